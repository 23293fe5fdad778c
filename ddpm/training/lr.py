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


POLYNOMIAL_LR_END = 1e-7  # diffusers' default end value of the polynomial schedule


def lr_multiplier(name: LRScheduleName, warmup: int, total: int, base_lr: float, num_cycles: int = 1,
                  power: float = 1.0, lr_end: float = POLYNOMIAL_LR_END) -> Callable[[int], float]:
    """The function ``step -> lr / base_lr`` of schedule ``name`` (checked by ``get_scheduler``): a linear warmup
    over ``warmup`` steps (none for "constant"), then the schedule's own formula, as diffusers writes it."""

    def progress(s: int) -> float:
        return (s - warmup) / max(1, total - warmup)

    def polynomial(s: int) -> float:
        if s > total:
            return lr_end / base_lr
        return ((base_lr - lr_end) * (1.0 - progress(s)) ** power + lr_end) / base_lr

    def cosine_with_restarts(s: int) -> float:
        p = progress(s)
        return 0.0 if p >= 1.0 else max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * p) % 1.0))))

    after_warmup: dict[str, Callable[[int], float]] = {
        "constant": lambda s: 1.0,
        "constant_with_warmup": lambda s: 1.0,
        "linear": lambda s: max(0.0, (total - s) / max(1, total - warmup)),
        "cosine": lambda s: max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress(s)))),
        "cosine_with_restarts": cosine_with_restarts,
        "polynomial": polynomial,
    }
    schedule = after_warmup[name]
    if name == "constant":
        return schedule
    return lambda s: s / max(1, warmup) if s < warmup else schedule(s)


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
    if name == "polynomial" and not base_lr > POLYNOMIAL_LR_END:
        raise ValueError(f"learning_rate={base_lr} must be larger than the polynomial schedule's end value "
                         f"{POLYNOMIAL_LR_END}")
    multiplier = lr_multiplier(name, num_warmup_steps or 0, num_training_steps or 0, base_lr, num_cycles, power)
    return LambdaLR(optimizer, multiplier)
