"""DPMSolverMultistepScheduler: DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b), multistep,
orders 1-3, ODE and SDE variants; a diffusers-shaped wrapper over ``ddpm.solvers``.

Same constructor arguments, defaults and ``scheduler_config.json`` as diffusers 0.42.1. The class keeps only the
step index and the last ``solver_order`` converted model outputs; ``set_timesteps`` builds the σ list and every
step's scalars. Deliberate differences from diffusers are listed in docs/parity.md.
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
from ddpm.schedulers.config import DPMSolverMultistepSchedulerConfig, FinalSigmas, check_custom, check_steps
from ddpm.schedulers.noise import Generator, draw_noise


class DPMSolverMultistepScheduler(SigmaScheduler):
    """Fast ODE/SDE solver for diffusion models: DPM-Solver++(2M) by default, about 20 steps for a DDPM model.

    ``algorithm_type``: "dpmsolver++" integrates the data prediction x_θ (best, Lu et al. 2022b), "dpmsolver" the
    noise prediction ε_θ (Lu et al. 2022a), "sde-dpmsolver++" / "sde-dpmsolver" add fresh noise each step (drawn
    from ``generator``, one per image for a list). ``solver_order`` 1 is DDIM; 2 ("midpoint" or "heun" form of
    the second-order term) and 3 use the previous outputs.
    """

    config_class = DPMSolverMultistepSchedulerConfig
    default_num_inference_steps = 20  # DPM-Solver++ samples well in 10-20 steps (Lu et al. 2022b)
    unlisted_is_last = True
    variance_preserving = True
    init_noise_sigma = 1.0  # x_T ~ N(0, I)
    config: DPMSolverMultistepSchedulerConfig

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "linear",
                 trained_betas: Sequence[float] | np.ndarray | Tensor | None = None, solver_order: int = 2,
                 prediction_type: S.PredictionType = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: V.DPMAlgorithm = "dpmsolver++", solver_type: V.DPMSolverType = "midpoint",
                 lower_order_final: bool = True, euler_at_final: bool = False, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, use_lu_lambdas: bool = False,
                 use_flow_sigmas: bool = False, flow_shift: float = 1.0, final_sigmas_type: FinalSigmas = "zero",
                 lambda_min_clipped: float = -float("inf"), variance_type: S.VarianceType | None = None,
                 timestep_spacing: S.TimestepSpacing = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: Literal["exponential"] = "exponential", **metadata: Any) -> None:
        config = DPMSolverMultistepSchedulerConfig(**config_arguments(locals()))
        self._build_betas(config, metadata, zero_snr_floor=True)
        self._train_sigmas = V.vp_sigmas(self.alphas_cumprod)  # σ of each training timestep, float32 [T]
        # λ_t of each training timestep (half log-SNR), for lambda_min_clipped
        self._train_lambdas = torch.log(self.alphas_cumprod.sqrt()) - torch.log((1 - self.alphas_cumprod).sqrt())
        self.num_inference_steps = None
        full = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self._set_schedule(full, self._train_sigmas, None, torch.float32)
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[Tensor | None] = [None] * self.config.solver_order  # oldest first
        self.lower_order_nums = 0  # steps taken so far, up to solver_order (the multistep warm-up)

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[int] | None = None) -> None:
        """Choose the schedule: ``num_inference_steps`` timesteps spaced by ``config.timestep_spacing`` (or Karras,
        exponential or uniform-λ noise levels), or an explicit descending list ``timesteps``. Resets the history."""
        c, T = self.config, self.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps and timesteps")
        log_sigmas = np.log(self._train_sigmas)
        custom = check_custom(timesteps, "timesteps")
        if custom is not None:
            if c.use_karras_sigmas or c.use_lu_lambdas or c.use_exponential_sigmas:
                raise ValueError("custom timesteps cannot be used with use_karras_sigmas, use_lu_lambdas or "
                                 "use_exponential_sigmas (those choose the timesteps themselves)")
            ts: np.ndarray = np.array(custom).astype(np.int64)
            if ts.min() < 0 or ts.max() >= T:
                raise ValueError(f"timesteps must lie in [0, num_train_timesteps={T}), got {ts.max()}..{ts.min()}")
            n = len(ts)
        else:
            n = check_steps(num_inference_steps, T)
            # λ_min clipping: skip the timesteps whose λ is below it (needed by the cosine schedule)
            clipped = int(torch.searchsorted(torch.flip(self._train_lambdas, [0]), c.lambda_min_clipped))
            ts = V.solver_timesteps(T, n, c.timestep_spacing, c.steps_offset, T - clipped)
        rounded = c.beta_schedule != "squaredcos_cap_v2"  # diffusers keeps the cosine schedule's fractional t
        sigma_min, sigma_max = float(self._train_sigmas[0]), float(self._train_sigmas[-1])
        if c.use_karras_sigmas:
            sigmas = V.karras_sigmas(sigma_min, sigma_max, n)
            ts = V.sigma_to_t(sigmas, log_sigmas)
            ts = ts.round() if rounded else ts
        elif c.use_lu_lambdas:
            sigmas = V.uniform_lambda_sigmas(float(log_sigmas[0]), float(log_sigmas[-1]), n)
            ts = V.sigma_to_t(sigmas, log_sigmas)
            ts = ts.round() if rounded else ts
        elif c.use_exponential_sigmas:
            sigmas = V.exponential_sigmas(sigma_min, sigma_max, n)
            ts = V.sigma_to_t(sigmas, log_sigmas)
        else:
            sigmas = np.interp(ts, np.arange(0, len(self._train_sigmas)), self._train_sigmas)
        last = sigma_min if c.final_sigmas_type == "sigma_min" else 0.0
        self._set_schedule(ts, np.concatenate([sigmas, [last]]).astype(np.float32), device, torch.int64)
        self.num_inference_steps = len(ts)
        self._reset_history()
        self._points = list(zip(*(v.tolist() for v in V.alpha_sigma_lambda(self.sigmas)[:2])))  # (α_t, σ_t)
        self._steps = {k: V.dpm_solver_coefficients(self.sigmas, k, c.algorithm_type, c.solver_type)
                       for k in range(1, c.solver_order + 1)}

    def convert_model_output(self, model_output: Tensor, sample: Tensor) -> Tensor:
        """The model output at the current step as what the solver integrates: the data prediction x_θ for the
        "++" algorithms (dynamically thresholded if configured), the noise prediction ε_θ otherwise."""
        c = self.config
        if c.variance_type in ("learned", "learned_range"):  # the variance channels are not used by the solver
            model_output = model_output[:, : sample.shape[1]]
        if self._step_index is None:
            raise ValueError("convert_model_output needs the current step: call step (or set_begin_index) first")
        alpha_t, sigma_t = self._points[self._step_index]
        if c.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            x0 = V.to_data_prediction(c.prediction_type, model_output, sample, alpha_t, sigma_t)
            return S.dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value) if c.thresholding else x0
        eps = V.to_noise_prediction(c.prediction_type, model_output, sample, alpha_t, sigma_t)
        if c.thresholding:  # threshold x̂_0 = (x − σ_t ε)/α_t, then turn it back into ε
            x0 = S.dynamic_threshold(V.to_data_prediction("epsilon", eps, sample, alpha_t, sigma_t),
                                     c.dynamic_thresholding_ratio, c.sample_max_value)
            eps = V.to_noise_prediction("sample", x0, sample, alpha_t, sigma_t)
        return eps

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None,
             variance_noise: Tensor | None = None, return_dict: Literal[True] = True) -> SchedulerOutput: ...

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None,
             variance_noise: Tensor | None = None, *, return_dict: Literal[False]) -> tuple[Tensor, ...]: ...

    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None,
             variance_noise: Tensor | None = None, return_dict: bool = True) -> SchedulerOutput | tuple[Tensor, ...]:
        """One multistep update x_s → x_t. model_output, sample: [B, C, H, W] (model_output [B, 2C, H, W] with
        learned variance). The SDE variants add ``variance_noise`` or noise drawn from ``generator``. Computed in
        float32, returned in the model output's dtype."""
        n = self._check_ready()
        i = self._init_step_index(timestep)
        if i >= n:
            raise ValueError(f"all {n} steps are done: call set_timesteps to sample again")
        c = self.config
        # lower orders at the end stabilise sampling below 15 steps (diffusers' rule); a zero final σ has λ = ∞
        lower_final = i == n - 1 and (c.euler_at_final or (c.lower_order_final and n < 15)
                                      or c.final_sigmas_type == "zero")
        lower_second = i == n - 2 and c.lower_order_final and n < 15
        m = self.convert_model_output(model_output, sample)
        self.model_outputs = self.model_outputs[1:] + [m]
        noise = None
        if c.algorithm_type.startswith("sde"):
            noise = (draw_noise(m.shape, generator, m.device, torch.float32) if variance_noise is None
                     else variance_noise.to(device=m.device, dtype=torch.float32))
        if c.solver_order == 1 or self.lower_order_nums < 1 or lower_final:
            order = 1
        elif c.solver_order == 2 or self.lower_order_nums < 2 or lower_second:
            order = 2
        else:
            order = 3
        history: list[Tensor] = [x for x in self.model_outputs if x is not None]
        prev = V.dpm_solver_update(sample.to(torch.float32), history, self._steps[order][i], noise).to(m.dtype)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index = i + 1
        return output(prev, None, return_dict)

    def scale_model_input(self, sample: Tensor, timestep: Timestep | None = None) -> Tensor:
        """Identity: the model sees x_t unscaled."""
        return sample
