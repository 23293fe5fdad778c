"""Fuzzing the constructors of UNet, DDPMScheduler and DDIMScheduler with hypothesis.

Each example starts from a small valid configuration and overrides one to three of its arguments with values
drawn from a mix of valid ones, boundary cases and garbage (wrong types, NaN/inf, bad strings, mismatched lengths).
The property: construction either raises ValueError/TypeError whose message names one of the overridden arguments
(the base is valid, so one of them is to blame), or it succeeds and the object then works on a tiny input: a
forward pass (UNet) or set_timesteps + steps + add_noise (schedulers) with finite output of the right shape. Any
other exception, e.g. a shape error from deep inside ``forward``, fails the test.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ddpm import DDIMScheduler, DDPMScheduler, UNet

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Values that are wrong for (almost) every argument.
GARBAGE = st.sampled_from([None, True, False, "", "8", 2.5, -1, 0, float("nan"), float("inf"), -float("inf"),
                           [], (), {"a": 1}, b"x", object()])
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-3, 3))


def _fuzz(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(valid, valid, valid, GARBAGE)  # mostly plausible values, so that valid configs come up too


def _message_names(error: Exception, keys: list[str]) -> bool:
    return any(key in str(error) for key in keys)


@st.composite
def _overrides(draw: st.DrawFn, values: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    size = draw(st.sampled_from([1, 1, 2, 2, 3]))
    weighted = list(values) + ["@structure"] * 6 * ("@structure" in values)  # block layouts matter most
    keys = draw(st.lists(st.sampled_from(weighted), min_size=size, max_size=size, unique=True))
    out: dict[str, Any] = {}
    for key in keys:
        drawn = draw(values[key])
        out.update(drawn if key.startswith("@") else {key: drawn})  # "@..." entries override several keys
    return out


# --- UNet ---------------------------------------------------------------------------------------------------------

UNET_BASE: dict[str, Any] = dict(
    sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, attention_head_dim=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)
DOWN_NAMES = ["DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D", "SkipDownBlock2D", "AttnSkipDownBlock2D",
              "UNetResDownBlock2D"]
UP_NAMES = ["UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D",
            "UNetResUpBlock2D"]
CHANNELS = st.one_of(st.sampled_from([4, 8, 12, 16]), st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 0, -4]))
SMALL_INTS = st.integers(-2, 16)


@st.composite
def _structure(draw: st.DrawFn) -> dict[str, Any]:
    """Block types and widths together, mostly consistent with each other (1 to 3 levels, sometimes 0 or a
    mismatched length, a bad name or a wrong type)."""
    n = draw(st.sampled_from([2, 1, 2, 3, 3, 0]))
    lengths = draw(st.sampled_from([(n, n, n)] * 6 + [(n + 1, n, n), (n, n + 1, n), (n, n, n + 1)]))
    names = st.sampled_from(DOWN_NAMES + ["CrossAttnDownBlock2D"])
    # (hypothesis favours the first of sampled_from's choices and small integers: the rare branches come last)
    down = draw(st.lists(_fuzz(names) if draw(st.sampled_from(range(5))) == 4 else names,
                         min_size=lengths[0], max_size=lengths[0]))
    up = draw(st.lists(st.sampled_from(UP_NAMES + ["UpDecoderBlock2D"]), min_size=lengths[1], max_size=lengths[1]))
    if draw(st.sampled_from(range(4))) < 3:  # mostly mirror the down path, so that valid Skip/Attn configurations come up
        up = [d.replace("Down", "Up") for d in reversed(down) if isinstance(d, str)][:lengths[1]] or up
    channels = draw(st.lists(CHANNELS, min_size=lengths[2], max_size=lengths[2]))
    out = dict(down_block_types=down, up_block_types=up, block_out_channels=channels)
    if draw(st.sampled_from(range(10))) == 9:  # a string or a number where a list belongs
        key = draw(st.sampled_from(sorted(out)))
        out[key] = draw(st.sampled_from(["DownBlock2D", 8, None, "8,16"]))
    return out


UNET_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "sample_size": _fuzz(st.one_of(st.sampled_from([4, 8, 16, 6, 12, 2, 1, None, (8, 4), (4, 16), (8,), (8, 8, 8),
                                                    [8, 16], (8, "8"), (0, 8), 8.0]), SMALL_INTS)),
    "in_channels": _fuzz(st.one_of(SMALL_INTS, st.just(3.0))),
    "out_channels": _fuzz(st.one_of(SMALL_INTS, st.just(3.0))),
    "center_input_sample": _fuzz(st.booleans()),
    "time_embedding_type": _fuzz(st.sampled_from(["positional", "fourier", "learned", "rotary", "Positional"])),
    "time_embedding_dim": _fuzz(st.sampled_from([None, 1, 4, 8, 32, 0, -8, 8.0])),
    "freq_shift": _fuzz(st.one_of(NUMBERS, st.sampled_from([0, 1, 4, 7.5, 8, 100]))),
    "flip_sin_to_cos": _fuzz(st.booleans()),
    "mid_block_type": _fuzz(st.sampled_from(["UNetMidBlock2D", None, "UNetMidBlock2DCrossAttn"])),
    "layers_per_block": _fuzz(st.sampled_from([1, 2, 0, -1, 1.0])),
    "mid_block_scale_factor": _fuzz(st.one_of(NUMBERS, st.sampled_from([1, math.sqrt(2), 0]))),
    "downsample_padding": _fuzz(st.sampled_from([0, 1, 2, 3, -1, 1.0])),
    "downsample_type": _fuzz(st.sampled_from(["conv", "resnet", "fir", "Conv"])),
    "upsample_type": _fuzz(st.sampled_from(["conv", "resnet", "fir", "nearest"])),
    "dropout": _fuzz(st.one_of(NUMBERS, st.sampled_from([0.0, 0.1, 0.5, 1.0, 1.5]))),
    "act_fn": _fuzz(st.sampled_from(["silu", "swish", "mish", "gelu", "relu", "tanh", "SiLU"])),
    "attention_head_dim": _fuzz(st.sampled_from([None, 1, 2, 3, 4, 5, 8, 16, 32, 0, -4, 4.0])),
    "norm_num_groups": _fuzz(st.sampled_from([None, 1, 2, 3, 4, 8, 16, 32, 0, -4, 4.0])),
    "attn_norm_num_groups": _fuzz(st.sampled_from([None, 1, 2, 3, 4, 8, 16, 32, 0, -4, 4.0])),
    "norm_eps": _fuzz(st.one_of(NUMBERS, st.sampled_from([1e-5, 1e-6, 0.0, 1e3]))),
    "resnet_time_scale_shift": _fuzz(st.sampled_from(["default", "scale_shift", "spatial"])),
    "add_attention": _fuzz(st.booleans()),
    "class_embed_type": _fuzz(st.sampled_from([None, "timestep", "identity", "projection"])),
    "num_class_embeds": _fuzz(st.sampled_from([None, 1, 3, 10, 0, -1, 3.0])),
    "num_train_timesteps": _fuzz(st.sampled_from([None, 1, 10, 1000, 0, -5, 10.0])),
    "@structure": _structure(),
    "@unknown": st.sampled_from([{"resnet_groups": 4}, {"cross_attention_dim": 8}, {"sample_sizes": 8}]),
}


def _unet_inputs(config: Any) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
    """A tiny batch of two samples at the config's sample_size, a timestep and class labels that this UNet takes."""
    size = config.sample_size if config.sample_size is not None else 8
    height, width = (size, size) if isinstance(size, int) else size
    sample = torch.randn(2, config.in_channels, height, width)
    # A fourier UNet takes noise levels sigma > 0 as a tensor (a Python number is truncated to an integer, as in
    # diffusers); a learned one integer indices below num_train_timesteps.
    timestep: Any = {"fourier": torch.tensor([0.7]), "learned": min(3, (config.num_train_timesteps or 1) - 1)}.get(
        config.time_embedding_type, 3)
    labels = None
    temb_dim = config.time_embedding_dim or 4 * config.block_out_channels[0]
    if config.class_embed_type == "identity":
        labels = torch.randn(2, temb_dim)
    elif config.class_embed_type == "timestep":
        labels = torch.tensor([1, 1]) if config.time_embedding_type != "learned" else torch.tensor([0, 0])
    elif config.num_class_embeds is not None:
        labels = torch.tensor([0, config.num_class_embeds - 1])
    return sample, timestep, labels


def check_unet(overrides: dict[str, Any]) -> None:
    kwargs = {**UNET_BASE, **overrides}
    torch.manual_seed(0)
    try:
        model = UNet(**kwargs)
    except (ValueError, TypeError) as e:
        assert _message_names(e, list(overrides)), f"{type(e).__name__} names none of {sorted(overrides)}: {e}"
        return
    sample, timestep, labels = _unet_inputs(model.config)
    with torch.no_grad():
        out = model(sample, timestep, class_labels=labels).sample
    assert out.shape == (2, model.config.out_channels, *sample.shape[2:])
    assert torch.isfinite(out).all(), f"non-finite output for {overrides}"


@FUZZ
@given(overrides=_overrides(UNET_VALUES))
@example(overrides={})  # the base itself must work
@example(overrides={"attention_head_dim": 32})  # wider than the attention block
@example(overrides={"sample_size": 7})  # not divisible by 2 ** (number of downsampling blocks)
@example(overrides={"downsample_padding": 2})
@example(overrides={"freq_shift": 4})  # = half the embedding width: a division by zero in the frequencies
@example(overrides={"down_block_types": [3, "DownBlock2D"]})
@example(overrides={"block_out_channels": []})
@example(overrides={"in_channels": 0})
@example(overrides={"layers_per_block": "2"})
@example(overrides={"norm_eps": 0.0})
@example(overrides={"down_block_types": ("SkipDownBlock2D", "SkipDownBlock2D"),
                    "up_block_types": ("SkipUpBlock2D", "SkipUpBlock2D"), "block_out_channels": (4, 6)})
@example(overrides={"down_block_types": ("SkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"),  # valid NCSN++
                    "up_block_types": ("SkipUpBlock2D",) * 3, "block_out_channels": (4, 8, 12),
                    "time_embedding_type": "fourier"})
@example(overrides={"down_block_types": ("ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                    "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
                    "block_out_channels": (4, 8, 12), "resnet_time_scale_shift": "scale_shift"})
@example(overrides={"down_block_types": ("DownBlock2D", "SkipDownBlock2D"),  # the Skip image path would end at
                    "up_block_types": ("SkipUpBlock2D", "UpBlock2D"), "block_out_channels": (4, 8)})  # half size
@example(overrides={"down_block_types": ("DownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"),  # ... start at
                    "up_block_types": ("SkipUpBlock2D",) * 3, "block_out_channels": (4, 8, 8)})  # twice the size
@example(overrides={"class_embed_type": "identity", "time_embedding_dim": 8})
@example(overrides={"class_embed_type": "timestep", "time_embedding_type": "learned", "num_train_timesteps": 10})
@example(overrides={"num_class_embeds": 3, "sample_size": (8, 4)})
def test_unet_constructor_fuzz(overrides: dict[str, Any]) -> None:
    check_unet(overrides)


def test_forward_rejects_resolution_not_divisible_by_downsampling() -> None:
    model = UNet(**{**UNET_BASE, "sample_size": None, "block_out_channels": (4, 8, 8), "attention_head_dim": None,
                    "down_block_types": ("DownBlock2D",) * 3, "up_block_types": ("UpBlock2D",) * 3})
    with torch.no_grad():
        assert model(torch.randn(1, 3, 12, 8), 5).sample.shape == (1, 3, 12, 8)  # two downsamplings: 4 divides both
        for shape in [(1, 3, 10, 8), (1, 3, 8, 6), (1, 3, 7, 7)]:
            with pytest.raises(ValueError, match="sample") as info:
                model(torch.randn(*shape), 5)
            assert f"{shape[2]}x{shape[3]}" in str(info.value) and "divisible by 4" in str(info.value), info.value
        with pytest.raises(ValueError, match="sample"):
            model(torch.randn(1, 1, 8, 8), 5)  # wrong number of channels
        with pytest.raises(ValueError, match="sample"):
            model(torch.randn(3, 8, 8), 5)  # no batch dimension


def test_config_rejects_sample_size_not_divisible_by_downsampling() -> None:
    three_levels = dict(block_out_channels=(4, 8, 8), down_block_types=("DownBlock2D",) * 3,
                        up_block_types=("UpBlock2D",) * 3)
    with pytest.raises(ValueError, match="sample_size=6 must be divisible by 4"):
        UNet(**{**UNET_BASE, **three_levels, "sample_size": 6})
    assert UNet(**{**UNET_BASE, **three_levels, "sample_size": 12}).config.sample_size == 12
    with pytest.raises(ValueError, match="sample_size"):
        UNet(**{**UNET_BASE, "sample_size": (8, 5)})
    assert UNet(**{**UNET_BASE, "sample_size": (8, 4)}).config.sample_size == (8, 4)


# --- schedulers ---------------------------------------------------------------------------------------------------

T = 20  # the base schedules' length: small, so that every example builds its tables quickly
SCHED_BASE: dict[str, Any] = dict(num_train_timesteps=T)
BETAS = st.one_of(NUMBERS, st.sampled_from([1e-4, 0.02, 0.5, 0.999, 1.0, 1e-12, 0, -1e-4]))
FLAGS = _fuzz(st.one_of(st.booleans(), st.sampled_from([0, 1, "True", np.bool_(True)])))


@st.composite
def _trained_betas(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.sampled_from([T, T, T, T - 1, T + 1, 0]))
    betas = draw(st.lists(st.floats(1e-4, 0.2) | BETAS, min_size=n, max_size=n))
    kind = draw(st.sampled_from(["list", "list", "numpy", "tensor", "2d", "str"]))
    value: Any = {"list": betas, "numpy": np.array(betas), "tensor": torch.tensor(betas, dtype=torch.float64),
                  "2d": [betas], "str": [str(b) for b in betas]}[kind]
    return {"trained_betas": value}


SCHED_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "num_train_timesteps": _fuzz(st.sampled_from([1, 2, 3, 10, 50, 0, -1, 10.0, True])),
    "beta_start": _fuzz(BETAS),
    "beta_end": _fuzz(BETAS),
    "beta_schedule": _fuzz(st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "cosine"])),
    "@trained_betas": _trained_betas(),
    "trained_betas": GARBAGE,
    "variance_type": _fuzz(st.sampled_from(["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                                            "learned", "learned_range", "fixed"])),
    "clip_sample": FLAGS,
    "set_alpha_to_one": FLAGS,
    "prediction_type": _fuzz(st.sampled_from(["epsilon", "sample", "v_prediction", "x0"])),
    "thresholding": FLAGS,
    "dynamic_thresholding_ratio": _fuzz(st.one_of(NUMBERS, st.sampled_from([0.995, 0.5, 1.0, 0.0, 1.5]))),
    "clip_sample_range": _fuzz(st.one_of(NUMBERS, st.sampled_from([1.0, 0.5, 2.0, 0.0, -1.0]))),
    "sample_max_value": _fuzz(st.one_of(NUMBERS, st.sampled_from([1.0, 0.5, 2.0, 0.0, -1.0]))),
    "timestep_spacing": _fuzz(st.sampled_from(["leading", "trailing", "linspace", "uniform"])),
    "steps_offset": _fuzz(st.sampled_from([0, 1, 5, 19, 20, 25, -1, 1.0])),
    "rescale_betas_zero_snr": FLAGS,
    "@unknown": st.sampled_from([{"skip_prk_steps": True}, {"clip_sample_max": 1.0}]),
}
DDIM_ONLY, DDPM_ONLY = {"set_alpha_to_one"}, {"variance_type"}


def _finite_or_degenerate(x: torch.Tensor, scheduler: Any, t: int) -> bool:
    """Finite, or the one case the maths leaves undefined: ε-prediction with ᾱ_t = 0 (zero terminal SNR, or a
    schedule whose ᾱ underflows) makes x̂_0 = (x_t − ε)/√ᾱ_t infinite unless it is clipped (diffusers alike)."""
    if torch.isfinite(x).all():
        return True
    c = scheduler.config
    return (float(scheduler.alphas_cumprod[t]) == 0.0 and c.prediction_type == "epsilon"
            and (c.thresholding or not c.clip_sample))


def check_scheduler(cls: type, overrides: dict[str, Any], num_inference_steps: int, eta: float) -> None:
    try:
        scheduler = cls(**{**SCHED_BASE, **overrides})
    except (ValueError, TypeError) as e:
        assert _message_names(e, list(overrides)), f"{type(e).__name__} names none of {sorted(overrides)}: {e}"
        return
    n_train = scheduler.num_train_timesteps
    try:
        scheduler.set_timesteps(min(num_inference_steps, n_train))
    except ValueError as e:  # leading spacing: steps_offset can push the first timestep past T for some n
        assert "steps_offset" in str(e), e
        scheduler.set_timesteps(1)
    assert torch.isfinite(scheduler.alphas_cumprod).all() and (scheduler.alphas_cumprod >= 0).all()
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, 4, 4, generator=generator)
    learned = getattr(scheduler.config, "variance_type", "") in ("learned", "learned_range")
    model_output = torch.randn(2, 6 if learned else 3, 4, 4, generator=generator)
    if learned:
        model_output[:, 3:] = model_output[:, 3:].abs() if scheduler.config.variance_type == "learned" else 0.3
    for t in {int(scheduler.timesteps[0]), int(scheduler.timesteps[-1])}:
        kwargs = dict(eta=eta) if cls is DDIMScheduler else {}
        prev, x0 = scheduler.step(model_output, t, sample, generator=generator, **kwargs).to_tuple()
        assert prev.shape == x0.shape == sample.shape
        assert _finite_or_degenerate(prev, scheduler, t), f"non-finite step at t={t} for {overrides}"
    noisy = scheduler.add_noise(sample, model_output[:, :3], torch.tensor([0, n_train - 1]))
    assert noisy.shape == sample.shape and torch.isfinite(noisy).all()


@FUZZ
@given(overrides=_overrides({k: v for k, v in SCHED_VALUES.items() if k not in DDIM_ONLY}),
       num_inference_steps=st.sampled_from([1, 2, 5, 1000]))
@example(overrides={}, num_inference_steps=5)
@example(overrides={"beta_start": 0.02, "beta_end": 1e-4}, num_inference_steps=5)  # beta_start > beta_end
@example(overrides={"beta_start": 0.0}, num_inference_steps=T)  # β_0 = 0: the last step divides 0 by 0
@example(overrides={"beta_start": float("nan")}, num_inference_steps=5)
@example(overrides={"beta_end": float("inf")}, num_inference_steps=5)
@example(overrides={"trained_betas": [0.1] * (T - 1)}, num_inference_steps=5)
@example(overrides={"trained_betas": "0.1"}, num_inference_steps=5)
@example(overrides={"num_train_timesteps": 0}, num_inference_steps=5)
@example(overrides={"steps_offset": T}, num_inference_steps=1)
@example(overrides={"num_train_timesteps": 1, "rescale_betas_zero_snr": True}, num_inference_steps=1)
@example(overrides={"sample_max_value": 0.0, "thresholding": True}, num_inference_steps=5)
@example(overrides={"clip_sample": "no"}, num_inference_steps=5)
def test_ddpm_scheduler_constructor_fuzz(overrides: dict[str, Any], num_inference_steps: int) -> None:
    check_scheduler(DDPMScheduler, overrides, num_inference_steps, 0.0)


@FUZZ
@given(overrides=_overrides({k: v for k, v in SCHED_VALUES.items() if k not in DDPM_ONLY}),
       num_inference_steps=st.sampled_from([1, 2, 5, 1000]), eta=st.sampled_from([0.0, 0.5, 1.0]))
@example(overrides={}, num_inference_steps=5, eta=1.0)
@example(overrides={"beta_start": 0.0}, num_inference_steps=T, eta=1.0)
@example(overrides={"dynamic_thresholding_ratio": "0.9"}, num_inference_steps=5, eta=0.0)
@example(overrides={"steps_offset": -1}, num_inference_steps=5, eta=0.0)
def test_ddim_scheduler_constructor_fuzz(overrides: dict[str, Any], num_inference_steps: int, eta: float) -> None:
    check_scheduler(DDIMScheduler, overrides, num_inference_steps, eta)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_from_config_validates_like_the_constructor(cls: type) -> None:
    # A scheduler_config.json goes through the same checks as keyword arguments.
    for bad, key in [({"beta_start": 0.5, "beta_end": 0.1}, "beta_start"), ({"steps_offset": "1"}, "steps_offset"),
                     ({"trained_betas": [0.1, "x"]}, "trained_betas"), ({"clip_sample": None}, "clip_sample")]:
        with pytest.raises((ValueError, TypeError), match=key):
            cls.from_config({"num_train_timesteps": 2, **bad})
