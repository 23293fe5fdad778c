"""HeunDiscreteScheduler: Heun's second-order method on the probability-flow ODE in σ (Karras et al. 2022,
Algorithm 1); a diffusers-shaped wrapper over ``ddpm.solvers``.

Same constructor arguments, defaults (note beta_start=0.00085, beta_end=0.012, Stable Diffusion's) and
``scheduler_config.json`` as diffusers 0.42.1. Each step takes two model calls, so ``timesteps`` lists every
inner timestep twice (``order = 2``); the last step, to σ = 0, is a plain Euler step. Deliberate differences from
diffusers are listed in docs/parity.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import Tensor

from ddpm import schedule as S
from ddpm import solvers as V
from ddpm.schedulers.base import SchedulerOutput, SigmaScheduler, Timestep, config_arguments, output
from ddpm.schedulers.config import HeunDiscreteSchedulerConfig, check_custom, check_steps
from ddpm.schedulers.noise import Generator


class HeunDiscreteScheduler(SigmaScheduler):
    """Second-order ODE sampler on σ (Karras et al. 2022): an Euler step to σ_{i+1}, then a correction with the
    average of the slopes at both ends. ``use_karras_sigmas`` spaces the σ by their Eq. 5."""

    config_class = HeunDiscreteSchedulerConfig
    order = 2  # two model calls per step
    default_num_inference_steps = 25  # 49 model calls, as many as a 50-step first-order sampler
    unlisted_is_last = False
    variance_preserving = False
    config: HeunDiscreteSchedulerConfig

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "exp"] = "linear",
                 trained_betas: Sequence[float] | np.ndarray | Tensor | None = None,
                 prediction_type: S.PredictionType = "epsilon", use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, clip_sample: bool = False,
                 clip_sample_range: float = 1.0, timestep_spacing: S.TimestepSpacing = "linspace",
                 steps_offset: int = 0, **metadata: Any) -> None:
        self._build_betas(HeunDiscreteSchedulerConfig(**config_arguments(locals())), metadata, zero_snr_floor=False)
        self._train_sigmas = V.vp_sigmas(self.alphas_cumprod)  # σ of each training timestep, float32 [T]
        self.set_timesteps(num_train_timesteps)  # as diffusers: usable before set_timesteps, with every timestep

    @property
    def init_noise_sigma(self) -> Tensor:
        """σ_max for linspace/trailing spacing, √(σ_max² + 1) for leading: the start x ~ N(0, init_noise_sigma² I).
        A 0-d float32 CPU tensor, as in diffusers."""
        max_sigma = self.sigmas.max()
        return max_sigma if self.config.timestep_spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5

    @property
    def state_in_first_order(self) -> bool:
        """True before the Euler half of a step, False before its correction."""
        return self.dt is None

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      num_train_timesteps: int | None = None, timesteps: Sequence[float] | None = None) -> None:
        """Choose ``num_inference_steps`` timesteps spaced by ``config.timestep_spacing`` over
        ``num_train_timesteps`` (default: the config's), or Karras or exponential σ, or explicit descending
        ``timesteps``. Inner timesteps are listed twice, one per model call."""
        c = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        custom = check_custom(timesteps, "timesteps")
        if custom is not None and (c.use_karras_sigmas or c.use_exponential_sigmas):
            raise ValueError("custom timesteps cannot be used with use_karras_sigmas or use_exponential_sigmas")
        T = num_train_timesteps or self.num_train_timesteps
        if custom is not None:
            ts: np.ndarray = np.array(custom, dtype=np.float32)
            n = len(ts)
        else:
            n = check_steps(num_inference_steps, T)
            ts = V.karras_family_timesteps(T, n, c.timestep_spacing, c.steps_offset)
        log_sigmas = np.log(self._train_sigmas)
        sig = np.interp(ts, np.arange(0, len(self._train_sigmas)), self._train_sigmas)
        if c.use_karras_sigmas or c.use_exponential_sigmas:
            sig = (V.karras_sigmas if c.use_karras_sigmas else V.exponential_sigmas)(float(sig[-1]), float(sig[0]), n)
            ts = V.sigma_to_t(sig, log_sigmas)
        sig = np.concatenate([sig, [0.0]]).astype(np.float32)
        # σ_0, then each inner σ twice (end of one step, start of the next), then the final σ = 0
        sigmas = np.concatenate([sig[:1], sig[1:-1].repeat(2), sig[-1:]])
        self._set_schedule(np.concatenate([ts[:1], ts[1:].repeat(2)]).astype(np.float32), sigmas, device,
                           torch.float32)
        self._levels = V.noise_levels(self.sigmas)
        self.num_inference_steps = n
        self.prev_derivative: Tensor | None = None  # the first half's slope, d_i
        self.dt: float | None = None  # σ_{i+1} − σ_i of the step under way
        self.sample: Tensor | None = None  # x_i, where the correction restarts

    def scale_model_input(self, sample: Tensor, timestep: Timestep) -> Tensor:
        """x/√(σ² + 1): the VP-trained model expects unit-variance-scaled inputs (Karras et al. 2022, Table 1)."""
        return sample / self._levels[self._init_step_index(timestep)].input_scale

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None,
             return_dict: Literal[True] = True) -> SchedulerOutput: ...

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None, *,
             return_dict: Literal[False]) -> tuple[Tensor, ...]: ...

    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[Tensor, ...]:
        """Half a Heun step: the Euler move to σ_{i+1} (first call), or its correction (second call). Returns the
        new x and D(x; σ). ``generator`` is accepted so every scheduler steps with one signature; Heun draws no
        noise."""
        self._check_ready()
        i = self._init_step_index(timestep)
        if i >= len(self._timestep_values):
            raise ValueError("all steps are done: call set_timesteps to sample again")
        level = self._levels[i]  # σ_i on the Euler half; σ_{i+1} (where the model was just called) on the correction
        denoised = V.karras_denoised(self.config.prediction_type, model_output, sample, level)
        if self.config.clip_sample:
            denoised = denoised.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        derivative = V.ode_derivative(sample, denoised, level.sigma)
        if self.dt is None:  # Euler to σ_{i+1}; keep d_i, the step and x_i for the correction
            dt = float(np.float32(self._levels[i + 1].sigma) - np.float32(level.sigma))
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:  # Heun: x_{i+1} = x_i + (σ_{i+1} − σ_i)(d_i + d')/2
            assert self.prev_derivative is not None and self.sample is not None
            derivative = (self.prev_derivative + derivative) / 2
            dt, sample = self.dt, self.sample
            self.prev_derivative, self.dt, self.sample = None, None, None
        prev = V.euler_update(sample, derivative, dt)
        self._step_index = i + 1
        return output(prev, denoised, return_dict)
