"""The sampling cases: the pipelines (time inside and outside the UNet) and the scheduler loops on their own."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.harness import ModuleTimer, Row, Side, autocast, summary, synchronizer, time_interleaved
from benchmarks.plan import GOAL, Plan


def sampling_rows(models: dict[str, nn.Module], sides: list[Side], plan: Plan, device: torch.device, precision: str,
                  name: str, log: Callable[[str], None]) -> tuple[list[Row], list[dict[str, Any]]]:
    """The pipelines at ``plan.sampling_batch``; the UNet's own time is measured by hooks, the rest is the
    scheduler's and the pipeline's overhead."""
    sync, ctx = synchronizer(device), autocast(device, precision)
    rows, summaries = [], []
    for (kind, steps), repeats in zip(plan.sampling, plan.sampling_repeats):
        inside: dict[str, list[float]] = {s.name: [] for s in sides}
        calls = {}
        for side in sides:
            pipe = side.pipeline(models[side.name], side.scheduler(kind), kind)
            timer = ModuleTimer(models[side.name], sync)

            def call(pipe: Any = pipe, timer: ModuleTimer = timer, name: str = side.name, steps: int = steps) -> None:
                timer.total = 0.0
                with torch.no_grad(), ctx():
                    pipe(batch_size=plan.sampling_batch, generator=torch.Generator().manual_seed(0),
                         num_inference_steps=steps, output_type="pt")
                inside[name].append(timer.total)
            call(steps=2)  # warm-up: first-call kernel set-up for these shapes, lazy imports
            inside[side.name].clear()
            calls[side.name] = (call, timer)
        try:
            times = time_interleaved({k: c for k, (c, _) in calls.items()}, repeats, warmup=0, sync=sync)
        finally:
            for _, timer in calls.values():
                timer.remove()
        row = Row(f"{name} sampling {kind.upper()} {steps} steps b{plan.sampling_batch}", precision, times)
        rows.append(row)
        summaries.append({"case": row.case, "precision": precision, "steps": steps, "config": name,
                          "total": {k: statistics.median(v) for k, v in times.items()},
                          "outside": {k: statistics.median([a - b for a, b in zip(times[k], inside[k])])
                                      for k in times},
                          "inside": {k: statistics.median(v) for k, v in inside.items()}})
        log(summary(row, sides))
    return rows, summaries


def scheduler_rows(sides: list[Side], plan: Plan, device: torch.device) -> list[Row]:
    """Scheduler-only loops: a zero model output, so all the time is set_timesteps + step."""
    rows = []
    for kind, steps in plan.scheduler_steps:
        x = torch.randn(plan.scheduler_batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
        zero = torch.zeros_like(x)

        def loop(scheduler: Any) -> Callable[[], None]:
            def call() -> None:
                generator = torch.Generator(device).manual_seed(0)
                scheduler.set_timesteps(steps, device=device)
                sample = x
                for t in scheduler.timesteps:
                    sample = scheduler.step(zero, t, sample, generator=generator).prev_sample
            return call

        times = time_interleaved({s.name: loop(s.scheduler(kind)) for s in sides}, max(plan.repeats, 3), 1,
                                 synchronizer(device))
        rows.append(Row(f"scheduler loop {kind.upper()} {steps} steps b{plan.scheduler_batch}", "fp32", times,
                        goal=GOAL))
    return rows


