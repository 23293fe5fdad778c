"""The UNet's down, mid and up blocks, under diffusers' class names.

A down block is ``num_layers`` ResNet blocks (each optionally followed by self-attention) and a downsampler; its
outputs after every layer and after the downsampler are the skip connections that the matching up block
concatenates back in, newest first (Ronneberger et al. 2015; Ho et al. 2020, Appendix B). The Skip blocks are the
score-SDE NCSN++ variant (Song et al. 2021): FIR resampling, residuals scaled by 1/sqrt(2), and an extra
image-resolution path (``skip_sample``) carried through the network.

One implementation per family, with flags: ``DownBlock`` (attention or not; downsampling by a strided
convolution or by a ResNet block), ``UpBlock``, ``SkipDownBlock``, ``SkipUpBlock``. diffusers' block names
(``DownBlock2D``, ``AttnDownBlock2D``, ...) are thin subclasses that add only the name, so that ``isinstance``
checks and hooks written against diffusers find our blocks; ``DOWN_BLOCKS`` / ``UP_BLOCKS`` (and the Skip
families' ``SKIP_DOWN_BLOCKS`` / ``SKIP_UP_BLOCKS``) map the config's block-type strings to them, and the UNet
passes each the flags that ``unet_config.DOWN_BLOCK_TYPES`` / ``UP_BLOCK_TYPES`` list for its name (through
``UNetConfig.down_levels()`` / ``up_levels()``). Every block creates its layers in diffusers' order (ResNet, then its attention, layer by layer), so a seed
gives both libraries the same initial weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ddpm.layers import (ActFn, Attention, Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, TimeEmbeddingNorm,
                         Upsample2D, fir_downsample, fir_upsample)
from ddpm.unet_config import attn_skip_up_groups, skip_groups, up_resnet_channels

# Activation checkpointing (Chen et al. 2016): recompute a layer in the backward pass instead of storing its
# activations. Non-reentrant, so it composes with autocast and in-place ops.
default_checkpointing: Callable[..., Any] = partial(checkpoint, use_reentrant=False)


class _Block(nn.Module):
    """What every block shares: the gradient-checkpointing switch that ``UNet.enable_gradient_checkpointing``
    sets (diffusers' attribute names). As in diffusers, the ResNet layers are checkpointed (``_resnet``), the
    attention layers and the mid block's first ResNet are not."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func: Callable[..., Any] = default_checkpointing

    def _resnet(self, resnet: nn.Module, hidden_states: Tensor, temb: Tensor) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            out: Tensor = self._gradient_checkpointing_func(resnet, hidden_states, temb)
            return out
        return resnet(hidden_states, temb)


def _attention(channels: int, head_dim: int, groups: int | None, eps: float, rescale: float = 1.0) -> Attention:
    # heads = channels // head_dim, as diffusers counts them
    return Attention(channels, heads=channels // head_dim, dim_head=head_dim, norm_num_groups=groups, eps=eps,
                     rescale_output_factor=rescale)


# --- plain blocks -------------------------------------------------------------------------------------------------

class DownBlock(_Block):
    """``num_layers`` ResNet blocks, each followed by attention when ``attention_head_dim`` is given, then an
    optional downsampler: ``[N, C_in, H, W] -> [N, C, H/2, W/2]`` and the skip connections (one per layer, plus
    the downsampler's output). ``downsample``: a stride-2 convolution ("conv"), a ResNet block that average-pools
    ("resnet"), or None (the last level)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int,
                 resnet_groups: int, resnet_eps: float, resnet_act_fn: ActFn,
                 resnet_time_scale_shift: TimeEmbeddingNorm, dropout: float, attention_head_dim: int | None,
                 downsample: Literal["conv", "resnet"] | None, downsample_padding: int = 1) -> None:
        super().__init__()
        res: dict[str, Any] = dict(groups=resnet_groups, eps=resnet_eps, non_linearity=resnet_act_fn,
                                   time_embedding_norm=resnet_time_scale_shift, dropout=dropout)
        resnets, attentions = [], []
        for i in range(num_layers):  # diffusers' creation order: resnet, then its attention, per layer
            resnets.append(ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, **res))
            if attention_head_dim is not None:
                attentions.append(_attention(out_channels, attention_head_dim, resnet_groups, resnet_eps))
        # registered first, as in diffusers: the same key order; None where diffusers has no attentions either
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.resnets = nn.ModuleList(resnets)
        self.downsamplers: nn.ModuleList | None = None
        if downsample == "conv":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=downsample_padding)])
        elif downsample == "resnet":
            self.downsamplers = nn.ModuleList([ResnetBlock2D(out_channels, out_channels, temb_channels, down=True,
                                                             **res)])

    def forward(self, hidden_states: Tensor, temb: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        output_states: tuple[Tensor, ...] = ()
        for i, resnet in enumerate(self.resnets):
            hidden_states = self._resnet(resnet, hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            down = self.downsamplers[0]
            hidden_states = down(hidden_states, temb) if isinstance(down, ResnetBlock2D) else down(hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class UpBlock(_Block):
    """``num_layers`` ResNet blocks on ``[x, skip]`` concatenations, each followed by attention when
    ``attention_head_dim`` is given, then an optional upsampler: ``[N, C_prev, H, W] -> [N, C, 2H, 2W]``.
    ``in_channels`` is the width of the matching down level (the last skip), ``prev_output_channel`` the width of
    the incoming map. ``upsample``: nearest 2x + 3x3 convolution ("conv"), a ResNet block that upsamples
    ("resnet"), or None (the last level)."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int, *,
                 num_layers: int, resnet_groups: int, resnet_eps: float, resnet_act_fn: ActFn,
                 resnet_time_scale_shift: TimeEmbeddingNorm, dropout: float, attention_head_dim: int | None,
                 upsample: Literal["conv", "resnet"] | None) -> None:
        super().__init__()
        res: dict[str, Any] = dict(groups=resnet_groups, eps=resnet_eps, non_linearity=resnet_act_fn,
                                   time_embedding_norm=resnet_time_scale_shift, dropout=dropout)
        resnets, attentions = [], []
        for x_channels, skip_channels in up_resnet_channels(in_channels, prev_output_channel, out_channels,
                                                            num_layers):  # [x, skip] concatenations
            resnets.append(ResnetBlock2D(x_channels + skip_channels, out_channels, temb_channels, **res))
            if attention_head_dim is not None:
                attentions.append(_attention(out_channels, attention_head_dim, resnet_groups, resnet_eps))
        # registered first, as in diffusers: the same key order; None where diffusers has no attentions either
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers: nn.ModuleList | None = None
        if upsample == "conv":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])
        elif upsample == "resnet":
            self.upsamplers = nn.ModuleList([ResnetBlock2D(out_channels, out_channels, temb_channels, up=True, **res)])

    def forward(self, hidden_states: Tensor, res_hidden_states_tuple: tuple[Tensor, ...], temb: Tensor) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            skip = res_hidden_states_tuple[-1 - i]  # newest first
            hidden_states = torch.cat([hidden_states, skip], dim=1)  # (N, C_x + C_skip, H, W)
            hidden_states = self._resnet(resnet, hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
        if self.upsamplers is not None:
            up = self.upsamplers[0]
            hidden_states = up(hidden_states, temb) if isinstance(up, ResnetBlock2D) else up(hidden_states)
        return hidden_states


class UNetMidBlock2D(_Block):
    """ResNet, then (attention, ResNet): ``[N, C, H, W] -> [N, C, H, W]``. The ResNet blocks and the attention
    divide their output by ``output_scale_factor`` (the config's ``mid_block_scale_factor``)."""

    def __init__(self, in_channels: int, temb_channels: int, *, resnet_groups: int, attn_groups: int | None,
                 resnet_eps: float, resnet_act_fn: ActFn, resnet_time_scale_shift: TimeEmbeddingNorm,
                 dropout: float, attention_head_dim: int, add_attention: bool, output_scale_factor: float) -> None:
        super().__init__()
        res: dict[str, Any] = dict(groups=resnet_groups, eps=resnet_eps, non_linearity=resnet_act_fn,
                                   time_embedding_norm=resnet_time_scale_shift, dropout=dropout,
                                   output_scale_factor=output_scale_factor)
        first = ResnetBlock2D(in_channels, in_channels, temb_channels, **res)
        self.attentions = nn.ModuleList([_attention(in_channels, attention_head_dim, attn_groups, resnet_eps,
                                                    output_scale_factor)]) if add_attention else None
        self.resnets = nn.ModuleList([first, ResnetBlock2D(in_channels, in_channels, temb_channels, **res)])

    def forward(self, hidden_states: Tensor, temb: Tensor) -> Tensor:
        hidden_states = self.resnets[0](hidden_states, temb)  # not checkpointed, as in diffusers
        if self.attentions is not None:
            hidden_states = self.attentions[0](hidden_states)
        return self._resnet(self.resnets[1], hidden_states, temb)


# --- score-SDE (NCSN++) blocks ------------------------------------------------------------------------------------

class SkipDownBlock(_Block):
    """score-SDE down block: ResNet blocks (each followed by attention when ``attention_head_dim`` is given),
    then a ResNet block with FIR downsampling; the image-resolution ``skip_sample`` ``[N, 3, H, W]`` is
    FIR-downsampled and added through a 1x1 conv. Residual and attention outputs are divided by sqrt(2)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, *, num_layers: int,
                 resnet_eps: float, resnet_act_fn: ActFn, resnet_time_scale_shift: TimeEmbeddingNorm, dropout: float,
                 attention_head_dim: int | None, add_downsample: bool) -> None:
        super().__init__()
        res: dict[str, Any] = dict(eps=resnet_eps, non_linearity=resnet_act_fn,
                                   time_embedding_norm=resnet_time_scale_shift, dropout=dropout,
                                   output_scale_factor=math.sqrt(2.0))
        resnets, attentions = [], []
        for i in range(num_layers):
            c = in_channels if i == 0 else out_channels
            resnets.append(ResnetBlock2D(c, out_channels, temb_channels, groups=skip_groups(c),
                                         groups_out=skip_groups(out_channels), **res))
            if attention_head_dim is not None:  # its GroupNorm has 32 groups, fixed in diffusers
                attentions.append(_attention(out_channels, attention_head_dim, 32, resnet_eps, math.sqrt(2.0)))
        # registered first, as in diffusers: the same key order; None where diffusers has no attentions either
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.resnets = nn.ModuleList(resnets)
        self.resnet_down: ResnetBlock2D | None = None
        self.skip_conv: Conv2d | None = None
        if add_downsample:
            self.resnet_down = ResnetBlock2D(out_channels, out_channels, temb_channels,
                                             groups=skip_groups(out_channels), use_in_shortcut=True, down=True,
                                             kernel="fir", **res)
            self.skip_conv = Conv2d(3, out_channels, kernel_size=1)  # 3: the RGB image path

    def forward(self, hidden_states: Tensor, temb: Tensor, skip_sample: Tensor
                ) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
        output_states: tuple[Tensor, ...] = ()
        for i, resnet in enumerate(self.resnets):
            hidden_states = self._resnet(resnet, hidden_states, temb)
            if self.attentions is not None:
                hidden_states = self.attentions[i](hidden_states)
            output_states += (hidden_states,)
        if self.resnet_down is not None and self.skip_conv is not None:
            hidden_states = self.resnet_down(hidden_states, temb)
            skip_sample = fir_downsample(skip_sample)  # (N, 3, H/2, W/2)
            hidden_states = self.skip_conv(skip_sample) + hidden_states
            output_states += (hidden_states,)
        return hidden_states, output_states, skip_sample


class SkipUpBlock(_Block):
    """score-SDE up block: ResNet blocks on [x, skip-connection] concatenations, one attention after the last of
    them when ``attention_head_dim`` is given, then the image path: the incoming ``skip_sample`` ``[N, 3, H, W]``
    is FIR-upsampled and a GroupNorm-SiLU-3x3-conv projection of ``x`` to 3 channels is added; ``x`` itself is
    FIR-upsampled by a ResNet block."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int, *,
                 num_layers: int, resnet_eps: float, resnet_act_fn: ActFn, resnet_time_scale_shift: TimeEmbeddingNorm,
                 dropout: float, attention_head_dim: int | None, add_upsample: bool) -> None:
        super().__init__()
        res: dict[str, Any] = dict(eps=resnet_eps, non_linearity=resnet_act_fn,
                                   time_embedding_norm=resnet_time_scale_shift, dropout=dropout,
                                   output_scale_factor=math.sqrt(2.0))
        resnets = []
        for x_ch, skip_ch in up_resnet_channels(in_channels, prev_output_channel, out_channels, num_layers):
            groups = (attn_skip_up_groups(x_ch, skip_ch) if attention_head_dim is not None
                      else skip_groups(x_ch + skip_ch))
            resnets.append(ResnetBlock2D(x_ch + skip_ch, out_channels, temb_channels, groups=groups,
                                         groups_out=skip_groups(out_channels), **res))
        # created after the ResNets, registered before them (diffusers' order for both)
        self.attentions = nn.ModuleList([_attention(out_channels, attention_head_dim, 32, resnet_eps, math.sqrt(2.0))]
                                        ) if attention_head_dim is not None else None
        self.resnets = nn.ModuleList(resnets)
        self.resnet_up: ResnetBlock2D | None = None
        self.skip_conv: Conv2d | None = None
        self.skip_norm: GroupNorm | None = None
        if add_upsample:
            g = skip_groups(out_channels)
            self.resnet_up = ResnetBlock2D(out_channels, out_channels, temb_channels, groups=g, groups_out=g,
                                           use_in_shortcut=True, up=True, kernel="fir", **res)
            self.skip_conv = Conv2d(out_channels, 3, kernel_size=3, padding=1)
            self.skip_norm = GroupNorm(g, out_channels, eps=resnet_eps)
            self.act = nn.SiLU()

    def forward(self, hidden_states: Tensor, res_hidden_states_tuple: tuple[Tensor, ...], temb: Tensor,
                skip_sample: Tensor | None) -> tuple[Tensor, Tensor | None]:
        for i, resnet in enumerate(self.resnets):
            skip = res_hidden_states_tuple[-1 - i]
            hidden_states = self._resnet(resnet, torch.cat([hidden_states, skip], dim=1), temb)
        if self.attentions is not None:
            hidden_states = self.attentions[0](hidden_states)
        if skip_sample is not None:
            skip_sample = fir_upsample(skip_sample)  # (N, 3, H, W) from (N, 3, H/2, W/2)
        if self.resnet_up is not None and self.skip_norm is not None and self.skip_conv is not None:
            projected = self.skip_conv(self.act(self.skip_norm(hidden_states)))  # (N, 3, H, W)
            skip_sample = projected if skip_sample is None else skip_sample + projected
            hidden_states = self.resnet_up(hidden_states, temb)
        return hidden_states, skip_sample


# --- diffusers' names ---------------------------------------------------------------------------------------------
# Each adds only its name: the flags it stands for come from unet_config.DOWN_BLOCK_TYPES / UP_BLOCK_TYPES through
# UNet.__init__ (tests/test_unet_parity.py checks that every block gets the class its config names).

class DownBlock2D(DownBlock):
    """ResNet layers, then a stride-2 convolution (no attention)."""


class AttnDownBlock2D(DownBlock):
    """ResNet + attention layers, then the config's ``downsample_type``."""


class ResnetDownsampleBlock2D(DownBlock):
    """ResNet layers, then a ResNet block that average-pools."""


class UpBlock2D(UpBlock):
    """ResNet layers on [x, skip], then nearest 2x + 3x3 convolution (no attention)."""


class AttnUpBlock2D(UpBlock):
    """ResNet + attention layers on [x, skip], then the config's ``upsample_type``."""


class ResnetUpsampleBlock2D(UpBlock):
    """ResNet layers on [x, skip], then a ResNet block that upsamples (nearest)."""


class SkipDownBlock2D(SkipDownBlock):
    """score-SDE down block without attention."""


class AttnSkipDownBlock2D(SkipDownBlock):
    """score-SDE down block with attention after every ResNet layer."""


class SkipUpBlock2D(SkipUpBlock):
    """score-SDE up block without attention."""


class AttnSkipUpBlock2D(SkipUpBlock):
    """score-SDE up block with one attention after the ResNet layers."""


# The config's block-type names -> classes, per family (unet_config.DOWN_BLOCK_TYPES / UP_BLOCK_TYPES say which).
DOWN_BLOCKS: dict[str, type[DownBlock]] = {
    cls.__name__: cls for cls in (DownBlock2D, AttnDownBlock2D, ResnetDownsampleBlock2D)}
SKIP_DOWN_BLOCKS: dict[str, type[SkipDownBlock]] = {
    cls.__name__: cls for cls in (SkipDownBlock2D, AttnSkipDownBlock2D)}
UP_BLOCKS: dict[str, type[UpBlock]] = {cls.__name__: cls for cls in (UpBlock2D, AttnUpBlock2D, ResnetUpsampleBlock2D)}
SKIP_UP_BLOCKS: dict[str, type[SkipUpBlock]] = {cls.__name__: cls for cls in (SkipUpBlock2D, AttnSkipUpBlock2D)}
