"""The UNet's layers: timestep embeddings, the ResNet block, spatial self-attention and resampling.

Attribute names follow diffusers (``norm1``, ``conv1``, ``time_emb_proj``, ``to_q``, ``to_out.0``, ...) so that a
diffusers ``UNet2DModel`` state dict loads with ``strict=True``. Parameters that diffusers has and we do not need
(dropout modules, the unused ``Timesteps`` object) carry no weights, so leaving them out changes no key.

Layout and speed (measured on a 2-core AVX-512 CPU, shared/PERF_NOTES.md): the UNet runs in channels_last; the
convolutions, the fused GroupNorm -> SiLU -> convolution and the upsampling convolution are in ``kernels.py``; no
division by an output scale factor of 1.0 is issued.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ddpm.kernels import concat_skip, conv2d, norm_act_conv, upsample_conv

ActFn = Literal["silu", "swish", "mish", "gelu", "relu"]
TimeScaleShift = Literal["default", "scale_shift"]
# How a ResNet block changes resolution: nearest/avg-pool ("up"/"down", diffusers' resnet up/down types) or the
# FIR filter of the score-SDE models ("fir_up"/"fir_down", used by the Skip blocks).
Resample = Literal["up", "down", "fir_up", "fir_down"]


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and keys) running through ``kernels.conv2d``. Square kernels, zero padding."""

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(x, self.weight, self.bias, self.stride[0], cast(int, self.padding[0]))



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
        if skip is not None and not torch.is_grad_enabled():  # inference: one concatenation serves both paths
            x, skip = concat_skip(x, skip), None
        if self.fusable and not (self.dropout > 0.0 and self.training):
            h = norm_act_conv(x, self.norm1, self.conv1.weight, self.conv1.bias, silu=True, padding=1, skip=skip)
            t = self.time_emb_proj(temb)[:, :, None, None]  # (N, C_out, 1, 1)
            # conv1's output is read by no backward formula: safe in place
            h = norm_act_conv(h.add_(t), self.norm2, self.conv2.weight, self.conv2.bias, silu=True, padding=1)
            residual = self._shortcut(x, skip)
        else:
            x = concat_skip(x, skip)
            h = self._unfused(x, temb)
            residual = self._shortcut(self.resample(x) if self.resample is not None else x, None)
        h = h.add_(residual)
        if self.output_scale_factor != 1.0:
            h = h.div_(self.output_scale_factor)
        return h

    def _shortcut(self, x: Tensor, skip: Tensor | None) -> Tensor:
        if self.conv_shortcut is None:
            return concat_skip(x, skip)
        if skip is None:
            return self.conv_shortcut(x)
        # The 1x1 shortcut of [x, skip] as the sum of two: no concatenated map is stored for it.
        w, split = self.conv_shortcut.weight, x.shape[1]
        b = self.conv_shortcut.bias
        return conv2d(x, w[:, :split], b, frozen_key=("x", (w, b))).add_(
            conv2d(skip, w[:, split:], frozen_key=("skip", (w,))))

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
        params = (self.to_q.weight, self.to_k.weight, self.to_v.weight, self.to_q.bias, self.to_k.bias, self.to_v.bias)

        def qkv_weights() -> tuple[Tensor, Tensor]:  # (3 inner, C, 1, 1), (3 inner,)
            return torch.cat(params[:3])[:, :, None, None], torch.cat(params[3:])
        if self.group_norm is not None:  # (N, 3 inner, H, W)
            qkv = norm_act_conv(x, self.group_norm, qkv_weights, silu=False, frozen_key=("qkv", params))
        else:
            qkv = conv2d(x, qkv_weights, frozen_key=("qkv", params))
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
        out = conv2d(out, proj.weight[:, :, None, None], proj.bias, frozen_key=("", (proj.weight, proj.bias)))
        out = out.add_(x)  # + residual (the convolution's output is saved by no backward formula)
        if self.rescale_output_factor != 1.0:
            out = out.div_(self.rescale_output_factor)
        return out
