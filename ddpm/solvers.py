"""The maths of the fast samplers (DPM-Solver, DPM-Solver++, UniPC, Euler, Heun) as plain functions.

All of them walk a decreasing list of noise levels σ_0 > σ_1 > … > σ_n (σ_n = 0 or a small σ_min) in the
parameterisation of Karras et al. 2022, x = x_0 + σ ε. A DDPM model x_t = α_t x_0 + σ_t ε, with α_t = √ᾱ_t and
σ_t = √(1 − ᾱ_t), maps onto it through σ = σ_t / α_t = √((1 − ᾱ_t)/ᾱ_t) (x scaled by 1/α_t). Back from σ:
α_t = 1/√(1 + σ²), σ_t = σ α_t, and the half log-SNR of Lu et al. 2022 is λ = log α_t − log σ_t = −log σ.

Each sampler is two functions over a precomputed schedule: its per-step scalars, computed for the whole schedule
when the timesteps are set (``*_coefficients``), and its update, a few elementwise tensor ops. The multistep
updates share one signature in the manner of k-diffusion's samplers,

    update(x, outputs, c, noise) -> x_next      outputs: the model's converted outputs so far, newest last,

so the diffusers-shaped classes in ``ddpm.schedulers`` only keep the step index and the history.

Dtype policy (parity with diffusers 0.42.1 decides, as in ``ddpm.schedule``):
- σ lists are built with diffusers' numpy/torch operations and stored as float32 (that is what their loops use).
- Per-step scalars are diffusers' float32 expressions, evaluated once per schedule as vectors and handed out as
  Python floats (exact float32 values, so ``c * tensor`` is the same float32 product). Vectorised ``exp``/``log``
  may differ from diffusers' 0-d evaluation by one ulp, so whole loops agree to ~1e-7, not always bit for bit.
- The updates keep diffusers' operation order and never fuse a multiply into an add.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, cast

import numpy as np
import torch
from torch import Tensor

from ddpm import schedule as S

TimestepSpacing = Literal["leading", "trailing", "linspace"]
DPMAlgorithm = Literal["dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"]
DPMSolverType = Literal["midpoint", "heun"]
UniPCSolverType = Literal["bh1", "bh2"]

DPM_ALGORITHMS: tuple[DPMAlgorithm, ...] = ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver")
DPM_SOLVER_TYPES: tuple[DPMSolverType, ...] = ("midpoint", "heun")
UNIPC_SOLVER_TYPES: tuple[UniPCSolverType, ...] = ("bh1", "bh2")


# ---------------------------------------------------------------------------------------------- noise levels

def vp_sigmas(alphas_cumprod: Tensor) -> np.ndarray:
    """σ = √((1 − ᾱ_t)/ᾱ_t) of every training timestep: float32 torch maths as diffusers, as a numpy array [T]."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()


def alpha_sigma_lambda(sigmas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(α_t, σ_t, λ_t) of VE noise levels σ: α_t = 1/√(σ² + 1), σ_t = σ α_t, λ_t = log α_t − log σ_t (the half
    log-SNR, Lu et al. 2022a, Sec. 3.1). float32 in and out; σ = 0 gives λ = +inf."""
    alpha = 1 / ((sigmas**2 + 1) ** 0.5)
    sigma_t = sigmas * alpha
    return alpha, sigma_t, torch.log(alpha) - torch.log(sigma_t)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Eq. 5 of Karras et al. 2022: σ_i = (σ_max^(1/ρ) + i/(n−1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i = 0..n−1.
    ρ = 7 spends more steps at low noise. float64 [n]."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """σ evenly spaced in log σ from σ_max down to σ_min (diffusers' ``use_exponential_sigmas``). float64 [n]."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def uniform_lambda_sigmas(log_sigma_min: float, log_sigma_max: float, n: int) -> np.ndarray:
    """σ with λ = −log σ evenly spaced ("uniform logSNR" step sizes, Lu et al. 2022a, Sec. 3.3); diffusers'
    ``use_lu_lambdas``, written as its ρ = 1 ramp. float64 [n]."""
    ramp = np.linspace(0, 1, n)
    return np.exp((log_sigma_max + ramp * (log_sigma_min - log_sigma_max)) ** 1.0)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each σ: t interpolated linearly in log σ between the two neighbouring
    training levels, clamped to [0, T − 1] (diffusers' rule). log_sigmas: float32 [T]. float64, shaped as sigmas."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    # the last training level at or below log σ (0 if none); the list need not be sorted (zero-SNR ends it
    # out of order), so this is a search from the end rather than a bisection
    below = log_sigmas[:, None] <= log_sigma  # [T, n]
    last = log_sigmas.shape[0] - 1 - np.argmax(below[::-1], axis=0)
    low_idx = np.clip(np.where(below.any(axis=0), last, 0), 0, log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * (low_idx + 1)


def solver_timesteps(num_train_timesteps: int, n: int, spacing: TimestepSpacing, steps_offset: int,
                     last_timestep: int | None = None) -> np.ndarray:
    """Integer timesteps of the multistep solvers (DPM-Solver, UniPC): n of n + 1 evenly spaced points, the last
    point (t = 0) being where the solver ends rather than a model call. ``last_timestep`` (default T) is one past
    the largest usable timestep. Values and rounding match diffusers; trailing never gives more than n (diffusers'
    ``np.arange`` sometimes appends a spurious timestep −1). int64 [≤ n], strictly descending.

    A solver step must lower σ (its step size is h = λ_t − λ_s > 0), so the points must be distinct timesteps. Near
    n = last − 1 linspace rounds two points to one timestep, and leading spacing's stride last // (n + 1) becomes 0;
    there the stride is at least 1, the points are kept below ``last`` and repeats are merged, so asking for more
    steps than there are timesteps runs every timestep once (n = last − 1's schedule). diffusers keeps the repeats
    and returns NaN (docs/parity.md)."""
    T = num_train_timesteps
    last = T if last_timestep is None else last_timestep
    if spacing == "trailing":
        return (np.arange(last, 0, -T / n).round().astype(np.int64) - 1)[:n]
    if spacing == "linspace":
        points = np.linspace(0, last - 1, n + 1).round()
    elif spacing == "leading":
        points = np.arange(0, n + 1) * max(last // (n + 1), 1) + steps_offset
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not supported; choose 'linspace', 'leading' or 'trailing'")
    points = np.minimum(points[::-1][:-1], last - 1).astype(np.int64)  # descending, without the end point t = 0
    return points[np.concatenate([[True], points[1:] < points[:-1]])]  # merge repeats


def karras_family_timesteps(num_train_timesteps: int, n: int, spacing: TimestepSpacing,
                            steps_offset: int) -> np.ndarray:
    """Timesteps of EulerDiscrete and HeunDiscrete: n points, float32 (linspace gives fractional ones), descending;
    values as diffusers', trailing trimmed to n as in ``solver_timesteps``. float32 [n]."""
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32) + steps_offset
    if spacing == "trailing":
        return (np.arange(T, 0, -T / n).round().copy().astype(np.float32) - 1)[:n]
    raise ValueError(f"timestep_spacing={spacing!r} is not supported; choose 'linspace', 'leading' or 'trailing'")


# ---------------------------------------------------------------------------------------------- model outputs

def to_data_prediction(prediction_type: str, model_output: Tensor, sample: Tensor, alpha_t: float,
                       sigma_t: float) -> Tensor:
    """x_θ(x_t, t), the data prediction DPM-Solver++ and UniPC integrate (Lu et al. 2022b, Sec. 4), from an ε-, v-
    or x_0-predicting model: DDPM's x_0 prediction (``schedule.predict_x0``) with α_t = √ᾱ_t and σ_t = √(1 − ᾱ_t)."""
    return S.predict_x0(cast(S.PredictionType, prediction_type), model_output, sample, alpha_t, sigma_t)


def to_noise_prediction(prediction_type: str, model_output: Tensor, sample: Tensor, alpha_t: float,
                        sigma_t: float) -> Tensor:
    """ε_θ(x_t, t), what the original DPM-Solver integrates (Lu et al. 2022a, Eq. 3.4): ε itself,
    ε = α_t v + σ_t x_t, or ε = (x_t − α_t x_0)/σ_t."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return (alpha_t * model_output).add_(sigma_t * sample)
    if prediction_type == "sample":
        return torch.sub(sample, alpha_t * model_output).div_(sigma_t)
    raise ValueError(f"prediction_type={prediction_type!r} is not supported")


# ---------------------------------------------------------------------------------------------- DPM-Solver

class DPMCoefficients(NamedTuple):
    """Scalars of one multistep DPM-Solver step s_0 → t of a given order (float32 values). With the last model
    outputs m0 (at s_0), m1, m2 and h = λ_t − λ_s0, r0 = h_0/h, r1 = h_1/h (h_0, h_1 the previous step sizes):

        D1 = (m0 − m1)/r0                                           (order 2)
        D1 = D1_0 + r0/(r0 + r1) (D1_0 − D1_1), D2 = (D1_0 − D1_1)/(r0 + r1)   (order 3; D1_k = (m_k − m_k+1)/r_k)
        x_t = x_coeff x + c0 m0 + c1 D1 + c2 D2 + noise_coeff z
    """
    order: int
    x_coeff: float
    c0: float
    c1: float
    c2: float
    inv_r0: float        # 1/r0
    inv_r1: float        # 1/r1
    r0_share: float      # r0/(r0 + r1)
    inv_r_sum: float     # 1/(r0 + r1)
    noise_coeff: float   # 0 for the ODE solvers


def dpm_solver_coefficients(sigmas: Tensor, order: int, algorithm: DPMAlgorithm,
                            solver_type: DPMSolverType) -> list[DPMCoefficients]:
    """Per-step scalars of ``order``-th order multistep DPM-Solver over a σ schedule (float32 [n + 1]); row i is
    the step from σ_i to σ_i+1 (rows i < order − 1 lack history and are never used).

    Each is the exact solution of the diffusion ODE in λ (Lu et al. 2022a, Eq. 3.4) with the model output expanded
    in λ around s_0: dpmsolver (Lu et al. 2022a, Sec. 3; order 1 is DDIM) integrates ε_θ, dpmsolver++ (Lu et al.
    2022b, Sec. 4, Algorithm 2 for 2M) the data prediction x_θ. The "heun" form weighs D1 by the φ_2 term
    ((e^−h − 1)/h + 1), "midpoint" by ½(1 − e^−h). The SDE variants (Lu et al. 2022b, Sec. 5) shrink x by e^−h
    more, double the model weight's exponent (1 − e^−2h) and add fresh noise √(1 − e^−2h) σ_t z.
    """
    alpha, sigma, lam = alpha_sigma_lambda(sigmas.float())
    n = sigmas.shape[0] - 1
    s0 = torch.arange(n)
    t, s1, s2 = s0 + 1, (s0 - 1).clamp(min=0), (s0 - 2).clamp(min=0)
    a_t, sig_t, a_s0, sig_s0 = alpha[t], sigma[t], alpha[s0], sigma[s0]
    h, h_0, h_1 = lam[t] - lam[s0], lam[s0] - lam[s1], lam[s1] - lam[s2]
    r0, r1 = h_0 / h, h_1 / h
    zero = torch.zeros_like(h)
    c1 = c2 = noise = zero
    if algorithm == "dpmsolver++":  # x_t = σ_t/σ_s x_s − α_t (e^−h − 1) D0 + …
        x_coeff, em1 = sig_t / sig_s0, torch.exp(-h) - 1.0
        c0 = -(a_t * em1)
        if order == 2 and solver_type == "midpoint":
            c1 = -(0.5 * (a_t * em1))
        elif order >= 2:
            c1 = a_t * (em1 / h + 1.0)
        if order == 3:
            c2 = -(a_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5))
    elif algorithm == "dpmsolver":  # x_t = α_t/α_s x_s − σ_t (e^h − 1) D0 − …
        x_coeff, ep1 = a_t / a_s0, torch.exp(h) - 1.0
        c0 = -(sig_t * ep1)
        if order == 2 and solver_type == "midpoint":
            c1 = -(0.5 * (sig_t * ep1))
        elif order >= 2:
            c1 = -(sig_t * (ep1 / h - 1.0))
        if order == 3:
            c2 = -(sig_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5))
    elif algorithm == "sde-dpmsolver++":
        x_coeff, one_m = sig_t / sig_s0 * torch.exp(-h), 1 - torch.exp(-2.0 * h)
        c0 = a_t * one_m
        if order == 2 and solver_type == "midpoint":
            c1 = 0.5 * (a_t * one_m)
        elif order >= 2:
            c1 = a_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        if order == 3:
            c2 = a_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
        noise = sig_t * torch.sqrt(1.0 - torch.exp(-2 * h))
    elif algorithm == "sde-dpmsolver":  # the noise-prediction SDE solver (Lu et al. 2022b, Sec. 5; orders 1-2)
        x_coeff, ep1 = a_t / a_s0, torch.exp(h) - 1.0
        c0 = -(2.0 * (sig_t * ep1))
        if order == 2 and solver_type == "midpoint":
            c1 = -(sig_t * ep1)
        elif order >= 2:
            c1 = -(2.0 * (sig_t * (ep1 / h - 1.0)))
        noise = sig_t * torch.sqrt(torch.exp(2 * h) - 1.0)
    else:
        raise ValueError(f"algorithm_type={algorithm!r} is not supported")
    r0_share, inv_r_sum = r0 / (r0 + r1), 1.0 / (r0 + r1)
    # A step that does not lower σ (h <= 0) is the identity. It happens only at the end of a σ list that already
    # ends at σ_min when final_sigmas_type="sigma_min" appends σ_min again (Karras, exponential or uniform-λ σ),
    # up to rounding; there the higher-order weights are 0/0 and the SDE noise √(1 − e^−2h) is √(<0).
    still = h <= 0
    x_coeff = torch.where(still, 1.0, x_coeff)
    c0, c1, c2, r0_share, inv_r_sum, noise = (torch.where(still, 0.0, v) for v in
                                              (c0, c1, c2, r0_share, inv_r_sum, noise))
    columns = (x_coeff, c0, c1, c2, 1.0 / r0, 1.0 / r1, r0_share, inv_r_sum, noise)
    return [DPMCoefficients(order, *row) for row in zip(*(c.tolist() for c in columns))]


def dpm_solver_update(x: Tensor, outputs: Sequence[Tensor], c: DPMCoefficients, noise: Tensor | None) -> Tensor:
    """One multistep DPM-Solver step (see ``DPMCoefficients``). x: x_s [B, C, H, W]; outputs: converted model
    outputs, newest last (the last ``c.order`` are used); noise: z for the SDE variants, else None."""
    m0 = outputs[-1]
    out = (c.x_coeff * x).add_(c.c0 * m0)
    if c.order == 2:
        out.add_(c.c1 * (m0 - outputs[-2]).mul_(c.inv_r0))
    elif c.order == 3:
        d1_0 = (m0 - outputs[-2]).mul_(c.inv_r0)
        d1_1 = (outputs[-2] - outputs[-3]).mul_(c.inv_r1)
        diff = d1_0 - d1_1
        out.add_(c.c1 * (d1_0 + c.r0_share * diff)).add_(c.c2 * (c.inv_r_sum * diff))
    if noise is not None:
        out.add_(c.noise_coeff * noise)
    return out


# ---------------------------------------------------------------------------------------------- UniPC

class UniPCCoefficients(NamedTuple):
    """Scalars of one UniPC step s_0 → t of a given order (Zhao et al. 2023, Sec. 3), float32 values.

    With h = λ_t − λ_s0, r_k = (λ_{s_k} − λ_s0)/h for the earlier points s_1, s_2 and D_k = (m_k − m0)/r_k:
        predictor UniP:  x_t  = x_coeff x − m0_coeff m0 − b_coeff Σ_k ρ^p_k D_k
        corrector UniC:  x_t^c = x_coeff x − m0_coeff m0 − b_coeff (Σ_k ρ^c_k D_k + ρ^c_last (m_t − m0))
    """
    order: int
    x_coeff: float                 # σ_t/σ_s0 (data prediction) or α_t/α_s0 (noise prediction)
    m0_coeff: float                # α_t h φ_1(h) or σ_t h φ_1(h), with h φ_1(h) = e^hh − 1, hh = ∓h
    b_coeff: float                 # α_t B(h) or σ_t B(h); B(h) = hh (bh1) or e^hh − 1 (bh2)
    r: tuple[float, ...]           # r_1 .. r_{order−1}
    rho_p: tuple[float, ...]       # predictor weights (order − 1 of them)
    rho_c: tuple[float, ...]       # corrector weights (order of them; the last weighs m_t − m0)


def unipc_coefficients(sigmas: Tensor, order: int, solver_type: UniPCSolverType,
                       predict_x0: bool) -> list[UniPCCoefficients]:
    """Per-step scalars of order-``order`` UniPC over a σ schedule (float32 [n + 1]); row i is the step σ_i → σ_i+1
    (the predictor of step i and the corrector applied at step i + 1). Rows i < order − 1 are never used.

    The weights solve UniPC's order conditions (Zhao et al. 2023, Sec. 3): R ρ = b with R_jk = r_k^(j−1) and
    b_j = j! h φ_{j+1}(hh)/B(h), the φ from the recursion φ_{k+1} = (φ_k − 1/k!)/hh. The second-order predictor and
    the first-order corrector use ρ = ½ instead of a solve, as the authors' code does.
    """
    alpha, sigma, lam = alpha_sigma_lambda(sigmas.float())
    n = sigmas.shape[0] - 1
    s0 = torch.arange(n)
    h = lam[s0 + 1] - lam[s0]
    hh = -h if predict_x0 else h
    h_phi_1 = torch.expm1(hh)  # h φ_1(h) = e^hh − 1
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    if predict_x0:
        x_coeff, m0_coeff, b_coeff = sigma[s0 + 1] / sigma[s0], alpha[s0 + 1] * h_phi_1, alpha[s0 + 1] * b_h
    else:
        x_coeff, m0_coeff, b_coeff = alpha[s0 + 1] / alpha[s0], sigma[s0 + 1] * h_phi_1, sigma[s0 + 1] * b_h
    # r_k for k = 1 .. order−1 (earlier points, clamped at the start where those rows are unused), then 1
    rks = [(lam[(s0 - k).clamp(min=0)] - lam[s0]) / h for k in range(1, order)] + [torch.ones_like(h)]
    rks_t = torch.stack(rks, dim=1)  # [n, order]
    R = torch.stack([rks_t ** (j - 1) for j in range(1, order + 1)], dim=1)  # [n, order, order]: R[j, k] = r_k^j
    b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
    for j in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    b_t = torch.stack(b, dim=1)  # [n, order]
    if order == 1:
        rho_p, rho_c = torch.zeros(n, 0), torch.full((n, 1), 0.5)
    else:
        rho_p = (torch.full((n, 1), 0.5) if order == 2 else
                 _solve(R[:, :-1, :-1], b_t[:, :-1]))
        rho_c = _solve(R, b_t)
    # a step that does not lower σ is the identity (see dpm_solver_coefficients); its weights are 0/0 there
    still = h <= 0
    x_coeff = torch.where(still, 1.0, x_coeff)
    m0_coeff, b_coeff = torch.where(still, 0.0, m0_coeff), torch.where(still, 0.0, b_coeff)
    rho_p, rho_c = (torch.where(still.unsqueeze(1), 0.0, rho) for rho in (rho_p, rho_c))
    columns = (x_coeff.tolist(), m0_coeff.tolist(), b_coeff.tolist(), rks_t[:, :-1].tolist(), rho_p.tolist(),
               rho_c.tolist())
    return [UniPCCoefficients(order, x, m0, b_, tuple(r), tuple(rp), tuple(rc))
            for x, m0, b_, r, rp, rc in zip(*columns)]


def _solve(R: Tensor, b: Tensor) -> Tensor:
    # ρ = R⁻¹ b per row, float32 as diffusers; rows whose R is singular (the unused start rows) give NaN
    out = torch.full_like(b, math.nan)
    ok = torch.linalg.det(R).abs() > 0
    if ok.any():
        out[ok] = torch.linalg.solve(R[ok], b[ok])
    return out


def _weighted_differences(outputs: Sequence[Tensor], r: tuple[float, ...], rho: tuple[float, ...]) -> Tensor | None:
    # Σ_k ρ_k D_k with D_k = (m_k − m0)/r_k over the earlier outputs m_1, m_2 (None when there are none)
    m0, total = outputs[-1], None
    for k, (r_k, rho_k) in enumerate(zip(r, rho), start=1):
        term = rho_k * ((outputs[-1 - k] - m0) / r_k)
        total = term if total is None else total.add_(term)
    return total


def unipc_predict(x: Tensor, outputs: Sequence[Tensor], c: UniPCCoefficients, noise: Tensor | None = None) -> Tensor:
    """UniP-p, the predictor (Zhao et al. 2023): x_s → x_t from the last ``c.order`` outputs."""
    out = (c.x_coeff * x).sub_(c.m0_coeff * outputs[-1])
    res = _weighted_differences(outputs, c.r, c.rho_p)
    return out if res is None else out.sub_(c.b_coeff * res)


def unipc_correct(x: Tensor, outputs: Sequence[Tensor], c: UniPCCoefficients, model_t: Tensor) -> Tensor:
    """UniC-p, the corrector (Zhao et al. 2023): recompute x_t from x_s with the model's output
    ``model_t`` at the predicted x_t as one more point (raising the order by one, at no extra model call)."""
    out = (c.x_coeff * x).sub_(c.m0_coeff * outputs[-1])
    res = _weighted_differences(outputs, c.r, c.rho_c[:-1])
    last = c.rho_c[-1] * (model_t - outputs[-1])
    return out.sub_(c.b_coeff * (last if res is None else res.add_(last)))


# ---------------------------------------------------------------------------------------------- Euler and Heun

class NoiseLevel(NamedTuple):
    """Scalars of one noise level σ of the Euler/Heun schedule, float32 values."""
    sigma: float
    input_scale: float   # √(σ² + 1): the VP-trained model is fed x/√(σ² + 1)
    v_out: float         # −σ/√(σ² + 1), the weight of v in D(x; σ)
    v_skip: float        # σ² + 1, what x is divided by in D(x; σ)


def noise_levels(sigmas: Tensor) -> list[NoiseLevel]:
    """``NoiseLevel`` of each σ of a schedule (float32 [m]), with diffusers' float32 expressions."""
    s = sigmas.float()
    columns = (s, (s**2 + 1) ** 0.5, -s / (s**2 + 1) ** 0.5, s**2 + 1)
    return [NoiseLevel(*row) for row in zip(*(c.tolist() for c in columns))]


def karras_denoised(prediction_type: str, model_output: Tensor, sample: Tensor, level: NoiseLevel,
                    sigma_hat: float | None = None) -> Tensor:
    """D(x; σ), the denoised image, from a VP-trained model fed x/√(σ² + 1) (Karras et al. 2022, Table 1, VP):
    x − σ ε for ε-prediction, −σ/√(σ² + 1) v + x/(σ² + 1) for v-prediction (Salimans & Ho 2022), the output
    itself for x_0-prediction. ``sigma_hat`` is Euler's raised σ̂ (Algorithm 2 of Karras et al.), used by the
    ε branch only, as diffusers does."""
    if prediction_type == "epsilon":
        return sample - (level.sigma if sigma_hat is None else sigma_hat) * model_output
    if prediction_type == "v_prediction":
        return model_output * level.v_out + sample / level.v_skip
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type={prediction_type!r} is not supported")


def ode_derivative(x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
    """dx/dσ = (x − D(x; σ))/σ, the probability-flow ODE in σ (Karras et al. 2022, Sec. 2 with σ(t) = t)."""
    return (x - denoised) / sigma


def euler_update(x: Tensor, derivative: Tensor, dt: float) -> Tensor:
    """x + dt · dx/dσ: an Euler step (Algorithm 2 of Karras et al. 2022); with the average of the derivatives at
    both ends it is Heun's second-order step (their Algorithm 1)."""
    return x + derivative * dt
