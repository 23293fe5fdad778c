"""The sampling pipeline: start from Gaussian noise and denoise with a UNet and a scheduler.

``Pipeline`` is a drop-in for diffusers' ``DDPMPipeline`` and reads and writes its folder layout::

    model_index.json          {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], ...}
    unet/config.json + diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json

It also loads the single-folder layout of the original google/ddpm-* repos, where ``config.json`` and
``scheduler_config.json`` sit side by side at the root.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ddpm import checkpoint
from ddpm.config import DIFFUSERS_VERSION, read_json, write_json
from ddpm.images import numpy_to_pil, to_numpy, to_unit_range
from ddpm.outputs import BaseOutput
from ddpm.schedulers import DDIMScheduler, DDPMScheduler, draw_noise
from ddpm.unet import UNet

Scheduler = DDPMScheduler | DDIMScheduler
Generator = torch.Generator | list[torch.Generator] | None
SCHEDULERS: dict[str, type[DDPMScheduler] | type[DDIMScheduler]] = {
    "DDPMScheduler": DDPMScheduler,
    "DDIMScheduler": DDIMScheduler,
}
# Pipeline class names whose folders we load: they all hold one unconditional UNet and one scheduler.
PIPELINE_CLASSES = ("DDPMPipeline", "DDIMPipeline")


@dataclass
class ImagePipelineOutput(BaseOutput):
    """``images``: a list of PIL images, an ``[N x H x W x C]`` array or an ``[N x C x H x W]`` tensor."""
    images: list[Image.Image] | np.ndarray | torch.Tensor


PipelineOutput = ImagePipelineOutput  # the name ddpm used first


class Pipeline:
    """Unconditional image sampler: ``Pipeline(unet=..., scheduler=...)(batch_size=8).images``."""

    def __init__(self, unet: UNet, scheduler: Scheduler) -> None:
        self.unet = unet
        self.scheduler = scheduler
        self._progress_bar_config: dict[str, Any] = {}

    # ---- running ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, *args: Any, **kwargs: Any) -> Pipeline:
        """Move (and/or cast) the UNet, like ``nn.Module.to``: ``pipe.to("cuda")``, ``pipe.to(torch.float16)``."""
        self.unet.to(*args, **kwargs)
        return self

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the tqdm bar of each call, e.g. ``disable=True``."""
        self._progress_bar_config = dict(kwargs)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Generator = None,
        num_inference_steps: int = 1000,
        output_type: Literal["pil", "np", "pt"] = "pil",
        return_dict: bool = True,
        eta: float = 0.0,
    ) -> ImagePipelineOutput | tuple[Any]:
        """Sample ``batch_size`` images.

        generator: one ``torch.Generator``, or a list of one per sample (each sample then depends only on
        its own generator, whatever the batch size). eta: DDIM's noise scale (0 = deterministic DDIM); it
        is only used with a DDIMScheduler. Returns ``.images``: a list of PIL images, an ``[N x H x W x C]``
        float array in ``[0, 1]`` ("np"), or an ``[N x C x H x W]`` tensor in ``[0, 1]`` ("pt").
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r} is not supported; choose 'pil', 'np' or 'pt'")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for batch_size={batch_size}; pass one per sample")
        size = self.unet.config.sample_size
        if size is None:
            raise ValueError("unet.config.sample_size is None: the pipeline needs it to know the image size")
        height, width = (size, size) if isinstance(size, int) else size
        shape = (batch_size, self.unet.config.in_channels, height, width)
        image = draw_noise(shape, generator, self.device, self.dtype)  # x_T ~ N(0, I)

        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        with self.unet.frozen_weights():  # the weights do not change during the loop
            for t in tqdm(self.scheduler.timesteps, **self._progress_bar_config):
                model_output = self.unet(image, t).sample
                if isinstance(self.scheduler, DDIMScheduler):
                    image = self.scheduler.step(model_output, t, image, eta=eta, generator=generator).prev_sample
                else:
                    image = self.scheduler.step(model_output, t, image, generator=generator).prev_sample

        image = to_unit_range(image)
        images: Any = image
        if output_type != "pt":
            images = to_numpy(image)
            if output_type == "pil":
                images = numpy_to_pil(images)
        return ImagePipelineOutput(images) if return_dict else (images,)

    # ---- files -----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write diffusers' DDPMPipeline layout: model_index.json, unet/ and scheduler/."""
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(root / "unet")
        self.scheduler.save_pretrained(root / "scheduler")
        write_json(root / checkpoint.PIPELINE_INDEX_NAME, {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "unet": ["diffusers", "UNet2DModel"],
        })

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike[str], unet: UNet | None = None,
                        scheduler: Scheduler | None = None, torch_dtype: torch.dtype | None = None) -> Pipeline:
        """Load a pipeline folder or hub repo written by diffusers or by ddpm.

        ``unet=`` or ``scheduler=`` replace that component (e.g. a DDIMScheduler for 50-step sampling).
        """
        index_path = checkpoint.resolve_file(path_or_repo_id, checkpoint.PIPELINE_INDEX_NAME, required=False)
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
            if checkpoint.resolve_file(path_or_repo_id, checkpoint.MODEL_CONFIG_NAME, "unet", required=False) is None:
                subfolders = (None, None)
        elif checkpoint.resolve_file(path_or_repo_id, checkpoint.MODEL_CONFIG_NAME, required=False) is not None:
            subfolders = (None, None)
        else:
            raise FileNotFoundError(f"{os.fspath(path_or_repo_id)} is not a pipeline folder: it has neither "
                                    f"{checkpoint.PIPELINE_INDEX_NAME} nor {checkpoint.MODEL_CONFIG_NAME}")

        if unet is None:
            unet = UNet.from_pretrained(path_or_repo_id, subfolder=subfolders[0], torch_dtype=torch_dtype)
        if scheduler is None:
            config_path = checkpoint.resolve_file(path_or_repo_id, checkpoint.SCHEDULER_CONFIG_NAME, subfolders[1])
            assert config_path is not None
            config = read_json(config_path)
            name = config.get("_class_name", scheduler_name or "DDPMScheduler")
            if name not in SCHEDULERS:
                raise ValueError(f"{config_path}: scheduler class {name!r} is not supported; "
                                 f"ddpm has {' and '.join(SCHEDULERS)}")
            scheduler = SCHEDULERS[name].from_config(config)
        return cls(unet=unet, scheduler=scheduler)


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
