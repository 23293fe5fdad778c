"""``UNetConfig``: the keys of diffusers' ``config.json`` for ``UNet2DModel``, with the same defaults, and what they
describe: the block types, the resolution levels and their channel widths.

It describes and checks; it builds nothing. ``UNet.__init__`` and ``blocks.py`` build from this description
(``UNetConfig.down_levels`` / ``up_levels``, ``up_resnet_channels``, the GroupNorm group rules), so the channel
arithmetic is written once, here, and an unbuildable config is a ``ValueError`` naming the key before any layer
exists.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal, NamedTuple

from ddpm.config import FrozenConfig, check_choice, check_int, check_number

ACT_FNS = ("silu", "swish", "mish", "gelu", "relu")
Resample = Literal["conv", "resnet", "fir"]


class BlockType(NamedTuple):
    """What a diffusers block-type name stands for."""

    attention: bool
    resample: Resample | None  # None: the config's downsample_type / upsample_type (diffusers' Attn blocks)


DOWN_BLOCK_TYPES: dict[str, BlockType] = {
    "DownBlock2D": BlockType(False, "conv"),
    "AttnDownBlock2D": BlockType(True, None),
    "ResnetDownsampleBlock2D": BlockType(False, "resnet"),
    "SkipDownBlock2D": BlockType(False, "fir"),  # the score-SDE blocks: FIR resampling and an image path
    "AttnSkipDownBlock2D": BlockType(True, "fir"),
}
UP_BLOCK_TYPES: dict[str, BlockType] = {
    "UpBlock2D": BlockType(False, "conv"),
    "AttnUpBlock2D": BlockType(True, None),
    "ResnetUpsampleBlock2D": BlockType(False, "resnet"),
    "SkipUpBlock2D": BlockType(False, "fir"),
    "AttnSkipUpBlock2D": BlockType(True, "fir"),
}


def canonical_block_type(name: str) -> str:
    """diffusers accepts "UNetResDownBlock2D" for "DownBlock2D" (and so on); so do we."""
    return name[len("UNetRes"):] if name.startswith("UNetRes") else name


class Level(NamedTuple):
    """One block of the UNet: its type and the channel widths it connects.

    Down blocks map ``in_channels`` to ``out_channels``. Up blocks map the ``prev_channels``-wide map from below
    to ``out_channels``, concatenating skip connections; ``in_channels`` is the width of the matching down level,
    whose input is the last skip they take (diffusers' ``in_channels`` / ``prev_output_channel``)."""

    block_type: str  # canonical diffusers name
    in_channels: int
    out_channels: int
    prev_channels: int  # up blocks; equal to in_channels for down blocks
    attention_head_dim: int | None  # None: no attention
    resample: Resample | None  # None: the last level, which keeps the resolution
    skip: bool  # a score-SDE (Skip) block


def up_resnet_channels(in_channels: int, prev_channels: int, out_channels: int, num_layers: int
                       ) -> list[tuple[int, int]]:
    """(incoming map, skip connection) widths of each ResNet block of an up block: the map from below is
    ``prev_channels`` wide for the first and ``out_channels`` after; every skip is ``out_channels`` wide except
    the last, the matching down level's input (``in_channels``)."""
    return [(prev_channels if i == 0 else out_channels, in_channels if i == num_layers - 1 else out_channels)
            for i in range(num_layers)]


def skip_groups(channels: int) -> int:
    """GroupNorm groups in the Skip blocks: sized from the channel count, ignoring norm_num_groups (diffusers)."""
    return min(channels // 4, 32)


def attn_skip_up_groups(x_channels: int, skip_channels: int) -> int:
    """diffusers' AttnSkipUpBlock2D computes ``min(x + skip // 4, 32)`` (operator precedence) for its ResNets'
    first GroupNorm; checkpoints depend on it, so it is kept."""
    return min(x_channels + skip_channels // 4, 32)


def check_resolution(what: str, size: int | Sequence[int], levels: int) -> None:
    """The divisibility rule, for every caller: each down block but the last halves H and W, and the up path must
    restore them exactly, so every side must be divisible by ``2 ** (levels - 1)``. Otherwise a ValueError that
    starts with ``what`` (e.g. ``"sample_size=6"``, ``"sample size 10x8"``, ``"--resolution 30"``)."""
    factor = 2 ** (levels - 1)
    if any(s % factor for s in ([size] if isinstance(size, int) else size)):
        raise ValueError(f"{what} must be divisible by {factor}: the UNet halves the resolution {levels - 1} times "
                         f"(2 ** (number of down blocks - 1)) and the up path must restore it exactly")


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
        check_choice("act_fn", self.act_fn, ACT_FNS)
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
        if self.sample_size is not None:
            check_resolution(f"sample_size={self.sample_size}", self.sample_size, len(downs))
        self._check_skip_path()
        self._check_attention()
        self._check_groups()

    # --- the description ----------------------------------------------------------------------------------------

    def down_levels(self) -> list[Level]:
        """The down blocks, top (full resolution) first."""
        ch, levels = self.block_out_channels, []
        for i, name in enumerate(self.down_block_types):
            name = canonical_block_type(name)
            kind = DOWN_BLOCK_TYPES[name]
            final = i == len(ch) - 1  # the last level keeps its resolution
            levels.append(Level(name, ch[max(i - 1, 0)], ch[i], ch[max(i - 1, 0)],
                                (self.attention_head_dim or ch[i]) if kind.attention else None,
                                None if final else kind.resample or self.downsample_type, kind.resample == "fir"))
        return levels

    def up_levels(self) -> list[Level]:
        """The up blocks, bottom (lowest resolution) first; each mirrors a down level."""
        rev, levels = self.block_out_channels[::-1], []
        for i, name in enumerate(self.up_block_types):
            name = canonical_block_type(name)
            kind = UP_BLOCK_TYPES[name]
            final = i == len(rev) - 1
            levels.append(Level(name, rev[min(i + 1, len(rev) - 1)], rev[i], rev[max(i - 1, 0)],
                                (self.attention_head_dim or rev[i]) if kind.attention else None,
                                None if final else kind.resample or self.upsample_type, kind.resample == "fir"))
        return levels

    def groups_for(self, channels: int) -> int:
        """GroupNorm groups of the plain blocks, the mid block and the output head for a ``channels``-wide layer."""
        return self.norm_num_groups if self.norm_num_groups is not None else skip_groups(channels)

    def mid_attention_groups(self) -> int | None:
        """GroupNorm groups of the mid-block attention: attn_norm_num_groups, else those of its ResNets, except
        that diffusers gives it no GroupNorm under scale_shift."""
        if self.attn_norm_num_groups is not None or self.resnet_time_scale_shift != "default":
            return self.attn_norm_num_groups
        return self.groups_for(self.block_out_channels[-1])

    # --- the checks that combine values ----------------------------------------------------------------------------

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

    def _check_skip_path(self) -> None:
        # The Skip blocks carry a 3-channel image path (skip_sample) beside x, at x's resolution: a Skip block that
        # downsamples needs Skip blocks before it, and once an up block is a Skip block, all later ones must be too
        # (they upsample the path back to the output, where it is added).
        downs, ups = self.down_block_types, self.up_block_types
        skip_down = [level.skip for level in self.down_levels()]
        skip_up = [level.skip for level in self.up_levels()]
        for i in range(len(downs) - 1):  # the last down block does not downsample
            if skip_down[i] and not all(skip_down[:i]):
                raise ValueError(f"down_block_types[{i}]={downs[i]!r} downsamples the Skip image path, so the down "
                                 f"blocks before it must be Skip blocks too; got {list(downs)}")
        for i in range(skip_up.index(True) + 1 if any(skip_up) else len(ups), len(ups)):
            if not skip_up[i]:
                raise ValueError(f"up_block_types[{i}]={ups[i]!r} follows a Skip up block, so it must be a Skip block "
                                 f"too (to carry the image path to the output); got {list(ups)}")

    def _check_attention(self) -> None:
        # An attention layer has width // attention_head_dim heads (as in diffusers): at least one is needed.
        if self.attention_head_dim is None:
            return
        layers = [(f"{key}[{i}]={names[i]!r}", level.out_channels)
                  for key, names, levels in (("down_block_types", self.down_block_types, self.down_levels()),
                                             ("up_block_types", self.up_block_types, self.up_levels()))
                  for i, level in enumerate(levels) if level.attention_head_dim is not None]
        if self.mid_block_type is not None and self.add_attention:
            layers.append(("the mid block", self.block_out_channels[-1]))
        for where, c in layers:
            if self.attention_head_dim > c:
                raise ValueError(f"attention_head_dim={self.attention_head_dim} is wider than the attention of "
                                 f"{where}, which has {c} channels (block_out_channels); it would have no heads")

    def _check_groups(self) -> None:
        skip_down = [level.skip for level in self.down_levels()]
        skip_up = [level.skip for level in self.up_levels()]
        if self.norm_num_groups is None and not (all(skip_down) and all(skip_up)):
            raise ValueError("norm_num_groups=None is only supported when every block is a Skip block")
        if (any(skip_down) or any(skip_up)) and (self.in_channels != 3 or self.out_channels != 3):
            raise ValueError(f"Skip blocks carry a 3-channel image path; in_channels={self.in_channels} and "
                             f"out_channels={self.out_channels} must both be 3")
        for where, c, groups, source in self._group_norms():
            if groups < 1 or c % groups:
                raise ValueError(f"block_out_channels={list(self.block_out_channels)} do not fit {where}: it "
                                 f"normalises {c} channels in {groups} GroupNorm groups ({source})")

    def _group_norms(self) -> list[tuple[str, int, int, str]]:
        """(layer, channels, groups, where the groups come from) of the GroupNorms the UNet builds.

        A plain block normalises each width it connects (its ResNets' inputs and outputs, and in an up block their
        sums with the skips) in norm_num_groups groups: norm_num_groups must divide each of them, which these
        widths cover exactly. A Skip block sizes its groups from each width, so its sums are listed one by one."""
        plain, n_up = f"norm_num_groups={self.norm_num_groups}", self.layers_per_block + 1
        norms: list[tuple[str, int, int, str]] = []
        for key, names, levels in (("down_block_types", self.down_block_types, self.down_levels()),
                                   ("up_block_types", self.up_block_types, self.up_levels())):
            for i, level in enumerate(levels):
                where, out = f"{key}[{i}]={names[i]!r}", level.out_channels
                if not level.skip:
                    widths = {level.in_channels, out, level.prev_channels}
                    norms += [(where, c, self.groups_for(c), plain) for c in sorted(widths)]
                    continue
                rule = "min(channels // 4, 32) in Skip blocks"
                if key == "down_block_types":
                    inputs = [level.in_channels]
                else:
                    pairs = up_resnet_channels(level.in_channels, level.prev_channels, out, n_up)
                    inputs = [x + s for x, s in pairs]
                    if level.attention_head_dim is not None:  # diffusers' AttnSkipUpBlock2D (see blocks.py)
                        norms += [(where, x + s, attn_skip_up_groups(x, s), rule) for x, s in pairs]
                        inputs = []
                norms += [(where, c, skip_groups(c), rule) for c in [*inputs, out]]
                if level.attention_head_dim is not None:
                    norms.append((where, out, 32, "32 in the Skip blocks' attention"))
        ch = self.block_out_channels
        if self.mid_block_type is not None:
            norms.append(("the mid block", ch[-1], self.groups_for(ch[-1]), plain))
            if self.add_attention and self.attn_norm_num_groups is not None:
                norms.append(("the mid-block attention", ch[-1], self.attn_norm_num_groups,
                              f"attn_norm_num_groups={self.attn_norm_num_groups}"))
        norms.append(("the output head", ch[0], self.groups_for(ch[0]), plain))
        return norms
