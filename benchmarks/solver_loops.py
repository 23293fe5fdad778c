"""Scheduler overhead of the fast samplers against diffusers: set_timesteps(20) plus a 20-step loop with a zero
model output, batch 8 x 3 x 32 x 32, fp32, one thread. Interleaved A/B in one process; prints medians and the
ratio diffusers/ddpm (> 1: ddpm is faster). Run on an idle machine for figures to record:

    python benchmarks/solver_loops.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import ddpm

CASES: list[tuple[str, dict[str, Any]]] = [
    ("DPMSolverMultistepScheduler", {}), ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("UniPCMultistepScheduler", {}), ("EulerDiscreteScheduler", {}), ("HeunDiscreteScheduler", {})]


def loop(scheduler: Any, x0: torch.Tensor, steps: int) -> Callable[[], None]:
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters

    def run() -> None:
        scheduler.set_timesteps(steps)
        g = torch.Generator().manual_seed(0)
        x = x0 * float(scheduler.init_noise_sigma)
        zero = torch.zeros_like(x)
        for t in scheduler.timesteps:
            kw = {"generator": g} if takes_generator else {}
            x = scheduler.step(zero, t, scheduler.scale_model_input(x, t), **kw).prev_sample
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    import diffusers  # the test extra

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    x0 = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name, kw in CASES:
        a = loop(getattr(diffusers, name)(**kw), x0, args.steps)
        b = loop(getattr(ddpm, name)(**kw), x0, args.steps)
        for f in (a, b, a, b):  # warm-up
            f()
        ta, tb = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            a()
            t1 = time.perf_counter()
            b()
            ta.append(t1 - t0)
            tb.append(time.perf_counter() - t1)
        paired = statistics.median(x / y for x, y in zip(ta, tb))
        print(f"{name} {kw or ''}: diffusers {statistics.median(ta) * 1e3:.2f} ms, ddpm {statistics.median(tb) * 1e3:.2f} "
              f"ms, ratio {statistics.median(ta) / statistics.median(tb):.2f} (paired {paired:.2f})")


if __name__ == "__main__":
    main()
