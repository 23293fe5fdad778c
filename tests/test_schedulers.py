"""DDPMScheduler / DDIMScheduler: parity with live diffusers over the option matrix, files both ways, errors,
dtypes, and closed-form checks of the maths in ddpm.schedule against hand-written formulas."""

import dataclasses
import itertools
import json
import math

import diffusers
import numpy as np
import pytest
import torch

from ddpm.schedulers import DDIMScheduler, DDIMSchedulerConfig, DDPMScheduler, SchedulerOutput

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]
SPACINGS = ["leading", "trailing", "linspace"]
FLAGS = list(itertools.product([False, True], repeat=3))  # clip_sample, thresholding, rescale_betas_zero_snr
SHAPE = (2, 3, 4, 4)


def exact(ours, theirs):
    """fp32 results are bit-identical: same float32 schedule, same operation order, same generator draws."""
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)


def fake_model(x, t, variance_type=None):
    """A deterministic stand-in for a UNet: a prediction depending on x and t, plus variance channels."""
    out = 0.6 * x + 0.1 * math.sin(int(t) / 7.0)
    if variance_type == "learned":  # σ² itself
        return torch.cat([out, 0.01 * torch.sigmoid(x)], dim=1)
    if variance_type == "learned_range":  # v in [-1, 1], Eq. 15 of Nichol & Dhariwal
        return torch.cat([out, torch.tanh(x)], dim=1)
    return out


def run_loop(scheduler, n, step_kwargs=None, seed=0, variance_type=None, timestep_as=lambda t: t):
    """A seeded sampling loop; returns every step's (prev_sample, pred_original_sample)."""
    if n is not None:
        scheduler.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + 1)) * 1.5
    outs = []
    for t in scheduler.timesteps:
        out = scheduler.step(fake_model(x, t, variance_type), timestep_as(t), x, generator=g, **(step_kwargs or {}))
        x = out.prev_sample
        outs.append((out.prev_sample, out.pred_original_sample))
    return outs


# ---------------------------------------------------------------------------------------------- schedules

@pytest.mark.parametrize("T", [1000, 37])
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_betas_and_alphas_cumprod_match_diffusers(beta_schedule, zero_snr, T):
    kw = dict(num_train_timesteps=T, beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
    ours, theirs = DDPMScheduler(**kw), diffusers.DDPMScheduler(**kw)
    exact(ours.betas, theirs.betas)
    exact(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert ours.betas.dtype == torch.float32 and ours.alphas_cumprod.dtype == torch.float32
    if beta_schedule != "sigmoid":  # diffusers' DDIM has no sigmoid schedule
        exact(DDIMScheduler(**kw).alphas_cumprod, diffusers.DDIMScheduler(**kw).alphas_cumprod)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_timesteps_match_diffusers(cls, spacing):
    for T, ns, offset in [(50, range(1, 51), 0), (1000, [1, 3, 7, 10, 50, 100, 250, 999, 1000], 0),
                          (1000, [10, 50, 999], 1)]:
        ours = getattr(__import__("ddpm"), cls)(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
        theirs = getattr(diffusers, cls)(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
        for n in ns:
            ours.set_timesteps(n)
            theirs.set_timesteps(n)
            assert ours.timesteps.dtype == torch.int64 and len(ours.timesteps) == n
            # diffusers' trailing spacing sometimes appends a spurious -1 (see the next test); all else is equal
            extra = theirs.timesteps[n:].tolist()
            assert extra in ([], [-1]) and (spacing == "trailing" or not extra)
            assert torch.equal(ours.timesteps, theirs.timesteps[:n]), (T, n, offset)


def test_trailing_spacing_never_adds_a_spurious_step():
    # diffusers' np.arange(T, 0, -T/n) yields n + 1 steps for some n, the last being -1 (a deliberate difference)
    ours, theirs = DDPMScheduler(timestep_spacing="trailing"), diffusers.DDPMScheduler(timestep_spacing="trailing")
    ours.set_timesteps(61)
    theirs.set_timesteps(61)
    assert len(theirs.timesteps) == 62 and int(theirs.timesteps[-1]) == -1
    assert len(ours.timesteps) == 61 and torch.equal(ours.timesteps, theirs.timesteps[:61])


# ---------------------------------------------------------------------------------------------- forward process

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_add_noise_and_velocity_match_diffusers(beta_schedule, zero_snr, dtype):
    kw = dict(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
    ours, theirs = DDPMScheduler(**kw), diffusers.DDPMScheduler(**kw)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(SHAPE, generator=g, dtype=dtype), torch.randn(SHAPE, generator=g, dtype=dtype)
    t = torch.tensor([0, 999])
    exact(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    exact(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t))
    assert ours.add_noise(x0, noise, t).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_noise_low_precision_keeps_state_and_precision(dtype):
    ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    state = ours.alphas_cumprod
    before = state.clone()
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(64, 3, 8, 8, generator=g), torch.randn(64, 3, 8, 8, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    out = ours.add_noise(x0.to(dtype), noise.to(dtype), t)
    ours.get_velocity(x0.to(dtype), noise.to(dtype), t)
    assert out.dtype == dtype
    assert ours.alphas_cumprod is state and state.dtype == torch.float32 and torch.equal(state, before)
    # reference in float64 from the same (rounded) inputs, with ᾱ from a float64 cumprod of the linear betas
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].view(-1, 1, 1, 1)
    ref = ab.sqrt() * x0.to(dtype).double() + (1 - ab).sqrt() * noise.to(dtype).double()
    ours_err = (out.double() - ref).abs().max().item()
    theirs_err = (theirs.add_noise(x0.to(dtype), noise.to(dtype), t).double() - ref).abs().max().item()
    ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)  # relative spacing of the format
    assert ours_err <= ulp * ref.abs().max().item() / 2 * 1.01  # only the final rounding to `dtype`
    assert ours_err < theirs_err  # diffusers takes √ᾱ in low precision


# ---------------------------------------------------------------------------------------------- DDPM loops

@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_ddpm_loop_matches_diffusers(beta_schedule, variance_type, prediction_type, spacing):
    # 2 of the 8 flag combinations per case, rotating so that each combination meets every variance type ×
    # prediction type (12 cases each) and every beta schedule × spacing (18 cases each)
    i = SCHEDULES.index(beta_schedule) * len(SPACINGS) + SPACINGS.index(spacing)
    shift = VARIANCES.index(variance_type) + PREDICTIONS.index(prediction_type)
    for clip, thresholding, zero_snr in (FLAGS[(2 * i + k + shift) % len(FLAGS)] for k in (0, 1)):
        kw = dict(num_train_timesteps=100, beta_schedule=beta_schedule, prediction_type=prediction_type,
                  timestep_spacing=spacing, clip_sample=clip, thresholding=thresholding,
                  rescale_betas_zero_snr=zero_snr, sample_max_value=1.5, clip_sample_range=1.2)
        # diffusers' fixed_large_log is NaN (their #14569); its intended σ = √β_t is diffusers' fixed_large
        ref_variance = "fixed_large" if variance_type == "fixed_large_log" else variance_type
        for n, T in ((5, 100), (None, 12)):  # spaced steps, and the full chain without set_timesteps
            kw["num_train_timesteps"] = T
            ours = run_loop(DDPMScheduler(variance_type=variance_type, **kw), n, variance_type=variance_type)
            theirs = run_loop(diffusers.DDPMScheduler(variance_type=ref_variance, **kw), n,
                              variance_type=variance_type)
            assert len(ours) == len(theirs) == (n or T)
            for (p, x0), (p_ref, x0_ref) in zip(ours, theirs):
                if variance_type == "fixed_large_log":
                    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-5, equal_nan=True)
                    torch.testing.assert_close(x0, x0_ref, rtol=1e-5, atol=1e-5, equal_nan=True)
                else:
                    exact(p, p_ref)
                    exact(x0, x0_ref)


def test_ddpm_1000_step_loop_matches_diffusers_with_any_timestep_type_and_generator_lists():
    for n, as_ in [(None, lambda t: t), (1000, int), (50, lambda t: t.clone())]:
        ours = run_loop(DDPMScheduler(), n, timestep_as=as_)
        theirs = run_loop(diffusers.DDPMScheduler(), n)
        for a, b in zip(ours, theirs):
            exact(a[0], b[0])
            exact(a[1], b[1])
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    outs = []
    for s in (DDPMScheduler(), diffusers.DDPMScheduler()):
        gens = [torch.Generator().manual_seed(i) for i in range(SHAPE[0])]
        outs.append(s.step(eps, 500, x, generator=gens).prev_sample)
    exact(*outs)


def test_ddpm_fixed_large_log_uses_sqrt_beta():
    ours, theirs = DDPMScheduler(variance_type="fixed_large_log"), diffusers.DDPMScheduler(variance_type="fixed_large_log")
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    assert torch.isnan(theirs.step(eps, 500, x, generator=torch.Generator().manual_seed(0)).prev_sample).all()
    out = ours.step(eps, 500, x, generator=torch.Generator().manual_seed(0))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    a_t, a_prev = ac[500], ac[499]
    beta = 1 - a_t / a_prev
    x0 = ((x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()).clamp(-1, 1)
    mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x.double()  # Eq. 7
    # log σ = log(β_t) / 2
    torch.testing.assert_close(out.prev_sample.double(), mean + math.exp(math.log(beta) / 2) * z.double(),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- DDIM loops

@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("beta_schedule", SCHEDULES[:3])
def test_ddim_loop_matches_diffusers(beta_schedule, prediction_type, spacing, eta):
    # 4 of the 16 flag combinations per case, rotating so that each meets every prediction type × η (9 cases each)
    # and every beta schedule × spacing (9 cases each)
    combos = list(itertools.product(FLAGS, [(True, False), (False, True)]))
    i = SCHEDULES.index(beta_schedule) * len(SPACINGS) + SPACINGS.index(spacing)
    shift = 4 * (PREDICTIONS.index(prediction_type) * 3 + [0.0, 0.5, 1.0].index(eta))
    for (clip, thresholding, zero_snr), (set_one, clipped) in (combos[(4 * i + k + shift) % len(combos)]
                                                                 for k in range(4)):
        kw = dict(num_train_timesteps=100, beta_schedule=beta_schedule, prediction_type=prediction_type,
                  timestep_spacing=spacing, clip_sample=clip, thresholding=thresholding, set_alpha_to_one=set_one,
                  rescale_betas_zero_snr=zero_snr, steps_offset=1 if spacing == "leading" else 0)
        step_kwargs = dict(eta=eta, use_clipped_model_output=clipped)
        ours = run_loop(DDIMScheduler(**kw), 4, step_kwargs)
        theirs = run_loop(diffusers.DDIMScheduler(**kw), 4, step_kwargs)
        for (p, x0), (p_ref, x0_ref) in zip(ours, theirs):
            exact(p, p_ref)
            exact(x0, x0_ref)


def test_ddim_variance_noise_and_argument_errors():
    ours, theirs = DDIMScheduler(), diffusers.DDIMScheduler()
    x, eps, z = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        ours.step(eps, 980, x)
    for s in (ours, theirs):
        s.set_timesteps(50)
    exact(ours.step(eps, 980, x, eta=0.7, variance_noise=z).prev_sample,
          theirs.step(eps, 980, x, eta=0.7, variance_noise=z).prev_sample)
    exact(ours.step(eps, 333, x).prev_sample, theirs.step(eps, 333, x).prev_sample)  # not a listed timestep
    with pytest.raises(ValueError, match="generator"):
        ours.step(eps, 980, x, eta=0.5, variance_noise=z, generator=torch.Generator())


def test_ddim_eta_zero_is_deterministic_and_recovers_x0():
    s = DDIMScheduler(clip_sample=False)
    s.set_timesteps(10)
    x0, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    t = int(s.timesteps[3])
    xt = s.add_noise(x0, eps, torch.tensor([t]))
    out = s.step(eps, t, xt)  # the true ε gives back x_0 (Eq. 12 of Song et al.), up to float32 coefficients
    torch.testing.assert_close(out.pred_original_sample, x0, rtol=1e-5, atol=1e-6)
    a_prev = s.alphas_cumprod[t - 100].double()
    torch.testing.assert_close(out.prev_sample, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    s.step(eps, t, xt, generator=g)  # η = 0 draws no noise: the generator is left as it was (as in diffusers)
    assert torch.equal(g.get_state(), state)


# ---------------------------------------------------------------------------------------------- closed forms

def test_closed_form_schedules():
    s = DDPMScheduler()
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=2e-5)
    T, sh = 1000, 0.008  # Eq. 17 of Nichol & Dhariwal 2021
    f = np.cos((np.arange(T + 1) / T + sh) / (1 + sh) * np.pi / 2) ** 2
    np.testing.assert_allclose(DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas.numpy(),
                               np.minimum(1 - f[1:] / f[:-1], 0.999), rtol=1e-5)
    z = DDPMScheduler(rescale_betas_zero_snr=True)  # Lin et al. 2023: SNR(T) = 0, ᾱ_1 unchanged
    assert z.alphas_cumprod[-1].item() == 0.0
    assert z.alphas_cumprod[0].item() == pytest.approx(s.alphas_cumprod[0].item(), rel=1e-6)
    sig = DDPMScheduler(beta_schedule="sigmoid").betas.double()
    torch.testing.assert_close(sig, torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.02 - 1e-4)
                               + 1e-4, rtol=1e-5, atol=0)


def test_ddpm_posterior_mean_and_variance_closed_form():
    s = DDPMScheduler(clip_sample=False)
    x, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    # t = 500: at small t, diffusers' float32 β_t = 1 − ᾱ_t/ᾱ_{t−1} (kept for parity) is only ~1e-4 accurate
    out = s.step(eps, 500, x, generator=torch.Generator().manual_seed(0))
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ac = s.alphas_cumprod.double()
    a_t, a_prev, beta = ac[500], ac[499], s.betas[500].double()
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # inverse of Eq. 4
    mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x  # Eq. 7
    var = (1 - a_prev) / (1 - a_t) * beta  # β̃_t, Eq. 7
    torch.testing.assert_close(out.prev_sample, mean + var.sqrt() * z, rtol=1e-5, atol=1e-5)
    v = s.get_velocity(x0, eps, torch.tensor([500]))  # x_0 = √ᾱ x_t − √(1−ᾱ) v (Salimans & Ho 2022)
    torch.testing.assert_close(a_t.sqrt() * s.add_noise(x0, eps, torch.tensor([500])) - (1 - a_t).sqrt() * v, x0)


def test_step_makes_no_host_reads_of_device_timesteps():
    # "meta" tensors have no values: any .item() or `if tensor` would raise, so a whole loop proves no sync
    for s in (DDPMScheduler(), DDIMScheduler()):
        s.set_timesteps(10, device="meta")
        x = torch.empty(SHAPE, device="meta")
        for t in s.timesteps:
            x = s.step(torch.empty(SHAPE, device="meta"), t, x).prev_sample
        assert x.shape == SHAPE


# ---------------------------------------------------------------------------------------------- API and files

def test_api_surface():
    s = DDPMScheduler(num_train_timesteps=50)
    assert s.num_train_timesteps == s.config.num_train_timesteps == len(s) == 50 and s.init_noise_sigma == 1.0
    x = torch.randn(SHAPE)
    assert s.scale_model_input(x, 3) is x
    assert s.previous_timestep(10) == 9 and int(s.previous_timestep(torch.tensor(0))) == -1
    s.set_timesteps(5)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=50)
    theirs.set_timesteps(5)
    assert [int(s.previous_timestep(t)) for t in s.timesteps] == [int(theirs.previous_timestep(t)) for t in theirs.timesteps]
    out = s.step(x, 40, x, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, SchedulerOutput)
    prev, x0 = out.to_tuple()
    assert prev is out.prev_sample is out["prev_sample"] and x0 is out[1]
    assert list(out.keys()) == ["prev_sample", "pred_original_sample"]  # a mapping, as diffusers' BaseOutput
    plain = s.step(x, 40, x, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert type(plain) is tuple and torch.equal(plain[0], prev)


def test_set_timesteps_errors():
    s = DDPMScheduler(num_train_timesteps=100)
    for kwargs, word in [(dict(num_inference_steps=5, timesteps=[3, 2]), "only one"),
                         (dict(timesteps=[5, 7, 2]), "descending"), (dict(timesteps=[5, 5]), "descending"),
                         (dict(timesteps=[100, 50]), "num_train_timesteps"), (dict(num_inference_steps=101), "101"),
                         (dict(), "num_inference_steps")]:
        with pytest.raises(ValueError, match=word):
            s.set_timesteps(**kwargs)
    s.set_timesteps(timesteps=[90, 40, 7])  # custom timesteps run as in diffusers
    theirs = diffusers.DDPMScheduler(num_train_timesteps=100)
    theirs.set_timesteps(timesteps=[90, 40, 7])
    for a, b in zip(run_loop(s, None), run_loop(theirs, None)):
        exact(a[0], b[0])
    with pytest.raises(ValueError, match="timestep=41"):
        s.step(torch.zeros(SHAPE), 41, torch.zeros(SHAPE))


def test_config_values_errors():
    with pytest.raises(ValueError, match="beta_schedule"):
        DDPMScheduler(beta_schedule="laplace")
    with pytest.raises(ValueError, match="variance_type"):
        DDPMScheduler(variance_type="fixed")
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMScheduler(prediction_type="x0")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDIMScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="trained_betas"):
        DDPMScheduler(num_train_timesteps=10, trained_betas=[0.1] * 5)
    with pytest.raises(ValueError, match="skip_prk_steps"):
        DDPMScheduler.from_config({"num_train_timesteps": 10, "skip_prk_steps": True})


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_save_load_both_directions(cls, tmp_path):
    kw = dict(num_train_timesteps=20, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
              timestep_spacing="trailing", clip_sample=False, rescale_betas_zero_snr=True,
              trained_betas=[0.01 * (i + 1) for i in range(20)])
    ours, theirs = getattr(__import__("ddpm"), cls)(**kw), getattr(diffusers, cls)(**kw)
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert written["_class_name"] == cls and written["trained_betas"] == kw["trained_betas"]
    loaded = getattr(diffusers, cls).from_pretrained(tmp_path / "ours")
    assert type(loaded).__name__ == cls
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == \
        {k: v for k, v in theirs.config.items() if not k.startswith("_")}
    exact(loaded.alphas_cumprod, ours.alphas_cumprod)
    theirs.save_pretrained(tmp_path / "theirs" / "scheduler")
    back = getattr(__import__("ddpm"), cls).from_pretrained(tmp_path / "theirs", subfolder="scheduler")
    assert dataclasses.astuple(back.config) == dataclasses.astuple(ours.config)  # the fields (metadata differs)
    exact(back.alphas_cumprod, theirs.alphas_cumprod)


def test_from_config_across_schedulers():
    ddpm_cfg = DDPMScheduler(beta_schedule="scaled_linear", variance_type="fixed_large", steps_offset=1).config
    ddim = DDIMScheduler.from_config(ddpm_cfg)  # DDPM-only key variance_type is dropped
    assert isinstance(ddim.config, DDIMSchedulerConfig) and ddim.config.beta_schedule == "scaled_linear"
    assert ddim.config.steps_offset == 1
    theirs = diffusers.DDIMScheduler(set_alpha_to_one=False, prediction_type="sample")
    ours = DDPMScheduler.from_config(theirs.config)  # a diffusers FrozenDict; set_alpha_to_one dropped
    assert ours.config.prediction_type == "sample"
    assert DDIMScheduler.from_config(theirs.config, timestep_spacing="trailing").config.set_alpha_to_one is False
    their_ddim = diffusers.DDIMScheduler.from_config(DDPMScheduler(prediction_type="v_prediction").config.__dict__)
    assert their_ddim.config.prediction_type == "v_prediction"
    # the scheduler_config.json of the original google/ddpm-* repos (diffusers 0.1.1) loads, as does a legacy key
    old = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02, "beta_schedule": "linear",
           "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None,
           "variance_type": "fixed_small", "tensor_format": "pt"}
    assert dataclasses.astuple(DDPMScheduler.from_config(old).config) == dataclasses.astuple(DDPMScheduler().config)
