"""ddpm.UNet against live diffusers.UNet2DModel: same weights, same inputs, same outputs and gradients.

Every case builds diffusers' model with seeded random weights (all parameters perturbed, so that a swapped norm or
projection cannot hide behind default inits), saves it, loads it with ``ddpm.UNet.from_pretrained``, and compares
the forward output (three timestep forms) and the gradient of a loss for every named parameter, then saves ours
and loads it back into diffusers. Tolerance: relative error max|a - b| / max|b| <= 1e-4 in float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from diffusers import UNet2DModel

from ddpm import blocks as ddpm_blocks
from ddpm import kernels
from ddpm.unet import UNet, UNetConfig

REL_TOL = 1e-4
SMALL = {k: v for k, v in json.loads((Path(__file__).parent.parent / "ddpm" / "assets" / "unet-small.json").read_text()
                                      ).items() if not k.startswith("_")}  # the default laptop model


BASE: dict[str, Any] = dict(
    block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, attention_head_dim=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)
THREE_LEVELS: dict[str, Any] = dict(
    block_out_channels=(8, 16, 16), norm_num_groups=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
SKIP: dict[str, Any] = dict(
    block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
    down_block_types=("SkipDownBlock2D", "SkipDownBlock2D"), up_block_types=("SkipUpBlock2D", "SkipUpBlock2D"),
)
ATTN_SKIP: dict[str, Any] = dict(  # the Skip attention GroupNorm has 32 groups: 32-channel blocks
    block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1, attention_head_dim=16,
    down_block_types=("AttnSkipDownBlock2D", "SkipDownBlock2D"),
    up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D"),
)

CASES: dict[str, dict[str, Any]] = {
    "attn-down-up": BASE,
    "cifar10-like": dict(THREE_LEVELS, layers_per_block=2, attention_head_dim=None, downsample_padding=0,
                         flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6),
    "padding1-two-heads": dict(THREE_LEVELS, downsample_padding=1, attention_head_dim=8),
    "head-dim-not-dividing": dict(BASE, attention_head_dim=3, in_channels=1, out_channels=2),
    "resnet-down-up-blocks": dict(BASE, down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
                                  up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D")),
    "attn-resnet-resampling": dict(BASE, down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
                                   up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
                                   downsample_type="resnet", upsample_type="resnet"),
    "scale-shift": dict(BASE, resnet_time_scale_shift="scale_shift"),
    "scale-shift-attn-groups": dict(BASE, resnet_time_scale_shift="scale_shift", attn_norm_num_groups=2),
    "attn-norm-groups": dict(BASE, attn_norm_num_groups=8),
    "fourier": dict(BASE, time_embedding_type="fourier", flip_sin_to_cos=True),
    "learned": dict(BASE, time_embedding_type="learned", num_train_timesteps=10),
    "class-embeds": dict(BASE, num_class_embeds=5),
    "class-timestep": dict(BASE, class_embed_type="timestep"),
    "class-identity": dict(BASE, class_embed_type="identity"),
    "no-mid-attention": dict(BASE, add_attention=False),
    "no-mid-block": dict(BASE, mid_block_type=None),
    "center-input": dict(BASE, center_input_sample=True),
    "act-mish": dict(BASE, act_fn="mish"),
    "act-gelu": dict(BASE, act_fn="gelu"),
    "act-relu": dict(BASE, act_fn="relu"),
    "act-swish": dict(BASE, act_fn="swish"),
    "dropout-eval": dict(BASE, dropout=0.1),
    "time-dim-mid-scale": dict(BASE, time_embedding_dim=24, mid_block_scale_factor=math.sqrt(2.0)),
    "unetres-names": dict(BASE, down_block_types=("UNetResDownBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "UNetResUpBlock2D")),
    "skip-fourier": dict(SKIP, time_embedding_type="fourier", mid_block_scale_factor=math.sqrt(2.0)),
    "attn-skip-ncsnpp": dict(ATTN_SKIP, norm_num_groups=None, time_embedding_type="fourier",
                             attention_head_dim=None, norm_eps=1e-6, mid_block_scale_factor=math.sqrt(2.0)),
    "attn-skip-scale-shift": dict(ATTN_SKIP, resnet_time_scale_shift="scale_shift", layers_per_block=2),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def make_inputs(cfg: dict[str, Any], seed: int) -> tuple[torch.Tensor, list[Any], torch.Tensor | None]:
    """A batch of 2, the three timestep forms, and class labels if the config wants them."""
    g = torch.Generator().manual_seed(seed)
    width = 16 if cfg.get("in_channels", 3) == 1 else 8  # one non-square case
    sample = torch.randn(2, cfg.get("in_channels", 3), 8, width, generator=g)
    kind = cfg.get("time_embedding_type", "positional")
    if kind == "fourier":  # noise levels sigma > 0
        timesteps: list[Any] = [3, torch.tensor(0.7), torch.tensor([0.5, 2.0])]
    elif kind == "learned":
        timesteps = [7, torch.tensor(4), torch.tensor([2, 9])]
    else:
        timesteps = [7, torch.tensor(481), torch.tensor([3, 999])]
    labels = None
    if cfg.get("class_embed_type") == "identity":
        dim = cfg.get("time_embedding_dim") or cfg["block_out_channels"][0] * 4
        labels = torch.randn(2, dim, generator=g)
    elif cfg.get("class_embed_type") == "timestep" or cfg.get("num_class_embeds"):
        labels = torch.tensor([1, 4])
    return sample, timesteps, labels


@pytest.fixture(params=["cpu-kernels", "plain"])
def kernels_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every parity case twice: with the CPU kernels behind ddpm/kernels/' door, and with the plain PyTorch
    layers that CUDA and torch.compile run (the door shut for the test, as DDPM_CPU_KERNELS=0 shuts it)."""
    with kernels.enabled(request.param == "cpu-kernels"):
        yield request.param


def grads(model: torch.nn.Module, out: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    (out * weight).sum().backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers_both_directions(name: str, kernels_mode: str, tmp_path: Path) -> None:
    cfg = CASES[name]
    torch.manual_seed(0)
    ref = UNet2DModel(**cfg).eval()
    randomize(ref, seed=1)
    ref.save_pretrained(tmp_path / "diffusers")
    ours = UNet.from_pretrained(tmp_path / "diffusers")
    assert not ours.training
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]

    sample, timesteps, labels = make_inputs(cfg, seed=2)
    assert kernels.applies(sample) == (kernels_mode == "cpu-kernels")
    for t in timesteps:
        with torch.no_grad():
            expected = ref(sample, t, class_labels=labels).sample
            got = ours(sample, t, class_labels=labels).sample
        assert got.shape == expected.shape
        assert rel_err(got, expected) <= REL_TOL, (name, t)

    # Batch 1 inside frozen_weights(): convolutions on prepacked weights (ddpm/kernels/), same reference.
    t1, labels1 = timesteps[-1][:1], labels[:1] if labels is not None else None
    with torch.no_grad():
        expected = ref(sample[:1], t1, class_labels=labels1).sample
        with ours.frozen_weights():
            got = ours(sample[:1], t1, class_labels=labels1).sample
            packed = ours.conv_in.packed
            assert packed is not None and (len(packed) > 0) == (kernels_mode == "cpu-kernels"), "prepacked?"
    assert rel_err(got, expected) <= REL_TOL, (name, "frozen_weights, batch 1")

    # Gradients of a fixed linear functional of the output, per-sample timesteps, for every named parameter.
    weight = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    t = timesteps[-1]
    g_ref = grads(ref, ref(sample, t, class_labels=labels).sample, weight)
    g_ours = grads(ours, ours(sample, t, class_labels=labels).sample, weight)
    assert g_ours.keys() == g_ref.keys()
    # Per tensor, relative to its own largest entry, floored at 1% of the largest gradient anywhere: the key bias
    # gradient is exactly zero in exact arithmetic (softmax ignores a per-row shift), so both sides hold only noise.
    floor = 1e-2 * max(g.abs().max().item() for g in g_ref.values() if g is not None)
    for key, expected_grad in g_ref.items():
        got_grad = g_ours[key]
        if expected_grad is None:  # frozen parameters (the Fourier frequencies)
            assert got_grad is None, key
            continue
        assert got_grad is not None, key
        scale = max(expected_grad.abs().max().item(), floor)
        assert (got_grad - expected_grad).abs().max().item() <= REL_TOL * scale, (name, key)

    # The other direction: ddpm saves, diffusers loads the folder with the same config and outputs.
    ours.save_pretrained(tmp_path / "ddpm")
    back = UNet2DModel.from_pretrained(tmp_path / "ddpm").eval()
    for key in UNetConfig.__dataclass_fields__:
        a, b = back.config[key], ref.config[key]
        assert (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b), key
    with torch.no_grad():
        assert rel_err(back(sample, timesteps[-1], class_labels=labels).sample,
                       ours(sample, timesteps[-1], class_labels=labels).sample) <= REL_TOL


# --- same seed, same initial weights; same module names and classes ---------------------------------------------

def built_after_seed(cls: Any, cfg: dict[str, Any]) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model built right after torch.manual_seed(0), and the next three numbers the generator gives."""
    torch.manual_seed(0)
    model = cls(**cfg)
    return model, torch.randn(3)


@pytest.mark.parametrize("name", list(CASES) + ["unet-small"])
def test_same_seed_same_initial_weights(name: str) -> None:
    cfg = CASES[name] if name in CASES else SMALL
    ref, ref_next = built_after_seed(UNet2DModel, cfg)
    ours, our_next = built_after_seed(UNet, cfg)
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert list(our_state) == list(ref_state)
    for key, value in ref_state.items():
        assert torch.equal(our_state[key], value), key
    assert torch.equal(our_next, ref_next)  # the same number of random draws: later draws agree too


@pytest.mark.parametrize("name", list(CASES))
def test_module_names_and_classes_match_diffusers(name: str) -> None:
    # Every diffusers module that holds parameters (and every block) has our module of the same class name under
    # the same name, so hooks and isinstance / class-name checks written against diffusers find ours. Left out:
    # diffusers' parameter-free resampling modules inside ResNet blocks (Downsample2D(use_conv=False), ...).
    with torch.device("meta"):
        ref, ours = UNet2DModel(**CASES[name]), UNet(**CASES[name])
    our_modules = dict(ours.named_modules())
    for qualname, module in ref.named_modules():
        if qualname and any(True for _ in module.parameters()):
            assert qualname in our_modules, qualname
            assert type(our_modules[qualname]).__name__ == type(module).__name__, qualname
    cfg = UNetConfig(**CASES[name])
    for blocks, names in ((ours.down_blocks, cfg.down_block_types), (ours.up_blocks, cfg.up_block_types)):
        for block, block_type in zip(blocks, names):
            assert type(block).__name__ == block_type.removeprefix("UNetRes")
            assert isinstance(block, getattr(ddpm_blocks, block_type.removeprefix("UNetRes")))


# --- real configs: structure only -------------------------------------------------------------------------------

CIFAR10 = dict(  # google/ddpm-cifar10-32, the 35.7M model of Ho et al. 2020
    sample_size=32, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
)
TRAIN_UNCONDITIONAL = dict(  # diffusers' examples/unconditional_image_generation/train_unconditional.py
    sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
)


@pytest.mark.parametrize("cfg, n_params", [(CIFAR10, 35_746_307), (TRAIN_UNCONDITIONAL, None)],
                         ids=["cifar10-35.7M", "train-unconditional-113.7M"])
def test_real_config_structure(cfg: dict[str, Any], n_params: int | None) -> None:
    with torch.device("meta"):
        ref, ours = UNet2DModel(**cfg), UNet(**cfg)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert list(our_shapes) == list(ref_shapes)
    assert our_shapes == ref_shapes
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    if n_params is not None:
        assert count == n_params
    else:
        assert round(count / 1e6, 1) == 113.7


# --- legacy attention names -------------------------------------------------------------------------------------

LEGACY_NAMES = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_legacy_attention_keys_load_and_match(fmt: str, tmp_path: Path) -> None:
    cfg = dict(THREE_LEVELS, attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)
    torch.manual_seed(0)
    ref = UNet2DModel(**cfg).eval()
    randomize(ref, seed=4)
    ref.save_pretrained(tmp_path)  # config.json (and new-style weights, replaced below)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    legacy = {}
    for key, value in ref.state_dict().items():
        for new, old in LEGACY_NAMES.items():
            key = key.replace(new, old)
        legacy[key] = value.clone()
    # 2 down-block + 3 up-block + 1 mid-block attention layers, each with weight and bias, all renamed
    assert sum(".query." in k for k in legacy) == 12 and not any(".to_q." in k for k in legacy)
    if fmt == "bin":  # the layout of the original google/ddpm-* checkpoints
        torch.save(legacy, tmp_path / "diffusion_pytorch_model.bin")
    else:
        from safetensors.torch import save_file
        save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))

    ours = UNet.from_pretrained(tmp_path)
    sample, timesteps, _ = make_inputs(cfg, seed=5)
    with torch.no_grad():
        for t in timesteps:
            assert rel_err(ours(sample, t).sample, ref(sample, t).sample) <= REL_TOL
