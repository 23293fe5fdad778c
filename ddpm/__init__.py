"""ddpm: a small, readable diffusion library that loads and writes diffusers' unconditional checkpoints.

    from ddpm import UNet, DDPMScheduler, DDIMScheduler, Pipeline
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["UNet", "DDPMScheduler", "DDIMScheduler", "Pipeline"]

# Re-exported lazily so that `import ddpm` (and `python -m ddpm.sample --help`) stays fast; the names
# resolve on first use exactly as plain imports would.
_HOME = {"UNet": "ddpm.unet", "DDPMScheduler": "ddpm.schedulers", "DDIMScheduler": "ddpm.schedulers",
         "Pipeline": "ddpm.pipeline",
         "DPMSolverMultistepScheduler": "ddpm.schedulers", "UniPCMultistepScheduler": "ddpm.schedulers",
         "EulerDiscreteScheduler": "ddpm.schedulers", "HeunDiscreteScheduler": "ddpm.schedulers"}

if TYPE_CHECKING:
    from ddpm.pipeline import Pipeline
    from ddpm.schedulers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                                 HeunDiscreteScheduler, UniPCMultistepScheduler)
    from ddpm.unet import UNet


def __getattr__(name: str) -> Any:
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'ddpm' has no attribute {name!r}")
