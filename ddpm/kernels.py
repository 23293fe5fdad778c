"""The UNet's compute kernels on CPU: what ``layers.py`` calls where PyTorch's defaults were measured slow.

- ``conv2d``: every float32/bfloat16 convolution through oneDNN, channels_last in and out; at inference the weight
  is kept in oneDNN's own layout ("prepacked") instead of being reordered on every call.
- ``norm_act_conv``: GroupNorm -> SiLU -> convolution as one autograd Function that stores only its input.
- ``upsample_conv``: nearest 2x upsampling then a 3x3 convolution, as 2x2 convolutions of the small map.

Each computes what the plain modules compute (the parity tests compare the UNet with diffusers'); the measurements
behind each choice are in benchmarks/RESULTS.md and shared/PERF_NOTES.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# --- convolution --------------------------------------------------------------------------------------------------

_ONEDNN = torch.backends.mkldnn.is_available()
# Below this many pixels (N*H*W) a convolution costs about what reordering its weights for oneDNN costs (measured).
_FEW_PIXELS = 128


def _onednn_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype a convolution of ``x`` runs in (autocast's, where autocast is on) if oneDNN takes it, else None."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return dtype if _ONEDNN and x.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) else None


WeightFn = Callable[[], tuple[Tensor, "Tensor | None"]]  # a weight (and bias) derived from parameters, made on demand
FrozenKey = tuple[str, tuple["Tensor | None", ...]]  # a tag, and the parameters a frozen weight is made from


def conv2d(x: Tensor, weight: Tensor | WeightFn, bias: Tensor | None = None, stride: int = 1, padding: int = 0, *,
           frozen_key: FrozenKey | None = None) -> Tensor:
    """``F.conv2d`` that always takes the oneDNN kernel on CPU for float32 and bfloat16 (autocast included).

    PyTorch's heuristic sends batch-1 convolutions on small maps (e.g. 256 x 8 x 8) to its slow reference kernel,
    which ran at 49-61 GFLOP/s against up to 370 through oneDNN on our CPU (shared/PERF_NOTES.md).

    ``weight`` may be a function returning ``(weight, bias)`` (a weight derived from parameters, made only when
    needed). Inside ``frozen_weights()`` and without autograd, the weight is prepacked once and cached under
    ``frozen_key`` = (tag, the parameters it is made from); a plain parameter is its own key.
    """
    if _FROZEN:  # inside frozen_weights(): the weight may be prepacked
        if frozen_key is None and isinstance(weight, nn.Parameter):
            frozen_key = ("", (weight, bias))
        if (packed := _frozen(x, stride, padding, frozen_key, weight, bias)) is not None:
            return _packed_conv(x, packed, stride, padding)
    if not isinstance(weight, Tensor):
        weight, bias = weight()
    dtype = _onednn_dtype(x)
    if dtype is None:
        return F.conv2d(x, weight, bias, stride, padding)
    # Cast by hand as autocast would (it does not intercept mkldnn_convolution); channels_last in and out: with
    # NCHW input oneDNN reorders, and the output's layout spreads.
    x, weight = x.to(dtype, memory_format=torch.channels_last), weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    n, c, height, width = x.shape
    if weight.shape[2:] == (1, 1) and n * height * width < _FEW_PIXELS and not torch.is_grad_enabled():
        # 1x1 over few pixels: MKL's GEMM, with no weight reorder, beats oneDNN. (N*H*W, C) rows, channels_last out
        out = F.linear(x.permute(0, 2, 3, 1).reshape(-1, c), weight.flatten(1), bias)
        return out.view(n, height, width, -1).permute(0, 3, 1, 2)
    return torch.mkldnn_convolution(x, weight, bias, (padding, padding), (stride, stride), (1, 1), 1)


# --- frozen (prepacked) weights at inference ---------------------------------------------------------------------
# oneDNN runs a convolution on weights in its own blocked layout and reorders a plain weight into it on every call:
# 85-200 us per 3x3 convolution on 4x4-16x16 maps here, a third of a batch-1 forward (measured). Inside
# ``frozen_weights()`` each weight is reordered once, on first use, and the result reused until the block ends.
# It is opt-in and scoped because a weight changed behind autograd's back (``param.data.copy_(...)``, as diffusers'
# EMAModel.copy_to does) cannot be detected cheaply; a change through ordinary in-place ops (an optimizer step,
# load_state_dict) bumps the parameter's version and is picked up.

# Only convolutions over at most this many pixels (N*H*W) use them: the reorder costs in proportion to the weight,
# the convolution in proportion to N*H*W times the weight. Measured, butterflies-32, ddpm with/without, interleaved
# in one process: batch 1 forward 1.37x faster, batch 8 1.05-1.07x (its 4x4 and 8x8 levels), batch 32 1.01x. On
# larger maps the gain is a few per cent of the call at best, and each prepacked weight is one more long-lived
# allocation (glibc's heap trimming, and so the page faults of every later op, shifted with them in experiments).
_FROZEN_PIXELS = 512

Packed = tuple[Tensor, "Tensor | None", torch.dtype]  # weight in oneDNN's layout, bias, the dtype they run in
# The innermost open block's cache: slot -> (the parameters, their versions, the packed weight). Holding the
# parameters keeps their ids, part of the slot, from being reused by new tensors while the block is open.
_FROZEN: list[dict[tuple[Any, ...], tuple[tuple[Any, ...], tuple[Any, ...], Packed]]] = []


@contextlib.contextmanager
def frozen_weights() -> Iterator[None]:
    """Reuse the small-map convolution weights in oneDNN's layout for the calls made in this block without
    autograd (CPU, float32/bfloat16). For sampling loops, where the weights do not change: ``Pipeline`` uses it."""
    _FROZEN.append(_FROZEN[-1] if _FROZEN else {})
    try:
        yield
    finally:
        _FROZEN.pop()


def _prepacks(x: Tensor) -> bool:
    # Whether a convolution of x takes a prepacked weight (see _FROZEN_PIXELS); x: (N, C, H, W)
    return (bool(_FROZEN) and not torch.is_grad_enabled()
            and x.shape[0] * x.shape[2] * x.shape[3] <= _FROZEN_PIXELS)


def _frozen(x: Tensor, stride: int, padding: int, key: FrozenKey | None,
            weight: Tensor | WeightFn, bias: Tensor | None) -> Packed | None:
    # The packed (weight, bias, dtype) for convolving x, or None outside frozen_weights() / where it does not apply
    if key is None or not _prepacks(x) or (dtype := _onednn_dtype(x)) is None:
        return None
    tag, params = key
    slot = (tag, *(id(p) for p in params), dtype, tuple(x.shape[1:]), stride, padding)
    versions = tuple((p._version, p.data_ptr()) if p is not None else None for p in params)
    cached = _FROZEN[-1].get(slot)
    if cached is not None and cached[1] == versions:
        return cached[2]
    if not isinstance(weight, Tensor):
        weight, bias = weight()
    weight = weight.to(dtype, memory_format=torch.channels_last)
    packed = (torch.ops.mkldnn._reorder_convolution_weight(weight, [padding] * 2, [stride] * 2, [1, 1], 1,
                                                           list(x.shape)),
              bias.to(dtype) if bias is not None else None, dtype)
    _FROZEN[-1][slot] = (params, versions, packed)
    return packed


def _packed_conv(x: Tensor, packed: Packed, stride: int, padding: int) -> Tensor:
    weight, bias, dtype = packed
    x = x.to(dtype, memory_format=torch.channels_last)
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [padding] * 2, [stride] * 2, [1, 1], 1, "none",
                                                   [], "")


# --- GroupNorm -> SiLU -> convolution, fused ---------------------------------------------------------------------
# Every GroupNorm in the UNet feeds a convolution, through SiLU or directly (the attention's q/k/v projection).
# On CPU the three are one autograd Function that stores only its input and the group statistics and recomputes the
# normalised map in the backward pass (selective recomputation, Chen et al. 2016; storing the normalised and the
# activated maps cost two activations per norm). Its backward is written out: PyTorch's channels_last GroupNorm
# backward kernel is 2-4x slower than its NCHW one (10x under bf16).

def _group_affine(weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor, dtype: torch.dtype
                  ) -> tuple[Tensor, Tensor]:
    """GroupNorm's ``(x - mean) * rstd * weight + bias`` as ``x * scale + shift``: scale, shift ``(N, C, 1, 1)``,
    computed in float32 and handed out in ``dtype``, the activations' (one rounding under bf16 autocast)."""
    n, groups = mean.shape
    scale = weight.float().view(groups, -1) * rstd[:, :, None]  # (N, G, C/G)
    shift = torch.addcmul(bias.float().view(groups, -1), mean[:, :, None], scale, value=-1.0)
    return scale.view(n, -1, 1, 1).to(dtype), shift.view(n, -1, 1, 1).to(dtype)


def _norm_act(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float, silu: bool
              ) -> tuple[Tensor, Tensor, Tensor]:
    """``silu(group_norm(x))`` in float32 and the group mean, 1/std ``(N, G)``: PyTorch's kernel, fast forward in
    float32 (a bf16 x is copied: its bf16 channels_last kernel is up to 10x slower)."""
    n, c, height, width = x.shape
    h, mean, rstd = torch.ops.aten.native_group_norm(x.float(), weight.float(), bias.float(), n, c, height * width,
                                                     groups, eps)
    return (F.silu(h, inplace=True) if silu else h), mean, rstd


class _NormActConv(torch.autograd.Function):
    # With ``skip``, the input is the concatenation [x, skip] (the up path). The backward pass works on the two
    # parts, which are stored anyway: the concatenation is neither stored nor rebuilt.
    @staticmethod
    def forward(ctx: Any, x: Tensor, skip: Tensor | None, norm_weight: Tensor, norm_bias: Tensor, weight: Tensor,
                bias: Tensor | None, groups: int, eps: float, silu: bool, padding: int) -> Tensor:
        h, mean, rstd = _norm_act(concat_skip(x, skip), norm_weight, norm_bias, groups, eps, silu)
        ctx.save_for_backward(x, skip, norm_weight, norm_bias, weight, mean, rstd)
        ctx.config = silu, padding
        h = h.to(weight.dtype, memory_format=torch.channels_last)
        return torch.mkldnn_convolution(h, weight, bias, (padding, padding), (1, 1), (1, 1), 1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, skip, norm_weight, norm_bias, weight, mean, rstd = ctx.saved_tensors
        parts = (x,) if skip is None else (x, skip)
        silu, padding = ctx.config
        n, groups = mean.shape
        c, height, width = norm_weight.shape[0], x.shape[2], x.shape[3]
        scale, shift = _group_affine(norm_weight, norm_bias, mean, rstd, x.dtype)
        # Full-size temporaries set the backward pass's memory peak: each is dropped or reused once read.
        z = _by_parts(parts, scale, shift, out=torch.empty((n, c, height, width), dtype=x.dtype, device=x.device,
                                                           memory_format=torch.channels_last))  # recomputed
        h = F.silu(z, inplace=True) if silu else z  # the convolution's input, in z's buffer
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_h, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, h.to(weight.dtype), weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
            [True, True, False])
        # The bias gradient as one column sum: oneDNN's own took up to 10x longer.
        grad_bias = grad.sum((0, 2, 3)) if ctx.needs_input_grad[4] else None
        del grad
        grad_z = grad_h.to(x.dtype)
        if silu:  # recomputing z once more is cheaper than holding it next to h
            z = _by_parts(parts, scale, shift, out=h)
            grad_z = torch.ops.aten.silu_backward.grad_input(grad_z, z, grad_input=grad_z)
        # GroupNorm backward (Wu & He 2018): with xhat = (x - mean) rstd and g = dL/dz, per group
        # dx = rstd (w g - E[w g] - xhat E[w g xhat]) = scale g + a x + b. (bf16 sums accumulate in float32 inside
        # the kernel, 2-4x faster than asking for a float32 result; only the per-channel totals are rounded.)
        sums = torch.stack([grad_z.sum((2, 3)), _by_parts(parts, grad_z, None, out=z).sum((2, 3))]).float()
        sum_g, sum_gx = sums.view(2, n, groups, -1)  # (N, G, C/G) each
        sum_gxhat = (sum_gx - mean[:, :, None] * sum_g).mul_(rstd[:, :, None])
        count = height * width * (c // groups)
        w = norm_weight.float().view(groups, -1)
        e_wg, e_wgxhat = (w * sum_g).sum(-1).div_(count), (w * sum_gxhat).sum(-1).div_(count)  # (N, G)
        a = -rstd.square() * e_wgxhat
        b = torch.addcmul(-rstd * e_wg, a, mean, value=-1.0)
        a, b = (t[:, :, None].expand_as(sum_g).reshape(n, c, 1, 1).to(x.dtype) for t in (a, b))
        grad_x = _by_parts(parts, a, b, out=z).addcmul_(grad_z, scale)
        grad_parts: tuple[Tensor, Tensor | None] = (grad_x, None)
        if skip is not None:  # the skip's share as a compact copy: a slice would keep all of grad_x alive until
            split = x.shape[1]  # the down path's backward reaches the skip (torch.cat's backward does that)
            grad_parts = grad_x[:, :split], grad_x[:, split:].contiguous(memory_format=torch.channels_last)
        return (*grad_parts, sum_gxhat.sum(0).view(c), sum_g.sum(0).view(c), grad_weight, grad_bias, None, None,
                None, None)


def _by_parts(parts: tuple[Tensor, ...], scale: Tensor, shift: Tensor | None, out: Tensor) -> Tensor:
    # out = concat(parts) * scale (+ shift), part by part: the concatenation is never built
    start = 0
    for part in parts:
        end = start + part.shape[1]
        if shift is None:
            torch.mul(part, scale[:, start:end], out=out[:, start:end])
        else:
            torch.addcmul(shift[:, start:end], part, scale[:, start:end], out=out[:, start:end])
        start = end
    return out


def concat_skip(x: Tensor, skip: Tensor | None) -> Tensor:
    return torch.cat([x, skip], dim=1) if skip is not None else x  # (N, C_x + C_skip, H, W)


def norm_act_conv(x: Tensor, norm: nn.GroupNorm, weight: Tensor | WeightFn, bias: Tensor | None = None, *,
                  silu: bool, padding: int = 0, skip: Tensor | None = None, frozen_key: FrozenKey | None = None
                  ) -> Tensor:
    """``conv2d(silu(norm(x)))`` (or without the SiLU), stride 1: ``[N, C, H, W] -> [N, C_out, H, W]``; with
    ``skip`` ``[N, C_skip, H, W]``, of the concatenation ``[x, skip]``. ``weight`` and ``frozen_key`` as in
    ``conv2d``.

    Fused on CPU for float32 and bfloat16 (autocast): statistics and the affine map in float32, the convolution
    in the autocast dtype. Elsewhere the plain modules.
    """
    dtype = _onednn_dtype(x)
    if dtype is None:
        h = norm(concat_skip(x, skip))
        return conv2d(F.silu(h) if silu else h, weight, bias, padding=padding, frozen_key=frozen_key)
    if not torch.is_grad_enabled():  # inference: no Function, nothing saved
        h = _norm_act(concat_skip(x, skip), norm.weight, norm.bias, norm.num_groups, norm.eps, silu)[0]
        return conv2d(h.to(dtype), weight, bias, padding=padding, frozen_key=frozen_key)
    if not isinstance(weight, Tensor):
        weight, bias = weight()
    return cast(Tensor, _NormActConv.apply(x, skip, norm.weight, norm.bias, weight.to(dtype),
                                           bias.to(dtype) if bias is not None else None, norm.num_groups, norm.eps,
                                           silu, padding))


# --- nearest 2x upsampling -> 3x3 convolution ------------------------------------------------------------------

# After nearest 2x upsampling, output row 2i of a 3x3 convolution reads input rows (i-1, i, i) and row 2i+1 reads
# (i, i, i+1): per output phase, two input rows (and columns), over which the three kernel rows fold into two.
_UPSAMPLE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],   # phase 0: rows i-1, i <- (w0, w1 + w2)
                               [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # phase 1: rows i, i+1 <- (w0 + w1, w2)
# _UPSAMPLE_FOLD[(a, b, t, u), (k, l)] = 1 where 3x3 tap (k, l) adds into tap (t, u) of phase (a, b)'s 2x2 kernel
_UPSAMPLE_FOLD = torch.einsum("atk,bul->abtukl", _UPSAMPLE_TAPS, _UPSAMPLE_TAPS).reshape(16, 9)


def upsample_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv3x3(nearest_upsample_2x(x))`` with padding 1, ``[N, C, H, W] -> [N, O, 2H, 2W]``, computed as one 2x2
    convolution of ``x`` per output phase: the same sums grouped differently, with 2.25x fewer FLOPs and no
    4x-size upsampled map (the largest tensor a training step would otherwise store)."""
    n, _, height, width = x.shape
    if n * height * width < 2 * _FEW_PIXELS and not _prepacks(x):
        # weight-bound: reordering the phase kernels (16/9 the size of the 3x3 one) costs more than it saves
        return conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    # y[:, 4o + 2a + b, i + a, j + b] is output pixel (2i + a, 2j + b) of channel o: (N, 4 O, H + 1, W + 1)
    y = conv2d(x, lambda: _phase_weights(weight, bias), padding=1, frozen_key=("phases", (weight, bias)))
    return cast(Tensor, _InterleavePhases.apply(y.contiguous(memory_format=torch.channels_last)))


def _phase_weights(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    # (4 O, C, 2, 2), output channels ordered (o, a, b); channels_last like the 3x3 weights
    out, cin = weight.shape[:2]
    w = weight.permute(0, 2, 3, 1).reshape(out, 9, cin)  # (O, 3*3, C): a view of channels_last weights
    phase_weight = torch.matmul(_UPSAMPLE_FOLD.to(w), w).view(4 * out, 2, 2, cin).permute(0, 3, 1, 2)
    return phase_weight, bias.repeat_interleave(4) if bias is not None else None


class _InterleavePhases(torch.autograd.Function):
    # Written out because autograd's generic as_strided backward builds index tensors (10x a copy).
    @staticmethod
    def phases(y: Tensor) -> Tensor:
        # The (N, H, a, W, b, O) view of channels_last y (N, 4 O, H + 1, W + 1): the memory order of the output.
        n, c, height, width = y.shape
        s_n, _, s_row, s_col = y.stride()
        return y.as_strided((n, height - 1, 2, width - 1, 2, c // 4), (s_n, s_row, s_row + 2, s_col, s_col + 1, 4))

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
