"""The UNet noise-prediction network of DDPM, checkpoint-compatible with diffusers' ``UNet2DModel``.

Architecture (Ho et al. 2020, Appendix B; Ronneberger et al. 2015): a 3x3 input conv, a stack of down blocks
that halve the resolution, a mid block, mirrored up blocks that concatenate the down path's activations back in,
and a GroupNorm-SiLU-3x3-conv head. The timestep enters every ResNet block through a sinusoidal (or Fourier, or
learned) embedding and a two-layer MLP.

``UNetConfig`` (unet_config.py) holds exactly the keys of diffusers' ``config.json`` for ``UNet2DModel`` with
the same defaults and describes the levels built here; ``UNet.from_pretrained`` / ``save_pretrained`` read and
write diffusers' folder layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from ddpm import checkpoint, kernels
from ddpm.blocks import (DOWN_BLOCKS, SKIP_DOWN_BLOCKS, SKIP_UP_BLOCKS, UP_BLOCKS, SkipDownBlock, SkipUpBlock,
                         UNetMidBlock2D, default_checkpointing)
from ddpm.config import config_from_dict, config_to_dict, read_json, write_json
from ddpm.layers import (Conv2d, GaussianFourierProjection, GroupNorm, TimestepEmbedding, Timesteps,
                         Upsample2D)
from ddpm.outputs import BaseOutput
from ddpm.unet_config import UNetConfig, check_resolution

CLASS_NAME = "UNet2DModel"  # the _class_name we write and accept, so diffusers loads our folders


def _check_sample_shape(config: UNetConfig, shape: torch.Size) -> None:
    if len(shape) != 4 or shape[1] != config.in_channels:
        raise ValueError(f"sample has shape {tuple(shape)}; this UNet takes [N, {config.in_channels}, H, W] "
                         f"(in_channels={config.in_channels})")
    check_resolution(f"sample size {shape[2]}x{shape[3]}", (shape[2], shape[3]), len(config.down_block_types))


@dataclass
class UNet2DOutput(BaseOutput):
    """``sample``: the network output, ``[N, out_channels, H, W]`` (the predicted noise for DDPM)."""

    sample: Tensor


UNetOutput = UNet2DOutput  # the name ddpm used first


class UNet(nn.Module):
    """diffusers' ``UNet2DModel``, written out: same keywords, defaults, state-dict keys, outputs, and the same
    initial weights for the same seed.

    ``UNet(**kwargs)`` takes UNet2DModel's keyword arguments (see ``UNetConfig``); ``UNet(config)`` a ready config.
    """

    _supports_gradient_checkpointing = True
    _keep_in_fp32_modules: list[str] | None = None  # as UNet2DModel: no module must stay float32 when cast

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
        # Modules are created in diffusers' order, so that torch.manual_seed gives both the same weights.
        self.conv_in = Conv2d(c.in_channels, ch[0], kernel_size=3, padding=1)

        # time: features of the timestep, then the MLP (Ho et al. 2020, App. B)
        self.time_proj: nn.Module
        if c.time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(ch[0], scale=16.0)
            time_in = 2 * ch[0]
        elif c.time_embedding_type == "positional":
            self.time_proj = Timesteps(ch[0], c.flip_sin_to_cos, c.freq_shift)
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

        res: dict[str, Any] = dict(resnet_eps=c.norm_eps, resnet_act_fn=c.act_fn,
                                   resnet_time_scale_shift=c.resnet_time_scale_shift, dropout=c.dropout)
        self.down_blocks = nn.ModuleList()
        self.mid_block: UNetMidBlock2D | None = None
        self.up_blocks = nn.ModuleList()
        for level in c.down_levels():
            if level.resample == "fir" or level.skip:  # a Skip block (the first test narrows the type)
                block: nn.Module = SKIP_DOWN_BLOCKS[level.block_type](
                    level.in_channels, level.out_channels, temb_dim, num_layers=c.layers_per_block,
                    attention_head_dim=level.attention_head_dim, add_downsample=level.resample is not None, **res)
            else:
                block = DOWN_BLOCKS[level.block_type](
                    level.in_channels, level.out_channels, temb_dim, num_layers=c.layers_per_block,
                    resnet_groups=c.groups_for(level.out_channels), attention_head_dim=level.attention_head_dim,
                    downsample=level.resample, downsample_padding=c.downsample_padding, **res)
            self.down_blocks.append(block)

        if c.mid_block_type is not None:
            self.mid_block = UNetMidBlock2D(
                ch[-1], temb_dim, resnet_groups=c.groups_for(ch[-1]), attn_groups=c.mid_attention_groups(),
                attention_head_dim=c.attention_head_dim or ch[-1], add_attention=c.add_attention,
                output_scale_factor=c.mid_block_scale_factor, **res)

        for level in c.up_levels():
            if level.resample == "fir" or level.skip:  # a Skip block (the first test narrows the type)
                block = SKIP_UP_BLOCKS[level.block_type](
                    level.in_channels, level.prev_channels, level.out_channels, temb_dim,
                    num_layers=c.layers_per_block + 1, attention_head_dim=level.attention_head_dim,
                    add_upsample=level.resample is not None, **res)
            else:
                block = UP_BLOCKS[level.block_type](
                    level.in_channels, level.prev_channels, level.out_channels, temb_dim,
                    num_layers=c.layers_per_block + 1, resnet_groups=c.groups_for(level.out_channels),
                    attention_head_dim=level.attention_head_dim, upsample=level.resample, **res)
            self.up_blocks.append(block)

        self.conv_norm_out = GroupNorm(c.groups_for(ch[0]), ch[0], eps=c.norm_eps)
        self.conv_act = nn.SiLU()  # SiLU whatever act_fn says, as in diffusers
        self.conv_out = Conv2d(ch[0], c.out_channels, kernel_size=3, padding=1)
        # Layout: conv weights, and so every activation, in channels_last (NHWC). oneDNN computes in NHWC; with
        # NCHW it reorders every input (1.75x slower for 128 x 32 x 32 maps on our CPU). Keys, values and saved
        # files are unchanged; only strides differ. Outputs come back in the input's layout.
        self.to(memory_format=torch.channels_last)

    # --- diffusers' ModelMixin surface ---------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (one parameter's: not a walk over every submodule per call)."""
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The number of parameters; only those that require grad with ``only_trainable``; without the
        ``nn.Embedding`` tables (learned time embedding, class labels) with ``exclude_embeddings``."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings \
            else set()
        return sum(p.numel() for p in self.parameters()
                   if (p.requires_grad or not only_trainable) and id(p) not in embeddings)

    def register_to_config(self, **kwargs: Any) -> None:
        """Replace config values after changing the model by hand (e.g. ``in_channels`` after swapping
        ``conv_in``), as diffusers' ``register_to_config`` does. The config stays a frozen ``UNetConfig``: the new
        one is checked like any other, and a key it does not have is a ``ValueError`` naming it."""
        unknown = [k for k in kwargs if k not in UNetConfig.__dataclass_fields__]
        if unknown:
            raise ValueError(f"unknown config key {unknown[0]!r} for UNetConfig; known keys: "
                             f"{', '.join(UNetConfig.__dataclass_fields__)}")
        self.config = dataclasses.replace(self.config, **kwargs)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def enable_gradient_checkpointing(self, gradient_checkpointing_func: Callable[..., Any] | None = None) -> None:
        """Recompute each ResNet/attention layer in the backward pass: less memory, about 30% more compute.
        ``gradient_checkpointing_func(layer, *inputs)``: default ``torch.utils.checkpoint.checkpoint`` (not
        reentrant)."""
        for block in self._blocks():
            block.gradient_checkpointing = True
            block._gradient_checkpointing_func = gradient_checkpointing_func or default_checkpointing

    def disable_gradient_checkpointing(self) -> None:
        for block in self._blocks():
            block.gradient_checkpointing = False

    def _blocks(self) -> list[Any]:
        return [*self.down_blocks, *([self.mid_block] if self.mid_block is not None else []), *self.up_blocks]

    @contextlib.contextmanager
    def frozen_weights(self) -> Iterator[None]:
        """A block in which this UNet's weights will not change: its calls without autograd on CPU (float32,
        bfloat16) reuse the convolution weights of the small maps in oneDNN's layout instead of reordering them
        on every call: forward 1.2-1.4x faster at batch 1, about 1.05x at batch 8 (benchmarks/RESULTS.md).
        ``Pipeline`` samples inside one. For a hand-written sampling loop::

            with torch.no_grad(), unet.frozen_weights():
                for t in scheduler.timesteps: ...

        It covers this UNet only (a copy made inside the block packs nothing). An optimizer step or
        ``load_state_dict`` inside it is seen (they bump the parameters' version counters); a write through
        ``param.data`` is not. Where the CPU kernels do not apply (CUDA, ``torch.compile``,
        ``DDPM_CPU_KERNELS=0``) it changes nothing.
        """
        layers = [m for m in self.modules() if isinstance(m, (Conv2d, Upsample2D))]
        if any(m.packed is not None for m in layers):  # nested: the open block's weights serve
            yield
            return
        packed = kernels.PackedWeights()
        for m in layers:
            m.packed = packed
        try:
            yield
        finally:
            packed.close()
            for m in layers:
                m.packed = None

    # --- forward -------------------------------------------------------------------------------------------------

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
                return_dict: bool = True) -> UNet2DOutput | tuple[Tensor]:
        """Predict from a noisy ``sample`` ``[N, in_channels, H, W]`` at ``timestep``.

        ``timestep``: a Python number, a 0-d tensor, or a tensor with one entry per sample (noise levels sigma
        > 0 for the "fourier" embedding, integer indices for "learned"). ``class_labels``: ``[N]`` integer labels
        (or ``[N, temb_dim]`` vectors for ``class_embed_type="identity"``). Returns ``UNet2DOutput(sample)`` with
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

        skip_sample = sample
        x = self.conv_in(sample)
        skips: tuple[Tensor, ...] = (x,)  # the skip connections, taken newest first by the up path
        for down in self.down_blocks:
            if isinstance(down, SkipDownBlock):
                x, res, skip_sample = down(x, emb, skip_sample)
            else:
                x, res = down(x, emb)
            skips += res
        if self.mid_block is not None:
            x = self.mid_block(x, emb)
        up_skip: Tensor | None = None
        for up in self.up_blocks:
            n = len(up.resnets)  # type: ignore[arg-type]
            res, skips = skips[-n:], skips[:-n]
            if isinstance(up, SkipUpBlock):
                x, up_skip = up(x, res, emb, up_skip)
            else:
                x = up(x, res, emb)

        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        if up_skip is not None:
            x = x + up_skip
        if self.config.time_embedding_type == "fourier":
            # NCSN++ predicts the score times sigma; dividing by sigma gives the score (Song et al. 2021).
            x = x / t.reshape(-1, 1, 1, 1)
        if sample.is_contiguous() or not sample.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()  # NCHW in (or any other layout), NCHW out; channels_last in, channels_last out
        return UNet2DOutput(x) if return_dict else (x,)

    # --- diffusers' folder format --------------------------------------------------------------------------------

    config_name = checkpoint.MODEL_CONFIG_NAME  # "config.json", as diffusers' ``ConfigMixin.config_name``

    @classmethod
    def load_config(cls, pretrained_model_name_or_path: str | os.PathLike[str], subfolder: str | None = None, *,
                    cache_dir: str | Path | None = None, revision: str | None = None, token: str | bool | None = None,
                    local_files_only: bool = False, force_download: bool = False) -> dict[str, Any]:
        """The ``config.json`` of a model folder or hub repo as a dict (what ``from_config`` takes)."""
        hub = checkpoint.HubOptions(cache_dir, revision, token, local_files_only, force_download)
        path = checkpoint.resolve_file(pretrained_model_name_or_path, cls.config_name, subfolder, hub=hub)
        assert path is not None
        return read_json(path)

    def save_config(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``config.json`` (diffusers' keys, ``_class_name: "UNet2DModel"``) into ``save_directory``."""
        folder = Path(save_directory)
        if folder.is_file():
            raise NotADirectoryError(f"{folder} is a file; save_config needs a folder")
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / self.config_name, config_to_dict(self.config, CLASS_NAME))

    @overload
    @classmethod
    def from_config(cls, config: UNetConfig | Mapping[str, Any] | str | os.PathLike[str],
                    return_unused_kwargs: Literal[False] = False, **overrides: Any) -> UNet: ...

    @overload
    @classmethod
    def from_config(cls, config: UNetConfig | Mapping[str, Any] | str | os.PathLike[str],
                    return_unused_kwargs: Literal[True], **overrides: Any) -> tuple[UNet, dict[str, Any]]: ...

    @classmethod
    def from_config(cls, config: UNetConfig | Mapping[str, Any] | str | os.PathLike[str],
                    return_unused_kwargs: bool = False, **overrides: Any) -> UNet | tuple[UNet, dict[str, Any]]:
        """A randomly initialised UNet from a ``UNetConfig``, a ``config.json``-style dict (diffusers' ``FrozenDict``
        too, e.g. ``diffusers_unet.config``) or, as diffusers still allows, a folder to read ``config.json`` from.

        ``overrides`` replace config keys. The extra keys that diffusers' ``EMAModel.save_pretrained`` writes
        (decay, inv_gamma, ...) are ignored; ``return_unused_kwargs=True`` returns them as ``(unet, {key: value})``,
        as diffusers does. Any other unknown key is a ``ValueError`` naming it.
        """
        if isinstance(config, (str, os.PathLike)):
            config = cls.load_config(config)
        if isinstance(config, UNetConfig) and not overrides:
            unet = cls(config)
            return (unet, {}) if return_unused_kwargs else unet
        if not isinstance(config, Mapping):
            raise TypeError(f"from_config takes a UNetConfig, a dict or a folder, got {type(config).__name__}")
        _check_class_name(config.get("_class_name"), "config")
        merged = {**config, **overrides}
        unet = cls(config_from_dict(UNetConfig, merged, ignore=EMA_CONFIG_KEYS))
        unused = {k: merged[k] for k in EMA_CONFIG_KEYS if k in merged}
        return (unet, unused) if return_unused_kwargs else unet

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *, subfolder: str | None = None,
                        variant: str | None = None, torch_dtype: torch.dtype | None = None,
                        dtype: torch.dtype | None = None, low_cpu_mem_usage: bool = True,
                        device_map: DeviceMap = None, use_safetensors: bool | None = None,
                        cache_dir: str | Path | None = None, revision: str | None = None,
                        token: str | bool | None = None, local_files_only: bool = False,
                        force_download: bool = False, **config_overrides: Any) -> UNet:
        """Load a diffusers ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, a
        sharded checkpoint with its ``.index.json``, or the pickled ``.bin`` read with ``weights_only=True``) from
        a local path or a Hub repo id. The keywords mean what they mean in diffusers:

        - ``subfolder``: e.g. ``"unet"`` inside a pipeline folder; ``variant``: ``diffusion_pytorch_model.<variant>.*``.
        - ``torch_dtype`` (or its alias ``dtype``): the parameters' dtype; float32 when not given.
        - ``low_cpu_mem_usage=True`` builds the model on the meta device and assigns the file's tensors (no random
          init, one copy in memory); ``False`` builds it normally and copies the weights in. Same result.
        - ``device_map``: ``None`` (CPU), or one device for the whole model (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
          a ``torch.device`` or an index); the tensors go straight there.
        - ``use_safetensors``: ``None`` prefers safetensors and falls back to ``.bin``; ``True``/``False`` only one.
        - ``cache_dir``, ``revision``, ``token``, ``local_files_only``, ``force_download``: passed to huggingface_hub.
        - other keywords override config keys (``sample_size=64``); anything else is a ``TypeError`` naming it.

        The load is strict: missing, unexpected, mis-shaped or non-float tensors raise ``ValueError`` naming them
        and the file. Legacy attention names (query/key/value/proj_attn) are renamed. Returns the model in eval mode.
        """
        unknown = [k for k in config_overrides if k not in UNetConfig.__dataclass_fields__]
        if unknown:
            raise TypeError(f"UNet.from_pretrained() got an unexpected keyword argument {unknown[0]!r} (it is not a "
                            f"loading option ddpm supports, nor a config key)")
        load_dtype = _load_dtype(torch_dtype, dtype)
        device = _device_from_map(device_map, low_cpu_mem_usage)
        hub = checkpoint.HubOptions(cache_dir, revision, token, local_files_only, force_download)
        config_path = checkpoint.resolve_file(pretrained_model_name_or_path, cls.config_name, subfolder, hub=hub)
        assert config_path is not None
        raw = read_json(config_path)
        _check_class_name(raw.get("_class_name"), str(config_path))
        try:
            config = config_from_dict(UNetConfig, {**raw, **config_overrides}, ignore=EMA_CONFIG_KEYS)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{config_path}: {e}") from None
        files = checkpoint.resolve_weights(pretrained_model_name_or_path, subfolder, variant, use_safetensors, hub)
        state = checkpoint.rename_legacy_keys(checkpoint.load_state(files))

        if low_cpu_mem_usage:
            with torch.device("meta"):  # no random init: every tensor comes from the file
                model = cls(config)
        else:
            model = cls(config)
        reference = model.state_dict()
        _check_state_dict(reference, state, files[0], config_path)
        target = load_dtype or torch.float32
        # Own, freshly allocated copies in the layout __init__ gave each tensor: safetensors may hand out views of a
        # memory-mapped file, which a later save_pretrained to the same folder would overwrite.
        state = {k: v.to(device=device, dtype=target if v.is_floating_point() else v.dtype, copy=True,
                         memory_format=_layout_of(reference[k]))
                 for k, v in state.items()}
        if low_cpu_mem_usage:
            model.load_state_dict(state, strict=True, assign=True)
        else:
            model.to(device=device, dtype=target)
            model.load_state_dict(state, strict=True)
        return model.eval()

    def save_pretrained(self, save_directory: str | os.PathLike[str], *, safe_serialization: bool = True,
                        variant: str | None = None,
                        max_shard_size: int | str = checkpoint.DEFAULT_MAX_SHARD_SIZE) -> None:
        """Write ``config.json`` (``_class_name: "UNet2DModel"``) and the weights as diffusers does: one
        ``diffusion_pytorch_model[.<variant>].safetensors``, or shards plus the index when the weights exceed
        ``max_shard_size`` (bytes, or a string like ``"5GB"``). ``diffusers.UNet2DModel.from_pretrained`` loads it.
        ``safe_serialization=False`` (a pickled ``.bin``) is refused: ddpm writes safetensors only."""
        if not safe_serialization:
            raise ValueError(f"safe_serialization=False asks for a pickled .bin; {checkpoint.NO_PICKLE}. Drop the "
                             f"argument (True is the default)")
        checkpoint.check_variant(variant)
        self.save_config(save_directory)
        checkpoint.save_state(self.state_dict(), Path(save_directory), variant, max_shard_size)


# Keys that diffusers' EMAModel.save_pretrained adds to config.json (its EMA settings): ignored on load.
EMA_CONFIG_KEYS = ("decay", "inv_gamma", "min_decay", "optimization_step", "power", "update_after_step",
                   "use_ema_warmup")

DeviceMap = str | int | torch.device | dict[str, Any] | None
# device_map strategies that spread one model over several devices (accelerate's); ddpm places the whole UNet
SPREADING_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _load_dtype(torch_dtype: Any, dtype: Any) -> torch.dtype | None:
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one of them")
    chosen = dtype if dtype is not None else torch_dtype
    if chosen is not None and not (isinstance(chosen, torch.dtype) and chosen.is_floating_point):
        raise TypeError(f"torch_dtype={chosen!r} must be a floating-point torch.dtype, e.g. torch.float16")
    return chosen


def _device_from_map(device_map: DeviceMap, low_cpu_mem_usage: bool) -> torch.device:
    # diffusers' device_map for one model: None, a device, or {"": device}
    if device_map is None:
        return torch.device("cpu")
    if not low_cpu_mem_usage:
        raise ValueError(f"device_map={device_map!r} needs low_cpu_mem_usage=True (as in diffusers)")
    if isinstance(device_map, dict) and list(device_map) == [""]:
        return _device_from_map(device_map[""], low_cpu_mem_usage)
    if device_map in SPREADING_DEVICE_MAPS:
        raise ValueError(f"device_map={device_map!r} spreads a model over several devices; ddpm puts the whole UNet on "
                         f"one: pass that device, e.g. device_map='cuda' or 'cpu'")
    if isinstance(device_map, bool) or not isinstance(device_map, (str, int, torch.device)):
        raise ValueError(f"device_map={device_map!r} is not supported; pass None, a device such as 'cpu' or "
                         f"'cuda:0', a torch.device, or a device index")
    try:
        device = torch.device(device_map)
        torch.empty(0, device=device)  # is it there?
    except (RuntimeError, AssertionError, ValueError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"device_map={device_map!r} is not a device available here ({why})") from None
    return device


def _layout_of(reference: Tensor) -> torch.memory_format:
    # The memory format a parameter was built in (channels_last for the conv weights), so that loading keeps it
    if reference.ndim == 4 and reference.is_contiguous(memory_format=torch.channels_last) \
            and not reference.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _check_class_name(name: Any, where: str) -> None:
    if name is not None and name != CLASS_NAME:
        raise ValueError(f"{where}: _class_name={name!r} is not a {CLASS_NAME} config; ddpm.UNet loads "
                         f"{CLASS_NAME} folders only")


def _check_state_dict(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], weights_path: Path,
                      config_path: Path) -> None:
    shapes = {k: tuple(v.shape) for k, v in expected.items()}
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {shapes[k]}"
                  for k in shapes if k in state and tuple(state[k].shape) != shapes[k]]
    not_float = [f"{k} is {state[k].dtype}" for k in shapes
                 if k in state and expected[k].is_floating_point() and not state[k].is_floating_point()]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched), ("not floating point (quantized or damaged?)", not_float)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{weights_path} does not fit the UNet described by {config_path}; "
                         + "; ".join(problems))
