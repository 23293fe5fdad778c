"""ddpm.UNet on its own: config validation, outputs, loading/saving errors, gradient checkpointing, dtypes."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from diffusers import UNet2DModel

from ddpm import kernels
from ddpm.unet import UNet, UNetConfig, UNetOutput

TINY: dict[str, Any] = dict(
    block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, attention_head_dim=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)


def tiny_unet(seed: int = 0, **overrides: Any) -> UNet:
    torch.manual_seed(seed)
    return UNet(**{**TINY, **overrides})


# --- configuration errors name the key --------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (dict(up_block_types=("UpBlock2D",)), "up_block_types"),
    (dict(block_out_channels=(8, 16, 32)), "block_out_channels"),
    (dict(block_out_channels=(8, 18)), "norm_num_groups"),
    (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")), "down_block_types"),
    (dict(up_block_types=("AttnUpBlock2D", "UpDecoderBlock2D")), "up_block_types"),
    (dict(time_embedding_type="rotary"), "time_embedding_type"),
    (dict(time_embedding_type="learned"), "num_train_timesteps"),
    (dict(act_fn="tanh"), "act_fn"),
    (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift"),
    (dict(class_embed_type="projection"), "class_embed_type"),
    (dict(downsample_type="fir"), "downsample_type"),
    (dict(upsample_type="fir"), "upsample_type"),
    (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "mid_block_type"),
    (dict(attn_norm_num_groups=3), "attn_norm_num_groups"),
    (dict(down_block_types=("SkipDownBlock2D", "SkipDownBlock2D"), up_block_types=("SkipUpBlock2D",) * 2,
          in_channels=1), "in_channels"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(norm_num_groups=None), "norm_num_groups"),
    (dict(not_a_key=1), "not_a_key"),
])
def test_bad_config_is_value_error_naming_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        UNet(**{**TINY, **overrides})


def test_unknown_block_type_message_names_the_type() -> None:
    with pytest.raises(ValueError, match="CrossAttnDownBlock2D"):
        UNetConfig(**{**TINY, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D")})


def test_config_is_frozen_and_lists_become_tuples() -> None:
    config = UNetConfig(**{**TINY, "block_out_channels": [8, 16]})
    assert config.block_out_channels == (8, 16)
    with pytest.raises(AttributeError):
        config.in_channels = 1  # type: ignore[misc]
    assert hash(config) == hash(UNetConfig(**TINY))


def test_unknown_key_in_config_json_names_key_and_file(tmp_path: Path) -> None:
    tiny_unet().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    data["resnet_groups_typo"] = 4
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="resnet_groups_typo") as info:
        UNet.from_pretrained(tmp_path)
    assert "config.json" in str(info.value)


def test_other_class_name_is_refused(tmp_path: Path) -> None:
    tiny_unet().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    data = json.loads(path.read_text())
    assert data["_class_name"] == "UNet2DModel"
    data["_class_name"] = "UNet2DConditionModel"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        UNet.from_pretrained(tmp_path)


# --- forward ------------------------------------------------------------------------------------------------------

def test_output_as_attribute_and_tuple() -> None:
    unet = tiny_unet().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = unet(x, 10)
        plain = unet(x, 10, return_dict=False)
    assert isinstance(out, UNetOutput)
    assert out.sample.shape == (2, 3, 8, 8)
    assert torch.equal(out[0], out.sample)
    (unpacked,) = out.to_tuple()
    assert unpacked is out.sample is out["sample"] and list(out.keys()) == ["sample"]
    assert type(plain) is tuple and len(plain) == 1
    assert torch.equal(plain[0], out.sample)


def test_timestep_forms_agree() -> None:
    unet = tiny_unet().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        outs = [unet(x, t).sample for t in (5, torch.tensor(5), torch.tensor([5]), torch.tensor([5, 5]))]
        other = unet(x, torch.tensor([5, 6])).sample
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert torch.equal(other[0], outs[0][0]) and not torch.allclose(other[1], outs[0][1])


def test_class_label_errors() -> None:
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="class_labels"):
        tiny_unet(num_class_embeds=3)(x, 1)
    with pytest.raises(ValueError, match="class_labels"):
        tiny_unet()(x, 1, class_labels=torch.tensor([0]))


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    unet = tiny_unet(seed=1, layers_per_block=2)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    target = torch.randn(2, 3, 8, 8)

    def grads() -> dict[str, torch.Tensor]:
        unet.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(unet(x, t).sample, target).backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    plain = grads()
    unet.enable_gradient_checkpointing()
    assert all(b.gradient_checkpointing for b in unet.down_blocks)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(unet.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("in_channels", [3, 1])
def test_output_layout_follows_input_layout(in_channels: int) -> None:
    unet = tiny_unet(in_channels=in_channels, out_channels=2).eval()
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # the internal layout
    x = torch.randn(2, in_channels, 8, 8)
    with torch.no_grad():
        out = unet(x, 3).sample
        out_cl = unet(x.to(memory_format=torch.channels_last), 3).sample
        unet = unet.to(memory_format=torch.contiguous_format)
        out_nchw_weights = unet(x, 3).sample
    assert out.is_contiguous()
    if in_channels == 3:  # a 1-channel batch is both layouts at once: it gets NCHW back
        assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    torch.testing.assert_close(out_cl, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_nchw_weights, out, rtol=1e-5, atol=1e-6)


# --- frozen_weights(): prepacked convolution weights at inference --------------------------------------------------
# Checked against diffusers' UNet2DModel with the same weights (an independent reference), not against ddpm itself.

def twins(seed: int) -> tuple[UNet, UNet2DModel]:
    """ddpm's UNet and diffusers' UNet2DModel with the same (seeded) weights."""
    torch.manual_seed(seed)
    ref = UNet2DModel(**TINY).eval()
    ours = UNet(**TINY).eval()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def close_to(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> bool:
    return (got - expected).abs().max().item() <= tol * expected.abs().max().item()


def test_frozen_weights_match_diffusers_and_see_weight_updates() -> None:
    unet, ref = twins(seed=3)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # 2 x 8 x 8: prepacked
    other = UNet2DModel(**TINY).state_dict()
    with torch.no_grad(), unet.frozen_weights():
        assert close_to(unet(x, 5).sample, ref(x, 5).sample)
        assert unet.conv_in.packed is not None and len(unet.conv_in.packed) > 0, "nothing was prepacked"
        with unet.frozen_weights():  # nested blocks share the open cache
            assert unet.conv_in.packed is unet.up_blocks[0].upsamplers[0].packed
        # in-place updates bump the version counters: an optimizer-like step and a load_state_dict
        for model in (unet, ref):
            for p in model.parameters():
                p.mul_(1.5)
        assert close_to(unet(x, 5).sample, ref(x, 5).sample)
        unet.load_state_dict(other)
        ref.load_state_dict(other)
        assert close_to(unet(x, 5).sample, ref(x, 5).sample)
    assert unet.conv_in.packed is None  # released at the end of the block


def test_frozen_weights_is_scoped_to_one_unet() -> None:
    (unet, ref), (bystander, bystander_ref) = twins(seed=4), twins(seed=5)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), unet.frozen_weights():
        out = bystander(x, 7).sample
        assert bystander.conv_in.packed is None
        copy_made_inside = copy.deepcopy(unet)  # a copy packs nothing, inside the block or after it
        assert close_to(copy_made_inside(x, 7).sample, ref(x, 7).sample)
        packed = copy_made_inside.conv_in.packed
        assert packed is not None and len(packed) == 0 and not packed.open
    assert close_to(out, bystander_ref(x, 7).sample)
    with torch.no_grad():  # after the block the copy still packs nothing, and sees weight changes
        for model in (copy_made_inside, ref):
            for p in model.parameters():
                p.data.mul_(0.5)
        assert close_to(copy_made_inside(x, 7).sample, ref(x, 7).sample)


def test_frozen_weights_under_bf16_autocast_and_with_grad() -> None:
    unet, ref = twins(seed=5)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref(x, 9).sample.float()
        with unet.frozen_weights():
            got = unet(x, 9).sample.float()
            packed = unet.conv_in.packed
            assert packed is not None and (torch.bfloat16 in packed.dtypes()) == kernels.applies(x)
    assert close_to(got, expected, tol=3e-2)  # bf16 on both sides
    with unet.frozen_weights():  # with autograd on, nothing is prepacked and gradients flow
        unet(x, 9).sample.sum().backward()
        assert unet.conv_in.packed is not None and len(unet.conv_in.packed) == 0
    assert all(p.grad is not None for p in unet.conv_in.parameters())


# --- diffusers' ModelMixin surface, checked against diffusers ----------------------------------------------------

SURFACE_CASES = {
    "attention": {},
    "learned-and-class-embeds": dict(time_embedding_type="learned", num_train_timesteps=10, num_class_embeds=5),
    "fourier": dict(time_embedding_type="fourier"),
}


@pytest.mark.parametrize("case", list(SURFACE_CASES))
def test_model_surface_matches_diffusers(case: str) -> None:
    cfg = {**TINY, **SURFACE_CASES[case]}
    torch.manual_seed(0)
    ref, ours = UNet2DModel(**cfg), UNet(**cfg)
    assert ours.dtype == ref.dtype == torch.float32 and ours.device == ref.device == torch.device("cpu")
    for only_trainable in (False, True):
        for exclude_embeddings in (False, True):
            assert ours.num_parameters(only_trainable, exclude_embeddings) == ref.num_parameters(
                only_trainable=only_trainable, exclude_embeddings=exclude_embeddings), (only_trainable,
                                                                                        exclude_embeddings)
    assert UNet._supports_gradient_checkpointing is UNet2DModel._supports_gradient_checkpointing is True
    assert UNet._keep_in_fp32_modules == UNet2DModel._keep_in_fp32_modules
    assert ours.to(torch.float64).dtype == ref.to(torch.float64).dtype == torch.float64


def test_gradient_checkpointing_switches_as_in_diffusers() -> None:
    torch.manual_seed(0)
    ref, ours = UNet2DModel(**TINY), UNet(**TINY)
    ours.load_state_dict(ref.state_dict())
    calls: dict[str, list[str]] = {"diffusers": [], "ddpm": []}
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    grads = {}
    for side, model in (("diffusers", ref), ("ddpm", ours)):
        assert not model.is_gradient_checkpointing

        def recording(layer: torch.nn.Module, *args: Any, side: str = side) -> Any:
            calls[side].append(type(layer).__name__)
            return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)

        model.enable_gradient_checkpointing(recording)
        assert model.is_gradient_checkpointing
        model(x, t).sample.square().mean().backward()
        grads[side] = {n: p.grad for n, p in model.named_parameters()}
        model.disable_gradient_checkpointing()
        assert not model.is_gradient_checkpointing
        with torch.no_grad():  # no checkpointing without autograd
            model(x, t)
    assert calls["ddpm"] == calls["diffusers"] and len(calls["ddpm"]) > 3
    for name, g in grads["diffusers"].items():
        torch.testing.assert_close(grads["ddpm"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_register_to_config_replaces_values_as_in_diffusers() -> None:
    torch.manual_seed(0)
    ref, ours = UNet2DModel(**TINY), UNet(**TINY)
    for model in (ref, ours):  # model surgery, then the config follows: a 4-channel input
        model.conv_in = torch.nn.Conv2d(4, 8, kernel_size=3, padding=1)
        model.register_to_config(in_channels=4)
    assert ours.config.in_channels == ref.config.in_channels == 4
    assert isinstance(ours.config, UNetConfig) and ours.config.block_out_channels == (8, 16)
    assert ours(torch.randn(1, 4, 8, 8), 3).sample.shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="not_a_key"):
        ours.register_to_config(not_a_key=1)
    with pytest.raises(ValueError, match="layers_per_block"):
        ours.register_to_config(layers_per_block=0)


# --- loading and saving -------------------------------------------------------------------------------------------

def test_save_load_roundtrip_and_from_config(tmp_path: Path) -> None:
    unet = tiny_unet(seed=2).eval()
    unet.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = UNet.from_pretrained(tmp_path)
    assert loaded.config == unet.config
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 4).sample, unet(x, 4).sample)
    data = json.loads((tmp_path / "config.json").read_text())
    assert UNet.from_config(data).config == unet.config
    assert UNet.from_config(unet.config).config == unet.config


def test_bin_checkpoint_loads_with_weights_only(tmp_path: Path) -> None:
    unet = tiny_unet(seed=3).eval()
    unet.save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(unet.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    loaded = UNet.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 4).sample, unet(x, 4).sample)


class NotATensor:  # a pickled object that weights_only=True must refuse
    pass


def test_bin_with_arbitrary_objects_is_refused(tmp_path: Path) -> None:
    tiny_unet().save_pretrained(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": NotATensor()}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="refused"):
        UNet.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit, expected", [
    ("drop", "missing keys: conv_in.weight"),
    ("extra", "unexpected keys: extra.weight"),
    ("shape", "shape mismatches: conv_out.bias"),
])
def test_strict_load_names_the_problem_and_the_file(tmp_path: Path, edit: str, expected: str) -> None:
    from safetensors.torch import load_file, save_file

    tiny_unet().save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    if edit == "drop":
        del state["conv_in.weight"]
    elif edit == "extra":
        state["extra.weight"] = torch.zeros(2)
    else:
        state["conv_out.bias"] = torch.zeros(5)
    save_file(state, str(path))
    with pytest.raises(ValueError, match=expected) as info:
        UNet.from_pretrained(tmp_path)
    assert str(path) in str(info.value)


def test_torch_dtype_and_default_float32(tmp_path: Path) -> None:
    unet = tiny_unet(time_embedding_type="fourier")
    unet.half().save_pretrained(tmp_path)
    assert UNet.from_pretrained(tmp_path).dtype == torch.float32
    half = UNet.from_pretrained(tmp_path, torch_dtype=torch.float16)
    assert half.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in half.parameters())
    assert half.time_proj.weight.requires_grad is False  # the frozen Fourier frequencies stay frozen


def test_subfolder(tmp_path: Path) -> None:
    tiny_unet().save_pretrained(tmp_path / "unet")
    assert UNet.from_pretrained(tmp_path, subfolder="unet").config.block_out_channels == (8, 16)


def test_hub_id_offline_says_a_local_path_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local"):
        UNet.from_pretrained("someone/nothing")


def test_block_tables_agree_with_the_config_description() -> None:
    from ddpm import blocks
    from ddpm.unet_config import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES

    for classes, skip_classes, described in ((blocks.DOWN_BLOCKS, blocks.SKIP_DOWN_BLOCKS, DOWN_BLOCK_TYPES),
                                            (blocks.UP_BLOCKS, blocks.SKIP_UP_BLOCKS, UP_BLOCK_TYPES)):
        assert set(classes) | set(skip_classes) == set(described) and not set(classes) & set(skip_classes)
        assert {name for name, kind in described.items() if kind.resample == "fir"} == set(skip_classes)
        assert all(cls.__name__ == name for name, cls in {**classes, **skip_classes}.items())
