"""The sampling pipeline: start from Gaussian noise and denoise with a UNet and a scheduler.

``Pipeline`` works with every scheduler and reads and writes the folder layout of diffusers' ``DDPMPipeline``::

    model_index.json          {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], ...}
    unet/config.json + diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json

It also loads the single-folder layout of the original google/ddpm-* repos, where ``config.json`` and
``scheduler_config.json`` sit side by side at the root. ``DDPMPipeline`` and ``DDIMPipeline`` are thin subclasses
with diffusers' call signatures, so scripts written for diffusers run with only their imports changed.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ddpm import checkpoint
from ddpm.config import DIFFUSERS_VERSION, read_json, write_json
from ddpm.images import numpy_to_pil, to_numpy, to_unit_range
from ddpm.outputs import BaseOutput
from ddpm.schedulers import SCHEDULERS, DDIMScheduler, DDPMScheduler, draw_noise
from ddpm.unet import UNet

Generator = torch.Generator | list[torch.Generator] | None
# Pipeline class names whose folders we load: they all hold one unconditional UNet and one scheduler.
PIPELINE_CLASSES = ("DDPMPipeline", "DDIMPipeline")
P = TypeVar("P", bound="Pipeline")


class Scheduler(Protocol):
    """What the pipeline and its callers use of a scheduler (every ddpm scheduler has it)."""

    @property
    def timesteps(self) -> torch.Tensor: ...
    @property
    def init_noise_sigma(self) -> float | torch.Tensor: ...
    @property
    def config(self) -> Any: ...
    @property
    def num_train_timesteps(self) -> int: ...
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None: ...
    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor: ...
    def step(self, *args: Any, **kwargs: Any) -> Any: ...
    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None: ...


@dataclass
class ImagePipelineOutput(BaseOutput):
    """``images``: a list of PIL images, an ``[N x H x W x C]`` array or an ``[N x C x H x W]`` tensor."""
    images: list[Image.Image] | np.ndarray | torch.Tensor


PipelineOutput = ImagePipelineOutput  # the name ddpm used first


class Pipeline:
    """Unconditional image sampler for any scheduler: ``Pipeline(unet=..., scheduler=...)(batch_size=8).images``.

    ``unet`` may be a ``torch.compile``'d UNet. Each call draws x_T ~ N(0, σ_init² I) (``init_noise_sigma``: 1 for
    DDPM/DDIM), then for each timestep runs the UNet on ``scheduler.scale_model_input(x, t)`` and steps.
    """

    _pipeline_class_name = "DDPMPipeline"  # the model_index.json _class_name we write (diffusers loads it)

    def __init__(self, unet: UNet, scheduler: Scheduler) -> None:
        if not isinstance(unet, torch.nn.Module):
            raise TypeError(f"unet must be a UNet (a torch.nn.Module), got {type(unet).__name__}")
        self.unet = unet
        self.scheduler = scheduler
        self._progress_bar_config: dict[str, Any] = {}

    # ---- diffusers' DiffusionPipeline surface -----------------------------------------------------------------

    @property
    def components(self) -> dict[str, Any]:
        """``{"unet": ..., "scheduler": ...}``, e.g. for ``DDIMPipeline(**pipe.components)``."""
        return {"unet": self.unet, "scheduler": self.scheduler}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self: P, *args: Any, **kwargs: Any) -> P:
        """Move and/or cast the UNet, as diffusers' ``DiffusionPipeline.to``: ``pipe.to("cuda")``,
        ``pipe.to(torch.float16)``, ``pipe.to("cuda", torch.float16)``, ``pipe.to(device=..., dtype=...)`` (also
        spelled ``torch_device=``/``torch_dtype=``). Returns the pipeline."""
        names = {"device": "device", "torch_device": "device", "dtype": "dtype", "torch_dtype": "dtype"}
        unknown = [k for k in kwargs if k not in names and k != "silence_dtype_warnings"]
        if unknown:
            raise TypeError(f"{type(self).__name__}.to() got an unexpected keyword argument {unknown[0]!r}")
        if len(args) > 2:
            raise ValueError("to() takes at most two positional arguments: a device and a dtype")
        if len(args) == 2 and isinstance(args[0], torch.dtype):
            raise ValueError("to(a, b): the first argument is the device, the second the dtype")
        given: dict[str, Any] = {}
        for value in args:
            key = "dtype" if isinstance(value, torch.dtype) else "device"
            given[key] = value
        for key, value in kwargs.items():
            if key == "silence_dtype_warnings" or value is None:
                continue
            if names[key] in given:
                raise ValueError(f"the {names[key]} was given twice (as {key}= and another way); pass it once")
            given[names[key]] = value
        dtype = given.get("dtype")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype={dtype!r} must be a floating-point torch.dtype, e.g. torch.float16")
        device = torch.device(given["device"]) if given.get("device") is not None else None
        self.unet.to(device=device, dtype=dtype)
        return self

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the tqdm bar of each call, e.g. ``disable=True``, ``desc="sampling"``, ``leave=False``."""
        self._progress_bar_config = dict(kwargs)

    def progress_bar(self, iterable: Any = None, total: int | None = None) -> tqdm:
        """A tqdm bar with the options of ``set_progress_bar_config`` (over ``iterable``, or of ``total`` steps)."""
        if iterable is None and total is None:
            raise ValueError("progress_bar needs an iterable or a total")
        return tqdm(iterable, total=total, **self._progress_bar_config)

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Changes nothing, exactly as in diffusers for this model: its ``UNet2DModel`` has no sliced attention, so
        ``DDPMPipeline.enable_attention_slicing`` leaves it alone. Kept so that scripts written for diffusers run."""
        if slice_size not in ("auto", "max", None) and not (isinstance(slice_size, int) and slice_size > 0):
            raise ValueError(f"slice_size={slice_size!r} must be 'auto', 'max', a positive integer or None")

    def disable_attention_slicing(self) -> None:
        """Changes nothing (see ``enable_attention_slicing``)."""

    numpy_to_pil = staticmethod(numpy_to_pil)

    @property
    def default_num_inference_steps(self) -> int:
        """The number of steps a call takes by default: the scheduler's ``default_num_inference_steps`` (DDIM: 50),
        else its ``num_train_timesteps`` (DDPM: every step, 1000 for the usual config)."""
        steps = getattr(self.scheduler, "default_num_inference_steps", None)  # a diffusers scheduler has none
        return int(steps) if steps is not None else int(self.scheduler.config["num_train_timesteps"])

    # ---- sampling ---------------------------------------------------------------------------------------------

    def __call__(
        self,
        batch_size: int = 1,
        generator: Generator = None,
        num_inference_steps: int | None = None,
        output_type: Literal["pil", "np", "pt"] = "pil",
        return_dict: bool = True,
        eta: float = 0.0,
        use_clipped_model_output: bool | None = None,
    ) -> ImagePipelineOutput | tuple[Any]:
        """Sample ``batch_size`` images.

        generator: one ``torch.Generator``, or a list of one per sample (each sample then depends only on its own
        generator, whatever the batch size). num_inference_steps: None takes ``default_num_inference_steps`` (the
        scheduler's: 1000 for DDPM's usual config, 50 for DDIM). eta, use_clipped_model_output: DDIM's options,
        passed only to a scheduler whose ``step`` takes them (setting them for another is a ``ValueError``).
        Returns ``.images``: a list of PIL images, an ``[N x H x W x C]`` float array in ``[0, 1]`` ("np"), or an
        ``[N x C x H x W]`` tensor in ``[0, 1]`` ("pt"); ``return_dict=False`` gives the 1-tuple ``(images,)``.
        """
        return self._sample(batch_size=batch_size, generator=generator, num_inference_steps=num_inference_steps,
                            output_type=output_type, return_dict=return_dict, eta=eta,
                            use_clipped_model_output=use_clipped_model_output)

    @torch.no_grad()
    def _sample(self, *, batch_size: int, generator: Generator, num_inference_steps: int | None,
                output_type: str, return_dict: bool, eta: float,
                use_clipped_model_output: bool | None) -> ImagePipelineOutput | tuple[Any]:
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r} is not supported; choose 'pil', 'np' or 'pt'")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for batch_size={batch_size}; pass one per sample")
        step_kwargs = self._step_kwargs(generator, eta, use_clipped_model_output)
        config = self.unet.config
        if config["sample_size"] is None:
            raise ValueError("unet.config.sample_size is None: the pipeline needs it to know the image size")
        size = config["sample_size"]
        height, width = (size, size) if isinstance(size, int) else size
        shape = (batch_size, config["in_channels"], height, width)

        device = self.device
        steps = self.default_num_inference_steps if num_inference_steps is None else num_inference_steps
        self.scheduler.set_timesteps(steps, device=device)
        image = draw_noise(shape, generator, device, self.dtype) * self.scheduler.init_noise_sigma  # x_T
        with self.unet.frozen_weights():  # the weights do not change during the loop
            for t in self.progress_bar(self.scheduler.timesteps):
                model_input = self.scheduler.scale_model_input(image, t)  # identity for DDPM/DDIM, x/√(σ²+1) for Euler
                model_output = self.unet(model_input, t).sample
                image = self.scheduler.step(model_output, t, image, **step_kwargs).prev_sample

        image = to_unit_range(image)
        images: Any = image
        if output_type != "pt":
            images = to_numpy(image)
            if output_type == "pil":
                images = numpy_to_pil(images)
        return ImagePipelineOutput(images) if return_dict else (images,)

    def _step_kwargs(self, generator: Generator, eta: float, use_clipped_model_output: bool | None) -> dict[str, Any]:
        # The keywords this scheduler's step takes, as diffusers' pipelines pick them (its prepare_extra_step_kwargs)
        accepted = inspect.signature(self.scheduler.step).parameters
        name = type(self.scheduler).__name__
        kwargs: dict[str, Any] = {"generator": generator} if "generator" in accepted else {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        elif eta:
            raise ValueError(f"eta={eta} is DDIM's noise scale, but {name}.step takes no eta")
        if use_clipped_model_output is not None:
            if "use_clipped_model_output" not in accepted:
                raise ValueError(f"use_clipped_model_output is a DDIM option, but {name}.step takes none")
            kwargs["use_clipped_model_output"] = use_clipped_model_output
        return kwargs

    # ---- files ------------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike[str], *, safe_serialization: bool = True,
                        variant: str | None = None,
                        max_shard_size: int | str = checkpoint.DEFAULT_MAX_SHARD_SIZE) -> None:
        """Write diffusers' pipeline layout: model_index.json, unet/ and scheduler/. The keywords are passed to
        ``UNet.save_pretrained`` (``variant``, ``max_shard_size``); ``safe_serialization=False`` is refused."""
        if not safe_serialization:
            raise ValueError(f"safe_serialization=False asks for pickled .bin files; {checkpoint.NO_PICKLE}. Drop "
                             f"the argument (True is the default)")
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(root / "unet", variant=variant, max_shard_size=max_shard_size)
        self.scheduler.save_pretrained(root / "scheduler")
        write_json(root / checkpoint.PIPELINE_INDEX_NAME, {
            "_class_name": self._pipeline_class_name,
            "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "unet": ["diffusers", "UNet2DModel"],
        })

    @classmethod
    def from_pretrained(cls: type[P], pretrained_model_name_or_path: str | os.PathLike[str], *,
                        unet: UNet | None = None, scheduler: Scheduler | None = None,
                        torch_dtype: torch.dtype | dict[str, torch.dtype] | None = None,
                        dtype: torch.dtype | dict[str, torch.dtype] | None = None, variant: str | None = None,
                        low_cpu_mem_usage: bool = True, device_map: Any = None, use_safetensors: bool | None = None,
                        cache_dir: str | Path | None = None, revision: str | None = None,
                        token: str | bool | None = None, local_files_only: bool = False,
                        force_download: bool = False) -> P:
        """Load a pipeline folder or hub repo written by diffusers or by ddpm.

        ``unet=`` or ``scheduler=`` replace that component (e.g. a DDIMScheduler for 50-step sampling). The other
        keywords mean what they mean in diffusers and go to ``UNet.from_pretrained`` (``torch_dtype`` may also be
        a dict such as ``{"unet": torch.bfloat16, "default": torch.float16}``); the hub ones to every file.
        """
        hub = checkpoint.HubOptions(cache_dir, revision, token, local_files_only, force_download)
        root = pretrained_model_name_or_path
        index_path = checkpoint.resolve_file(root, checkpoint.PIPELINE_INDEX_NAME, required=False, hub=hub)
        subfolders: tuple[str | None, str | None] = ("unet", "scheduler")
        scheduler_name = None
        if index_path is not None:
            index = read_json(index_path)
            if index.get("_class_name") not in PIPELINE_CLASSES:
                raise ValueError(f"{index_path}: _class_name {index.get('_class_name')!r} is not an unconditional "
                                 f"image pipeline ({' or '.join(PIPELINE_CLASSES)})")
            entry = index.get("scheduler", [None, None])
            if not (isinstance(entry, list) and len(entry) == 2):
                raise ValueError(f"{index_path}: 'scheduler' must be a [library, class name] pair, got {entry!r}")
            scheduler_name = entry[1]
            # The original google/ddpm-* repos keep both configs at the root next to model_index.json.
            if checkpoint.resolve_file(root, checkpoint.MODEL_CONFIG_NAME, "unet", False, hub) is None:
                subfolders = (None, None)
        elif checkpoint.resolve_file(root, checkpoint.MODEL_CONFIG_NAME, required=False, hub=hub) is not None:
            subfolders = (None, None)
        else:
            raise FileNotFoundError(f"{os.fspath(root)} is not a pipeline folder: it has neither "
                                    f"{checkpoint.PIPELINE_INDEX_NAME} nor {checkpoint.MODEL_CONFIG_NAME}")

        if unet is None:
            try:
                unet = UNet.from_pretrained(
                    root, subfolder=subfolders[0], torch_dtype=_unet_dtype(torch_dtype, dtype), variant=variant,
                    low_cpu_mem_usage=low_cpu_mem_usage, device_map=device_map, use_safetensors=use_safetensors,
                    cache_dir=cache_dir, revision=revision, token=token, local_files_only=local_files_only,
                    force_download=force_download)
            except checkpoint.MissingWeightsError as e:
                if variant is None:
                    raise
                # diffusers' error (type and first words) for a pipeline without files of that variant
                raise ValueError(f"You are trying to load the model files of the `variant={variant}`, but no such "
                                 f"modeling files are available: {e}") from None
        if scheduler is None:
            config_path = checkpoint.resolve_file(root, checkpoint.SCHEDULER_CONFIG_NAME, subfolders[1], hub=hub)
            assert config_path is not None
            config = read_json(config_path)
            name = config.get("_class_name", scheduler_name or "DDPMScheduler")
            if name not in SCHEDULERS:
                raise ValueError(f"{config_path}: scheduler class {name!r} is not supported; "
                                 f"ddpm has {', '.join(SCHEDULERS)}")
            try:
                scheduler = SCHEDULERS[name].from_config(config)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{config_path}: {e}") from None
        return cls(unet=unet, scheduler=scheduler)


def _unet_dtype(torch_dtype: Any, dtype: Any) -> torch.dtype | None:
    # A pipeline's dtype: one dtype, or diffusers' per-component dict {"unet": ..., "default": ...}
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one of them")
    chosen = dtype if dtype is not None else torch_dtype
    if isinstance(chosen, dict):
        unknown = [k for k in chosen if k not in ("unet", "default")]
        if unknown:
            raise ValueError(f"dtype dict key {unknown[0]!r} names no component with weights; use 'unet' or 'default'")
        return chosen.get("unet", chosen.get("default"))
    return chosen


class DDPMPipeline(Pipeline):
    """diffusers' ``DDPMPipeline``, with its call signature: ``DDPMPipeline(unet, scheduler)(batch_size, generator,
    num_inference_steps, output_type, return_dict)``. It also applies the scheduler's ``init_noise_sigma`` and
    ``scale_model_input`` (diffusers' forgets both), and by default takes the scheduler's default step count."""

    def __call__(  # type: ignore[override]
        self,
        batch_size: int = 1,
        generator: Generator = None,
        num_inference_steps: int | None = None,
        output_type: Literal["pil", "np", "pt"] = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple[Any]:
        """Sample ``batch_size`` images; see ``Pipeline.__call__``."""
        return self._sample(batch_size=batch_size, generator=generator, num_inference_steps=num_inference_steps,
                            output_type=output_type, return_dict=return_dict, eta=0.0, use_clipped_model_output=None)


class DDIMPipeline(Pipeline):
    """diffusers' ``DDIMPipeline``: the scheduler passed in is converted to a ``DDIMScheduler`` with the same config
    (as diffusers does), and a call defaults to 50 steps: ``DDIMPipeline(unet, scheduler)(batch_size, generator,
    eta, num_inference_steps, use_clipped_model_output, output_type, return_dict)``."""

    _pipeline_class_name = "DDIMPipeline"

    def __init__(self, unet: UNet, scheduler: Scheduler) -> None:
        super().__init__(unet, DDIMScheduler.from_config(scheduler.config))

    def __call__(  # type: ignore[override]
        self,
        batch_size: int = 1,
        generator: Generator = None,
        eta: float = 0.0,
        num_inference_steps: int | None = None,
        use_clipped_model_output: bool | None = None,
        output_type: Literal["pil", "np", "pt"] = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple[Any]:
        """Sample ``batch_size`` images with DDIM (η = ``eta``: 0 deterministic, 1 DDPM-like); see
        ``Pipeline.__call__``."""
        return self._sample(batch_size=batch_size, generator=generator, num_inference_steps=num_inference_steps,
                            output_type=output_type, return_dict=return_dict, eta=eta,
                            use_clipped_model_output=use_clipped_model_output)


# ---- training checkpoints (ddpm.train's and train_unconditional.py's checkpoint-N folders) --------------------

def is_training_checkpoint(folder: str | os.PathLike[str]) -> bool:
    """A local folder with ``unet/`` but no ``model_index.json``: a checkpoint of ``ddpm.train`` or of diffusers'
    train_unconditional.py (``unet/``, optionally ``unet_ema/`` and ``scheduler/``, plus trainer state)."""
    folder = Path(folder)
    return folder.is_dir() and (folder / "unet" / checkpoint.MODEL_CONFIG_NAME).is_file() \
        and not (folder / checkpoint.PIPELINE_INDEX_NAME).exists()


def checkpoint_pipeline(folder: str | os.PathLike[str], use_ema: bool = True,
                        warn: Callable[[str], object] | None = None) -> tuple[Pipeline, str]:
    """A pipeline from a training checkpoint folder and which weights it holds: ``"ema"`` (``unet_ema/``, used when
    present and ``use_ema``) or ``"raw"`` (``unet/``). The scheduler comes from ``scheduler/`` (ddpm.train writes
    it), else from the run's saved pipeline in the parent folder (train_unconditional.py), else it is diffusers'
    default ``DDPMScheduler``, with a note to ``warn``."""
    folder = Path(folder)
    ema = use_ema and (folder / "unet_ema" / checkpoint.MODEL_CONFIG_NAME).is_file()
    weights = "ema" if ema else "raw"
    unet = UNet.from_pretrained(folder, subfolder="unet_ema" if ema else "unet")
    own = folder / "scheduler" / checkpoint.SCHEDULER_CONFIG_NAME
    if own.is_file():
        config = read_json(own)
        name = config.get("_class_name", "DDPMScheduler")
        if name not in SCHEDULERS:
            raise ValueError(f"{own}: scheduler class {name!r} is not supported; ddpm has {', '.join(SCHEDULERS)}")
        return Pipeline(unet=unet, scheduler=SCHEDULERS[name].from_config(config)), weights
    if (folder.parent / checkpoint.PIPELINE_INDEX_NAME).is_file():
        return Pipeline.from_pretrained(folder.parent, unet=unet), weights
    if warn is not None:
        warn(f"note: {folder} has no scheduler/ and {folder.parent} no saved pipeline: sampling with diffusers' "
             f"default DDPMScheduler (1000 steps, linear betas)")
    return Pipeline(unet=unet, scheduler=DDPMScheduler()), weights


# ---- sampling many images in batches (ddpm.sample, ddpm.evaluate, the trainer's scoring) ----------------------

def sample_batches(pipe: Pipeline, num_images: int, batch_size: int, num_inference_steps: int, seed: int = 0,
                   eta: float = 0.0, output_type: Literal["pil", "np", "pt"] = "pil",
                   progress: bool = True, leave: bool = True) -> Iterator[tuple[int, Any]]:
    """``(first, images)`` per batch of at most ``batch_size``: images ``first``, ``first + 1``, ... of
    ``num_images``, image i drawn with its own generator seeded ``seed + i`` (so the set does not depend on
    ``batch_size``). ``progress=False`` hides the per-step bars; ``leave=False`` clears each when done."""
    num_batches = math.ceil(num_images / batch_size)
    for b in range(num_batches):
        first = b * batch_size
        count = min(batch_size, num_images - first)
        generators = [torch.Generator().manual_seed(seed + first + i) for i in range(count)]
        pipe.set_progress_bar_config(desc=f"batch {b + 1}/{num_batches}", leave=leave, disable=not progress)
        yield first, pipe(batch_size=count, generator=generators, num_inference_steps=num_inference_steps,
                          eta=eta, output_type=output_type)[0]


def generate(pipe: Pipeline, num_images: int, batch_size: int, num_inference_steps: int, seed: int = 0,
             eta: float = 0.0, progress: bool = True) -> torch.Tensor:
    """``num_images`` samples as an ``[N x C x H x W]`` CPU tensor in ``[-1, 1]``; image i uses seed ``seed + i``
    (as ``sample_batches``), so the set does not depend on ``batch_size``. ``progress=False``: no bars."""
    out = []
    with tqdm(total=num_images, desc="sampling", unit="image", disable=not progress) as bar:  # inner bars: steps
        for _, images in sample_batches(pipe, num_images, batch_size, num_inference_steps, seed, eta,
                                        output_type="pt", progress=progress, leave=False):
            assert isinstance(images, torch.Tensor)
            out.append(images.float().cpu() * 2 - 1)  # the pipeline's [0, 1] back to model space [-1, 1]
            bar.update(images.shape[0])
    return torch.cat(out)
