"""DDIMScheduler: denoising diffusion implicit models (Song et al. 2021), a diffusers-shaped wrapper over ``ddpm.schedule``.

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
from ddpm.schedulers.config import DDIMSchedulerConfig
from ddpm.schedulers.noise import Generator, draw_noise


class DDIMScheduler(AlphaScheduler):
    """Denoising diffusion implicit models (Song et al. 2021): ``step`` follows Eq. 12 with σ_t(η) of Eq. 16;
    η = 0 is deterministic, η = 1 is DDPM-like. Samples a 1000-step DDPM model in ~50 steps."""

    config_class = DDIMSchedulerConfig
    default_num_inference_steps = 50  # DDIMPipeline's default
    config: DDIMSchedulerConfig

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: S.BetaSchedule = "linear",
                 trained_betas: Sequence[float] | np.ndarray | Tensor | None = None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0,
                 prediction_type: S.PredictionType = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: S.TimestepSpacing = "leading",
                 rescale_betas_zero_snr: bool = False, **metadata: Any) -> None:
        self._setup(DDIMSchedulerConfig(**config_arguments(locals())), metadata)
        # ᾱ "before" the last step: 1 (a clean x_0) or ᾱ_0 (Sec. 4.2 of Song et al. leaves it open)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])

    def previous_timestep(self, timestep: Timestep) -> Timestep:
        """t − T // n for spaced schedules (as diffusers; for trailing/linspace this is not always the next
        listed timestep), the next listed one for custom timesteps; < 0 means the step to x_0."""
        t = self._timestep_int(timestep)
        if self.custom_timesteps:
            prev = self._next_listed(t)
        elif self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before stepping a DDIMScheduler")
        else:
            prev = t - self.num_train_timesteps // self.num_inference_steps
        return torch.tensor(prev, device=timestep.device) if isinstance(timestep, Tensor) else prev

    def _get_variance(self, timestep: int, prev_timestep: int) -> Tensor:
        """σ_t(η = 1)² = (1 − ᾱ_prev)/(1 − ᾱ_t) (1 − ᾱ_t/ᾱ_prev) (Eq. 16 of Song et al.), a 0-d float32 tensor;
        diffusers' private method of that name, which some user code calls."""
        row = S.ddim_coefficients(self.alphas_cumprod, [int(timestep)], [int(prev_timestep)],
                                  self.final_alpha_cumprod, 1.0)[0]
        return torch.tensor(row.std, dtype=torch.float32) ** 2

    def _coefficients(self, t: int, eta: float) -> S.DDIMCoefficients:
        table = self._coefficient_cache.get(eta)
        if table is None:  # the listed timesteps at once; others (rare) are added one by one
            ts = self._timesteps
            prevs = [int(self.previous_timestep(s)) for s in ts]
            rows = S.ddim_coefficients(self.alphas_cumprod, ts, prevs, self.final_alpha_cumprod, eta)
            table = self._coefficient_cache[eta] = dict(zip(ts, rows))
        if t not in table:
            if not 0 <= t < self.num_train_timesteps:
                raise ValueError(f"timestep={t} must lie in [0, num_train_timesteps={self.num_train_timesteps})")
            prev = int(self.previous_timestep(t))
            table[t] = S.ddim_coefficients(self.alphas_cumprod, [t], [prev], self.final_alpha_cumprod, eta)[0]
        return table[t]

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Generator = None,
             variance_noise: Tensor | None = None, return_dict: Literal[True] = True) -> SchedulerOutput: ...

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Generator = None,
             variance_noise: Tensor | None = None, *, return_dict: Literal[False]) -> tuple[Tensor, Tensor]: ...

    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: Generator = None,
             variance_noise: Tensor | None = None, return_dict: bool = True) -> SchedulerOutput | tuple[Tensor, Tensor]:
        """One DDIM step x_t → x_prev (Eq. 12 of Song et al.). model_output, sample: [B, C, H, W]. With
        ``use_clipped_model_output`` ε is re-derived from the clipped x̂_0 (as GLIDE does). For η > 0 the noise
        is ``variance_noise`` or drawn from ``generator`` (not both)."""
        if self.num_inference_steps is None and not self.custom_timesteps:
            raise ValueError("num_inference_steps is None: call set_timesteps before stepping a DDIMScheduler")
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        c = self._coefficients(self._timestep_int(timestep), float(eta))
        pt = self.config.prediction_type
        noise_dtype = model_output.dtype  # diffusers draws the noise in the model's dtype
        model_output, sample = common_dtype(model_output, sample)
        x0 = S.predict_x0(pt, model_output, sample, c.sqrt_alpha_prod, c.sqrt_beta_prod)
        eps = S.predict_epsilon(pt, model_output, sample, x0, c.sqrt_alpha_prod, c.sqrt_beta_prod)
        x0 = self._clip(x0, model_output)
        if use_clipped_model_output:
            eps = S.eps_from_x0(sample, x0, c.sqrt_alpha_prod, c.sqrt_beta_prod)
        prev = S.ddim_prev_sample(x0, eps, c)
        if eta > 0:
            if variance_noise is None:  # + σ_t z, Eq. 12 of Song et al.
                prev.add_(draw_noise(model_output.shape, generator, model_output.device, noise_dtype).mul_(c.std))
            else:
                prev.add_(c.std * variance_noise)
        return SchedulerOutput(prev, x0) if return_dict else (prev, x0)
