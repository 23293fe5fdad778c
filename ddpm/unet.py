"""The UNet noise-prediction network of DDPM, checkpoint-compatible with diffusers' ``UNet2DModel``.

Architecture (Ho et al. 2020, Appendix B; Ronneberger et al. 2015): a 3x3 input conv, a stack of down blocks
that halve the resolution, a mid block, mirrored up blocks that concatenate the down path's activations back in,
and a GroupNorm-SiLU-3x3-conv head. The timestep enters every ResNet block through a sinusoidal (or Fourier, or
learned) embedding and a two-layer MLP.

``UNetConfig`` holds exactly the keys of diffusers' ``config.json`` for ``UNet2DModel`` with the same defaults;
``UNet.from_pretrained`` / ``save_pretrained`` read and write diffusers' folder layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from ddpm import checkpoint, kernels
from ddpm.blocks import (DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, DownBlock, MidBlock, SkipDownBlock, SkipUpBlock,
                         UpBlock, canonical_block_type)
from ddpm.config import check_choice, check_int, check_number, config_from_dict, config_to_dict, read_json, write_json
from ddpm.layers import (ACTIVATIONS, Conv2d, GaussianFourierEmbedding, SinusoidalTimestepEmbedding,
                         TimestepEmbedding, norm_act_conv)

CLASS_NAME = "UNet2DModel"  # the _class_name we write and accept, so diffusers loads our folders


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """diffusers' ``UNet2DModel`` config: same keys, same defaults. Invalid values raise ``ValueError``."""

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False  # map inputs in [0, 1] to [-1, 1] first
    time_embedding_type: Literal["positional", "fourier", "learned"] = "positional"
    time_embedding_dim: int | None = None  # None: 4 * block_out_channels[0]
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: Literal["UNetMidBlock2D"] | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1  # 0: the original DDPM's asymmetric (bottom/right) padding
    downsample_type: Literal["conv", "resnet"] = "conv"  # used by AttnDownBlock2D, as in diffusers
    upsample_type: Literal["conv", "resnet"] = "conv"  # used by AttnUpBlock2D, as in diffusers
    dropout: float = 0.0
    act_fn: Literal["silu", "swish", "mish", "gelu", "relu"] = "silu"
    attention_head_dim: int | None = 8  # None: one head as wide as the block
    norm_num_groups: int | None = 32  # None (score-SDE configs, Skip blocks only): min(channels // 4, 32)
    # GroupNorm groups of the mid-block attention; None: norm_num_groups, or no GroupNorm under scale_shift
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: Literal["default", "scale_shift"] = "default"
    add_attention: bool = True  # attention in the mid block
    class_embed_type: Literal["timestep", "identity"] | None = None
    num_class_embeds: int | None = None  # with class_embed_type None: an nn.Embedding of class labels
    num_train_timesteps: int | None = None  # rows of the "learned" time embedding

    def __post_init__(self) -> None:
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            value = getattr(self, key)
            if not isinstance(value, (tuple, list)):
                raise TypeError(f"{key}={value!r} must be a list with one entry per resolution level")
            object.__setattr__(self, key, tuple(value))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        self._check_values()
        check_choice("time_embedding_type", self.time_embedding_type, ("positional", "fourier", "learned"))
        check_choice("act_fn", self.act_fn, tuple(ACTIVATIONS))
        check_choice("resnet_time_scale_shift", self.resnet_time_scale_shift, ("default", "scale_shift"))
        check_choice("class_embed_type", self.class_embed_type, (None, "timestep", "identity"))
        check_choice("downsample_type", self.downsample_type, ("conv", "resnet"))
        check_choice("upsample_type", self.upsample_type, ("conv", "resnet"))
        check_choice("mid_block_type", self.mid_block_type, ("UNetMidBlock2D", None))
        downs, ups, channels = self.down_block_types, self.up_block_types, self.block_out_channels
        for key, names, table in (("down_block_types", downs, DOWN_BLOCK_TYPES),
                                  ("up_block_types", ups, UP_BLOCK_TYPES)):
            for i, name in enumerate(names):
                if not isinstance(name, str) or canonical_block_type(name) not in table:
                    raise ValueError(f"{key}[{i}]={name!r} is not a supported block type; supported: "
                                     f"{', '.join(table)}")
        if not channels:
            raise ValueError("block_out_channels is empty; give one width per resolution level")
        if len(downs) != len(ups):
            raise ValueError(f"down_block_types has {len(downs)} entries but up_block_types has {len(ups)}; "
                             f"they must match")
        if len(channels) != len(downs):
            raise ValueError(f"block_out_channels has {len(channels)} entries but down_block_types has "
                             f"{len(downs)}; they must match")
        if self.time_embedding_type == "learned" and self.num_train_timesteps is None:
            raise ValueError("num_train_timesteps must be set when time_embedding_type='learned'")
        half = channels[0] // 2  # the sinusoidal embedding's frequencies divide by (half - freq_shift)
        if self.time_embedding_type == "positional" and half > 0 and self.freq_shift >= half:
            raise ValueError(f"freq_shift={self.freq_shift} must be less than block_out_channels[0] // 2 = {half}")
        factor = 2 ** (len(downs) - 1)  # every down block but the last halves the resolution
        sizes = self.sample_size if isinstance(self.sample_size, tuple) else (self.sample_size,)
        if any(s is not None and s % factor for s in sizes):
            raise ValueError(f"sample_size={self.sample_size} must be divisible by {factor} = 2 ** (number of "
                             f"down blocks - 1), so that the up path restores the input's size")
        self._check_skip_path()
        self._check_attention()
        self._check_groups()

    def _check_skip_path(self) -> None:
        # The Skip blocks carry a 3-channel image path (skip_sample) beside x, at x's resolution: a Skip block that
        # downsamples needs Skip blocks before it, and once an up block is a Skip block, all later ones must be too
        # (they upsample the path back to the output, where it is added).
        downs, ups = self.down_block_types, self.up_block_types
        skip_down = [DOWN_BLOCK_TYPES[canonical_block_type(n)][1] == "fir" for n in downs]
        skip_up = [UP_BLOCK_TYPES[canonical_block_type(n)][1] == "fir" for n in ups]
        for i in range(len(downs) - 1):  # the last down block does not downsample
            if skip_down[i] and not all(skip_down[:i]):
                raise ValueError(f"down_block_types[{i}]={downs[i]!r} downsamples the Skip image path, so the down "
                                 f"blocks before it must be Skip blocks too; got {list(downs)}")
        for i in range(skip_up.index(True) + 1 if any(skip_up) else len(ups), len(ups)):
            if not skip_up[i]:
                raise ValueError(f"up_block_types[{i}]={ups[i]!r} follows a Skip up block, so it must be a Skip block "
                                 f"too (to carry the image path to the output); got {list(ups)}")

    def _check_values(self) -> None:
        # Each value on its own: its type and range. The checks in __post_init__ then combine them.
        for key in ("in_channels", "out_channels", "layers_per_block"):
            check_int(key, getattr(self, key), minimum=1)
        for key in ("time_embedding_dim", "attention_head_dim", "norm_num_groups", "attn_norm_num_groups",
                    "num_class_embeds", "num_train_timesteps"):
            check_int(key, getattr(self, key), minimum=1, optional=True)
        for i, c in enumerate(self.block_out_channels):
            check_int(f"block_out_channels[{i}]", c, minimum=1)
        if isinstance(self.sample_size, tuple):
            if len(self.sample_size) != 2:
                raise ValueError(f"sample_size={self.sample_size} must be an integer or a (height, width) pair")
            for s in self.sample_size:
                check_int("sample_size", s, minimum=1)
        else:
            check_int("sample_size", self.sample_size, minimum=1, optional=True)
        check_int("downsample_padding", self.downsample_padding, minimum=0)
        if self.downsample_padding > 1:
            raise ValueError(f"downsample_padding={self.downsample_padding} is not supported; choose 1, or 0 for "
                             f"the original DDPM's asymmetric padding")
        for key in ("center_input_sample", "flip_sin_to_cos", "add_attention"):
            if not isinstance(getattr(self, key), bool):
                raise TypeError(f"{key}={getattr(self, key)!r} must be True or False")
        check_number("freq_shift", self.freq_shift)
        for key in ("mid_block_scale_factor", "norm_eps"):
            if check_number(key, getattr(self, key)) <= 0:
                raise ValueError(f"{key}={getattr(self, key)} must be positive")
        if not 0 <= check_number("dropout", self.dropout) <= 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1]")

    def _check_attention(self) -> None:
        # An attention layer has width // attention_head_dim heads (as in diffusers): at least one is needed.
        if self.attention_head_dim is None:
            return
        rev = self.block_out_channels[::-1]
        layers = [(f"down_block_types[{i}]={name!r}", c) for i, (name, c)
                  in enumerate(zip(self.down_block_types, self.block_out_channels))
                  if DOWN_BLOCK_TYPES[canonical_block_type(name)][0]]
        layers += [(f"up_block_types[{i}]={name!r}", c) for i, (name, c) in enumerate(zip(self.up_block_types, rev))
                   if UP_BLOCK_TYPES[canonical_block_type(name)][0]]
        if self.mid_block_type is not None and self.add_attention:
            layers.append(("the mid block", rev[0]))
        for where, c in layers:
            if self.attention_head_dim > c:
                raise ValueError(f"attention_head_dim={self.attention_head_dim} is wider than the attention of "
                                 f"{where}, which has {c} channels (block_out_channels); it would have no heads")

    def groups_for(self, channels: int) -> int:
        """GroupNorm groups of the mid block and the output head for a ``channels``-wide layer."""
        return self.norm_num_groups if self.norm_num_groups is not None else min(channels // 4, 32)

    def _check_groups(self) -> None:
        channels = self.block_out_channels
        skip = [DOWN_BLOCK_TYPES[canonical_block_type(n)][1] == "fir" for n in self.down_block_types]
        skip_up = [UP_BLOCK_TYPES[canonical_block_type(n)][1] == "fir" for n in self.up_block_types]
        if self.norm_num_groups is None and not (all(skip) and all(skip_up)):
            raise ValueError("norm_num_groups=None is only supported when every block is a Skip block")
        if any(skip) or any(skip_up):
            if self.in_channels != 3 or self.out_channels != 3:
                raise ValueError(f"Skip blocks carry a 3-channel image path; in_channels={self.in_channels} and "
                                 f"out_channels={self.out_channels} must both be 3")
        for where, c, groups, source in self._group_norms():
            if groups < 1 or c % groups:
                raise ValueError(f"block_out_channels={list(channels)} do not fit {where}: it normalises {c} "
                                 f"channels in {groups} GroupNorm groups ({source})")

    def _group_norms(self) -> list[tuple[str, int, int, str]]:
        """(layer, channels, groups, where the groups come from) of every GroupNorm that ``UNet`` builds; the
        channel arithmetic of ``UNet.__init__`` and ddpm/blocks.py, repeated so that a bad config fails here."""
        ch, n, plain = self.block_out_channels, self.layers_per_block, f"norm_num_groups={self.norm_num_groups}"
        skip, attn_skip = "min(channels // 4, 32) in Skip blocks", "32 in AttnSkip attention"
        norms: list[tuple[str, int, int, str]] = []
        for i, name in enumerate(self.down_block_types):
            attention, kind = DOWN_BLOCK_TYPES[canonical_block_type(name)]
            where, c_in, c = f"down_block_types[{i}]={name!r}", ch[max(i - 1, 0)], ch[i]
            if kind == "fir":
                norms += [(where, x, min(x // 4, 32), skip) for x in (c_in, c)]
                norms += [(where, c, 32, attn_skip)] if attention else []
            else:
                norms += [(where, x, self.groups_for(c), plain) for x in (c_in, c)]
        rev = ch[::-1]
        for i, name in enumerate(self.up_block_types):
            attention, kind = UP_BLOCK_TYPES[canonical_block_type(name)]
            where, prev, c = f"up_block_types[{i}]={name!r}", rev[max(i - 1, 0)], rev[i]
            c_skip = rev[min(i + 1, len(ch) - 1)]
            # ResNet j takes [incoming map, skip]: (prev, c), (c, c), ..., and (c, c_skip) for the last
            pairs = [(prev if j == 0 else c, c_skip if j == n else c) for j in range(n + 1)]
            if kind == "fir":  # AttnSkipUpBlock2D's min(x + s // 4, 32) is diffusers' (see blocks.py)
                norms += [(where, x + s, min(x + s // 4, 32) if attention else min((x + s) // 4, 32), skip)
                          for x, s in pairs]
                norms += [(where, c, min(c // 4, 32), skip)] + ([(where, c, 32, attn_skip)] if attention else [])
            else:
                norms += [(where, x + s, self.groups_for(c), plain) for x, s in pairs + [(c, 0)]]
        if self.mid_block_type is not None:
            norms.append(("the mid block", ch[-1], self.groups_for(ch[-1]), plain))
            if self.add_attention and self.attn_norm_num_groups is not None:
                norms.append(("the mid-block attention", ch[-1], self.attn_norm_num_groups,
                              f"attn_norm_num_groups={self.attn_norm_num_groups}"))
        norms.append(("the output head", ch[0], self.groups_for(ch[0]), plain))
        return norms



def _check_sample_shape(config: UNetConfig, shape: torch.Size) -> None:
    # Every down block but the last halves H and W, and the up path must restore them exactly. Integers only.
    factor = 1 << (len(config.down_block_types) - 1)
    if len(shape) == 4 and shape[1] == config.in_channels and not (shape[2] % factor or shape[3] % factor):
        return
    if len(shape) != 4 or shape[1] != config.in_channels:
        raise ValueError(f"sample has shape {tuple(shape)}; this UNet takes [N, {config.in_channels}, H, W] "
                         f"(in_channels={config.in_channels})")
    raise ValueError(f"sample size {shape[2]}x{shape[3]} is not divisible by {factor}; this UNet halves the "
                     f"resolution {factor.bit_length() - 1} times (2 ** (number of down blocks - 1))")

class UNetOutput(NamedTuple):
    """``sample``: the network output, ``[N, out_channels, H, W]`` (the predicted noise for DDPM)."""

    sample: Tensor


class UNet(nn.Module):
    """diffusers' ``UNet2DModel``, written out: same keywords, defaults, state-dict keys and outputs.

    ``UNet(**kwargs)`` takes UNet2DModel's keyword arguments (see ``UNetConfig``); ``UNet(config)`` a ready config.
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = config_from_dict(UNetConfig, kwargs)
        elif not isinstance(config, UNetConfig):
            raise TypeError(f"UNet takes a UNetConfig or keyword arguments, got {type(config).__name__}")
        elif kwargs:
            raise ValueError(f"pass either a UNetConfig or keyword arguments, not both (got {', '.join(kwargs)})")
        self.config = config
        c = config
        ch = c.block_out_channels
        temb_dim = c.time_embedding_dim or ch[0] * 4
        self.conv_in = Conv2d(c.in_channels, ch[0], kernel_size=3, padding=1)

        # time: features of the timestep, then the MLP (Ho et al. 2020, App. B)
        self.time_proj: nn.Module
        if c.time_embedding_type == "fourier":
            self.time_proj = GaussianFourierEmbedding(ch[0], scale=16.0)
            time_in = 2 * ch[0]
        elif c.time_embedding_type == "positional":
            self.time_proj = SinusoidalTimestepEmbedding(ch[0], c.flip_sin_to_cos, c.freq_shift)
            time_in = ch[0]
        else:  # "learned": one trained vector per integer timestep
            assert c.num_train_timesteps is not None  # checked by UNetConfig
            self.time_proj = nn.Embedding(c.num_train_timesteps, ch[0])
            time_in = ch[0]
        self.time_embedding = TimestepEmbedding(time_in, temb_dim)
        self.class_embedding: nn.Module | None = None
        if c.class_embed_type is None and c.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(c.num_class_embeds, temb_dim)
        elif c.class_embed_type == "timestep":  # class labels embedded like timesteps
            self.class_embedding = TimestepEmbedding(time_in, temb_dim)
        elif c.class_embed_type == "identity":  # class_labels are already [N, temb_dim] vectors
            self.class_embedding = nn.Identity()
        self.act = ACTIVATIONS[c.act_fn]

        common: dict[str, Any] = dict(eps=c.norm_eps, act_fn=c.act_fn, time_scale_shift=c.resnet_time_scale_shift,
                                      dropout=c.dropout)
        # diffusers registers down_blocks, up_blocks, then mid_block; we do too, so state dicts list alike.
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i, name in enumerate(c.down_block_types):
            cin, cout, last = ch[max(i - 1, 0)], ch[i], i == len(ch) - 1
            attention, kind = DOWN_BLOCK_TYPES[canonical_block_type(name)]
            head_dim = c.attention_head_dim or cout
            if kind == "fir":
                self.down_blocks.append(SkipDownBlock(cin, cout, temb_dim, layers=c.layers_per_block,
                                                      attention=attention, add_downsample=not last,
                                                      head_dim=head_dim, **common))
            else:
                self.down_blocks.append(DownBlock(
                    cin, cout, temb_dim, layers=c.layers_per_block, attention=attention,
                    downsample=None if last else kind or c.downsample_type, groups=c.groups_for(cout),
                    head_dim=head_dim, downsample_padding=c.downsample_padding, **common))

        self.mid_block: MidBlock | None = None
        if c.mid_block_type is not None:
            # The mid attention normalises with attn_norm_num_groups, else norm_num_groups, except that diffusers
            # gives it no GroupNorm at all under scale_shift.
            attn_groups = c.attn_norm_num_groups
            if attn_groups is None and c.resnet_time_scale_shift == "default":
                attn_groups = c.groups_for(ch[-1])
            self.mid_block = MidBlock(ch[-1], temb_dim, groups=c.groups_for(ch[-1]), attn_groups=attn_groups,
                                      head_dim=c.attention_head_dim or ch[-1], attention=c.add_attention,
                                      output_scale_factor=c.mid_block_scale_factor, **common)

        rev = list(reversed(ch))
        for i, name in enumerate(c.up_block_types):
            prev, cout, cin, last = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, len(ch) - 1)], i == len(ch) - 1
            attention, kind = UP_BLOCK_TYPES[canonical_block_type(name)]
            head_dim = c.attention_head_dim or cout
            if kind == "fir":
                self.up_blocks.append(SkipUpBlock(cin, prev, cout, temb_dim, layers=c.layers_per_block + 1,
                                                  attention=attention, add_upsample=not last, head_dim=head_dim,
                                                  **common))
            else:
                self.up_blocks.append(UpBlock(
                    cin, prev, cout, temb_dim, layers=c.layers_per_block + 1, attention=attention,
                    upsample=None if last else kind or c.upsample_type, groups=c.groups_for(cout),
                    head_dim=head_dim, **common))

        self.conv_norm_out = nn.GroupNorm(c.groups_for(ch[0]), ch[0], eps=c.norm_eps)
        self.conv_out = Conv2d(ch[0], c.out_channels, kernel_size=3, padding=1)
        # Layout: conv weights, and so every activation, in channels_last (NHWC). oneDNN computes in NHWC; with
        # NCHW it reorders every input (1.75x slower for 128 x 32 x 32 maps on our CPU). Keys, values and saved
        # files are unchanged; only strides differ. Outputs come back in the input's layout.
        self.to(memory_format=torch.channels_last)

    # Cheap properties: one parameter's dtype/device, not a walk over every submodule per call.
    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @staticmethod
    def frozen_weights() -> contextlib.AbstractContextManager[None]:
        """A block in which the weights will not change: calls without autograd (CPU, float32/bfloat16) reuse
        the convolution weights of the small maps in oneDNN's layout instead of reordering them on every call:
        forward 1.2-1.4x faster at batch 1, about 1.05x at batch 8 (benchmarks/RESULTS.md). ``Pipeline`` samples inside one. For a hand-written sampling loop::

            with torch.no_grad(), unet.frozen_weights():
                for t in scheduler.timesteps: ...

        It covers every UNet's convolutions in the block. An optimizer step or ``load_state_dict`` inside it is
        seen (they bump the parameters' version counters); a write through ``param.data`` is not.
        """
        return kernels.frozen_weights()

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each ResNet/attention layer in the backward pass: less memory, about 30% more compute."""
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            if block is not None:
                block.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            if block is not None:
                block.gradient_checkpointing = False

    def _embed_time(self, t: Tensor, class_labels: Tensor | None) -> Tensor:
        emb = self.time_embedding(self.time_proj(t).to(self.dtype))  # (N, temb_dim)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels must be given: this UNet is class-conditional "
                                 f"(class_embed_type={self.config.class_embed_type!r}, "
                                 f"num_class_embeds={self.config.num_class_embeds})")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(self.dtype)
            emb = emb + self.class_embedding(class_labels).to(self.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels were given but this UNet has no class embedding "
                             "(set class_embed_type or num_class_embeds)")
        return emb

    def forward(self, sample: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None,
                return_dict: bool = True) -> UNetOutput | tuple[Tensor]:
        """Predict from a noisy ``sample`` ``[N, in_channels, H, W]`` at ``timestep``.

        ``timestep``: a Python number, a 0-d tensor, or a tensor with one entry per sample (noise levels sigma
        > 0 for the "fourier" embedding, integer indices for "learned"). ``class_labels``: ``[N]`` integer labels
        (or ``[N, temb_dim]`` vectors for ``class_embed_type="identity"``). Returns ``UNetOutput(sample)`` with
        ``sample`` ``[N, out_channels, H, W]``, or the 1-tuple ``(sample,)`` when ``return_dict=False``.
        H and W must be divisible by ``2 ** (len(block_out_channels) - 1)``.
        """
        _check_sample_shape(self.config, sample.shape)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        # Python numbers become int64 exactly as in diffusers (a float like 999.5 is truncated to 999).
        t = timestep if isinstance(timestep, Tensor) else torch.tensor([timestep], dtype=torch.long)
        t = t.to(sample.device).reshape(-1).expand(sample.shape[0])  # (N,): one entry, or one per sample
        emb = self._embed_time(t, class_labels)
        temb = self.act(emb)  # every ResNet block applies act_fn to emb first; do it once for all

        skip_sample = sample
        x = self.conv_in(sample)
        skips = [x]  # the skip connections, consumed newest-first by the up path
        for down in self.down_blocks:
            if isinstance(down, SkipDownBlock):
                x, res, skip_sample = down(x, temb, skip_sample)
            else:
                x, res = down(x, temb)
            skips.extend(res)
        if self.mid_block is not None:
            x = self.mid_block(x, temb)
        up_skip: Tensor | None = None
        for up in self.up_blocks:
            if isinstance(up, SkipUpBlock):
                x, up_skip = up(x, skips, temb, up_skip)
            else:
                x = up(x, skips, temb)

        x = norm_act_conv(x, self.conv_norm_out, self.conv_out.weight, self.conv_out.bias, silu=True, padding=1)
        if up_skip is not None:
            x = x + up_skip
        if self.config.time_embedding_type == "fourier":
            # NCSN++ predicts the score times sigma; dividing by sigma gives the score (Song et al. 2021).
            x = x / t.reshape(-1, 1, 1, 1)
        if sample.is_contiguous() or not sample.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()  # NCHW in (or any other layout), NCHW out; channels_last in, channels_last out
        return UNetOutput(x) if return_dict else (x,)

    # --- diffusers' folder format --------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: UNetConfig | Mapping[str, Any]) -> UNet:
        """A randomly initialised UNet from a ``UNetConfig`` or a diffusers-style config dict."""
        if isinstance(config, UNetConfig):
            return cls(config)
        _check_class_name(config.get("_class_name"), "config")
        return cls(config_from_dict(UNetConfig, config))

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike[str], subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None) -> UNet:
        """Load a diffusers ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, or
        the pickled ``.bin`` read with ``weights_only=True``) from a local path or a Hub repo id.

        Legacy attention names (query/key/value/proj_attn) are renamed. The load is strict: missing, unexpected
        or mis-shaped tensors raise ``ValueError`` naming them and the file. Weights are float32 unless
        ``torch_dtype`` says otherwise.
        """
        config_path = checkpoint.resolve_file(path_or_repo_id, checkpoint.MODEL_CONFIG_NAME, subfolder)
        assert config_path is not None
        raw = read_json(config_path)
        _check_class_name(raw.get("_class_name"), str(config_path))
        try:
            config = config_from_dict(UNetConfig, raw)
        except ValueError as e:
            raise ValueError(f"{config_path}: {e}") from None
        weights_path = checkpoint.resolve_weights(path_or_repo_id, subfolder)
        state = checkpoint.rename_legacy_keys(checkpoint.load_weights(weights_path))

        with torch.device("meta"):  # no random init: every tensor comes from the file
            model = cls(config)
        _check_state_dict(model, state, weights_path, config_path)
        # Own, freshly allocated copies (in the layout __init__ picks): safetensors may hand out views of a
        # memory-mapped file, which a later save_pretrained to the same folder would overwrite.
        dtype = torch_dtype or torch.float32
        state = {k: v.to(dtype=dtype if v.is_floating_point() else v.dtype, copy=True,
                         memory_format=torch.channels_last if v.ndim == 4 else torch.contiguous_format)
                 for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``config.json`` (``_class_name: "UNet2DModel"``) and ``diffusion_pytorch_model.safetensors``,
        a folder that ``diffusers.UNet2DModel.from_pretrained`` loads."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / checkpoint.MODEL_CONFIG_NAME, config_to_dict(self.config, CLASS_NAME))
        checkpoint.save_weights(self.state_dict(), folder / checkpoint.WEIGHTS_NAME)


def _check_class_name(name: Any, where: str) -> None:
    if name is not None and name != CLASS_NAME:
        raise ValueError(f"{where}: _class_name={name!r} is not a {CLASS_NAME} config; ddpm.UNet loads "
                         f"{CLASS_NAME} folders only")


def _check_state_dict(model: nn.Module, state: Mapping[str, Tensor], weights_path: Path, config_path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
                  for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{weights_path} does not fit the UNet described by {config_path}; "
                         + "; ".join(problems))
