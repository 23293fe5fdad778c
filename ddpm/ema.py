"""Exponential moving average (EMA) of a model's parameters, with the warmup decay of train_unconditional.py.

After the n-th optimiser step the shadow weights move towards the live ones,

    shadow <- decay_n * shadow + (1 - decay_n) * param,
    decay_n = min(max_decay, 1 - (1 + (n - 1) / inv_gamma) ** -power),    decay_1 = 0,

the warmup of Karras/Crowson as used by diffusers' ``EMAModel(use_ema_warmup=True)``. Step counting matches
diffusers exactly: ``EMAModel.get_decay(optimization_step)`` uses ``step = optimization_step - 1`` (its
``update_after_step`` is 0 in the script) and returns 0 when that is <= 0, so the first update copies the
weights and the second uses ``1 - 2 ** -power``. With inv_gamma=1, power=3/4 the decay reaches 0.999 after
about 10k steps and 0.9999 after about 215k.

Only parameters are averaged (buffers are not), as in diffusers. Update once per optimiser step, never per
micro-batch of gradient accumulation. The shadow weights stay in float32 on the parameters' device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def ema_decay(step: int, max_decay: float = 0.9999, inv_gamma: float = 1.0, power: float = 0.75) -> float:
    """The decay used by the ``step``-th update (1-based), as diffusers' ``EMAModel.get_decay(step)``."""
    n = step - 1
    if n <= 0:
        return 0.0
    return max(0.0, min(max_decay, 1.0 - (1.0 + n / inv_gamma) ** -power))


def ema_update_(shadow: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """``shadow <- shadow + (1 - decay) (param - shadow)`` in place, for every pair in one fused call.

    diffusers' ``EMAModel.step`` rounds three times (``s - (1 - d) * (s - p)``); this rounds as ``torch.lerp``
    does, so the shadow weights are within an ulp of diffusers' (1.2e-7 here), not bitwise equal. Rounding as
    diffusers does takes three passes over the weights instead of one: 3-4x the time of this update
    (docs/architecture.md, "Hand-written or library").
    """
    torch._foreach_lerp_(shadow, params, 1.0 - decay)


class EMA:
    """Shadow copy of ``model``'s parameters, keyed by parameter name.

    ``step(model)`` after each optimiser step; ``copy_to(model)`` writes the averaged weights into a model of
    the same architecture (e.g. a copy of the UNet used for sampling and saving); ``state_dict()`` /
    ``load_state_dict()`` for checkpoints.
    """

    def __init__(self, model: nn.Module, max_decay: float = 0.9999, inv_gamma: float = 1.0,
                 power: float = 0.75) -> None:
        if not 0.0 <= max_decay <= 1.0:
            raise ValueError(f"ema_max_decay={max_decay} must be in [0, 1]")
        if inv_gamma <= 0:
            raise ValueError(f"ema_inv_gamma={inv_gamma} must be positive")
        if power <= 0:
            raise ValueError(f"ema_power={power} must be positive")
        self.max_decay = max_decay
        self.inv_gamma = inv_gamma
        self.power = power
        self.optimization_step = 0  # number of updates so far
        self.decay = 0.0  # the decay used by the last update (diffusers' cur_decay_value)
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in model.named_parameters()
        }
        self._bound: tuple[nn.Module, list[tuple[torch.Tensor, nn.Parameter]]] | None = None  # see _pairs

    @torch.no_grad()
    def step(self, model: nn.Module) -> float:
        """One EMA update from ``model``'s current parameters; returns the decay it used."""
        self.optimization_step += 1
        self.decay = ema_decay(self.optimization_step, self.max_decay, self.inv_gamma, self.power)
        pairs = self._pairs(model)
        trained = [(s, p.detach().float()) for s, p in pairs if p.requires_grad]
        if trained:
            ema_update_([s for s, _ in trained], [p for _, p in trained], self.decay)
        for s, p in pairs:
            if not p.requires_grad:
                s.copy_(p.detach())  # frozen parameters are copied, as diffusers does
        return self.decay

    def _pairs(self, model: nn.Module) -> list[tuple[torch.Tensor, nn.Parameter]]:
        # (shadow, parameter) in a fixed order, matched by name once per model rather than on every step
        if self._bound is None or self._bound[0] is not model:
            params = dict(model.named_parameters())
            self._check_names(params.keys(), "model")
            self._bound = (model, [(shadow, params[name]) for name, shadow in self.shadow.items()])
        return self._bound[1]

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model``'s parameters (cast to each parameter's dtype)."""
        params = dict(model.named_parameters())
        self._check_names(params.keys(), "model")
        for name, shadow in self.shadow.items():
            params[name].copy_(shadow)

    def state_dict(self) -> dict[str, Any]:
        """``{"optimization_step", "decay", "max_decay", "inv_gamma", "power", "shadow": {name: tensor}}``."""
        return {
            "optimization_step": self.optimization_step,
            "decay": self.decay,
            "max_decay": self.max_decay,
            "inv_gamma": self.inv_gamma,
            "power": self.power,
            "shadow": {name: t.detach().clone() for name, t in self.shadow.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        shadow = state["shadow"]
        self._check_names(shadow.keys(), "EMA state")
        for name, t in shadow.items():
            if t.shape != self.shadow[name].shape:
                raise ValueError(f"EMA state: {name} has shape {tuple(t.shape)}, the model has "
                                 f"{tuple(self.shadow[name].shape)}")
        self.shadow = {name: shadow[name].to(self.shadow[name].device, torch.float32).clone() for name in self.shadow}
        self._bound = None  # new shadow tensors
        self.optimization_step = int(state["optimization_step"])
        self.decay = float(state.get("decay", ema_decay(self.optimization_step, self.max_decay, self.inv_gamma,
                                                          self.power)))

    def _check_names(self, names: Any, what: str) -> None:
        names = set(names)
        if names != set(self.shadow):
            missing = sorted(set(self.shadow) - names)[:3]
            extra = sorted(names - set(self.shadow))[:3]
            raise ValueError(f"{what} parameters do not match the EMA's: missing {missing}, unexpected {extra}")
