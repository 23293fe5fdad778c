"""DDPMScheduler: ancestral sampling of Ho et al. 2020, a diffusers-shaped wrapper over ``ddpm.schedule``.

Same constructor arguments, defaults, methods and ``scheduler_config.json`` as diffusers 0.42.1. The per-step
coefficients of a schedule are computed once by ``set_timesteps`` and looked up by timestep (see ``AlphaScheduler``).
Deliberate differences from diffusers are listed in docs/parity.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import Tensor

from ddpm import schedule as S
from ddpm.schedulers.base import AlphaScheduler, SchedulerOutput, Timestep, common_dtype, config_arguments
from ddpm.schedulers.config import DDPMSchedulerConfig
from ddpm.schedulers.noise import Generator, draw_noise


class DDPMScheduler(AlphaScheduler):
    """Ancestral sampling of Ho et al. 2020 (Algorithm 2), with diffusers' options. ``step`` turns the model
    output at x_t into x_{t-1} ~ N(μ̃_t, σ_t²) (Eqs. 6-7)."""

    config_class = DDPMSchedulerConfig
    default_num_inference_steps = None  # the full chain, num_train_timesteps steps (DDPMPipeline's 1000)
    config: DDPMSchedulerConfig

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: S.BetaSchedule = "linear",
                 trained_betas: Sequence[float] | np.ndarray | Tensor | None = None,
                 variance_type: S.VarianceType = "fixed_small", clip_sample: bool = True,
                 prediction_type: S.PredictionType = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: S.TimestepSpacing = "leading",
                 steps_offset: int = 0, rescale_betas_zero_snr: bool = False, **metadata: Any) -> None:
        self._setup(DDPMSchedulerConfig(**config_arguments(locals())), metadata)
        self.variance_type = variance_type

    def _coefficients(self, t: int) -> S.DDPMCoefficients:
        table = self._coefficient_cache.get(None)
        if table is None:  # the whole schedule at once, t_i → t_{i+1} (or → x_0 after the last)
            ts = self._timesteps
            rows = S.ddpm_coefficients(self.alphas_cumprod, ts, ts[1:] + [-1], self.config.variance_type)
            table = self._coefficient_cache[None] = dict(zip(ts, rows))
        if t not in table:
            raise ValueError(f"timestep={t} is not one of this scheduler's timesteps (set by set_timesteps)")
        return table[t]

    def _get_variance(self, t: int) -> Tensor:
        """σ_t² of the fixed variance types for the step from ``t`` (β̃_t of Eq. 7 of Ho et al., or β_t), a 0-d
        float32 tensor; diffusers' private method of that name, which some user code calls."""
        if self.config.variance_type in ("learned", "learned_range"):
            raise ValueError(f"variance_type={self.config.variance_type!r}: the variance comes from the model output")
        return torch.tensor(self._coefficients(int(t)).std, dtype=torch.float32) ** 2

    def previous_timestep(self, timestep: Timestep) -> Timestep:
        """The timestep after ``timestep`` in the schedule, −1 after the last (an int, or a tensor for a tensor)."""
        prev = self._next_listed(self._timestep_int(timestep))
        return torch.tensor(prev, device=timestep.device) if isinstance(timestep, Tensor) else prev

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None,
             return_dict: Literal[True] = True) -> SchedulerOutput: ...

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None, *,
             return_dict: Literal[False]) -> tuple[Tensor, Tensor]: ...

    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[Tensor, Tensor]:
        """One reverse step x_t → x_{t-1}. model_output: [B, C, H, W] (or [B, 2C, H, W] with the variance
        channels for learned/learned_range); sample: x_t [B, C, H, W]. Noise is drawn from ``generator``
        only for t > 0, as diffusers draws it."""
        t = self._timestep_int(timestep)
        c = self._coefficients(t)
        vt = self.config.variance_type
        noise_dtype = model_output.dtype  # diffusers draws the noise in the model's dtype
        model_output, sample = common_dtype(model_output, sample)
        predicted_variance = None
        if vt in ("learned", "learned_range"):
            if model_output.shape[1] != 2 * sample.shape[1]:
                raise ValueError(f"variance_type={vt!r} needs model_output with 2x the sample's channels "
                                 f"({2 * sample.shape[1]}), got {model_output.shape[1]}")
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        x0 = S.predict_x0(self.config.prediction_type, model_output, sample, c.sqrt_alpha_prod, c.sqrt_beta_prod)
        x0 = self._clip(x0, model_output)
        prev = S.ddpm_mean(x0, sample, c)
        if t > 0:
            noise = draw_noise(model_output.shape, generator, model_output.device, noise_dtype)
            if predicted_variance is None:
                prev.add_(noise.mul_(c.std))  # x_{t-1} = μ̃_t + σ_t z, Algorithm 2 of Ho et al.
            else:
                prev.add_(S.ddpm_learned_std(vt, predicted_variance, c) * noise)
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)
