"""ddpm: a small, readable diffusion library that loads and writes diffusers' unconditional checkpoints.

    from ddpm import UNet, DDPMScheduler, DDIMScheduler, Pipeline

diffusers' names work too, so a script runs with only ``diffusers`` replaced by ``ddpm`` in its imports:
``UNet2DModel`` (the same class as ``UNet``), ``DDPMPipeline`` and ``DDIMPipeline`` (``Pipeline`` with diffusers'
call signatures; ``DDIMPipeline`` converts its scheduler to DDIM) and ``ImagePipelineOutput``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["UNet", "DDPMScheduler", "DDIMScheduler", "Pipeline",
           "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
           "UNet2DModel", "DDPMPipeline", "DDIMPipeline", "ImagePipelineOutput"]

# Re-exported lazily so that `import ddpm` (and `python -m ddpm.sample --help`) stays fast; the names
# resolve on first use exactly as plain imports would. Aliases map to (module, name there).
_HOME = {"UNet": ("ddpm.unet", "UNet"), "DDPMScheduler": ("ddpm.schedulers", "DDPMScheduler"),
         "DDIMScheduler": ("ddpm.schedulers", "DDIMScheduler"), "Pipeline": ("ddpm.pipeline", "Pipeline"),
         "UNet2DModel": ("ddpm.unet", "UNet"), "DDPMPipeline": ("ddpm.pipeline", "DDPMPipeline"),
         "DDIMPipeline": ("ddpm.pipeline", "DDIMPipeline"),
         "ImagePipelineOutput": ("ddpm.pipeline", "ImagePipelineOutput"),
         **{name: ("ddpm.schedulers", name) for name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                                          "EulerDiscreteScheduler", "HeunDiscreteScheduler")}}

if TYPE_CHECKING:
    from ddpm.pipeline import DDIMPipeline, DDPMPipeline, ImagePipelineOutput, Pipeline
    from ddpm.schedulers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                                 HeunDiscreteScheduler, UniPCMultistepScheduler)
    from ddpm.unet import UNet
    from ddpm.unet import UNet as UNet2DModel


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        module, attribute = _HOME[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
