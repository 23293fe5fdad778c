"""The schedulers: diffusers-shaped classes over the maths in ``ddpm.schedule`` (DDPM, DDIM) and
``ddpm.solvers`` (DPM-Solver, UniPC, Euler, Heun), one class per file, their configs in ``config.py``.

    from ddpm.schedulers import DDPMScheduler, DPMSolverMultistepScheduler
    scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)   # swap, as in diffusers

``SCHEDULERS`` maps each diffusers class name to our class (for ``_class_name`` in saved configs); ``SAMPLERS``
maps the short names of the command lines (``--scheduler dpm``) to a class and its settings, and ``sampler``
builds one on a model's training schedule.
"""

from typing import Any, Union, cast

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

AnyScheduler = Union[DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler,
                     EulerDiscreteScheduler, HeunDiscreteScheduler]

# The command lines' sampler names (ddpm.sample/ddpm.evaluate --scheduler, ddpm.train --ddpm_inference_scheduler):
# name -> (diffusers class name, settings on top of the model's schedule). "dpm" is DPM-Solver++(2M) (Lu et al.
# 2022b), "sde-dpm" its stochastic variant, which adds fresh noise at every step.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {}),
    "sde-dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}
# Which of those take --solver_order and --karras_sigmas
SOLVER_ORDER_SAMPLERS = ("dpm", "sde-dpm", "unipc")
KARRAS_SAMPLERS = ("dpm", "sde-dpm", "unipc", "euler", "heun")


# What a sampler takes from the config it is built on: what a model's scheduler_config.json says about the model
# (its training schedule, prediction type, learned variance, how x̂_0 is clipped) and how its timesteps are
# spaced. Everything else (another sampler's order, algorithm, noise levels) is that sampler's own choice, so
# sampler("dpm", an SDE-DPM-Solver's config) is DPM-Solver++(2M), not the SDE variant carried over by from_config,
# while built on a pipeline's saved DDPM config it is DPMSolverMultistepScheduler.from_config(that config).
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                 "rescale_betas_zero_snr", "timestep_spacing", "steps_offset", "variance_type", "clip_sample",
                 "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "sample_max_value")


def sampler(name: str, config: Any, solver_order: int | None = None, karras_sigmas: bool = False) -> AnyScheduler:
    """The sampler ``name`` (a key of ``SAMPLERS``) with its own defaults, on the training schedule of ``config``
    (any scheduler's config: its ``SCHEDULE_KEYS``), with ``solver_order`` (multistep samplers) or Karras noise
    levels (σ-based samplers) when given."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    class_name, settings = SAMPLERS[name]
    settings = dict(settings)
    if solver_order is not None:
        if name not in SOLVER_ORDER_SAMPLERS:
            raise ValueError(f"solver_order applies to the multistep samplers ({', '.join(SOLVER_ORDER_SAMPLERS)}), "
                             f"not to {name}")
        settings["solver_order"] = solver_order
    if karras_sigmas:
        if name not in KARRAS_SAMPLERS:
            raise ValueError(f"Karras sigmas apply to the σ-based samplers ({', '.join(KARRAS_SAMPLERS)}), not to {name}")
        settings["use_karras_sigmas"] = True
    schedule = {k: v for k, v in dict(config).items() if k in SCHEDULE_KEYS}
    defaulted = [k for k in dict(config).get("_use_default_values", ()) if k in schedule]  # as from_config reads it
    schedule.update({"_use_default_values": defaulted} if defaulted else {})
    return cast(AnyScheduler, SCHEDULERS[class_name].from_config(schedule, **settings))


__all__ = ["SCHEDULERS", "SAMPLERS", "sampler", "AnyScheduler", "SOLVER_ORDER_SAMPLERS", "KARRAS_SAMPLERS", "BaseScheduler", "SchedulerOutput", "SchedulerConfig", "Generator", "draw_noise",
           "DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
           "EulerDiscreteScheduler", "HeunDiscreteScheduler", "DDPMSchedulerConfig", "DDIMSchedulerConfig",
           "DPMSolverMultistepSchedulerConfig", "UniPCMultistepSchedulerConfig", "EulerDiscreteSchedulerConfig",
           "HeunDiscreteSchedulerConfig"]
