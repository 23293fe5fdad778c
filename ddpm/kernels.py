"""CPU kernels behind one door: faster forms of what ``layers.py`` computes, used only where ``applies(x)`` says.

``applies(x)`` is true for a CPU tensor when oneDNN is built in, the compute dtype (autocast's, or ``x``'s) is
float32 or a bfloat16 the CPU supports, nothing is tracing the model (``torch.compile``, ``torch.jit.trace``,
``torch.fx``, ``torch.func`` transforms), and the kernels are switched on: ``DDPM_CPU_KERNELS=0`` in the
environment switches them off for the process, ``enabled(False)`` for a block (the parity tests run both ways).
Everywhere else (CUDA, compile, tracing) the layers run their plain PyTorch, which is what the kernels are tested
against.

What is here, each measured on a 2-core AVX-512 CPU (benchmarks/RESULTS.md, shared/PERF_NOTES.md):
- ``conv2d``: every convolution through oneDNN in channels_last. PyTorch's own choice sends small maps to a
  reference kernel 5-7x slower, and NCHW input makes oneDNN reorder it on every call.
- ``group_norm``: GroupNorm in float32 with its backward written out, which can write into a buffer it is given
  (the fused GroupNorm -> SiLU -> conv below relies on that to stay small). Written when PyTorch's channels_last
  GroupNorm backward measured several times its NCHW time; on torch 2.14.1 it is 1.2-1.7x, faster than this one on
  most shapes measured (up to 4x on 8x8 maps) and slower at 16 channels on 32x32, a wash over whole training steps
  (30 Nov 2026).
- ``upsample_conv``: nearest 2x upsampling then a 3x3 convolution, as four 2x2 convolutions of the small map
  (2.25x fewer FLOPs, no 4x-size map stored for the backward pass).
- ``norm_conv``, ``resnet_block``, ``attention_block``: a ResNet block's GroupNorm -> SiLU -> convolution pairs
  fused (storing only their input, recomputed in the backward pass), its adds in place, and the attention's
  q/k/v as one 1x1 convolution of the map: fewer passes over memory and fewer pages freed and refilled per step.
  They stand in for the block's submodules, so ``applies(x, block)`` also asks that no hook waits on one.
- ``attention``: heads narrower than 64 (diffusers' default is 8) as batched float32 GEMMs over chunks of heads
  whose scores stay in cache, 1.4-1.7x faster than CPU's flash-attention kernel forward + backward (and than its
  bf16 backward, 4x slower still at head_dim 8).
- ``PackedWeights``: convolution weights kept in oneDNN's blocked layout while they do not change
  (``UNet.frozen_weights()``), instead of being reordered on every call.

Private torch ops, each with a fallback, checked on torch 2.14.1: ``torch.ops.mkldnn._reorder_convolution_weight``
and ``torch.ops.mkldnn._convolution_pointwise`` (without them ``PackedWeights`` packs nothing), and
``torch.ops.mkldnn._is_mkldnn_bf16_supported`` (without it bfloat16 stays on the plain path); and, for the door,
``torch._C._are_functorch_transforms_active`` (without it, torch.func transforms are not detected).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# --- the door -----------------------------------------------------------------------------------------------------

_ONEDNN = torch.backends.mkldnn.is_available()
_mkldnn_ops = torch.ops.mkldnn
_BF16 = _ONEDNN and hasattr(_mkldnn_ops, "_is_mkldnn_bf16_supported") and bool(
    _mkldnn_ops._is_mkldnn_bf16_supported())
_switch = [os.environ.get("DDPM_CPU_KERNELS", "1") != "0"]  # in a list: enabled() flips it for a block


# fx.symbolic_trace (torch >= 2.7 names it apart from torch.export, which is_compiling() covers)
_fx_tracing: Callable[[], bool] = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",
                                          torch.fx._symbolic_trace.is_fx_tracing)
# torch.func transforms (grad, vmap, jacrev, ...): the kernels' autograd Functions do not support them
_functorch_active: Callable[[], bool] = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype an op on ``x`` computes in: autocast's where autocast is on, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def applies(x: Tensor, module: nn.Module | None = None) -> bool:
    """Whether the CPU kernels run for ``x``: CPU with oneDNN, float32 or (CPU-supported) bfloat16, not traced,
    not switched off. With ``module`` (a kernel that stands in for its submodules, calling none of them), also: no
    hooks on any submodule, so that every hook a user registered still runs."""
    # Tracers and transforms first (torch.compile / torch.export, jit.trace, fx, torch.func): they get the plain
    # path. Under dynamo nothing else is read, so nothing is guarded on.
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _fx_tracing() or _functorch_active():
        return False
    if not (_switch[0] and _ONEDNN and x.device.type == "cpu"):
        return False
    dtype = compute_dtype(x)
    if not (dtype == torch.float32 or (dtype == torch.bfloat16 and _BF16)):
        return False
    return module is None or not _hooked(module)


def _hooked(module: nn.Module) -> bool:
    if _global_hooks():
        return True
    # the submodules, depth first (a plain walk: ``module.modules()`` costs ~7 us a module, run per block per step)
    pending = list(module._modules.values())
    while pending:
        m = pending.pop()
        if m is None:
            continue
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
        pending.extend(m._modules.values())
    return False


def _global_hooks() -> bool:
    # hooks registered for every module (torch.nn.modules.module.register_module_forward_hook, ...)
    g = torch.nn.modules.module
    return any(getattr(g, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                   "_global_backward_hooks", "_global_backward_pre_hooks"))


def switched_on() -> bool:
    """Whether the kernels are switched on (``DDPM_CPU_KERNELS``, ``enabled``): the trainer's CPU settings ask too."""
    return _switch[0]


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Switch the kernels on or off for the calls made in this block (process-wide, not thread-local)."""
    before = _switch[0]
    _switch[0] = on
    try:
        yield
    finally:
        _switch[0] = before


# --- convolution --------------------------------------------------------------------------------------------------

# Below this many pixels (N*H*W) a convolution costs about what reordering its weight for oneDNN costs (measured).
_FEW_PIXELS = 128


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int = 1, padding: int = 0,
           packed: PackedWeights | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` through oneDNN, channels_last in and out, in
    ``compute_dtype(x)`` (cast by hand as autocast would: it does not see ``mkldnn_convolution``). With
    ``packed`` (inside ``UNet.frozen_weights()``), small maps without autograd use the prepacked weight."""
    if packed is not None and (prepacked := packed.get(x, stride, padding, (weight, bias),
                                                       lambda: (weight, bias))) is not None:
        return _packed_conv(x, prepacked, stride, padding)
    dtype = compute_dtype(x)
    x, weight = x.to(dtype, memory_format=torch.channels_last), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    n, c, height, width = x.shape
    if weight.shape[2:] == (1, 1) and stride == 1 and n * height * width < _FEW_PIXELS and not torch.is_grad_enabled():
        # 1x1 over few pixels: MKL's GEMM, with no weight reorder, beats oneDNN. (N*H*W, C) rows, channels_last out
        out = F.linear(x.permute(0, 2, 3, 1).reshape(-1, c), weight.flatten(1), bias)
        return out.view(n, height, width, -1).permute(0, 3, 1, 2)
    return torch.mkldnn_convolution(x, weight, bias, (padding, padding), (stride, stride), (1, 1), 1)


# --- prepacked weights while they do not change (UNet.frozen_weights()) ------------------------------------------
# oneDNN runs a convolution on weights in its own blocked layout and reorders a plain weight into it on every call:
# 85-200 us per 3x3 convolution on 4x4-16x16 maps here, a third of a batch-1 forward (measured). Only convolutions
# over at most _FROZEN_PIXELS pixels (N*H*W) use packed weights: the reorder costs in proportion to the weight, the
# convolution in proportion to N*H*W times the weight. Measured on butterflies-32, interleaved in one process: batch 1
# forward 1.37x faster, batch 8 1.05-1.07x (its 4x4 and 8x8 levels), batch 32 1.01x.
_FROZEN_PIXELS = 512
_PREPACK = all(hasattr(_mkldnn_ops, op) for op in ("_reorder_convolution_weight", "_convolution_pointwise"))

Packed = tuple[Tensor, "Tensor | None", torch.dtype]  # weight in oneDNN's layout, bias, the dtype they run in


class PackedWeights:
    """The prepacked convolution weights of one UNet inside its ``frozen_weights()`` block.

    A weight is packed on first use and reused while its parameters keep their version counters and storage: an
    optimizer step or ``load_state_dict`` (in-place ops) is seen; a write through ``param.data`` is not, which is
    why packing is opt-in and scoped to a block. Closed at the end of the block; a copy (``copy.deepcopy`` of a
    UNet inside the block, or pickling) is a closed, empty cache."""

    def __init__(self, open: bool = True) -> None:
        self.open = open
        # slot -> (the parameters, their versions, the packed weight). Holding the parameters keeps their ids,
        # part of the slot, from being reused by new tensors while the cache lives.
        self._cache: dict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[Any, ...], Packed]] = {}

    def close(self) -> None:
        self.open = False
        self._cache.clear()

    def __reduce__(self) -> tuple[Any, ...]:
        return PackedWeights, (False,)

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedWeights:
        return PackedWeights(open=False)

    def __len__(self) -> int:
        return len(self._cache)

    def dtypes(self) -> set[torch.dtype]:
        return {packed[2] for _, _, packed in self._cache.values()}

    def get(self, x: Tensor, stride: int, padding: int, params: tuple[Tensor | None, ...],
            make: Callable[[], tuple[Tensor, Tensor | None]]) -> Packed | None:
        """The packed (weight, bias, dtype) for convolving ``x`` with the weight ``make()`` derives from
        ``params``, or None where packing does not apply (autograd on, a large map, no private ops)."""
        n, _, height, width = x.shape
        if not (self.open and _PREPACK) or torch.is_grad_enabled() or n * height * width > _FROZEN_PIXELS:
            return None
        dtype = compute_dtype(x)
        slot = (*(id(p) for p in params), dtype, tuple(x.shape[1:]), stride, padding)
        versions = tuple((p._version, p.data_ptr()) if p is not None else None for p in params)
        cached = self._cache.get(slot)
        if cached is not None and cached[1] == versions:
            return cached[2]
        weight, bias = make()
        weight = weight.to(dtype, memory_format=torch.channels_last)
        packed = (_mkldnn_ops._reorder_convolution_weight(weight, [padding] * 2, [stride] * 2, [1, 1], 1,
                                                          list(x.shape)),
                  bias.to(dtype) if bias is not None else None, dtype)
        self._cache[slot] = (params, versions, packed)
        return packed


def _packed_conv(x: Tensor, packed: Packed, stride: int, padding: int) -> Tensor:
    weight, bias, dtype = packed
    x = x.to(dtype, memory_format=torch.channels_last)
    return cast(Tensor, _mkldnn_ops._convolution_pointwise(x, weight, bias, [padding] * 2, [stride] * 2, [1, 1], 1,
                                                           "none", [], ""))


# --- GroupNorm ----------------------------------------------------------------------------------------------------

def group_norm(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """``F.group_norm`` computed in float32 and returned in ``x``'s dtype, with a written-out backward pass."""
    if not torch.is_grad_enabled():
        return _group_norm_forward(x, groups, weight, bias, eps)[0].to(x.dtype)
    return cast(Tensor, _GroupNorm.apply(x, groups, weight, bias, eps))


def _group_norm_forward(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    # PyTorch's kernel in float32 (its bf16 channels_last kernel is up to 10x slower): output, mean and 1/std (N, G)
    n, c, height, width = x.shape
    return torch.ops.aten.native_group_norm(x.float(), weight.float(), bias.float(), n, c, height * width, groups,
                                            eps)


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        out, mean, rstd = _group_norm_forward(x, groups, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _group_norm_backward(grad.to(x.dtype), x, weight, mean, rstd)
        return grad_x, None, grad_weight, grad_bias, None


def _group_norm_backward(grad: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                         out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm's backward pass (Wu & He 2018): with xhat = (x - mean) rstd and g = dL/dy, per group
    dx = rstd (w g - E[w g] - xhat E[w g xhat]) = scale g + a x + b, with per-(sample, channel) scale, a, b.
    ``grad``, ``x``: ``[N, C, H, W]``; ``mean``, ``rstd``: ``[N, G]``. ``out``: a buffer for dx (may be ``grad``
    itself, which is read before it is written)."""
    n, c, height, width = x.shape
    groups = mean.shape[1]
    # (bf16 sums accumulate in float32 inside the kernel; only the per-channel totals are rounded)
    product = torch.mul(grad, x) if out is None or out is grad else torch.mul(grad, x, out=out)  # out: scratch first
    sums = torch.stack([grad.sum((2, 3)), product.sum((2, 3))]).float()
    sum_g, sum_gx = sums.view(2, n, groups, -1)  # (N, G, C/G) each
    sum_gxhat = (sum_gx - mean[:, :, None] * sum_g).mul_(rstd[:, :, None])
    count = height * width * (c // groups)
    w = weight.float().view(groups, -1)
    e_wg, e_wgxhat = (w * sum_g).sum(-1).div_(count), (w * sum_gxhat).sum(-1).div_(count)  # (N, G)
    a = -rstd.square() * e_wgxhat
    b = torch.addcmul(-rstd * e_wg, a, mean, value=-1.0)
    scale = (w * rstd[:, :, None]).view(n, c, 1, 1).to(x.dtype)
    a, b = (t[:, :, None].expand_as(sum_g).reshape(n, c, 1, 1).to(x.dtype) for t in (a, b))
    if out is None:
        grad_x = torch.addcmul(b, x, a).addcmul_(grad, scale)
    else:  # out = grad * scale + (x * a + b), written over grad where out is grad
        grad_x = out.mul_(scale) if out is grad else torch.mul(grad, scale, out=out)
        grad_x.addcmul_(x, a).add_(b)
    return grad_x, sum_gxhat.sum(0).view(c).to(weight.dtype), sum_g.sum(0).view(c).to(weight.dtype)


# --- GroupNorm -> SiLU -> convolution, fused ---------------------------------------------------------------------
# Every GroupNorm in a ResNet block feeds a convolution through SiLU, and the attention's feeds its q/k/v
# projection (a 1x1 convolution of the map). Fused, the three store only their input and the group statistics and
# recompute the normalised map in the backward pass (selective recomputation, Chen et al. 2016): per GroupNorm
# two fewer stored maps, and fewer freed and refilled pages of memory per step. Against the plain ops (30 Nov 2026,
# torch 2.14.1): training steps 3-7 % slower, peak RSS of a step 0.76-0.82x diffusers' instead of 0.87-0.92x (fp32)
# and 0.87-0.91x instead of 1.05-1.09x (bf16), where the plain ops store the float32 GroupNorm input and output.

def norm_conv(x: Tensor, norm: nn.GroupNorm, weight: Tensor, bias: Tensor | None, *, silu: bool, padding: int,
              packed: PackedWeights | None = None) -> Tensor:
    """``conv2d(silu(norm(x)))`` (or without the SiLU), stride 1, ``[N, C, H, W] -> [N, O, H, W]``: statistics
    and the affine map in float32, the convolution in ``compute_dtype(x)``."""
    dtype = compute_dtype(x)
    if not torch.is_grad_enabled():  # inference: no Function, nothing saved, SiLU in place
        h = _group_norm_forward(x, norm.num_groups, norm.weight, norm.bias, norm.eps)[0]
        h = F.silu(h, inplace=True) if silu else h
        return conv2d(h.to(dtype), weight, bias, padding=padding, packed=packed)
    return cast(Tensor, _NormConv.apply(x, norm.weight, norm.bias, weight.to(dtype),
                                        bias.to(dtype) if bias is not None else None, norm.num_groups, norm.eps,
                                        silu, padding))


class _NormConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor, bias: Tensor | None,
                groups: int, eps: float, silu: bool, padding: int) -> Tensor:
        h, mean, rstd = _group_norm_forward(x, groups, norm_weight, norm_bias, eps)
        h = F.silu(h, inplace=True) if silu else h
        ctx.save_for_backward(x, norm_weight, norm_bias, weight, mean, rstd)
        ctx.config = silu, padding, bias is not None
        h = h.to(weight.dtype, memory_format=torch.channels_last)
        return torch.mkldnn_convolution(h, weight, bias, (padding, padding), (1, 1), (1, 1), 1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, norm_weight, norm_bias, weight, mean, rstd = ctx.saved_tensors
        silu, padding, has_bias = ctx.config
        z = _normalised(x, norm_weight, norm_bias, mean, rstd)  # recomputed
        h = F.silu(z, inplace=True) if silu else z  # the convolution's input, in z's buffer
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_h, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad, h.to(weight.dtype), weight, [weight.shape[0]] if has_bias else None, [1, 1], [padding, padding],
            [1, 1], False, [0, 0], 1, [True, True, has_bias])
        grad_z = grad_h.to(x.dtype)
        if silu:  # recomputing z once more is cheaper than holding it next to h
            z = _normalised(x, norm_weight, norm_bias, mean, rstd, out=h)
            grad_z = torch.ops.aten.silu_backward.grad_input(grad_z, z, grad_input=grad_z)
        grad_x, grad_norm_weight, grad_norm_bias = _group_norm_backward(grad_z, x, norm_weight, mean, rstd, out=z)
        return grad_x, grad_norm_weight, grad_norm_bias, grad_weight, grad_bias, None, None, None, None


def _normalised(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor, out: Tensor | None = None
                ) -> Tensor:
    # GroupNorm's output x * scale + shift, from its statistics, in x's dtype (scale and shift made in float32)
    n, c = x.shape[:2]
    groups = mean.shape[1]
    scale = weight.float().view(groups, -1) * rstd[:, :, None]  # (N, G, C/G)
    shift = torch.addcmul(bias.float().view(groups, -1), mean[:, :, None], scale, value=-1.0)
    scale, shift = scale.view(n, c, 1, 1).to(x.dtype), shift.view(n, c, 1, 1).to(x.dtype)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last)
    return torch.addcmul(shift, x, scale, out=out)


# --- the ResNet block and the attention layer in fewer passes -------------------------------------------------
# They compute what layers.ResnetBlock2D / layers.Attention compute, from the same parameters, without calling
# their submodules one by one (applies(x, block) makes sure no hook is waiting on one).

def resnet_block(block: Any, x: Tensor, temb: Tensor) -> Tensor:
    """``layers.ResnetBlock2D`` (time_embedding_norm "default", SiLU, no resampling, no dropout): both
    GroupNorm -> SiLU -> conv pairs fused, and the time embedding and the residual added in place (to
    convolution outputs, which no backward formula reads)."""
    h = norm_conv(x, block.norm1, block.conv1.weight, block.conv1.bias, silu=True, padding=1, packed=block.conv1.packed)
    t = block.time_emb_proj(F.silu(temb))[:, :, None, None]  # (N, C_out, 1, 1)
    h = norm_conv(h.add_(t), block.norm2, block.conv2.weight, block.conv2.bias, silu=True, padding=1,
                  packed=block.conv2.packed)
    shortcut = block.conv_shortcut(x) if block.conv_shortcut is not None else x
    h = _add(h, shortcut)
    return h.div_(block.output_scale_factor) if block.output_scale_factor != 1.0 else h


def attention_block(attn: Any, x: Tensor) -> Tensor:
    """``layers.Attention`` with q, k and v as one 1x1 convolution of the map (fused with the GroupNorm) and the
    output projection as another: oneDNN's GEMM, 2x MKL's speed on this CPU, and no token copies."""
    qkv_weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])[:, :, None, None]  # (3 I, C)
    qkv_bias = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
    if attn.group_norm is not None:  # (N, 3 I, H, W)
        qkv = norm_conv(x, attn.group_norm, qkv_weight, qkv_bias, silu=False, padding=0)
    else:
        qkv = conv2d(x, qkv_weight, qkv_bias)
    proj = attn.to_out[0]
    out = _add(conv2d(attention(qkv, attn.heads), proj.weight[:, :, None, None], proj.bias), x)  # + residual
    return out.div_(attn.rescale_output_factor) if attn.rescale_output_factor != 1.0 else out


def _add(h: Tensor, residual: Tensor) -> Tensor:
    # h + residual, in h's memory where the result has h's dtype (h: a convolution's output, read by no backward)
    return h.add_(residual) if torch.result_type(h, residual) == h.dtype else h + residual


# --- nearest 2x upsampling -> 3x3 convolution ------------------------------------------------------------------

# After nearest 2x upsampling, output row 2i of a 3x3 convolution reads input rows (i-1, i, i) and row 2i+1 reads
# (i, i, i+1): per output phase, two input rows (and columns), over which the three kernel rows fold into two.
_UPSAMPLE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],   # phase 0: rows i-1, i <- (w0, w1 + w2)
                               [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # phase 1: rows i, i+1 <- (w0 + w1, w2)
# _UPSAMPLE_FOLD[(a, b, t, u), (k, l)] = 1 where 3x3 tap (k, l) adds into tap (t, u) of phase (a, b)'s 2x2 kernel
_UPSAMPLE_FOLD = torch.einsum("atk,bul->abtukl", _UPSAMPLE_TAPS, _UPSAMPLE_TAPS).reshape(16, 9)


def upsample_conv(x: Tensor, weight: Tensor, bias: Tensor | None, packed: PackedWeights | None = None) -> Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` with padding 1, ``[N, C, H, W] -> [N, O, 2H, 2W]``, as one 2x2
    convolution of ``x`` per output phase: the same sums grouped differently, with 2.25x fewer FLOPs and no
    4x-size upsampled map (the largest tensor a training step would otherwise store)."""
    n, _, height, width = x.shape
    prepacked = packed.get(x, 1, 1, (weight, bias), lambda: _phase_weights(weight, bias)) if packed else None
    if prepacked is None and n * height * width < 2 * _FEW_PIXELS:
        # weight-bound: reordering the phase kernels (16/9 the size of the 3x3 one) costs more than it saves
        return conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    # y[:, (2a + b) O + o, i + a, j + b] is output pixel (2i + a, 2j + b) of channel o: (N, 4 O, H + 1, W + 1)
    y = _packed_conv(x, prepacked, 1, 1) if prepacked is not None else conv2d(x, *_phase_weights(weight, bias),
                                                                             padding=1)
    return cast(Tensor, _InterleavePhases.apply(y.contiguous(memory_format=torch.channels_last)))


def _phase_weights(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    # (4 O, C, 2, 2), output channels ordered (a, b, o), so that each phase's O channels are contiguous in
    # channels_last memory (interleaving the phases then copies runs of O floats: 2x faster than with (o, a, b))
    out, cin = weight.shape[:2]
    w = weight.permute(0, 2, 3, 1).reshape(out, 9, cin)  # (O, 3*3, C)
    phase_weight = torch.matmul(_UPSAMPLE_FOLD.to(w), w).view(out, 4, 2, 2, cin).transpose(0, 1)  # (a b, O, 2, 2, C)
    return phase_weight.reshape(4 * out, 2, 2, cin).permute(0, 3, 1, 2), bias.repeat(4) if bias is not None else None


class _InterleavePhases(torch.autograd.Function):
    # Written out because autograd's generic as_strided backward builds index tensors (10x a copy).
    @staticmethod
    def phases(y: Tensor) -> Tensor:
        # The (N, H, a, W, b, O) view of channels_last y (N, 4 O, H + 1, W + 1): the memory order of the output.
        n, c, height, width = y.shape
        s_n, _, s_row, s_col = y.stride()
        out = c // 4
        return y.as_strided((n, height - 1, 2, width - 1, 2, out), (s_n, s_row, s_row + 2 * out, s_col, s_col + out, 1))

    @staticmethod
    def forward(ctx: Any, y: Tensor) -> Tensor:
        ctx.shape = y.shape
        phases = _InterleavePhases.phases(y)
        n, height, _, width, _, out = phases.shape
        return phases.reshape(n, 2 * height, 2 * width, out).permute(0, 3, 1, 2)  # one copy

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad_y = grad.new_zeros(ctx.shape).contiguous(memory_format=torch.channels_last)
        phases = _InterleavePhases.phases(grad_y)
        phases.copy_(grad.permute(0, 2, 3, 1).reshape(phases.shape))
        return grad_y


# --- attention ----------------------------------------------------------------------------------------------------

def attention(qkv: Tensor, heads: int) -> Tensor:
    """Softmax attention of the ``H*W`` tokens of ``qkv`` (``[N, 3 I, H, W]``: q, k, v stacked along channels, each
    ``heads`` heads of ``I / heads``), scale ``(I / heads) ** -0.5``, as ``[N, I, H, W]``. Heads narrower than 64
    (diffusers' default is 8) run ``_NarrowHeads`` in float32; wider ones ``F.scaled_dot_product_attention`` in
    ``compute_dtype`` (CPU's flash kernel, which keeps float32 accumulators for bf16)."""
    if qkv.shape[1] // (3 * heads) < 64:
        return cast(Tensor, _NarrowHeads.apply(qkv, heads)).to(compute_dtype(qkv))
    q, k, v = (rearrange(t, "b (n d) x y -> b n (x y) d", n=heads) for t in qkv.chunk(3, dim=1))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b n (x y) d -> b (n d) x y", x=qkv.shape[2])


# CPU's flash-attention kernel multiplies each head's tiny matrices one block at a time; for narrow heads it is
# faster as batched GEMMs over many heads at once, a chunk of heads small enough that their L x L scores stay in
# cache, with each product laid out so that no GEMM has an output 8 wide. unet-small's attention at batch 64
# (8 heads of 8, 64 tokens): forward + backward 5.5-5.7 ms against 8.3-8.4 (forward 1.6 against 2.2); heads of 16
# or 32 and 256 tokens likewise 1.4-1.7x faster; heads of 64 are slower (1.1x), and stay with the flash kernel
# (30 Nov 2026, training's allocator settings; float32, max error against the flash kernel 1e-6).
_SCORES_PER_CHUNK = 1 << 18  # float32 scores per chunk of heads: 1 MiB


class _NarrowHeads(torch.autograd.Function):
    # Per head, with tokens as rows: S = scale q k^T, P = softmax(S) by rows, out = P v. Stored: q, k^T, v^T in
    # float32 (the size of qkv); P is recomputed chunk by chunk in the backward pass, as in flash attention
    # (Dao et al. 2022): dv = P^T dout, dP = dout v^T, dS = P * (dP - rowsum(dP * P)), dq = scale dS k,
    # dk = scale dS^T q. Products are taken transposed where that is the faster GEMM: out^T = v^T P^T.
    @staticmethod
    @torch.autocast("cpu", enabled=False)  # float32 throughout
    def forward(ctx: Any, qkv: Tensor, heads: int) -> Tensor:
        n, _, height, width = qkv.shape
        tokens = qkv.permute(0, 2, 3, 1).reshape(n, height * width, 3, heads, -1)  # a view of channels_last qkv
        q = tokens[:, :, 0].transpose(1, 2).reshape(-1, height * width, tokens.shape[-1]).float()  # (N h, L, d)
        k_t, v_t = (tokens[:, :, i].permute(0, 2, 3, 1).reshape(-1, tokens.shape[-1], height * width).float()
                    for i in (1, 2))  # (N h, d, L)
        out_t = torch.empty_like(k_t)
        scores, probs = _chunk_buffers(q, 2)
        for rows, s, p in _head_chunks(q, scores, probs):
            _softmax_rows(q[rows], k_t[rows], s, p)
            torch.bmm(v_t[rows], p.transpose(1, 2), out=out_t[rows])  # out^T = v^T P^T
        ctx.save_for_backward(q, k_t, v_t)
        ctx.shape, ctx.dtype = qkv.shape, qkv.dtype
        return out_t.view(n, -1, height, width)  # (N, h d, H, W): out^T's memory is the map's, NCHW

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        q, k_t, v_t = ctx.saved_tensors
        n, _, height, width = ctx.shape
        scale = q.shape[-1] ** -0.5
        grad_t = grad.float().contiguous().view(k_t.shape)  # dout^T, (N h, d, L)
        grad_q_t, grad_k_t, grad_v_t = (torch.empty_like(k_t) for _ in range(3))
        scores, probs, grad_probs = _chunk_buffers(q, 3)
        for rows, s, p, grad_p in _head_chunks(q, scores, probs, grad_probs):
            _softmax_rows(q[rows], k_t[rows], s, p)
            torch.bmm(grad_t[rows], p, out=grad_v_t[rows])  # dv^T = dout^T P
            torch.bmm(grad_t[rows].transpose(1, 2), v_t[rows], out=grad_p)  # dP = dout v^T
            grad_s = torch._softmax_backward_data(grad_p, p, -1, p.dtype, grad_input=s)  # dS, over S
            _scaled_product(k_t[rows], grad_s.transpose(1, 2), scale, grad_q_t[rows])  # dq^T = scale k^T dS^T
            _scaled_product(q[rows].transpose(1, 2), grad_s, scale, grad_k_t[rows])  # dk^T = scale q^T dS
        heads = q.shape[0] // n
        grad_qkv = torch.empty(n, height, width, 3, heads, q.shape[-1], dtype=ctx.dtype)  # channels_last qkv
        for i, g in enumerate((grad_q_t, grad_k_t, grad_v_t)):
            grad_qkv[:, :, :, i] = g.view(n, heads, -1, height, width).permute(0, 3, 4, 1, 2)
        return grad_qkv.view(n, height, width, -1).permute(0, 3, 1, 2), None


def _chunk_buffers(q: Tensor, count: int) -> list[Tensor]:
    # L x L buffers for one chunk of heads, reused chunk after chunk (instead of 3-5 allocations per chunk)
    size = min(q.shape[0], max(1, _SCORES_PER_CHUNK // q.shape[1] ** 2))
    return [q.new_empty(size, q.shape[1], q.shape[1]) for _ in range(count)]


def _head_chunks(q: Tensor, *buffers: Tensor) -> Iterator[tuple[Any, ...]]:
    # (rows of the chunk, each buffer cut to the chunk's length): the last chunk may be shorter
    size = buffers[0].shape[0]
    for start in range(0, q.shape[0], size):
        rows = slice(start, min(start + size, q.shape[0]))
        yield (rows, *(b[: rows.stop - start] for b in buffers))


def _scaled_product(a: Tensor, b: Tensor, scale: float, out: Tensor) -> None:
    # out = scale a b, batched (baddbmm with beta = 0 never reads its input: out stands in for it)
    torch.baddbmm(out, a, b, beta=0.0, alpha=scale, out=out)


def _softmax_rows(q: Tensor, k_t: Tensor, scores: Tensor, probs: Tensor) -> None:
    # probs = softmax(scale q k^T) by rows, the scores written to scores first
    _scaled_product(q, k_t, q.shape[-1] ** -0.5, scores)
    torch._softmax(scores, -1, False, out=probs)
