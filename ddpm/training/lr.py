"""Learning-rate schedules: the six names of diffusers' ``get_scheduler``, with the same shapes.

Each is a multiplier of the base learning rate as a function of the optimiser step ``s`` (0-based), given
``warmup`` and ``total`` optimiser steps, wrapped in ``torch.optim.lr_scheduler.LambdaLR``:

    constant               1
    constant_with_warmup   s / warmup during warmup, then 1
    linear                 warmup, then (total - s) / (total - warmup) down to 0
    cosine                 warmup, then 0.5 (1 + cos(pi p)), p = (s - warmup) / (total - warmup)   (half a cosine)
    cosine_with_restarts   warmup, then 0.5 (1 + cos(pi ((cycles p) mod 1))), one cycle as get_scheduler's default
    polynomial             warmup, then (lr - lr_end) (1 - p) ** power + lr_end, power 1, lr_end 1e-7

Steps count optimiser updates, not micro-batches: the trainer steps the schedule once per optimiser step, so
gradient accumulation and the number of processes do not change its length.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from ddpm.training.args import LR_SCHEDULES, LRScheduleName


def lr_multiplier(name: LRScheduleName, warmup: int, total: int, base_lr: float, num_cycles: int = 1,
                  power: float = 1.0, lr_end: float = 1e-7) -> Callable[[int], float]:
    """The function ``step -> lr / base_lr`` of schedule ``name``."""

    def warming(s: int) -> float | None:
        return s / max(1, warmup) if s < warmup else None

    def progress(s: int) -> float:
        return (s - warmup) / max(1, total - warmup)

    def constant(s: int) -> float:
        return 1.0

    def constant_with_warmup(s: int) -> float:
        w = warming(s)
        return 1.0 if w is None else w

    def linear(s: int) -> float:
        w = warming(s)
        return max(0.0, (total - s) / max(1, total - warmup)) if w is None else w

    def cosine(s: int) -> float:
        w = warming(s)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress(s)))) if w is None else w

    def cosine_with_restarts(s: int) -> float:
        w = warming(s)
        if w is not None:
            return w
        p = progress(s)
        return 0.0 if p >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * p) % 1.0))))

    def polynomial(s: int) -> float:
        w = warming(s)
        if w is not None:
            return w
        if s > total:
            return lr_end / base_lr
        remaining = 1.0 - (s - warmup) / max(1, total - warmup)
        return ((base_lr - lr_end) * remaining**power + lr_end) / base_lr

    schedules: dict[str, Callable[[int], float]] = {
        "constant": constant, "constant_with_warmup": constant_with_warmup, "linear": linear, "cosine": cosine,
        "cosine_with_restarts": cosine_with_restarts, "polynomial": polynomial,
    }
    if name not in schedules:
        raise ValueError(f"lr_scheduler={name!r} is not supported; choose one of {', '.join(LR_SCHEDULES)}")
    if name == "polynomial" and not base_lr > lr_end:
        raise ValueError(f"learning_rate={base_lr} must be larger than the polynomial schedule's end value {lr_end}")
    return schedules[name]


def get_scheduler(name: LRScheduleName, optimizer: Optimizer, num_warmup_steps: int | None = None,
                  num_training_steps: int | None = None, num_cycles: int = 1, power: float = 1.0) -> LambdaLR:
    """A ``LambdaLR`` for ``optimizer`` following schedule ``name``, called like diffusers' ``get_scheduler``.

    Every schedule but "constant" needs ``num_warmup_steps``; all but the two constant ones need
    ``num_training_steps`` (both in optimiser steps).
    """
    if name not in LR_SCHEDULES:
        raise ValueError(f"lr_scheduler={name!r} is not supported; choose one of {', '.join(LR_SCHEDULES)}")
    if num_warmup_steps is None and name != "constant":
        raise ValueError(f"lr_scheduler={name!r} needs num_warmup_steps")
    if num_training_steps is None and name not in ("constant", "constant_with_warmup"):
        raise ValueError(f"lr_scheduler={name!r} needs num_training_steps")
    base_lr = float(optimizer.defaults["lr"])
    multiplier = lr_multiplier(name, num_warmup_steps or 0, num_training_steps or 0, base_lr, num_cycles, power)
    return LambdaLR(optimizer, multiplier)
