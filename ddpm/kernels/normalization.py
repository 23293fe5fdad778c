"""GroupNorm in float32 with a written-out backward pass, and GroupNorm -> SiLU -> convolution fused."""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.kernels.convolution import PackedWeights, conv2d
from ddpm.kernels.door import compute_dtype

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
