"""The diffusion maths of DDPM and DDIM as plain functions over tensors.

Notation (Ho et al. 2020): β_t the noise schedule, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s ("alphas_cumprod"),
x_0 the clean image, x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε the noisy one, ε ~ N(0, I).

The diffusers-shaped classes in ``ddpm.schedulers`` only look values up here and keep state.

Dtype policy (parity with diffusers decides, so it is written down per quantity):
- β and ᾱ are float32 and computed with float32 operations in diffusers' order (``torch.linspace`` in
  float32, ``torch.cumprod`` in float32). A float64 build differs by about 1e-6 relative at the end of a
  1000-step ᾱ, and DDIM's x_0 prediction divides by √ᾱ_t ≈ 0.006 there, so a float64 schedule alone
  would break 1e-5 parity of whole sampling loops. Only the cosine schedule is evaluated in float64
  (Python floats, as diffusers does) and then stored as float32.
- Per-step coefficients are also float32 results of diffusers' float32 expressions, computed once per
  schedule as vectors and handed out as Python floats (exact float32 values, so multiplying a tensor by
  them is the same float32 product; no 0-d tensor ops or host syncs per step). The per-element step
  maths keeps diffusers' operation order and never uses fused ``add(..., alpha=)`` (an FMA on CPU): each
  rounding then happens as in diffusers and fp32 sampling loops match it bit for bit. In-place ops only
  touch fresh temporaries; the step functions expect model_output and sample in one dtype (the
  schedulers cast both to their promoted dtype first).
- ``add_noise``/``velocity`` compute in ``promote(x.dtype, float32)``: float32 for fp16/bf16/fp32 inputs,
  float64 for float64 inputs, and return the inputs' dtype. diffusers instead casts ᾱ to fp16 before
  the square root, which loses precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
PredictionType = Literal["epsilon", "sample", "v_prediction"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]

BETA_SCHEDULES: tuple[BetaSchedule, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
VARIANCE_TYPES: tuple[VarianceType, ...] = (
    "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
PREDICTION_TYPES: tuple[PredictionType, ...] = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS: tuple[TimestepSpacing, ...] = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------------------------------------- β schedules

def cosine_betas(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule, Eq. 17 of Nichol & Dhariwal 2021: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2),
    β_t = min(1 − ᾱ(t+1)/ᾱ(t), max_beta). Python float64 maths, stored float32. Shape [T]."""
    def f(t: float) -> float:  # f(0) cancels in the ratio, as in the paper's implementation
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    T = num_train_timesteps
    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float32)


def exp_betas(num_train_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """β_t from ᾱ(t) = exp(−12 t), discretised as ``cosine_betas`` does (HeunDiscreteScheduler's "exp" schedule in
    diffusers). Python float64 maths, stored float32. Shape [T]."""
    T = num_train_timesteps
    return torch.tensor([min(1 - math.exp(-12 * (i + 1) / T) / math.exp(-12 * i / T), max_beta) for i in range(T)],
                        dtype=torch.float32)


def make_betas(schedule: BetaSchedule | Literal["exp"], num_train_timesteps: int, beta_start: float,
               beta_end: float, trained_betas: Sequence[float] | None = None) -> Tensor:
    """β_1..β_T as a float32 tensor of shape [T]; ``trained_betas`` overrides the schedule."""
    T = num_train_timesteps
    if trained_betas is not None:
        return torch.tensor(list(trained_betas), dtype=torch.float32)
    if schedule == "exp":  # only HeunDiscreteScheduler offers it
        return exp_betas(T)
    if schedule == "linear":  # Ho et al. 2020, Sec. 4: β linear from 1e-4 to 0.02
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if schedule == "scaled_linear":  # latent diffusion: linear in √β
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        return cosine_betas(T)
    if schedule == "sigmoid":  # GeoDiff (Xu et al. 2022): β = σ(linspace(−6, 6)) rescaled to [beta_start, beta_end]
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float32)) * (beta_end - beta_start) + beta_start
    raise ValueError(f"beta_schedule={schedule!r} is not supported; choose one of {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Algorithm 1 of Lin et al. 2023: shift and scale √ᾱ so that √ᾱ_T = 0 (zero terminal SNR) while √ᾱ_1
    keeps its value, then convert back to β. float32 in, float32 out (diffusers' precision)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])  # undo the cumulative product
    return 1 - alphas


def alphas_cumprod(betas: Tensor) -> Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s) (Ho et al. 2020, above Eq. 4), float32 cumprod like diffusers. Shape [T]."""
    return torch.cumprod(1.0 - betas, dim=0)


# ---------------------------------------------------------------------------------------------- timesteps

def inference_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: TimestepSpacing,
                        steps_offset: int = 0) -> list[int]:
    """Descending integer timesteps for sampling with fewer steps (Table 2 of Lin et al. 2023).

    leading: 0, k, 2k, … (k = T // n) plus ``steps_offset``; trailing: T − 1 down in steps of T/n;
    linspace: n points rounded from [0, T − 1]. Values and rounding match diffusers (numpy's round half
    to even), except that trailing never returns more than n steps (see below).
    """
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "leading":
        ts = (np.arange(n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        # np.arange with the float step -T/n sometimes yields n + 1 values (T=1000, n=61: 62, the last
        # one -1); diffusers keeps that spurious step, we keep the first n, which are identical.
        ts = (np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1)[:n]
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not supported; choose one of {', '.join(TIMESTEP_SPACINGS)}")
    return [int(t) for t in ts]


# ---------------------------------------------------------------------------------------------- forward process

def _gather(table: Tensor, timesteps: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
    # table[t] per sample, as [B, 1, ..., 1] to broadcast over a [B, C, H, W] batch; a gather, no host sync
    return table[timesteps.to(table.device)].to(dtype).reshape(-1, *([1] * (ndim - 1)))


def add_noise(alphas_cumprod: Tensor, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """q(x_t | x_0) sample, Eq. 4 of Ho et al. 2020: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε.

    x0, noise: [B, ...]; timesteps: [B] or a scalar, integers in [0, T); ``alphas_cumprod`` on x0's device.
    Computed in promote(dtype, float32), returned in the inputs' dtype.
    """
    out_dtype = torch.promote_types(x0.dtype, noise.dtype)
    dtype = torch.promote_types(out_dtype, torch.float32)
    ab = _gather(alphas_cumprod, timesteps, x0.ndim, dtype)
    return (ab**0.5 * x0.to(dtype) + (1 - ab) ** 0.5 * noise.to(dtype)).to(out_dtype)


def velocity(alphas_cumprod: Tensor, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """v-prediction target, Sec. 4 of Salimans & Ho 2022: v = √ᾱ_t ε − √(1 − ᾱ_t) x_0. Dtypes as ``add_noise``."""
    out_dtype = torch.promote_types(x0.dtype, noise.dtype)
    dtype = torch.promote_types(out_dtype, torch.float32)
    ab = _gather(alphas_cumprod, timesteps, x0.ndim, dtype)
    return (ab**0.5 * noise.to(dtype) - (1 - ab) ** 0.5 * x0.to(dtype)).to(out_dtype)


# ---------------------------------------------------------------------------------------------- reverse process

def predict_x0(prediction_type: PredictionType, model_output: Tensor, sample: Tensor,
               sqrt_alpha_prod: float, sqrt_beta_prod: float) -> Tensor:
    """x_0 from the network output at x_t: ε-prediction inverts Eq. 4 (Ho et al. Eq. 15),
    v-prediction uses x_0 = √ᾱ x_t − √(1−ᾱ) v (Salimans & Ho 2022, Sec. 4), sample-prediction is x_0 itself."""
    if prediction_type == "epsilon":
        return torch.sub(sample, sqrt_beta_prod * model_output).div_(sqrt_alpha_prod)
    if prediction_type == "v_prediction":
        return (sqrt_alpha_prod * sample).sub_(sqrt_beta_prod * model_output)
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; choose one of {', '.join(PREDICTION_TYPES)}")


def predict_epsilon(prediction_type: PredictionType, model_output: Tensor, sample: Tensor, x0: Tensor,
                    sqrt_alpha_prod: float, sqrt_beta_prod: float) -> Tensor:
    """ε from the network output (DDIM needs it for the "direction pointing to x_t", Eq. 12 of Song et al.)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":  # ε = √ᾱ v + √(1−ᾱ) x_t
        return (sqrt_alpha_prod * model_output).add_(sqrt_beta_prod * sample)
    return eps_from_x0(sample, x0, sqrt_alpha_prod, sqrt_beta_prod)


def eps_from_x0(sample: Tensor, x0: Tensor, sqrt_alpha_prod: float, sqrt_beta_prod: float) -> Tensor:
    """Invert Eq. 4 for ε: ε = (x_t − √ᾱ x_0) / √(1 − ᾱ)."""
    return torch.sub(sample, sqrt_alpha_prod * x0).div_(sqrt_beta_prod)


def dynamic_threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Dynamic thresholding, Sec. 2.3 of Saharia et al. 2022 (Imagen): per sample, s = the ``ratio`` quantile of
    |x_0|, clamped to [1, max_value]; x_0 ← clamp(x_0, −s, s) / s. Computed in float32 at least (quantile needs
    it), returned in x0's dtype. x0: [B, ...]."""
    flat = x0.reshape(x0.shape[0], -1)  # [B, C*H*W]
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)  # [B, 1]
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


# ---------------------------------------------------------------------------------------------- DDPM step

class DDPMCoefficients(NamedTuple):
    """Per-step constants of the DDPM reverse step t → prev (prev = −1 means "x_0"), float32 values."""
    sqrt_alpha_prod: float   # √ᾱ_t
    sqrt_beta_prod: float    # √(1 − ᾱ_t)
    x0_coeff: float          # √ᾱ_prev β_t / (1 − ᾱ_t), Eq. 7 of Ho et al.
    xt_coeff: float          # √α_t (1 − ᾱ_prev) / (1 − ᾱ_t), Eq. 7
    std: float               # σ_t of the fixed variance types (NaN for the learned ones)
    min_log: float           # log β̃_t (posterior variance, Eq. 7), for learned_range
    max_log: float           # log β_t, for learned_range


def ddpm_coefficients(alphas_cumprod: Tensor, timesteps: Sequence[int], prev_timesteps: Sequence[int],
                      variance_type: VarianceType) -> list[DDPMCoefficients]:
    """Coefficients of the steps t_i → prev_i, evaluated with diffusers' float32 expressions as vectors.

    With skipped steps, β_t is the effective 1 − ᾱ_t/ᾱ_prev and ᾱ_prev = 1 past the last step.
    """
    ac = alphas_cumprod.float()
    t = torch.tensor(list(timesteps), dtype=torch.long)
    prev = torch.tensor(list(prev_timesteps), dtype=torch.long)
    a_t = ac[t]
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.ones_like(a_t))
    b_t, b_prev = 1 - a_t, 1 - a_prev
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    # posterior q(x_prev | x_t, x_0) = N(x0_coeff x_0 + xt_coeff x_t, β̃_t), Eqs. 6-7 of Ho et al. 2020
    x0_coeff = (a_prev**0.5 * beta_t) / b_t
    xt_coeff = alpha_t**0.5 * b_prev / b_t
    posterior_var = torch.clamp(b_prev / b_t * beta_t, min=1e-20)  # clamped: its log is taken below
    std = {  # σ_t for the fixed variance choices of Ho et al. Sec. 3.2 (σ² = β̃_t or σ² = β_t)
        "fixed_small": posterior_var**0.5,
        "fixed_small_log": torch.exp(0.5 * torch.log(posterior_var)),
        "fixed_large": beta_t**0.5,
        # GLIDE's "max_log": log σ² = log β_t, so σ = exp(log(β_t)/2) = √β_t. diffusers takes √(log β_t) here,
        # which is NaN (their issue #14569); this is the intended value.
        "fixed_large_log": torch.exp(0.5 * torch.log(beta_t)),
    }.get(variance_type, torch.full_like(beta_t, math.nan))
    columns = (a_t**0.5, b_t**0.5, x0_coeff, xt_coeff, std, torch.log(posterior_var), torch.log(beta_t))
    return [DDPMCoefficients(*row) for row in zip(*(c.tolist() for c in columns))]


def ddpm_learned_std(variance_type: VarianceType, predicted: Tensor, c: DDPMCoefficients) -> Tensor:
    """σ_t from the network's variance channels (Nichol & Dhariwal 2021, Eq. 15 for learned_range:
    log σ² = v log β_t + (1 − v) log β̃_t with v = (output + 1)/2; "learned" outputs σ² itself)."""
    if variance_type == "learned":
        return predicted**0.5
    frac = (predicted + 1) / 2
    return torch.exp(0.5 * (frac * c.max_log + (1 - frac) * c.min_log))


def ddpm_mean(x0: Tensor, sample: Tensor, c: DDPMCoefficients) -> Tensor:
    """Posterior mean μ̃_t(x_t, x_0) = x0_coeff x_0 + xt_coeff x_t, Eq. 7 of Ho et al. 2020."""
    return (c.x0_coeff * x0).add_(c.xt_coeff * sample)


# ---------------------------------------------------------------------------------------------- DDIM step

class DDIMCoefficients(NamedTuple):
    """Per-step constants of the DDIM step t → prev for one η, float32 values."""
    sqrt_alpha_prod: float       # √ᾱ_t
    sqrt_beta_prod: float        # √(1 − ᾱ_t)
    sqrt_alpha_prod_prev: float  # √ᾱ_prev
    direction_coeff: float       # √(1 − ᾱ_prev − σ_t²), Eq. 12 of Song et al. 2021
    std: float                   # σ_t(η), Eq. 16


def ddim_coefficients(alphas_cumprod: Tensor, timesteps: Sequence[int], prev_timesteps: Sequence[int],
                      final_alpha_cumprod: float, eta: float) -> list[DDIMCoefficients]:
    """Coefficients of DDIM steps t_i → prev_i (prev < 0 uses ``final_alpha_cumprod``), diffusers' float32
    expressions evaluated as vectors."""
    ac = alphas_cumprod.float()
    t = torch.tensor(list(timesteps), dtype=torch.long)
    prev = torch.tensor(list(prev_timesteps), dtype=torch.long)
    a_t = ac[t]
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.full_like(a_t, final_alpha_cumprod))
    b_t, b_prev = 1 - a_t, 1 - a_prev
    # σ_t(η) = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev), Eq. 16 of Song et al. 2021
    std = eta * ((b_prev / b_t) * (1 - a_t / a_prev)) ** 0.5
    direction = (1 - a_prev - std**2) ** 0.5
    columns = (a_t**0.5, b_t**0.5, a_prev**0.5, direction, std)
    return [DDIMCoefficients(*row) for row in zip(*(c.tolist() for c in columns))]


def ddim_prev_sample(x0: Tensor, eps: Tensor, c: DDIMCoefficients) -> Tensor:
    """Eq. 12 of Song et al. 2021 without its noise term: x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev − σ²) ε̂."""
    return (c.sqrt_alpha_prod_prev * x0).add_(c.direction_coeff * eps)
