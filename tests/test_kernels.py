"""The CPU kernels behind ddpm/kernels/' door: where the door opens, and gradients of the hand-written backward
passes against independent references (diffusers' layers, or plain PyTorch ops with the door shut).

The UNet-level parity suite (test_unet_parity.py) runs every config with the door open and shut; these tests reach
the kernels' branches that its tiny maps do not (the phase-split upsampling above its size threshold, bf16).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention as DiffusersAttention
from diffusers.models.resnet import ResnetBlock2D as DiffusersResnetBlock2D
from diffusers.models.upsampling import Upsample2D as DiffusersUpsample2D

from ddpm import kernels
from ddpm.kernels import convolution, door, narrow_heads
from ddpm.layers import Attention, GroupNorm, ResnetBlock2D, Upsample2D

REPO = Path(__file__).resolve().parent.parent


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() / b.float().abs().max().item()


# --- the door -----------------------------------------------------------------------------------------------------

def test_door_opens_for_cpu_float32_and_bf16_only() -> None:
    x = torch.randn(1, 4, 4, 4)
    assert kernels.applies(x)
    assert not kernels.applies(x.double())  # a dtype oneDNN does not run
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.applies(x) == door._BF16  # only where the CPU supports bf16
    with kernels.enabled(False):
        assert not kernels.applies(x)
        with kernels.enabled(True):
            assert kernels.applies(x)
        assert not kernels.applies(x)
    assert kernels.applies(x)


def test_door_shut_for_a_cpu_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(door, "_BF16", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels.applies(torch.randn(1, 4, 4, 4))
    assert kernels.applies(torch.randn(1, 4, 4, 4))


def test_environment_switch_shuts_the_door() -> None:
    code = "import torch; from ddpm import kernels; print(kernels.applies(torch.randn(1, 4, 4, 4)))"
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**os.environ, "DDPM_CPU_KERNELS": value, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == expected


def test_door_shut_while_tracing() -> None:
    seen = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(kernels.applies(x))
        return x * 2

    torch.fx.symbolic_trace(probe)
    with warnings.catch_warnings():  # deprecated in recent torch, still in use
        warnings.simplefilter("ignore")
        torch.jit.trace(probe, torch.randn(1, 2, 2, 2), check_trace=False)
    assert seen == [False, False]
    probe(torch.randn(1, 2, 2, 2))
    assert seen[-1] is True


def test_a_hook_on_a_submodule_runs_and_gets_the_plain_path() -> None:
    torch.manual_seed(0)
    block = perturbed(ResnetBlock2D(8, 8, 16, groups=4), seed=1)
    x, temb = torch.randn(2, 8, 8, 8), torch.randn(2, 16)
    assert kernels.applies(x, block) and block.fusable
    with torch.no_grad():
        fused = block(x, temb)
        seen = []
        handle = block.norm2.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        assert not kernels.applies(x, block)
        hooked = block(x, temb)
        handle.remove()
    assert seen == [torch.Size([2, 8, 8, 8])]
    assert rel_err(hooked, fused) <= 1e-5


# --- phase-split upsampling, above its size threshold ------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 8, 8, 8), (3, 6, 12, 10), (2, 6, 12, 10)])  # N*H*W 256, 360; 240: below
def test_upsample_phase_split_matches_diffusers_with_gradients(shape: tuple[int, int, int, int],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    n, c, height, width = shape
    torch.manual_seed(0)
    ref = perturbed(DiffusersUpsample2D(c, use_conv=True, out_channels=c), seed=1)
    ours = Upsample2D(c)
    ours.load_state_dict(ref.state_dict())
    ours.to(memory_format=torch.channels_last)
    phase_calls = []
    real = convolution._phase_weights
    monkeypatch.setattr(convolution, "_phase_weights", lambda *a: phase_calls.append(1) or real(*a))

    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g)
    weight = torch.randn(n, c, 2 * height, 2 * width, generator=g)
    results = []
    for model in (ref, ours):
        xx = x.clone().requires_grad_()
        out = model(xx)
        (out * weight).sum().backward()
        results.append((out, xx.grad, model.conv.weight.grad, model.conv.bias.grad))
    assert phase_calls == ([1] if n * height * width >= 2 * convolution._FEW_PIXELS else [])
    for got, expected in zip(results[1], results[0]):
        assert got.shape == expected.shape
        assert rel_err(got, expected) <= 1e-5


# --- attention of narrow heads as chunked GEMMs ------------------------------------------------------------------

@pytest.mark.parametrize("shape,dim_head,chunk", [
    ((4, 16, 4, 4), 8, None),      # one chunk
    ((3, 32, 8, 8), 8, 3 * 64**2),  # 12 heads' scores in chunks of 3 (64 tokens)
    ((2, 32, 6, 5), 16, 5 * 30**2),  # 4 heads in chunks of 5: one partial chunk; a map that is not square
    ((2, 64, 4, 4), 32, 1),        # chunks of one head
])
def test_narrow_head_attention_matches_diffusers_with_gradients(shape: tuple[int, int, int, int], dim_head: int,
                                                                chunk: int | None,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    n, c, height, width = shape
    if chunk is not None:
        monkeypatch.setattr(narrow_heads, "_SCORES_PER_CHUNK", chunk)
    torch.manual_seed(0)
    ref = perturbed(DiffusersAttention(c, heads=c // dim_head, dim_head=dim_head, norm_num_groups=4, eps=1e-6,
                                       residual_connection=True, bias=True, upcast_softmax=True,
                                       rescale_output_factor=1.0, _from_deprecated_attn_block=True), seed=1)
    ours = Attention(c, heads=c // dim_head, dim_head=dim_head, norm_num_groups=4)
    ours.load_state_dict(ref.state_dict())
    narrow, chunk_heads = [], []
    real = narrow_heads._NarrowHeads.apply
    monkeypatch.setattr(narrow_heads._NarrowHeads, "apply", lambda *a: narrow.append(1) or real(*a))
    real_buffers = narrow_heads._chunk_buffers

    def recorded_buffers(q: torch.Tensor, count: int) -> list[torch.Tensor]:  # heads per chunk, forward and backward
        buffers = real_buffers(q, count)
        chunk_heads.append(len(buffers[0]))
        return buffers

    monkeypatch.setattr(narrow_heads, "_chunk_buffers", recorded_buffers)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g) * 3  # sharper softmax rows
    weight = torch.randn(shape, generator=g)
    results = []
    for model, memory_format in ((ref, torch.contiguous_format), (ours, torch.channels_last)):
        xx = x.clone().to(memory_format=memory_format).requires_grad_()
        out = model(xx)
        (out * weight).sum().backward()
        results.append({"out": out, "x": xx.grad} | {name: p.grad for name, p in model.named_parameters()})
    assert narrow == ([1] if kernels.applies(x) else [])
    if narrow:  # chunks of the size set above: all heads at once, or the chunk's scores' worth of heads
        heads = n * (c // dim_head)
        assert chunk_heads == [heads if chunk is None else min(heads, max(1, chunk // (height * width) ** 2))] * 2
    assert results[0].keys() == results[1].keys()
    largest = max(t.abs().max().item() for t in results[0].values())
    for name, expected in results[0].items():
        got = results[1][name]
        assert got.shape == expected.shape
        if name == "to_k.bias":  # zero (softmax ignores a shift of a row's scores) but for rounding, on both sides
            assert max(got.abs().max().item(), expected.abs().max().item()) <= 1e-6 * largest
        else:
            assert rel_err(got, expected) <= 1e-5, name


def test_wide_heads_keep_the_flash_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    torch.manual_seed(0)
    x = torch.randn(2, 128, 4, 4).to(memory_format=torch.channels_last)
    Attention(128, heads=2, dim_head=64, norm_num_groups=4)(x)
    assert calls == [torch.Size([2, 2, 16, 64])]


# --- the hand-written GroupNorm backward under bf16 ---------------------------------------------------------------

def test_group_norm_backward_under_bf16_matches_float32_ops() -> None:
    # The layer on a bf16 map (what a bf16 convolution hands it) against F.group_norm in float32 on the same
    # numbers: output and every gradient within bf16 rounding.
    torch.manual_seed(0)
    norm = perturbed(GroupNorm(4, 16), seed=3)
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(4, 16, 8, 8, generator=g) * 3 + 1).to(torch.bfloat16).to(memory_format=torch.channels_last)
    # an upstream gradient correlated with the output, so that every term of the backward pass matters
    weight = (x.float() + torch.randn(4, 16, 8, 8, generator=g)).to(torch.bfloat16)
    assert kernels.applies(x) == door._BF16

    xx = x.clone().requires_grad_()
    out = norm(xx)
    assert out.dtype == torch.bfloat16
    (out.float() * weight.float()).sum().backward()
    got = (out, xx.grad, norm.weight.grad, norm.bias.grad)

    norm.zero_grad()
    reference = x.float().requires_grad_()
    expected_out = F.group_norm(reference, 4, norm.weight, norm.bias, norm.eps)
    (expected_out.to(torch.bfloat16).float() * weight.float()).sum().backward()
    expected = (expected_out, reference.grad, norm.weight.grad, norm.bias.grad)
    for name, a, b in zip(("out", "x", "weight", "bias"), got, expected):
        assert rel_err(a, b) <= 2e-2, name  # measured: at most 1.3e-2; a 1% error in one term gives 3e-2


def test_fused_resnet_block_under_bf16_matches_diffusers() -> None:
    # The fused GroupNorm -> SiLU -> conv (hand-written GroupNorm backward, bf16 convolutions) against diffusers'
    # ResnetBlock2D under the same autocast: outputs and gradients within bf16 rounding of both.
    torch.manual_seed(0)
    ref = perturbed(DiffusersResnetBlock2D(in_channels=16, out_channels=8, temb_channels=32, groups=4, eps=1e-5),
                    seed=5)
    ours = ResnetBlock2D(16, 8, 32, groups=4, eps=1e-5)
    ours.load_state_dict(ref.state_dict())
    ours.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(6)
    x, temb = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 32, generator=g)
    with torch.no_grad():  # an upstream gradient correlated with the output (see above)
        weight = ref(x, temb) + torch.randn(4, 8, 8, 8, generator=g)
    results: list[Any] = []
    for model in (ref, ours):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xx, temb)
        (out.float() * weight).sum().backward()
        results.append({"out": out, "x": xx.grad, **{n: p.grad for n, p in model.named_parameters()}})
    assert kernels.applies(x) and ours.fusable
    for name, expected in results[0].items():
        assert rel_err(results[1][name], expected) <= 2e-2, name  # measured: at most 1.1e-2 (1% error: 3.7e-2)


# --- the plain path is what CUDA runs: attention in the autocast dtype, GroupNorm in float32 ----------------------

def test_plain_path_attention_in_autocast_dtype_and_group_norm_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    from ddpm.layers import Attention

    seen: dict[str, list[torch.dtype]] = {"sdpa": [], "group_norm": []}
    real_sdpa, real_gn = F.scaled_dot_product_attention, F.group_norm
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen["sdpa"].append(q.dtype) or real_sdpa(q, k, v, **kw))
    monkeypatch.setattr(F, "group_norm", lambda x, *a, **kw: seen["group_norm"].append(x.dtype) or real_gn(x, *a, **kw))
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, norm_num_groups=4)  # head_dim 8: the CPU kernels run it in float32
    x = torch.randn(2, 16, 4, 4).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with kernels.enabled(False):  # the plain layers, as on CUDA
            plain = attn(x)
        assert seen == {"sdpa": [torch.bfloat16], "group_norm": [torch.float32]}
        seen["sdpa"].clear()
        if kernels.applies(x):  # the CPU door: the narrow heads run as float32 GEMMs
            products: list[torch.dtype] = []
            for name in ("bmm", "baddbmm"):
                real = getattr(torch, name)
                monkeypatch.setattr(torch, name,
                                    lambda *a, real=real, **kw: products.append(a[1].dtype) or real(*a, **kw))
            cpu = attn(x)
            assert seen["sdpa"] == [] and products and set(products) == {torch.float32}
            assert rel_err(cpu, plain) <= 3e-2


def test_torch_func_grad_takes_the_plain_path() -> None:
    # torch.func transforms cannot run the kernels' autograd Functions: the door shuts, and the gradients are
    # autograd's (with the kernels) within float32 rounding.
    from ddpm.unet import UNet

    torch.manual_seed(0)
    unet = UNet(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, attention_head_dim=4,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 500])
    params = dict(unet.named_parameters())

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(unet, p, (x, t)).sample.square().mean()

    got = torch.func.grad(loss)(params)
    loss(params).backward()
    # floored at 1% of the largest gradient, as in test_unet_parity.py (to_k.bias's is zero but for rounding)
    floor = 1e-2 * max(p.grad.abs().max().item() for p in params.values() if p.grad is not None)
    for name, p in params.items():
        assert p.grad is not None, name
        assert (got[name] - p.grad).abs().max().item() <= 1e-4 * max(p.grad.abs().max().item(), floor), name
