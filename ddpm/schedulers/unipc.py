"""UniPCMultistepScheduler: the unified predictor-corrector of Zhao et al. 2023 (UniP-p then UniC-p), orders 1-3;
a diffusers-shaped wrapper over ``ddpm.solvers``.

Same constructor arguments, defaults and ``scheduler_config.json`` as diffusers 0.42.1. The class keeps only the
step index, the last ``solver_order`` converted model outputs and the sample the corrector starts from.
Deliberate differences from diffusers are listed in docs/parity.md.
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
from ddpm.schedulers.config import FinalSigmas, UniPCMultistepSchedulerConfig, check_steps
from ddpm.schedulers.noise import Generator


class UniPCMultistepScheduler(SigmaScheduler):
    """UniPC: each step first corrects the previous prediction with the new model output (UniC, no extra model
    call), then predicts the next point (UniP). ``solver_type`` "bh1" (B(h) = h, recommended below 10 steps) or
    "bh2" (B(h) = e^h − 1); ``disable_corrector`` lists step indices whose correction is skipped."""

    config_class = UniPCMultistepSchedulerConfig
    default_num_inference_steps = 20  # as DPM-Solver++: UniPC is at least as good per step (Zhao et al. 2023)
    unlisted_is_last = True
    variance_preserving = True
    init_noise_sigma = 1.0  # x_T ~ N(0, I)
    config: UniPCMultistepSchedulerConfig

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"] = "linear",
                 trained_betas: Sequence[float] | np.ndarray | Tensor | None = None, solver_order: int = 2,
                 prediction_type: S.PredictionType = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0, predict_x0: bool = True,
                 solver_type: V.UniPCSolverType = "bh2", lower_order_final: bool = True,
                 disable_corrector: Sequence[int] = (), solver_p: None = None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, use_flow_sigmas: bool = False,
                 flow_shift: float = 1.0, timestep_spacing: S.TimestepSpacing = "linspace", steps_offset: int = 0,
                 final_sigmas_type: FinalSigmas = "zero", rescale_betas_zero_snr: bool = False,
                 use_dynamic_shifting: bool = False, time_shift_type: Literal["exponential"] = "exponential",
                 sigma_min: float | None = None, sigma_max: float | None = None,
                 shift_terminal: float | None = None, **metadata: Any) -> None:
        arguments = config_arguments(locals())
        arguments["disable_corrector"] = tuple(disable_corrector)
        self._build_betas(UniPCMultistepSchedulerConfig(**arguments), metadata, zero_snr_floor=True)
        self._train_sigmas = V.vp_sigmas(self.alphas_cumprod)  # σ of each training timestep, float32 [T]
        self.num_inference_steps = None
        full = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self._set_schedule(full, self._train_sigmas, None, torch.float32)
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[Tensor | None] = [None] * self.config.solver_order  # oldest first
        self.lower_order_nums = 0  # steps taken so far, up to solver_order (the multistep warm-up)
        self.last_sample: Tensor | None = None  # x at the previous step: where the corrector starts
        self.this_order = 0  # order of the previous prediction, which its correction matches

    def set_timesteps(self, num_inference_steps: int | None = None,
                      device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` timesteps spaced by ``config.timestep_spacing`` (or Karras or
        exponential noise levels). Resets the history."""
        c, T = self.config, self.num_train_timesteps
        if num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps")
        n = check_steps(num_inference_steps, T)
        ts: np.ndarray = V.solver_timesteps(T, n, c.timestep_spacing, c.steps_offset)
        log_sigmas = np.log(self._train_sigmas)
        sigma_min = c.sigma_min if c.sigma_min is not None else float(self._train_sigmas[0])
        sigma_max = c.sigma_max if c.sigma_max is not None else float(self._train_sigmas[-1])
        if c.use_karras_sigmas or c.use_exponential_sigmas:
            sigmas = (V.karras_sigmas if c.use_karras_sigmas else V.exponential_sigmas)(sigma_min, sigma_max, n)
            ts = V.sigma_to_t(sigmas, log_sigmas)
            ts = ts.round() if c.use_karras_sigmas else ts
            last = sigmas[-1] if c.final_sigmas_type == "sigma_min" else 0.0
        else:
            sigmas = np.interp(ts, np.arange(0, len(self._train_sigmas)), self._train_sigmas)
            last = float(self._train_sigmas[0]) if c.final_sigmas_type == "sigma_min" else 0.0
        self._set_schedule(ts, np.concatenate([sigmas, [last]]).astype(np.float32), device, torch.int64)
        self.num_inference_steps = len(ts)
        self._reset_history()
        self._points = list(zip(*(v.tolist() for v in V.alpha_sigma_lambda(self.sigmas)[:2])))  # (α_t, σ_t)
        self._steps = {k: V.unipc_coefficients(self.sigmas, k, c.solver_type, c.predict_x0)
                       for k in range(1, c.solver_order + 1)}

    def convert_model_output(self, model_output: Tensor, sample: Tensor) -> Tensor:
        """The model output at the current step as the data prediction x_θ (``predict_x0``, thresholded if
        configured) or the noise prediction ε_θ."""
        if self._step_index is None:
            raise ValueError("convert_model_output needs the current step: call step (or set_begin_index) first")
        c = self.config
        alpha_t, sigma_t = self._points[self._step_index]
        if c.predict_x0:
            x0 = V.to_data_prediction(c.prediction_type, model_output, sample, alpha_t, sigma_t)
            return S.dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value) if c.thresholding else x0
        return V.to_noise_prediction(c.prediction_type, model_output, sample, alpha_t, sigma_t)

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None,
             return_dict: Literal[True] = True) -> SchedulerOutput: ...

    @overload
    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None, *,
             return_dict: Literal[False]) -> tuple[Tensor, ...]: ...

    def step(self, model_output: Tensor, timestep: Timestep, sample: Tensor, generator: Generator = None,
             return_dict: bool = True) -> SchedulerOutput | tuple[Tensor, ...]:
        """Correct x_s with the new model output (UniC), then predict the next x (UniP). model_output, sample:
        [B, C, H, W]. ``generator`` is accepted so every scheduler steps with one signature; UniPC draws no noise."""
        n = self._check_ready()
        i = self._init_step_index(timestep)
        if i >= n:
            raise ValueError(f"all {n} steps are done: call set_timesteps to sample again")
        c = self.config
        use_corrector = i > 0 and i - 1 not in c.disable_corrector and self.last_sample is not None
        m = self.convert_model_output(model_output, sample)
        if use_corrector:
            assert self.last_sample is not None
            history = [x for x in self.model_outputs if x is not None]
            sample = V.unipc_correct(self.last_sample, history, self._steps[self.this_order][i - 1],
                                     m).to(self.last_sample.dtype)
        self.model_outputs = self.model_outputs[1:] + [m]
        order = min(c.solver_order, n - i) if c.lower_order_final else c.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)  # the multistep warm-up
        self.last_sample = sample
        history = [x for x in self.model_outputs if x is not None]
        prev = V.unipc_predict(sample, history, self._steps[self.this_order][i]).to(sample.dtype)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self._step_index = i + 1
        return output(prev, None, return_dict)

    def scale_model_input(self, sample: Tensor, timestep: Timestep | None = None) -> Tensor:
        """Identity: the model sees x_t unscaled."""
        return sample
