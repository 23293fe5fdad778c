"""The UNet's layers: timestep embeddings, the ResNet block, spatial self-attention and resampling.

Attribute names follow diffusers (``norm1``, ``conv1``, ``time_emb_proj``, ``to_q``, ``to_out.0``, ...) so that a
diffusers ``UNet2DModel`` state dict loads with ``strict=True``. Parameters that diffusers has and we do not need
(dropout modules, the unused ``Timesteps`` object) carry no weights, so leaving them out changes no key.

Layout and speed (measured on a 2-core AVX-512 CPU, shared/PERF_NOTES.md): the UNet runs in channels_last and
every convolution goes to oneDNN; each GroupNorm -> SiLU -> convolution is one autograd Function that stores only
its input; upsampling convolutions skip the upsampled map; no division by an output scale factor of 1.0 is issued.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

ActFn = Literal["silu", "swish", "mish", "gelu", "relu"]
TimeScaleShift = Literal["default", "scale_shift"]
# How a ResNet block changes resolution: nearest/avg-pool ("up"/"down", diffusers' resnet up/down types) or the
# FIR filter of the score-SDE models ("fir_up"/"fir_down", used by the Skip blocks).
Resample = Literal["up", "down", "fir_up", "fir_down"]


# --- convolution --------------------------------------------------------------------------------------------------

_ONEDNN = torch.backends.mkldnn.is_available()
# Below this many pixels (N*H*W) a convolution costs about what reordering its weights for oneDNN costs (measured).
_FEW_PIXELS = 128


def _onednn_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype a convolution of ``x`` runs in (autocast's, where autocast is on) if oneDNN takes it, else None."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return dtype if _ONEDNN and x.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) else None


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int = 1, padding: int = 0) -> Tensor:
    """``F.conv2d`` that always takes the oneDNN kernel on CPU for float32 and bfloat16 (autocast included).

    PyTorch's heuristic sends batch-1 convolutions on small maps (e.g. 256 x 8 x 8) to its slow reference kernel,
    which ran at 49-61 GFLOP/s against up to 370 through oneDNN on our CPU (shared/PERF_NOTES.md).
    """
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


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and keys) running through ``conv2d`` above. Square kernels, zero padding."""

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(x, self.weight, self.bias, self.stride[0], cast(int, self.padding[0]))


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
        h, mean, rstd = _norm_act(_concat(x, skip), norm_weight, norm_bias, groups, eps, silu)
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


def _concat(x: Tensor, skip: Tensor | None) -> Tensor:
    return torch.cat([x, skip], dim=1) if skip is not None else x  # (N, C_x + C_skip, H, W)


def norm_act_conv(x: Tensor, norm: nn.GroupNorm, weight: Tensor, bias: Tensor | None, *, silu: bool,
                  padding: int = 0, skip: Tensor | None = None) -> Tensor:
    """``conv2d(silu(norm(x)))`` (or without the SiLU), stride 1: ``[N, C, H, W] -> [N, C_out, H, W]``; with
    ``skip`` ``[N, C_skip, H, W]``, of the concatenation ``[x, skip]``.

    Fused on CPU for float32 and bfloat16 (autocast): statistics and the affine map in float32, the convolution
    in the autocast dtype. Elsewhere the plain modules.
    """
    dtype = _onednn_dtype(x)
    if dtype is None:
        h = norm(_concat(x, skip))
        return conv2d(F.silu(h) if silu else h, weight, bias, padding=padding)
    bias = bias.to(dtype) if bias is not None else None
    if not torch.is_grad_enabled():  # inference: no Function, nothing saved
        h = _norm_act(_concat(x, skip), norm.weight, norm.bias, norm.num_groups, norm.eps, silu)[0]
        return conv2d(h.to(dtype), weight, bias, padding=padding)
    return cast(Tensor, _NormActConv.apply(x, skip, norm.weight, norm.bias, weight.to(dtype), bias,
                                           norm.num_groups, norm.eps, silu, padding))


# --- activations -------------------------------------------------------------------------------------------------
# In place at inference only. In training, in-place SiLU and Mish clone their input for the backward pass anyway,
# and an in-place op on a module's output breaks the user's full backward hooks on that module.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": lambda x: F.silu(x, inplace=not x.requires_grad),
    "swish": lambda x: F.silu(x, inplace=not x.requires_grad),
    "mish": lambda x: F.mish(x, inplace=not x.requires_grad),
    "relu": lambda x: F.relu(x, inplace=not x.requires_grad),
    "gelu": F.gelu,
}


# --- timestep embeddings ------------------------------------------------------------------------------------------

def sinusoidal_embedding(timesteps: Tensor, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0,
                         max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep embedding, ``[N] -> [N, dim]`` in float32.

    The Transformer positional encoding (Vaswani et al. 2017, Sec. 3.5) applied to the timestep, as in DDPM
    (Ho et al. 2020, Appendix B): frequencies ``exp(-ln(max_period) * i / (dim/2 - freq_shift))``, sines then
    cosines (cosines first with ``flip_sin_to_cos``), zero-padded when ``dim`` is odd. Computed in float32 every
    call (a few hundred flops), so a half-precision model never holds a rounded frequency table.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = timesteps[:, None].float() * freqs[None, :]  # (N, half)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class SinusoidalTimestepEmbedding(nn.Module):
    """Parameter-free ``[N] -> [N, dim]`` positional embedding (diffusers' ``Timesteps``)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> None:
        super().__init__()
        self.dim, self.flip_sin_to_cos, self.freq_shift = dim, flip_sin_to_cos, freq_shift

    def forward(self, timesteps: Tensor) -> Tensor:
        return sinusoidal_embedding(timesteps, self.dim, self.flip_sin_to_cos, self.freq_shift)


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features of ``log(sigma)``, ``[N] -> [N, 2 * dim]`` (Song et al. 2021, score-SDE NCSN++;
    Tancik et al. 2020). The frequencies are a frozen parameter named ``weight`` as in diffusers."""

    def __init__(self, dim: int, scale: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * scale, requires_grad=False)

    def forward(self, sigmas: Tensor) -> Tensor:
        x = torch.log(sigmas)[:, None] * self.weight.float()[None, :] * (2 * math.pi)  # (N, dim), fp32
        return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)


class TimestepEmbedding(nn.Module):
    """The two-layer MLP on the timestep features: ``linear_1 -> SiLU -> linear_2``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(ACTIVATIONS["silu"](self.linear_1(x)))


# --- resampling ---------------------------------------------------------------------------------------------------

def nearest_upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def avgpool_downsample(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=2, stride=2)


def _fir_kernel(x: Tensor, gain: float) -> Tensor:
    # The separable [1, 3, 3, 1] binomial filter of score-SDE / StyleGAN2 (Karras et al. 2020), normalised to sum
    # to `gain`, as one depthwise kernel per channel: (C, 1, 4, 4). It is symmetric, so correlation = convolution.
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=x.dtype, device=x.device)
    k2 = torch.outer(k, k) * (gain / 64.0)
    return k2.expand(x.shape[1], 1, 4, 4)


def fir_upsample(x: Tensor) -> Tensor:
    """FIR upsampling by 2, ``[N, C, H, W] -> [N, C, 2H, 2W]``: zero-insertion then the [1,3,3,1] filter (gain 4,
    so a constant image stays constant), done as one depthwise transposed convolution."""
    return F.conv_transpose2d(x, _fir_kernel(x, gain=4.0), stride=2, padding=1, groups=x.shape[1])


def fir_downsample(x: Tensor) -> Tensor:
    """FIR downsampling by 2, ``[N, C, H, W] -> [N, C, H/2, W/2]``: the [1,3,3,1] filter (gain 1) with one pixel
    of zero padding, sampled every second pixel, as one depthwise strided convolution."""
    return F.conv2d(x, _fir_kernel(x, gain=1.0), stride=2, padding=1, groups=x.shape[1])


RESAMPLERS: dict[str, Callable[[Tensor], Tensor]] = {
    "up": nearest_upsample, "down": avgpool_downsample, "fir_up": fir_upsample, "fir_down": fir_downsample,
}


class Downsample2D(nn.Module):
    """3x3 convolution with stride 2, ``[N, C, H, W] -> [N, C, H/2, W/2]``. ``padding=0`` is the original DDPM's
    asymmetric padding (TensorFlow "SAME" for stride 2): one zero row and column on the bottom/right only."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


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
    if n * height * width < 2 * _FEW_PIXELS:  # weight-bound: the phase kernels are 16/9 the size of the 3x3 one
        return conv2d(nearest_upsample(x), weight, bias, padding=1)
    out, cin = weight.shape[:2]
    w = weight.permute(0, 2, 3, 1).reshape(out, 9, cin)  # (O, 3*3, C): a view of channels_last weights
    # (4 O, C, 2, 2), output channels ordered (o, a, b); channels_last like the 3x3 weights
    phase_weight = torch.matmul(_UPSAMPLE_FOLD.to(w), w).view(4 * out, 2, 2, cin).permute(0, 3, 1, 2)
    phase_bias = bias.repeat_interleave(4) if bias is not None else None
    # y[:, 4o + 2a + b, i + a, j + b] is output pixel (2i + a, 2j + b) of channel o: (N, 4 O, H + 1, W + 1)
    y = conv2d(x, phase_weight, phase_bias, padding=1).contiguous(memory_format=torch.channels_last)
    return cast(Tensor, _InterleavePhases.apply(y))


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


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling by 2 followed by a 3x3 convolution, ``[N, C, H, W] -> [N, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return upsample_conv(x, self.conv.weight, self.conv.bias)


# --- ResNet block -------------------------------------------------------------------------------------------------

class ResnetBlock2D(nn.Module):
    """Pre-activation residual block with timestep conditioning (Ho et al. 2020, Appendix B; He et al. 2016).

    ``x: [N, C_in, H, W]``, ``temb: [N, T]`` **already passed through the activation** (the UNet applies it once
    for all blocks; diffusers recomputes the same value in every block). Returns ``[N, C_out, H', W']`` where
    ``H'`` is ``H`` changed by ``resample``.

    ``time_scale_shift="default"`` adds the projected embedding before ``norm2``; ``"scale_shift"`` applies it as
    FiLM after ``norm2``: ``h * (1 + scale) + shift`` (Dhariwal & Nichol 2021, "AdaGN").
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, groups: int,
                 groups_out: int | None = None, eps: float = 1e-6, act_fn: ActFn = "silu",
                 time_scale_shift: TimeScaleShift = "default", dropout: float = 0.0, output_scale_factor: float = 1.0,
                 use_in_shortcut: bool | None = None, resample: Resample | None = None) -> None:
        super().__init__()
        self.act = ACTIVATIONS[act_fn]
        self.scale_shift = time_scale_shift == "scale_shift"
        self.dropout = dropout
        self.output_scale_factor = output_scale_factor
        self.resample = RESAMPLERS[resample] if resample is not None else None

        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, 2 * out_channels if self.scale_shift else out_channels)
        self.norm2 = nn.GroupNorm(groups_out if groups_out is not None else groups, out_channels, eps=eps)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if use_in_shortcut is None:
            use_in_shortcut = in_channels != out_channels
        self.conv_shortcut = Conv2d(in_channels, out_channels, kernel_size=1) if use_in_shortcut else None
        # GroupNorm -> SiLU -> conv pairs run fused (norm_act_conv) unless something sits between them.
        self.fusable = act_fn in ("silu", "swish") and resample is None and not self.scale_shift

    def forward(self, x: Tensor, temb: Tensor, skip: Tensor | None = None) -> Tensor:
        """``skip``: the up path's skip connection, taken as concatenated to ``x`` along channels."""
        if self.fusable and not (self.dropout > 0.0 and self.training):
            h = norm_act_conv(x, self.norm1, self.conv1.weight, self.conv1.bias, silu=True, padding=1, skip=skip)
            t = self.time_emb_proj(temb)[:, :, None, None]  # (N, C_out, 1, 1)
            # conv1's output is read by no backward formula: safe in place
            h = norm_act_conv(h.add_(t), self.norm2, self.conv2.weight, self.conv2.bias, silu=True, padding=1)
            residual = self._shortcut(x, skip)
        else:
            x = _concat(x, skip)
            h = self._unfused(x, temb)
            residual = self._shortcut(self.resample(x) if self.resample is not None else x, None)
        h = h.add_(residual)
        if self.output_scale_factor != 1.0:
            h = h.div_(self.output_scale_factor)
        return h

    def _shortcut(self, x: Tensor, skip: Tensor | None) -> Tensor:
        if self.conv_shortcut is None:
            return _concat(x, skip)
        if skip is None:
            return self.conv_shortcut(x)
        # The 1x1 shortcut of [x, skip] as the sum of two: no concatenated map is stored for it.
        w, split = self.conv_shortcut.weight, x.shape[1]
        return conv2d(x, w[:, :split], self.conv_shortcut.bias).add_(conv2d(skip, w[:, split:], None))

    def _unfused(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.act(self.norm1(x))
        if self.resample is not None:
            h = self.resample(h)
        h = self.conv1(h)
        t = self.time_emb_proj(temb)[:, :, None, None]  # (N, C_out or 2 C_out, 1, 1)
        if self.scale_shift:
            scale, shift = t.chunk(2, dim=1)
            h = (self.norm2(h) * (1 + scale)).add_(shift)
        else:
            h = self.norm2(h.add_(t))  # conv1's output is not read by its backward: safe in place
        h = self.act(h)
        if self.dropout > 0.0 and self.training:
            h = F.dropout(h, self.dropout, training=True)
        return self.conv2(h)


# --- attention ----------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Spatial multi-head self-attention with a residual connection (Vaswani et al. 2017; Ho et al. 2020, App. B).

    ``[N, C, H, W] -> [N, C, H, W]``: optional GroupNorm, q/k/v projections over the ``H*W`` tokens, softmax
    attention with scale ``head_dim ** -0.5`` via ``F.scaled_dot_product_attention``, output projection, plus the
    input, divided by ``rescale_output_factor``. ``heads = channels // head_dim`` as in diffusers.
    """

    def __init__(self, channels: int, head_dim: int, norm_groups: int | None, eps: float = 1e-6,
                 rescale_output_factor: float = 1.0) -> None:
        super().__init__()
        self.heads = channels // head_dim
        inner = self.heads * head_dim
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = nn.GroupNorm(norm_groups, channels, eps=eps) if norm_groups is not None else None
        self.to_q = nn.Linear(channels, inner)
        self.to_k = nn.Linear(channels, inner)
        self.to_v = nn.Linear(channels, inner)
        # diffusers' to_out is [Linear, Dropout(0)]; the dropout has no weights, so index 0 keeps its key.
        self.to_out = nn.ModuleList([nn.Linear(inner, channels)])

    def forward(self, x: Tensor) -> Tensor:
        height = x.shape[2]
        # q, k and v as one 1x1 convolution (a oneDNN GEMM, 2x MKL's speed here); still three parameters.
        w = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])[:, :, None, None]  # (3 inner, C, 1, 1)
        b = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias])
        if self.group_norm is not None:
            qkv = norm_act_conv(x, self.group_norm, w, b, silu=False)  # (N, 3 inner, H, W)
        else:
            qkv = conv2d(x, w, b)
        # Views (channels_last: tokens are rows); split along channels, so their gradients meet in one cat.
        q, k, v = (rearrange(t, "b (n d) x y -> b n (x y) d", n=self.heads) for t in qkv.chunk(3, dim=1))
        # The softmax runs in float32 either way (the flash kernel accumulates bf16 in float32). For small heads
        # (diffusers' default head_dim 8) the inputs go in as float32 too: CPU's bf16 flash-attention backward is
        # 4x slower there, while for large heads (e.g. 256) it is 1.2x faster than float32.
        dtype = torch.float32 if q.shape[-1] < 64 else qkv.dtype
        with torch.autocast(x.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype)).to(qkv.dtype)  # (N, n, HW, d)
        out = rearrange(out, "b n (x y) d -> b (n d) x y", x=height)  # channels_last view: SDPA's out is (b, l, n, d)
        proj = cast(nn.Linear, self.to_out[0])
        out = conv2d(out, proj.weight[:, :, None, None], proj.bias).add_(x)  # + residual (conv output: unsaved)
        if self.rescale_output_factor != 1.0:
            out = out.div_(self.rescale_output_factor)
        return out
