"""The UNet's layers, in plain PyTorch: timestep embeddings, the ResNet block, spatial self-attention, resampling.

Class and attribute names are diffusers' (``ResnetBlock2D.norm1``, ``Attention.to_q``, ``to_out.0``, ...), so a
diffusers ``UNet2DModel`` state dict loads with ``strict=True`` and hooks or ``isinstance`` checks written against
diffusers' modules find ours. Every module is created in diffusers' order, drawing the same random numbers, so
``torch.manual_seed(s)`` gives both libraries the same initial weights.

Dtype policy: parameters float32; timestep embeddings, GroupNorm and the attention softmax in float32; everything
else in the autocast dtype when autocast is on.

Speed: ``Conv2d``, ``GroupNorm``, ``Upsample2D``, ``ResnetBlock2D`` and ``Attention`` each have one
``if kernels.applies(...):`` that hands the same computation to a faster CPU kernel (``ddpm/kernels/``, the one door);
below it is the plain PyTorch that runs everywhere else (CUDA, ``torch.compile``, ``DDPM_CPU_KERNELS=0``) and that
the parity tests also run against diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ddpm import kernels

ActFn = Literal["silu", "swish", "mish", "gelu", "relu"]
TimeEmbeddingNorm = Literal["default", "scale_shift"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU,
                                           "relu": nn.ReLU}


# --- convolution and GroupNorm ------------------------------------------------------------------------------------

class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and keys); on CPU through oneDNN in channels_last (``kernels.conv2d``)."""

    packed: kernels.PackedWeights | None = None  # set inside UNet.frozen_weights()

    def forward(self, x: Tensor) -> Tensor:
        if kernels.applies(x):
            return kernels.conv2d(x, self.weight, self.bias, self.stride[0], cast(int, self.padding[0]), self.packed)
        return super().forward(x)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` computed in float32 (statistics and affine map) and returned in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        if kernels.applies(x):  # the same, with a channels_last backward 3-4x faster than PyTorch's
            return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


# --- timestep embeddings ------------------------------------------------------------------------------------------

def sinusoidal_embedding(timesteps: Tensor, dim: int, flip_sin_to_cos: bool = False, freq_shift: float = 1.0,
                         max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep embedding, ``[N] -> [N, dim]`` in float32.

    The Transformer positional encoding (Vaswani et al. 2017, Sec. 3.5) applied to the timestep, as in DDPM
    (Ho et al. 2020, Appendix B): frequencies ``exp(-ln(max_period) * i / (dim/2 - freq_shift))``, sines then
    cosines (cosines first with ``flip_sin_to_cos``), zero-padded when ``dim`` is odd.
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


class Timesteps(nn.Module):
    """Parameter-free ``[N] -> [N, num_channels]`` sinusoidal embedding of the timestep."""

    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float) -> None:
        super().__init__()
        self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift = (num_channels, flip_sin_to_cos,
                                                                              downscale_freq_shift)

    def forward(self, timesteps: Tensor) -> Tensor:
        return sinusoidal_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift)


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of ``log(sigma)``, ``[N] -> [N, 2 * embedding_size]``, sines then cosines (Song et
    al. 2021, score-SDE NCSN++; Tancik et al. 2020). The frequencies are a frozen parameter named ``weight``."""

    def __init__(self, embedding_size: int, scale: float = 1.0) -> None:
        super().__init__()
        # diffusers draws the frequencies twice and keeps the second draw; so do we, so that seeds agree.
        torch.randn(embedding_size)
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, sigmas: Tensor) -> Tensor:
        x = torch.log(sigmas)[:, None] * self.weight.float()[None, :] * (2 * math.pi)  # (N, embedding_size)
        return torch.cat([torch.sin(x), torch.cos(x)], dim=-1)


class TimestepEmbedding(nn.Module):
    """The two-layer MLP on the timestep features: ``linear_1 -> SiLU -> linear_2``."""

    def __init__(self, in_channels: int, time_embed_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


# --- resampling ---------------------------------------------------------------------------------------------------

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


def nearest_upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def avgpool_downsample(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=2, stride=2)


class Downsample2D(nn.Module):
    """3x3 convolution with stride 2, ``[N, C, H, W] -> [N, C, H/2, W/2]``. ``padding=0`` is the original DDPM's
    asymmetric padding (TensorFlow "SAME" for stride 2): one zero row and column on the bottom/right only."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling by 2 followed by a 3x3 convolution, ``[N, C, H, W] -> [N, C, 2H, 2W]``."""

    packed: kernels.PackedWeights | None = None  # set inside UNet.frozen_weights()

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, hidden_states: Tensor) -> Tensor:
        if kernels.applies(hidden_states):  # the same sums as 2x2 convolutions of the small map
            return kernels.upsample_conv(hidden_states, self.conv.weight, self.conv.bias, self.packed)
        return self.conv(nearest_upsample(hidden_states))


# --- ResNet block -------------------------------------------------------------------------------------------------

class ResnetBlock2D(nn.Module):
    """Pre-activation residual block with timestep conditioning (Ho et al. 2020, Appendix B; He et al. 2016).

    ``input_tensor: [N, in_channels, H, W]``, ``temb: [N, temb_channels]`` (the time embedding before the
    activation, as in diffusers). Returns ``[N, out_channels, H', W']``, where ``up``/``down`` double or halve
    ``H`` and ``W`` (nearest / average pooling, or the FIR filter with ``kernel="fir"``).

    ``time_embedding_norm="default"`` adds the projected embedding before ``norm2``; ``"scale_shift"`` applies it
    as FiLM after ``norm2``: ``h * (1 + scale) + shift`` (Dhariwal & Nichol 2021, "AdaGN"). The output is
    ``(shortcut(x) + h) / output_scale_factor``.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, groups: int,
                 groups_out: int | None = None, eps: float = 1e-6, non_linearity: ActFn = "silu",
                 time_embedding_norm: TimeEmbeddingNorm = "default", dropout: float = 0.0,
                 output_scale_factor: float = 1.0, use_in_shortcut: bool | None = None, up: bool = False,
                 down: bool = False, kernel: Literal["fir"] | None = None) -> None:
        super().__init__()
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        scale_shift = time_embedding_norm == "scale_shift"
        self.time_emb_proj = nn.Linear(temb_channels, 2 * out_channels if scale_shift else out_channels)
        self.norm2 = GroupNorm(groups_out if groups_out is not None else groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nonlinearity = ACTIVATIONS[non_linearity]()
        self.resample: Callable[[Tensor], Tensor] | None = None
        if up:
            self.resample = fir_upsample if kernel == "fir" else nearest_upsample
        elif down:
            self.resample = fir_downsample if kernel == "fir" else avgpool_downsample
        if use_in_shortcut is None:
            use_in_shortcut = in_channels != out_channels
        self.conv_shortcut = Conv2d(in_channels, out_channels, kernel_size=1) if use_in_shortcut else None
        # the options kernels.resnet_block covers
        self.fusable = (time_embedding_norm == "default" and non_linearity in ("silu", "swish")
                        and self.resample is None and dropout == 0.0)

    def forward(self, input_tensor: Tensor, temb: Tensor) -> Tensor:
        if self.fusable and kernels.applies(input_tensor, self):  # CPU: the same in fewer passes over memory
            return kernels.resnet_block(self, input_tensor, temb)
        h = self.nonlinearity(self.norm1(input_tensor))
        if self.resample is not None:
            input_tensor, h = self.resample(input_tensor), self.resample(h)
        h = self.conv1(h)
        t = self.time_emb_proj(self.nonlinearity(temb))[:, :, None, None]  # (N, C_out or 2 C_out, 1, 1)
        if self.time_embedding_norm == "scale_shift":
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + t)
        h = self.conv2(self.dropout(self.nonlinearity(h)))
        shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
        out = shortcut + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


# --- attention ----------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Spatial multi-head self-attention with a residual connection (Vaswani et al. 2017; Ho et al. 2020, App. B).

    ``[N, C, H, W] -> [N, C, H, W]``: optional GroupNorm, q/k/v projections of the ``H*W`` tokens, softmax
    attention with scale ``dim_head ** -0.5`` (``F.scaled_dot_product_attention``, in the autocast dtype, so that
    GPUs run their flash kernels), output projection, plus the input, divided by ``rescale_output_factor``.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, norm_num_groups: int | None = None,
                 eps: float = 1e-6, rescale_output_factor: float = 1.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = GroupNorm(norm_num_groups, query_dim, eps=eps) if norm_num_groups is not None else None
        self.to_q = nn.Linear(query_dim, inner)
        self.to_k = nn.Linear(query_dim, inner)
        self.to_v = nn.Linear(query_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(self, hidden_states: Tensor) -> Tensor:
        if kernels.applies(hidden_states, self):  # CPU: projections as 1x1 convolutions of the map
            return kernels.attention_block(self, hidden_states)
        height = hidden_states.shape[2]
        x = self.group_norm(hidden_states) if self.group_norm is not None else hidden_states
        tokens = rearrange(x, "b c x y -> b (x y) c")  # a view when x is channels_last
        q, k, v = (rearrange(proj(tokens), "b l (n d) -> b n l d", n=self.heads)
                   for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, H*W, dim_head)
        out = self.to_out[0](rearrange(out, "b n l d -> b l (n d)"))
        out = rearrange(out, "b (x y) c -> b c x y", x=height) + hidden_states  # + residual
        return out / self.rescale_output_factor if self.rescale_output_factor != 1.0 else out
