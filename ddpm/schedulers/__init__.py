"""The schedulers: diffusers-shaped classes over the maths in ``ddpm.schedule`` (DDPM, DDIM) and
``ddpm.solvers`` (DPM-Solver, UniPC, Euler, Heun), one class per file, their configs in ``config.py``.

    from ddpm.schedulers import DDPMScheduler, DPMSolverMultistepScheduler
    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)   # swap, as in diffusers

``SCHEDULERS`` maps each diffusers class name to our class (for ``_class_name`` in saved configs).
"""

from ddpm.schedulers.base import BaseScheduler, SchedulerOutput
from ddpm.schedulers.config import (DDIMSchedulerConfig, DDPMSchedulerConfig, DPMSolverMultistepSchedulerConfig,
                                    EulerDiscreteSchedulerConfig, HeunDiscreteSchedulerConfig, SchedulerConfig,
                                    UniPCMultistepSchedulerConfig)
from ddpm.schedulers.ddim import DDIMScheduler
from ddpm.schedulers.ddpm import DDPMScheduler
from ddpm.schedulers.dpm_solver import DPMSolverMultistepScheduler
from ddpm.schedulers.euler import EulerDiscreteScheduler
from ddpm.schedulers.heun import HeunDiscreteScheduler
from ddpm.schedulers.noise import Generator, draw_noise
from ddpm.schedulers.unipc import UniPCMultistepScheduler

SCHEDULERS: dict[str, type[BaseScheduler]] = {
    "DDPMScheduler": DDPMScheduler,
    "DDIMScheduler": DDIMScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "UniPCMultistepScheduler": UniPCMultistepScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "HeunDiscreteScheduler": HeunDiscreteScheduler,
}

__all__ = ["SCHEDULERS", "BaseScheduler", "SchedulerOutput", "SchedulerConfig", "Generator", "draw_noise",
           "DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
           "EulerDiscreteScheduler", "HeunDiscreteScheduler", "DDPMSchedulerConfig", "DDIMSchedulerConfig",
           "DPMSolverMultistepSchedulerConfig", "UniPCMultistepSchedulerConfig", "EulerDiscreteSchedulerConfig",
           "HeunDiscreteSchedulerConfig"]
