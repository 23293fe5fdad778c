"""DPMSolverMultistep, UniPCMultistep, EulerDiscrete and HeunDiscrete against live diffusers 0.42.1: whole sampling
loops over the option matrix (timesteps, sigmas and every prev_sample), noise from generators and lists of them,
add_noise, mid-schedule starts, half precision; and closed-form checks of the maths in ddpm.solvers."""

import inspect
import math

import diffusers
import numpy as np
import pytest
import torch

import ddpm
from ddpm import solvers as V

SHAPE = (2, 3, 4, 4)
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]


def close(ours, theirs, rel=1e-5):
    """fp32 parity: max |ours − theirs| <= rel · max |theirs| (NaN where diffusers has NaN, nowhere else)."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    ok = ~torch.isnan(theirs)
    scale = theirs[ok].abs().max().item() if ok.any() else 0.0
    assert (ours[ok] - theirs[ok]).abs().max().item() <= rel * max(scale, 1e-30), (ours - theirs).abs().max()


def fake_model(x, t, channels=None):
    """A deterministic stand-in for a UNet: a prediction depending on x and t (plus variance channels)."""
    out = 0.6 * x + 0.1 * math.sin(float(t) / 7.0)
    return out if channels is None else torch.cat([out, torch.tanh(x)], dim=1)


def run_loop(scheduler, n, seed=0, generator=None, learned=False, begin=None, dtype=torch.float32, timesteps=None):
    """diffusers' pipeline loop: x_T ~ N(0, σ_init²), the model fed scale_model_input(x, t). Returns each prev_sample."""
    if timesteps is None:
        scheduler.set_timesteps(n)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    timesteps = scheduler.timesteps
    if begin is not None:
        scheduler.set_begin_index(begin)
        timesteps = timesteps[begin:]
    g = torch.Generator().manual_seed(seed) if generator is None else generator
    x = (torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + 1)) * float(scheduler.init_noise_sigma)
         ).to(dtype)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    outs = []
    for t in timesteps:
        out = fake_model(scheduler.scale_model_input(x, t), t, SHAPE[1] if learned else None).to(dtype)
        x = scheduler.step(out, t, x, **({"generator": g} if takes_generator else {})).prev_sample
        outs.append(x)
    return outs


def compare(name, kw, n, **loop_kw):
    ours, theirs = getattr(ddpm, name)(**kw), getattr(diffusers, name)(**kw)
    a = run_loop(ours, n, **loop_kw)
    if loop_kw.get("begin") is None and len(ours.timesteps) > 1 and ours.timesteps[0] == ours.timesteps[1]:
        # a repeated first timestep (cosine schedule with Karras/exponential σ): diffusers would start at the
        # second σ and run off the end (docs/parity.md); set_begin_index(0) is its way to run this loop
        loop_kw = {**loop_kw, "begin": 0}
    b = run_loop(theirs, n, **loop_kw)
    assert ours.timesteps.dtype == theirs.timesteps.dtype and torch.equal(ours.timesteps, theirs.timesteps), kw
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=1e-6, atol=0)
    assert float(ours.init_noise_sigma) == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
    assert len(a) == len(b) == len(ours.timesteps) - (loop_kw.get("begin") or 0)
    if torch.isnan(b[-1]).any() and not torch.isnan(b[-2]).any():
        # diffusers' σ list can end σ_min, σ_min up to rounding (Karras/exponential/uniform-λ σ with final
        # "sigma_min"): a step that does not lower σ, with 0/0 weights or √(<0) noise. Ours is the identity there
        # (docs/parity.md); UniPC still applies its corrector first.
        torch.testing.assert_close(ours.sigmas[-1], ours.sigmas[-2], rtol=1e-6, atol=0)
        assert ours.sigmas[-1] >= ours.sigmas[-2]
        assert torch.isfinite(a[-1]).all() and (name != "DPMSolverMultistepScheduler" or torch.equal(a[-1], a[-2]))
        a, b = a[:-1], b[:-1]
    for x, y in zip(a, b):
        close(x, y)


def matrix(main, secondary, pairs):
    """Cases: every combination of the ``main`` options, for each (prediction_type, beta_schedule) in ``pairs``;
    the ``secondary`` options (name -> (values, period divisor)) rotate through their values within each pair's
    group, so every value of every option meets every pair."""
    keys, combos = list(main), [{}]
    for k in keys:
        combos = [{**c, k: v} for c in combos for v in main[k]]
    cases = []
    for g, (pred, sched) in enumerate(pairs):
        for i, combo in enumerate(combos):
            case = {"prediction_type": pred, "beta_schedule": sched, **combo}
            for name, (values, d) in secondary.items():
                case[name] = values[(i // d + g) % len(values)]
            cases.append(case)
    return cases


PAIRS = [(p, s) for p in PREDICTIONS for s in SCHEDULES]
SIGMAS = {"": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
          "lu": {"use_lu_lambdas": True}}

DPM_CASES = [c for c in matrix(
    {"algorithm_type": ["dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"], "solver_order": [1, 2, 3],
     "solver_type": ["midpoint", "heun"]},
    {"lower_order_final": ([True, False], 1), "sigmas": (["", "karras", "lu", "exponential"], 1),
     "final_sigmas_type": (["zero", "sigma_min"], 2), "timestep_spacing": (["linspace", "leading", "trailing"], 3),
     "thresholding": ([False, True], 4), "euler_at_final": ([False, True], 5), "n": ([4, 8, 15], 6),
     "rescale_betas_zero_snr": ([False, True], 7)}, PAIRS)
    if not (c["algorithm_type"] == "sde-dpmsolver" and c["solver_order"] == 3)]  # diffusers has no such step

UNIPC_CASES = matrix(
    {"solver_type": ["bh1", "bh2"], "solver_order": [1, 2, 3], "predict_x0": [True, False]},
    {"lower_order_final": ([True, False], 1), "sigmas": (["", "karras", "exponential"], 1),
     "disable_corrector": ([[], [0], [1, 2]], 2), "timestep_spacing": (["linspace", "leading", "trailing"], 3),
     "final_sigmas_type": (["zero", "sigma_min"], 1), "thresholding": ([False, True], 4), "n": ([4, 8, 15], 2),
     "rescale_betas_zero_snr": ([False, True], 3)}, PAIRS)

EULER_CASES = matrix(
    {"sigmas": ["", "karras", "exponential"], "timestep_spacing": ["linspace", "leading", "trailing"]},
    {"interpolation_type": (["linear", "log_linear"], 1), "final_sigmas_type": (["zero", "sigma_min"], 2),
     "rescale_betas_zero_snr": ([False, True], 3), "timestep_type": (["discrete", "continuous"], 1),
     "n": ([4, 9, 15], 1)}, PAIRS)

HEUN_CASES = matrix(
    {"sigmas": ["", "karras", "exponential"], "timestep_spacing": ["linspace", "leading", "trailing"]},
    {"clip_sample": ([False, True], 1), "n": ([3, 6, 10], 2)},
    [(p, s) for p in PREDICTIONS for s in SCHEDULES + ["exp"]])


def kwargs_of(case, name):
    kw = {k: v for k, v in case.items() if k not in ("sigmas", "n")}
    kw.update(SIGMAS[case["sigmas"]])
    if kw.get("timestep_spacing") == "leading":
        kw["steps_offset"] = 1
    if name == "DPMSolverMultistepScheduler" and kw["algorithm_type"] in ("dpmsolver", "sde-dpmsolver"):
        kw["final_sigmas_type"] = "sigma_min"  # the noise-prediction solvers cannot step to σ = 0 (diffusers too)
    if name == "UniPCMultistepScheduler":
        if kw["solver_type"] == "bh1" or not kw["predict_x0"]:
            kw["final_sigmas_type"] = "sigma_min"  # to σ = 0 these give NaN in diffusers (a deliberate difference)
        kw["thresholding"] = kw["thresholding"] and kw["predict_x0"]
    if name == "EulerDiscreteScheduler" and kw["prediction_type"] != "v_prediction":
        kw["timestep_type"] = "discrete"  # continuous timesteps are diffusers' option for v-prediction only
    return kw


def test_the_matrix_covers_every_option_with_every_prediction_type_and_beta_schedule():
    for cases, options in [(DPM_CASES, ["algorithm_type", "solver_order", "solver_type", "lower_order_final", "sigmas",
                                        "final_sigmas_type", "timestep_spacing", "thresholding", "euler_at_final"]),
                           (UNIPC_CASES, ["solver_type", "solver_order", "predict_x0", "disable_corrector", "sigmas",
                                          "lower_order_final", "timestep_spacing"]),
                           (EULER_CASES, ["sigmas", "timestep_spacing", "interpolation_type", "final_sigmas_type"]),
                           (HEUN_CASES, ["sigmas", "timestep_spacing", "clip_sample"])]:
        for option in options:
            values = {str(c[option]) for c in cases}
            seen = {(str(c[option]), c["prediction_type"], c["beta_schedule"]) for c in cases}
            assert len(values) > 1 and all((v, p, s) in seen for v in values for p, s in PAIRS), option


@pytest.mark.parametrize("case", DPM_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_dpm_solver_loop_matches_diffusers(case):
    compare("DPMSolverMultistepScheduler", kwargs_of(case, "DPMSolverMultistepScheduler"), case["n"])


@pytest.mark.parametrize("case", UNIPC_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_unipc_loop_matches_diffusers(case):
    compare("UniPCMultistepScheduler", kwargs_of(case, "UniPCMultistepScheduler"), case["n"])


@pytest.mark.parametrize("case", EULER_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_euler_loop_matches_diffusers(case):
    compare("EulerDiscreteScheduler", kwargs_of(case, "EulerDiscreteScheduler"), case["n"])


@pytest.mark.parametrize("case", HEUN_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_heun_loop_matches_diffusers(case):
    compare("HeunDiscreteScheduler", kwargs_of(case, "HeunDiscreteScheduler"), case["n"])


def test_dpm_solver_special_options_match_diffusers():
    # learned variance (the model also outputs C variance channels), λ clipping for the cosine schedule,
    # custom timesteps, and a trained_betas schedule
    compare("DPMSolverMultistepScheduler", dict(variance_type="learned_range"), 6, learned=True)
    compare("DPMSolverMultistepScheduler", dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), 6)
    betas = np.linspace(1e-3, 0.05, 50)
    compare("DPMSolverMultistepScheduler", dict(num_train_timesteps=50, trained_betas=betas, solver_order=3), 7)
    for kw in [{"algorithm_type": "sde-dpmsolver++"}, {"final_sigmas_type": "sigma_min", "prediction_type": "sample"}]:
        compare("DPMSolverMultistepScheduler", kw, None, timesteps=[950, 700, 420, 300, 111, 20, 3])
    compare("EulerDiscreteScheduler", {}, None, timesteps=[950.0, 700.5, 420.0, 111.0, 3.0])
    compare("HeunDiscreteScheduler", {"prediction_type": "v_prediction"}, None, timesteps=[950.0, 420.0, 3.0])


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
                                  "HeunDiscreteScheduler"])
def test_timesteps_and_sigmas_match_diffusers_for_many_step_counts(name):
    for spacing in ["linspace", "leading", "trailing"]:
        ours, theirs = (getattr(lib, name)(timestep_spacing=spacing, steps_offset=int(spacing == "leading"))
                        for lib in (ddpm, diffusers))
        for n in [1, 2, 3, 7, 10, 20, 25, 50, 100, 999, 1000]:
            if name == "HeunDiscreteScheduler" and n == 1:
                continue  # diffusers' Heun cannot build a 1-step schedule (an empty repeat)
            ours.set_timesteps(n)
            theirs.set_timesteps(n)
            listed = theirs.timesteps.tolist()
            multistep = name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
            if multistep and (listed != sorted(set(listed), reverse=True) or max(listed) >= 1000):
                # diffusers repeats a timestep (then a step of h = 0 gives NaN) or lists t = T: near n = T the
                # multistep solvers run every timestep from T − 1 once instead (docs/parity.md)
                assert n >= 999, (spacing, n)
                got = ours.timesteps.tolist()
                assert got[0] == 999 and all(a - b == 1 for a, b in zip(got, got[1:])) and got[-1] >= 1, (spacing, n)
                continue
            k = len(ours.timesteps)
            # diffusers' trailing spacing sometimes appends a spurious timestep −1; we never do (docs/parity.md)
            extra = len(theirs.timesteps) - k
            assert extra == 0 or (spacing == "trailing" and extra == 1 and float(theirs.timesteps[-1]) == -1)
            assert torch.equal(ours.timesteps, theirs.timesteps[:k]), (spacing, n)
            if extra == 0:
                torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=1e-6, atol=0)


def test_mid_schedule_start_and_custom_sigmas_match_diffusers():
    for name in ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
                 "HeunDiscreteScheduler"]:
        compare(name, {}, 8, begin=3)  # img2img: set_begin_index, then loop from the 4th timestep
    ours, theirs = ddpm.EulerDiscreteScheduler(), diffusers.EulerDiscreteScheduler()
    sigmas = [14.0, 6.0, 2.5, 0.9, 0.3, 0.0]
    for s in (ours, theirs):
        s.set_timesteps(sigmas=sigmas)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=1e-6, atol=0)
    assert torch.equal(ours.sigmas, theirs.sigmas)


def test_noise_from_generator_lists_is_per_image_and_matches_diffusers():
    # sde-dpmsolver++ and Euler with churn draw fresh noise each step: a list of generators gives image i the
    # noise of generator i, so an image does not depend on the batch it was drawn in
    def batch_then_single(lib, name, kw, step_kw):
        def loop(batch, seeds):
            s = getattr(lib, name)(**kw)
            s.set_timesteps(6)
            gens = [torch.Generator().manual_seed(k) for k in seeds]
            x = torch.randn((1, 3, 4, 4), generator=torch.Generator().manual_seed(99)).repeat(batch, 1, 1, 1)
            x = x * float(s.init_noise_sigma)
            for t in s.timesteps:
                x = s.step(fake_model(s.scale_model_input(x, t), t), t, x, generator=gens, **step_kw).prev_sample
            return x
        return loop(3, [0, 1, 2]), loop(1, [2])

    for name, kw, step_kw in [("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
                              ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                               "solver_order": 3}, {}),
                              ("EulerDiscreteScheduler", {}, {"s_churn": 1.0})]:
        ours_batch, ours_single = batch_then_single(ddpm, name, kw, step_kw)
        theirs_batch, _ = batch_then_single(diffusers, name, kw, step_kw)
        close(ours_batch, theirs_batch)
        torch.testing.assert_close(ours_batch[2:], ours_single, rtol=0, atol=0)
        assert not torch.equal(ours_batch[0], ours_batch[1])  # different generators, different images


def test_variance_noise_add_noise_and_half_precision_match_diffusers():
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6))
    for name, kw in [("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
                     ("UniPCMultistepScheduler", {}), ("EulerDiscreteScheduler", {}), ("HeunDiscreteScheduler", {})]:
        ours, theirs = getattr(ddpm, name)(**kw), getattr(diffusers, name)(**kw)
        for s in (ours, theirs):
            s.set_timesteps(10)
        t = ours.timesteps[[0, 4]]
        close(ours.add_noise(x0, z, t), theirs.add_noise(x0, z, t))
        if name == "DPMSolverMultistepScheduler":
            t0 = ours.timesteps[0]
            close(ours.step(z, t0, x0, variance_noise=z).prev_sample, theirs.step(z, t0, x0, variance_noise=z).prev_sample)
        # a half-precision model: the steps return its dtype. Results agree to a few fp16 ulps: diffusers rounds
        # each step's float32 coefficients to fp16 before multiplying, we multiply at float32 precision
        a, b = (run_loop(getattr(lib, name)(**kw), 6, dtype=torch.float16) for lib in (ddpm, diffusers))
        for x, y in zip(a, b):
            assert x.dtype == y.dtype == torch.float16
            close(x.float(), y.float(), rel=1e-2)


def test_steps_make_no_host_reads_of_device_timesteps():
    # "meta" tensors have no values: any .item() or `if tensor` would raise, so a whole loop proves no sync
    for s in (ddpm.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3),
              ddpm.UniPCMultistepScheduler(solver_order=3), ddpm.EulerDiscreteScheduler(), ddpm.HeunDiscreteScheduler()):
        s.set_timesteps(10, device="meta")
        x = torch.empty(SHAPE, device="meta")
        for t in s.timesteps:
            x = s.step(s.scale_model_input(x, t), t, x).prev_sample
        assert x.shape == SHAPE and x.device.type == "meta"


# ---------------------------------------------------------------------------------------------- closed forms

def exact_denoiser(name, x0, eps, prediction_type):
    """The model of a data set holding the single image x0: its prediction at x_t is exact, and every sampler
    must follow x_t = α_t x0 + σ_t ε (VP) or x0 + σ ε (Euler, Heun) for the fixed ε (Lu et al. 2022b, Eq. 9 is
    exact when x_θ is constant; Euler/Heun have a constant slope dx/dσ = ε)."""
    def model(x_in, sigma):
        alpha, sigma_t = 1 / math.sqrt(sigma**2 + 1), sigma / math.sqrt(sigma**2 + 1)
        e = eps if sigma > 0 else torch.zeros_like(eps)
        return {"epsilon": e, "sample": x0, "v_prediction": alpha * e - sigma_t * x0}[prediction_type]
    return model


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("name,kw", [
    ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"solver_type": "heun", "use_karras_sigmas": True}),
    ("UniPCMultistepScheduler", {"solver_order": 3}), ("UniPCMultistepScheduler", {"solver_type": "bh1"}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}), ("HeunDiscreteScheduler", {})])
def test_an_exact_denoiser_gives_the_closed_form_trajectory(name, kw, prediction_type):
    s = getattr(ddpm, name)(prediction_type=prediction_type, **kw)
    s.set_timesteps(7)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g, dtype=torch.float64)
    ve = name in ("EulerDiscreteScheduler", "HeunDiscreteScheduler")
    model = exact_denoiser(name, x0, eps, prediction_type)
    sig = s.sigmas.double().tolist()
    x = (x0 + sig[0] * eps) if ve else (x0 + sig[0] * eps) / math.sqrt(sig[0] ** 2 + 1)
    for i, t in enumerate(s.timesteps):
        level = sig[i]  # the σ the model is evaluated at (Heun lists its inner σ twice, like its timesteps)
        x = s.step(model(s.scale_model_input(x, t), level), t, x).prev_sample
        nxt = sig[i + 1]  # Heun: after either half, x sits at sigmas[i + 1] (its inner σ are listed twice)
        expected = x0 + nxt * eps if ve else (x0 + nxt * eps) / math.sqrt(nxt**2 + 1)
        # float32 steps; ε-prediction divides by α_t ≈ 0.006 at t = T, so allow 1e-4
        torch.testing.assert_close(x.double(), expected, rtol=1e-4, atol=1e-4)
    if sig[-1] == 0:
        torch.testing.assert_close(x.double(), x0, rtol=1e-4, atol=1e-4)  # the last step lands on the image


def test_noise_levels_closed_forms():
    # Karras et al. 2022, Eq. 5 with ρ = 7, and the VP ↔ VE map σ = √((1 − ᾱ)/ᾱ), α = 1/√(1 + σ²)
    s = ddpm.EulerDiscreteScheduler(use_karras_sigmas=True)
    s.set_timesteps(10)
    ac = s.alphas_cumprod.double().numpy()  # the float32 ᾱ (bit-identical to diffusers', tests/test_schedulers.py)
    smin, smax = math.sqrt((1 - ac[0]) / ac[0]), math.sqrt((1 - ac[-1]) / ac[-1])
    ramp = np.arange(10) / 9
    expected = (smax ** (1 / 7) + ramp * (smin ** (1 / 7) - smax ** (1 / 7))) ** 7
    np.testing.assert_allclose(s.sigmas[:-1].numpy(), expected, rtol=2e-5)
    assert s.sigmas[-1] == 0
    # each timestep is where the training σ, interpolated linearly in log σ, equals the chosen σ
    log_train = np.log(np.sqrt((1 - ac) / ac))
    np.testing.assert_allclose(np.interp(s.timesteps.numpy(), np.arange(1000), log_train), np.log(expected),
                               rtol=1e-4)
    alpha, sigma_t, lam = V.alpha_sigma_lambda(torch.tensor([0.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(alpha**2 + sigma_t**2, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(lam, -torch.log(torch.tensor([0.5, 2.0], dtype=torch.float64)))


def test_dpm_solver_first_order_is_ddim():
    # Lu et al. 2022b, Sec. 4: first-order DPM-Solver++ is DDIM with η = 0. Checked against diffusers'
    # DDIMScheduler on its own timesteps (leading, T // n apart), the last step going to ᾱ = 1 (σ = 0)
    ddim = diffusers.DDIMScheduler(clip_sample=False)
    ddim.set_timesteps(10)
    dpm = ddpm.DPMSolverMultistepScheduler(solver_order=1)
    dpm.set_timesteps(timesteps=ddim.timesteps.tolist())
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    for t in ddim.timesteps:
        x = dpm.step(fake_model(x, t), t, x).prev_sample
        y = ddim.step(fake_model(y, t), t, y).prev_sample
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
