"""Noise drawing for the stochastic schedulers, seeded exactly as diffusers' ``randn_tensor``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

Generator = Union[torch.Generator, Sequence[torch.Generator], None]


def draw_noise(shape: Sequence[int], generator: Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    """N(0, I) noise drawn exactly as diffusers' ``randn_tensor`` draws it, so seeded runs match.

    A CPU generator with a non-CPU ``device`` draws on the CPU and copies over; a list of generators draws
    sample i of the batch from generator i (so each sample is reproducible whatever the batch size).
    """
    if generator is None or isinstance(generator, torch.Generator):  # the common case, kept cheap
        if generator is None or generator.device.type == device.type:
            return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    gens = list(generator) if isinstance(generator, Sequence) else [generator]
    if len(gens) not in (1, shape[0]):
        raise ValueError(f"generator: got a list of {len(gens)} generators for a batch of {shape[0]}")
    draw_on = device
    g_device = gens[0].device if gens[0] is not None else device
    if g_device.type != device.type:
        if g_device.type != "cpu":
            raise ValueError(f"generator is on {g_device} but the noise is wanted on {device}")
        draw_on = torch.device("cpu")
    if len(gens) == 1:
        return torch.randn(tuple(shape), generator=gens[0], device=draw_on, dtype=dtype).to(device)
    one = (1, *shape[1:])
    return torch.cat([torch.randn(one, generator=g, device=draw_on, dtype=dtype) for g in gens]).to(device)
