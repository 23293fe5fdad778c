"""Convolutions through oneDNN in channels_last, prepacked weights while they do not change, and nearest 2x
upsampling -> 3x3 convolution as four 2x2 convolutions of the small map."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from ddpm.kernels.door import compute_dtype

_mkldnn_ops = torch.ops.mkldnn

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
