"""The UNet's down, mid and up blocks, and the table that maps diffusers' block-type names onto them.

A down block is ``layers`` ResNet blocks (each optionally followed by self-attention) and a downsampler; its
outputs after every layer and after the downsampler are the skip connections that the matching up block
concatenates back in, newest first (Ronneberger et al. 2015; Ho et al. 2020, Appendix B). The Skip blocks are the
score-SDE NCSN++ variant (Song et al. 2021): FIR resampling, residuals scaled by 1/sqrt(2), and an extra
image-resolution path (``skip_sample``) carried through the network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ddpm.kernels import norm_act_conv
from ddpm.layers import Attention, Conv2d, Downsample2D, ResnetBlock2D, Upsample2D, fir_downsample, fir_upsample

# "conv": strided 3x3 conv / nearest + 3x3 conv; "resnet": a ResNet block with avg-pool / nearest resampling.
Resampling = Literal["conv", "resnet"]
BlockKind = Literal["conv", "resnet", "fir"]

# diffusers name -> (attention?, resampling). None = the config's downsample_type/upsample_type (as diffusers
# does for the Attn blocks only); "fir" = the Skip blocks. Older configs spell names with a "UNetRes" prefix.
DOWN_BLOCK_TYPES: dict[str, tuple[bool, BlockKind | None]] = {
    "DownBlock2D": (False, "conv"),
    "AttnDownBlock2D": (True, None),
    "ResnetDownsampleBlock2D": (False, "resnet"),
    "SkipDownBlock2D": (False, "fir"),
    "AttnSkipDownBlock2D": (True, "fir"),
}
UP_BLOCK_TYPES: dict[str, tuple[bool, BlockKind | None]] = {
    "UpBlock2D": (False, "conv"),
    "AttnUpBlock2D": (True, None),
    "ResnetUpsampleBlock2D": (False, "resnet"),
    "SkipUpBlock2D": (False, "fir"),
    "AttnSkipUpBlock2D": (True, "fir"),
}


def canonical_block_type(name: str) -> str:
    """diffusers accepts "UNetResDownBlock2D" for "DownBlock2D" (and so on); so do we."""
    return name[len("UNetRes"):] if name.startswith("UNetRes") else name


def _run(enabled: bool, fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    # Activation checkpointing (Chen et al. 2016): recompute fn in the backward pass instead of storing its
    # activations. Non-reentrant, so it composes with autocast and in-place ops.
    if enabled and torch.is_grad_enabled():
        out: Tensor = checkpoint(fn, *args, use_reentrant=False)
        return out
    return fn(*args)


def _level(in_widths: list[int], channels: int, temb_channels: int, attention: bool, head_dim: int,
           res: dict[str, Any]) -> tuple[nn.ModuleList, nn.ModuleList]:
    # One ResNet block per input width, each followed by attention when asked. Registered as diffusers does
    # (attentions, then resnets, then the resampler), so state dicts list alike.
    attentions = nn.ModuleList(Attention(channels, head_dim, res["groups"], res["eps"])
                               for _ in range(len(in_widths) if attention else 0))
    return attentions, nn.ModuleList(ResnetBlock2D(w, channels, temb_channels, **res) for w in in_widths)


def _resampler(kind: Resampling | None, direction: Literal["up", "down"], channels: int, temb_channels: int,
               res: dict[str, Any], conv: Callable[[], nn.Module]) -> nn.ModuleList | None:
    # diffusers' "downsamplers"/"upsamplers" list: Downsample2D/Upsample2D ("conv"), or a ResNet block that
    # resamples inside (downsample_type/upsample_type "resnet")
    if kind == "conv":
        return nn.ModuleList([conv()])
    if kind == "resnet":
        return nn.ModuleList([ResnetBlock2D(channels, channels, temb_channels, resample=direction, **res)])
    return None


def _down_layers(block: DownBlock | SkipDownBlock, x: Tensor, temb: Tensor) -> tuple[Tensor, list[Tensor]]:
    # Each ResNet block (then its attention, if any) in turn; every output is a skip connection for the up path
    residuals = []
    for i, resnet in enumerate(block.resnets):
        x = _run(block.gradient_checkpointing, resnet, x, temb)
        if len(block.attentions):
            x = _run(block.gradient_checkpointing, block.attentions[i], x)
        residuals.append(x)
    return x, residuals


class DownBlock(nn.Module):
    """``layers`` ResNet blocks (+ attention) then an optional downsampler: ``[N, C_in, H, W] -> [N, C, H/2, W/2]``.

    Covers DownBlock2D, AttnDownBlock2D and ResnetDownsampleBlock2D.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, layers: int, attention: bool,
                 downsample: Resampling | None, groups: int, eps: float, act_fn: str, time_scale_shift: str,
                 dropout: float, head_dim: int, downsample_padding: int) -> None:
        super().__init__()
        res: dict[str, Any] = dict(groups=groups, eps=eps, act_fn=act_fn, time_scale_shift=time_scale_shift,
                                   dropout=dropout)
        self.gradient_checkpointing = False
        widths = [in_channels if i == 0 else out_channels for i in range(layers)]
        self.attentions, self.resnets = _level(widths, out_channels, temb_channels, attention, head_dim, res)
        self.downsample = downsample
        self.downsamplers = _resampler(downsample, "down", out_channels, temb_channels, res,
                                       lambda: Downsample2D(out_channels, padding=downsample_padding))

    def forward(self, x: Tensor, temb: Tensor) -> tuple[Tensor, list[Tensor]]:
        x, residuals = _down_layers(self, x, temb)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, temb) if self.downsample == "resnet" else self.downsamplers[0](x)
            residuals.append(x)
        return x, residuals


class UpBlock(nn.Module):
    """``layers`` ResNet blocks on [x, skip] concatenations (+ attention) then an optional upsampler:
    ``[N, C_prev, H, W] -> [N, C, 2H, 2W]``. Covers UpBlock2D, AttnUpBlock2D and ResnetUpsampleBlock2D.

    ``in_channels`` is the width of the matching down level (the last skip), ``prev_channels`` the width of the
    incoming feature map.
    """

    def __init__(self, in_channels: int, prev_channels: int, out_channels: int, temb_channels: int, *, layers: int,
                 attention: bool, upsample: Resampling | None, groups: int, eps: float, act_fn: str,
                 time_scale_shift: str, dropout: float, head_dim: int) -> None:
        super().__init__()
        res: dict[str, Any] = dict(groups=groups, eps=eps, act_fn=act_fn, time_scale_shift=time_scale_shift,
                                   dropout=dropout)
        self.gradient_checkpointing = False
        widths = [(prev_channels if i == 0 else out_channels) + (in_channels if i == layers - 1 else out_channels)
                  for i in range(layers)]  # [x, skip] concatenations
        self.attentions, self.resnets = _level(widths, out_channels, temb_channels, attention, head_dim, res)
        self.upsample = upsample
        self.upsamplers = _resampler(upsample, "up", out_channels, temb_channels, res,
                                     lambda: Upsample2D(out_channels))

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor) -> Tensor:
        ckpt = self.gradient_checkpointing
        for i, resnet in enumerate(self.resnets):
            x = _run(ckpt, resnet, x, temb, skips.pop())  # on the concatenation [x, skip]
            if len(self.attentions):
                x = _run(ckpt, self.attentions[i], x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, temb) if self.upsample == "resnet" else self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """ResNet, then (attention, ResNet) once: ``[N, C, H, W] -> [N, C, H, W]`` (diffusers' UNetMidBlock2D).

    Both the ResNet blocks and the attention divide their output by ``output_scale_factor`` (the config's
    ``mid_block_scale_factor``).
    """

    def __init__(self, channels: int, temb_channels: int, *, groups: int, attn_groups: int | None, eps: float,
                 act_fn: str, time_scale_shift: str, dropout: float, head_dim: int, attention: bool,
                 output_scale_factor: float) -> None:
        super().__init__()
        res: dict[str, Any] = dict(groups=groups, eps=eps, act_fn=act_fn, time_scale_shift=time_scale_shift,
                                   dropout=dropout, output_scale_factor=output_scale_factor)
        self.gradient_checkpointing = False
        self.attentions = nn.ModuleList(
            [Attention(channels, head_dim, attn_groups, eps, output_scale_factor)] if attention else [])
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, temb_channels, **res) for _ in range(2))

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        ckpt = self.gradient_checkpointing
        x = _run(ckpt, self.resnets[0], x, temb)
        if len(self.attentions):
            x = _run(ckpt, self.attentions[0], x)
        return _run(ckpt, self.resnets[1], x, temb)


def _skip_groups(channels: int) -> int:
    # The Skip blocks size their GroupNorms from the channel count, ignoring norm_num_groups (as diffusers does).
    return min(channels // 4, 32)


class SkipDownBlock(nn.Module):
    """score-SDE down block (SkipDownBlock2D, AttnSkipDownBlock2D): ResNet blocks (+ attention), then a ResNet
    block with FIR downsampling; the image-resolution ``skip`` input ``[N, 3, H, W]`` is FIR-downsampled and
    added through a 1x1 conv. Residual and attention outputs are divided by sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, layers: int, attention: bool,
                 add_downsample: bool, eps: float, act_fn: str, time_scale_shift: str, dropout: float,
                 head_dim: int) -> None:
        super().__init__()
        res: dict[str, Any] = dict(eps=eps, act_fn=act_fn, time_scale_shift=time_scale_shift, dropout=dropout,
                                   output_scale_factor=math.sqrt(2.0))
        self.gradient_checkpointing = False
        # The attention GroupNorm is fixed at 32 groups in diffusers.
        self.attentions = nn.ModuleList(
            Attention(out_channels, head_dim, 32, eps, math.sqrt(2.0)) for _ in range(layers if attention else 0))
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c, out_channels, temb_channels, groups=_skip_groups(c),
                          groups_out=_skip_groups(out_channels), **res)
            for c in [in_channels] + [out_channels] * (layers - 1))
        self.resnet_down: ResnetBlock2D | None = None
        self.skip_conv: Conv2d | None = None
        if add_downsample:
            self.resnet_down = ResnetBlock2D(out_channels, out_channels, temb_channels,
                                             groups=_skip_groups(out_channels), use_in_shortcut=True,
                                             resample="fir_down", **res)
            self.skip_conv = Conv2d(3, out_channels, kernel_size=1)  # 3: the RGB image path

    def forward(self, x: Tensor, temb: Tensor, skip: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        x, residuals = _down_layers(self, x, temb)
        if self.resnet_down is not None and self.skip_conv is not None:
            x = self.resnet_down(x, temb)
            skip = fir_downsample(skip)  # (N, 3, H/2, W/2)
            x = self.skip_conv(skip) + x
            residuals.append(x)
        return x, residuals, skip


class SkipUpBlock(nn.Module):
    """score-SDE up block (SkipUpBlock2D, AttnSkipUpBlock2D): ResNet blocks on [x, skip-connection]
    concatenations, one attention after the last of them, then the image path: the incoming ``skip_sample``
    ``[N, 3, H, W]`` is FIR-upsampled and a GroupNorm-SiLU-3x3-conv projection of ``x`` to 3 channels is added;
    ``x`` itself is FIR-upsampled by a ResNet block."""

    def __init__(self, in_channels: int, prev_channels: int, out_channels: int, temb_channels: int, *, layers: int,
                 attention: bool, add_upsample: bool, eps: float, act_fn: str, time_scale_shift: str,
                 dropout: float, head_dim: int) -> None:
        super().__init__()
        res: dict[str, Any] = dict(eps=eps, act_fn=act_fn, time_scale_shift=time_scale_shift, dropout=dropout,
                                   output_scale_factor=math.sqrt(2.0))
        self.gradient_checkpointing = False
        self.attentions = nn.ModuleList(
            [Attention(out_channels, head_dim, 32, eps, math.sqrt(2.0))] if attention else [])
        resnets = []
        for i in range(layers):
            x_ch = prev_channels if i == 0 else out_channels
            skip_ch = in_channels if i == layers - 1 else out_channels
            # diffusers' AttnSkipUpBlock2D computes min(x_ch + skip_ch // 4, 32) (operator precedence); the
            # checkpoints depend on it, so it is kept.
            groups = min(x_ch + skip_ch // 4, 32) if attention else _skip_groups(x_ch + skip_ch)
            resnets.append(ResnetBlock2D(x_ch + skip_ch, out_channels, temb_channels, groups=groups,
                                         groups_out=_skip_groups(out_channels), **res))
        self.resnets = nn.ModuleList(resnets)
        self.resnet_up: ResnetBlock2D | None = None
        self.skip_norm: nn.GroupNorm | None = None
        self.skip_conv: Conv2d | None = None
        if add_upsample:
            g = _skip_groups(out_channels)
            self.resnet_up = ResnetBlock2D(out_channels, out_channels, temb_channels, groups=g, groups_out=g,
                                           use_in_shortcut=True, resample="fir_up", **res)
            self.skip_conv = Conv2d(out_channels, 3, kernel_size=3, padding=1)
            self.skip_norm = nn.GroupNorm(g, out_channels, eps=eps)

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor,
                skip_sample: Tensor | None) -> tuple[Tensor, Tensor | None]:
        ckpt = self.gradient_checkpointing
        for resnet in self.resnets:
            x = _run(ckpt, resnet, x, temb, skips.pop())  # on the concatenation [x, skip]
        if len(self.attentions):
            x = _run(ckpt, self.attentions[0], x)
        if skip_sample is not None:
            skip_sample = fir_upsample(skip_sample)  # (N, 3, H, W) from (N, 3, H/2, W/2)
        if self.resnet_up is not None and self.skip_norm is not None and self.skip_conv is not None:
            projected = norm_act_conv(x, self.skip_norm, self.skip_conv.weight, self.skip_conv.bias, silu=True,
                                      padding=1)  # (N, 3, H, W)
            skip_sample = projected if skip_sample is None else skip_sample + projected
            x = self.resnet_up(x, temb)
        return x, skip_sample
