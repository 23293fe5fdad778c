"""EulerDiscreteScheduler: Euler's method on the probability-flow ODE in σ (Karras et al. 2022, Algorithm 2, with
optional "churn"); a diffusers-shaped wrapper over ``ddpm.solvers``.

Same constructor arguments, defaults and ``scheduler_config.json`` as diffusers 0.42.1. The model is fed
x/√(σ² + 1) (``scale_model_input``) and sampling starts from N(0, σ_max² I) (``init_noise_sigma``). Deliberate
differences from diffusers are listed in docs/parity.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import Tensor

from ddpm import schedule as S
from ddpm import solvers as V
from ddpm.schedulers.base import SchedulerOutput, SigmaScheduler, Timestep, config_arguments, output
from ddpm.schedulers.config import EulerDiscreteSchedulerConfig, FinalSigmas, check_custom, check_steps
from ddpm.schedulers.noise import Generator, draw_noise

logger = logging.getLogger(__name__)


class EulerDiscreteScheduler(SigmaScheduler):
    """First-order ODE sampler on σ (Karras et al. 2022); ``use_karras_sigmas`` spaces the σ by their Eq. 5.
    ``step``'s ``s_churn`` > 0 adds noise to raise σ to σ̂ = σ (1 + γ) first (their Algorithm 2)."""

    config_class = EulerDiscreteSchedulerConfig
    default_num_inference_steps = 50  # first order: diffusers' pipelines default to 50 steps with it
    unlisted_is_last = False
    variance_preserving = False
    config: EulerDiscreteSchedulerConfig

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "linear",
                 trained_betas: Sequence[float] | np.ndarray | Tensor | None = None,
                 prediction_type: S.PredictionType = "epsilon",
                 interpolation_type: Literal["linear", "log_linear"] = "linear", use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 sigma_min: float | None = None, sigma_max: float | None = None,
                 timestep_spacing: S.TimestepSpacing = "linspace",
                 timestep_type: Literal["discrete", "continuous"] = "discrete", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, final_sigmas_type: FinalSigmas = "zero",
                 **metadata: Any) -> None:
        self._build_betas(EulerDiscreteSchedulerConfig(**config_arguments(locals())), metadata, zero_snr_floor=True)
        self._train_sigmas = V.vp_sigmas(self.alphas_cumprod)  # σ of each training timestep, float32 [T]
        self.num_inference_steps = None
        full = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].astype(np.float32)
        self._set_sigmas(full, np.concatenate([self._train_sigmas[::-1], [0.0]]).astype(np.float32), None)
        self.is_scale_input_called = False

    def _set_sigmas(self, timesteps: np.ndarray, sigmas: np.ndarray, device: str | torch.device | None) -> None:
        if self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction":
            # the model takes t = ¼ log σ (continuous-time models, Karras et al. 2022, Table 1 "c_noise")
            timesteps = (0.25 * torch.from_numpy(sigmas[:-1]).log()).numpy()
        self._set_schedule(timesteps, sigmas, device, torch.float32)
        self._levels = V.noise_levels(self.sigmas)

    @property
    def init_noise_sigma(self) -> Tensor:
        """σ_max for linspace/trailing spacing, √(σ_max² + 1) for leading: the start x ~ N(0, init_noise_sigma² I).
        A 0-d float32 CPU tensor, as in diffusers."""
        max_sigma = self.sigmas.max()
        return max_sigma if self.config.timestep_spacing in ("linspace", "trailing") else (max_sigma**2 + 1) ** 0.5

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[float] | None = None, sigmas: Sequence[float] | None = None) -> None:
        """Choose the schedule: ``num_inference_steps`` (spaced by ``config.timestep_spacing``, or Karras or
        exponential σ), or explicit descending ``timesteps``, or explicit ``sigmas`` (n + 1 values, the last
        one the final σ). Exactly one of the three."""
        c, T = self.config, self.num_train_timesteps
        if sum(x is not None for x in (num_inference_steps, timesteps, sigmas)) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps and sigmas")
        custom_t, custom_s = check_custom(timesteps, "timesteps"), check_custom(sigmas, "sigmas")
        if custom_t is not None and (c.use_karras_sigmas or c.use_exponential_sigmas):
            raise ValueError("custom timesteps cannot be used with use_karras_sigmas or use_exponential_sigmas")
        if custom_t is not None and c.timestep_type == "continuous" and c.prediction_type == "v_prediction":
            raise ValueError("custom timesteps cannot be used with timestep_type='continuous' and v_prediction")
        log_sigmas = np.log(self._train_sigmas)
        if custom_s is not None:
            if len(custom_s) < 2:
                raise ValueError("sigmas needs at least two values (the last is the final σ)")
            all_sigmas = np.array(custom_s).astype(np.float32)
            self.num_inference_steps = len(custom_s) - 1
            self._set_sigmas(V.sigma_to_t(all_sigmas[:-1], log_sigmas).astype(np.float32), all_sigmas, device)
            return
        if custom_t is not None:
            ts: np.ndarray = np.array(custom_t).astype(np.float32)
            n = len(ts)
        else:
            n = check_steps(num_inference_steps, T)
            ts = V.karras_family_timesteps(T, n, c.timestep_spacing, c.steps_offset)
        if c.interpolation_type == "linear":
            sig = np.interp(ts, np.arange(0, len(self._train_sigmas)), self._train_sigmas)
        else:  # log-linear: n + 1 σ evenly spaced in log σ over the training range (diffusers' choice)
            sig = torch.linspace(np.log(self._train_sigmas[-1]), np.log(self._train_sigmas[0]), n + 1).exp().numpy()
        if c.use_karras_sigmas or c.use_exponential_sigmas:
            sigma_min = c.sigma_min if c.sigma_min is not None else float(sig[-1])
            sigma_max = c.sigma_max if c.sigma_max is not None else float(sig[0])
            sig = (V.karras_sigmas if c.use_karras_sigmas else V.exponential_sigmas)(sigma_min, sigma_max, n)
            ts = V.sigma_to_t(sig, log_sigmas)
        last = float(self._train_sigmas[0]) if c.final_sigmas_type == "sigma_min" else 0.0
        self.num_inference_steps = n
        self._set_sigmas(ts.astype(np.float32), np.concatenate([sig, [last]]).astype(np.float32), device)

    def scale_model_input(self, sample: Tensor, timestep: Timestep) -> Tensor:
        """x/√(σ² + 1): the VP-trained model expects unit-variance-scaled inputs (Karras et al. 2022, Table 1)."""
        i = self._init_step_index(timestep)
        self.is_scale_input_called = True
        return sample / self._levels[i].input_scale

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator: Generator = None,
             return_dict: Literal[True] = True) -> SchedulerOutput: ...

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator: Generator = None,
             *, return_dict: Literal[False]) -> tuple[Tensor, ...]: ...

    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, generator: Generator = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[Tensor, ...]:
        """One Euler step σ_i → σ_{i+1}. model_output, sample: [B, C, H, W]; ``timestep`` one of
        ``self.timesteps`` (a float). With ``s_churn`` > 0 and s_tmin ≤ σ ≤ s_tmax, noise from ``generator``
        first raises σ to σ̂ = σ (1 + γ), γ = min(s_churn/n, √2 − 1). Returns x_{i+1} and D(x; σ)."""
        if isinstance(timestep, int) or (isinstance(timestep, Tensor) and not timestep.is_floating_point()):
            raise ValueError("EulerDiscreteScheduler.step takes one of scheduler.timesteps (a float), not an "
                             "integer index from enumerate(timesteps)")
        if not self.is_scale_input_called:
            logger.warning("scale_model_input was not called before step: the model saw an unscaled input")
        i = self._init_step_index(timestep)  # (before set_timesteps, the schedule is every training timestep)
        if i >= len(self._timestep_values):
            raise ValueError("all steps are done: call set_timesteps to sample again")
        level = self._levels[i]
        x = sample.to(torch.float32)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= level.sigma <= s_tmax else 0.0
        sigma_hat = float(np.float32(level.sigma) * np.float32(gamma + 1))  # float32, as diffusers
        if gamma > 0:  # Algorithm 2 of Karras et al.: x̂ = x + √(σ̂² − σ²) ε
            eps = draw_noise(model_output.shape, generator, model_output.device, model_output.dtype) * s_noise
            x = x + eps * float(np.sqrt(np.float32(sigma_hat) ** 2 - np.float32(level.sigma) ** 2))
        denoised = V.karras_denoised(self.config.prediction_type, model_output, x, level, sigma_hat)
        dt = float(np.float32(self._levels[i + 1].sigma) - np.float32(sigma_hat))
        prev = V.euler_update(x, V.ode_derivative(x, denoised, sigma_hat), dt).to(model_output.dtype)
        self._step_index = i + 1
        return output(prev, denoised, return_dict)
