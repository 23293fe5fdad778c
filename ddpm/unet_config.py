"""``UNetConfig``: the keys of diffusers' ``config.json`` for ``UNet2DModel``, with the same defaults, and the
checks that make an unbuildable config a ``ValueError`` naming the key before any layer is built."""

from __future__ import annotations

import dataclasses
from typing import Literal

from ddpm.blocks import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, canonical_block_type
from ddpm.config import FrozenConfig, check_choice, check_int, check_number
from ddpm.layers import ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class UNetConfig(FrozenConfig):
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
        skip_down, skip_up = self._skip_blocks()
        for i in range(len(downs) - 1):  # the last down block does not downsample
            if skip_down[i] and not all(skip_down[:i]):
                raise ValueError(f"down_block_types[{i}]={downs[i]!r} downsamples the Skip image path, so the down "
                                 f"blocks before it must be Skip blocks too; got {list(downs)}")
        for i in range(skip_up.index(True) + 1 if any(skip_up) else len(ups), len(ups)):
            if not skip_up[i]:
                raise ValueError(f"up_block_types[{i}]={ups[i]!r} follows a Skip up block, so it must be a Skip block "
                                 f"too (to carry the image path to the output); got {list(ups)}")

    def _skip_blocks(self) -> tuple[list[bool], list[bool]]:
        # Which down and up blocks are Skip (FIR, score-SDE) blocks
        return ([DOWN_BLOCK_TYPES[canonical_block_type(n)][1] == "fir" for n in self.down_block_types],
                [UP_BLOCK_TYPES[canonical_block_type(n)][1] == "fir" for n in self.up_block_types])

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
        skip, skip_up = self._skip_blocks()
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
