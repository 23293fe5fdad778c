"""The UNet cases: forward, forward+backward and a training step, eager and (with --compile) compiled."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from benchmarks.harness import DDPM, DIFFUSERS, Row, Side, autocast, summary, synchronizer, time_interleaved
from benchmarks.plan import GOAL, Plan

# ---- the cases ---------------------------------------------------------------------------------------------

class ReferenceEMA:
    """The same EMA code for both sides, so the training step compares the UNets and schedulers: ddpm.ema.EMA
    when present, else an in-place lerp of every parameter."""

    def __init__(self, model: nn.Module) -> None:
        self.ema: Any = None
        try:
            from ddpm.ema import EMA

            self.ema = EMA(model)
        except ImportError:
            pass
        self.model = model
        self.shadow = [] if self.ema is not None else [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def step(self) -> None:
        if self.ema is not None:
            self.ema.step(self.model)
        else:
            for s, p in zip(self.shadow, self.model.parameters()):
                s.lerp_(p, 1 - 0.9999)


class TrainerParts(NamedTuple):
    optimizer: torch.optim.Optimizer
    ema: Any  # diffusers' EMAModel, ddpm.ema.EMA or ReferenceEMA
    update_ema: Callable[[], object]


def trainer_parts(model: nn.Module, library: str | None, device: torch.device) -> TrainerParts:
    """The optimiser and the EMA of a training step. ``library=None``: the same code on both sides (torch's default
    AdamW, ``ReferenceEMA``), so the step compares the UNets and schedulers. ``"diffusers"``: as
    train_unconditional.py makes them (default AdamW, ``EMAModel`` with warmup); ``"ddpm"``: as ``ddpm.train``
    does (fused AdamW on a CPU, ``ddpm.ema.EMA``). Not included: the allocator settings ddpm.train makes for a CPU
    process (process-wide, so they cannot be interleaved)."""
    fused = None
    if library == DDPM:
        from ddpm.training.cpu import training_on_cpu

        fused = True if training_on_cpu(device) else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8,
                                  fused=fused)
    if library == DIFFUSERS:
        import diffusers
        from diffusers.training_utils import EMAModel

        unet: Any = model  # a UNet2DModel
        ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75,
                       model_cls=diffusers.UNet2DModel, model_config=unet.config)
        return TrainerParts(optimizer, ema, lambda: ema.step(model.parameters()))
    if library == DDPM:
        from ddpm.ema import EMA

        own = EMA(model)
        return TrainerParts(optimizer, own, lambda: own.step(model))
    reference = ReferenceEMA(model)
    return TrainerParts(optimizer, reference, reference.step)


def make_train_step(model: nn.Module, scheduler: Any, clean: torch.Tensor, precision: str, seed: int = 0,
                    trainer: str | None = None) -> Callable[[], None]:
    """One step of train_unconditional.py: noise, add_noise, predict, MSE loss in fp32, backward, clip the
    gradient norm to 1, AdamW, zero_grad, EMA update; optimiser and EMA from ``trainer_parts(model, trainer)``."""
    device = clean.device
    ctx = autocast(device, precision)
    optimizer, _, update_ema = trainer_parts(model, trainer, device)
    generator = torch.Generator(device).manual_seed(seed)
    model.train()

    def step() -> None:
        noise = torch.randn(clean.shape, generator=generator, device=device)
        timesteps = torch.randint(0, 1000, (clean.shape[0],), generator=generator, device=device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        with ctx():
            prediction = model(noisy, timesteps).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema()

    return step


def unet_rows(name: str, models: dict[str, nn.Module], sides: list[Side], plan: Plan, device: torch.device,
              precision: str, flops_per_image: dict[str, int], inputs: Callable[[int], tuple[torch.Tensor, ...]],
              log: Callable[[str], None]) -> list[Row]:
    sync, ctx = synchronizer(device), autocast(device, precision)
    rows = []
    for batch in plan.forward_batches:
        x, t, _ = inputs(batch)

        def forward(model: nn.Module, x: torch.Tensor = x, t: torch.Tensor = t) -> Callable[[], None]:
            def call() -> None:
                with torch.no_grad(), ctx():
                    model(x, t)
            return call

        times = time_interleaved({s.name: forward(models[s.name]) for s in sides}, plan.repeats, plan.warmup, sync)
        rows.append(Row(f"{name} forward b{batch}", precision, times, flops_per_image["forward"] * batch, GOAL))
        log(summary(rows[-1], sides))
        ours: list[Any] = [models[s.name] for s in sides if s.library == DDPM]
        if ours:
            # A sampling loop's calls: ddpm inside one frozen_weights() block (what its Pipeline does), so each
            # convolution weight is reordered for oneDNN once. diffusers is untouched by it.
            with ours[0].frozen_weights():
                times = time_interleaved({s.name: forward(models[s.name]) for s in sides}, plan.repeats,
                                         plan.warmup, sync)
            rows.append(Row(f"{name} forward b{batch}, ddpm in frozen_weights()", precision, times,
                            flops_per_image["forward"] * batch, GOAL))
            log(summary(rows[-1], sides))

    x, t, target = inputs(plan.backward_batch)

    def forward_backward(model: nn.Module) -> Callable[[], None]:
        def call() -> None:
            model.zero_grad(set_to_none=True)
            with ctx():
                out = model(x, t).sample
            F.mse_loss(out.float(), target).backward()
        return call

    for model in models.values():
        model.train()
    times = time_interleaved({s.name: forward_backward(models[s.name]) for s in sides}, plan.repeats, plan.warmup,
                             sync)
    for model in models.values():
        model.eval().zero_grad(set_to_none=True)
    rows.append(Row(f"{name} forward+backward b{plan.backward_batch}", precision, times,
                    flops_per_image["backward"] * plan.backward_batch, GOAL))
    log(summary(rows[-1], sides))

    clean = inputs(plan.train_batch)[0].clamp(-1, 1)
    # The training step twice: the same optimiser and EMA code on both sides (the UNets and schedulers compared),
    # then each library's own, as its trainer makes them (trainer_parts).
    for suffix, own in (("", False), (", optimiser and EMA as each trainer makes them", True)):
        steps = {s.name: make_train_step(copy.deepcopy(models[s.name]), s.scheduler("ddpm"), clean, precision,
                                         trainer=s.library if own else None) for s in sides}
        times = time_interleaved(steps, plan.repeats, plan.warmup, sync)
        rows.append(Row(f"{name} train step b{plan.train_batch}{suffix}", precision, times,
                        flops_per_image["backward"] * plan.train_batch, GOAL,
                        {"images/s": {s: plan.train_batch / statistics.median(v) for s, v in times.items()}}))
        log(summary(rows[-1], sides))
    return rows


def compile_rows(name: str, models: dict[str, nn.Module], sides: list[Side], plan: Plan, device: torch.device,
                 precision: str, flops_per_image: dict[str, int], inputs: Callable[[int], tuple[torch.Tensor, ...]],
                 log: Callable[[str], None]) -> list[Row]:
    """``torch.compile`` (inductor, default mode) of each UNet: compiled ddpm against compiled diffusers, forward at
    the largest forward batch and forward+backward at the backward batch. The compile times (first call) go in
    the row's extra column. Under compile ddpm runs its plain layers (the CPU kernels' door is shut).

    Dynamo's cache lives on the code object, so every UNet of a class shares it: after 8 entries (configs x
    precisions x grad modes) it runs that code eagerly, silently. The cache is emptied first, and a first call
    that compiles no graph is an error, not a row."""
    sync, ctx = synchronizer(device), autocast(device, precision)
    rows = []
    batch = max(plan.forward_batches)
    x, t, _ = inputs(batch)
    torch._dynamo.reset()
    compiled = {s.name: torch.compile(models[s.name], backend=plan.compile_backend) for s in sides}

    def forward(model: Callable[..., Any]) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad(), ctx():
                model(x, t)
        return call

    def first_calls(fns: dict[str, Callable[[], None]]) -> dict[str, float]:
        seconds = {}
        for key, fn in fns.items():
            graphs = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            fn()
            sync()
            seconds[key] = time.perf_counter() - start
            if counters["stats"]["unique_graphs"] == graphs:
                raise RuntimeError(f"{name} {precision}: torch.compile made no graph for the {key} UNet "
                                   "(it ran eagerly)")
        return seconds

    fns = {k: forward(m) for k, m in compiled.items()}
    compile_s = first_calls(fns)
    times = time_interleaved(fns, plan.repeats, warmup=2, sync=sync)
    rows.append(Row(f"{name} torch.compile forward b{batch}", precision, times, flops_per_image["forward"] * batch,
                    extra={"compile s": compile_s}))
    log(summary(rows[-1], sides) + f"; compile {compile_s}")

    xb, tb, target = inputs(plan.backward_batch)

    def forward_backward(model: Callable[..., Any], module: nn.Module) -> Callable[[], None]:
        def call() -> None:
            module.zero_grad(set_to_none=True)
            with ctx():
                out = model(xb, tb).sample
            F.mse_loss(out.float(), target).backward()
        return call

    for model in models.values():
        model.train()
    fns = {k: forward_backward(m, models[k]) for k, m in compiled.items()}
    compile_s = first_calls(fns)
    times = time_interleaved(fns, plan.repeats, warmup=2, sync=sync)
    for model in models.values():
        model.eval().zero_grad(set_to_none=True)
    rows.append(Row(f"{name} torch.compile forward+backward b{plan.backward_batch}", precision, times,
                    flops_per_image["backward"] * plan.backward_batch, extra={"compile s": compile_s}))
    log(summary(rows[-1], sides) + f"; compile {compile_s}")
    return rows
