"""Benchmark ddpm against diffusers: same machine, same weights, same precision, interleaved in one process.

    python benchmarks/run.py                 # full run (tens of minutes on 2 CPU cores) -> benchmarks/RESULTS.md
    python benchmarks/run.py --quick         # unet-small and butterflies-32, few repeats, short sampling loops
    python benchmarks/run.py --compile       # add compiled ddpm against compiled diffusers (minutes of compiling)
    python benchmarks/run.py --profile       # add torch.profiler tables of both UNets (on by default in full)
    python benchmarks/run.py --device cuda   # the same cases on a GPU, plus fp16 and torch.compile
    python benchmarks/run.py --aa            # A/A run: diffusers against itself, shows the machine's noise floor

How it measures (see benchmarks/README.md): diffusers' ``UNet2DModel`` is built with seeded random weights and
saved; both libraries load that folder; their outputs must match before anything is timed. Every case calls the
two libraries alternately (A B, B A, ...) and reports the median and the min-max of the repeats. Ratios are
diffusers time / ddpm time, so > 1 means ddpm is faster. Peak memory of a training step is measured in a fresh
subprocess per library so the two peaks do not mix.

The pieces, one file per case family: plan.py (configs, batch sizes, repeats), harness.py (the two libraries,
interleaved timing, FLOPs, result rows), unet_cases.py (forward, forward+backward, training step, compiled),
sampling_cases.py (pipelines, scheduler loops), memory.py (peak memory in fresh processes), profiling.py
(torch.profiler tables), report.py (RESULTS.md). This file runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run from a clean clone without installing the package
    sys.path.insert(1, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

# The pieces, one file per case family; re-exported here for tests/test_benchmarks_smoke.py and interactive use.
from benchmarks.harness import (  # noqa: E402,F401
                                DDPM, DIFFUSERS, OutputMismatch, Report, Row, Side, autocast, build_models,
                                conv_peak, count_flops, make_side, results_table, summary, supported_precisions,
                                synchronizer, time_interleaved, verify_match)
from benchmarks.memory import train_memory, train_worker  # noqa: E402,F401
from benchmarks.plan import CASES, CONFIG_BATCHES, CONFIGS, FULL, QUICK, Plan  # noqa: E402,F401
from benchmarks.profiling import profile_section  # noqa: E402
from benchmarks.report import previous_findings, render  # noqa: E402,F401
from benchmarks.sampling_cases import sampling_rows, scheduler_rows  # noqa: E402
from benchmarks.unet_cases import compile_rows, make_train_step, unet_rows  # noqa: E402,F401


# ---- the run -----------------------------------------------------------------------------------------------

def run_benchmark(plan: Plan, sides: list[Side], device: torch.device, configs: dict[str, dict[str, Any]] = CONFIGS,
                  log: Callable[[str], None] = print, workdir: Path | None = None,
                  progress: Callable[[Report], None] = lambda report: None) -> Report:
    """Every case of ``plan``: verify both sides agree, then time them interleaved. ``sides[0]`` is the baseline.
    ``progress(report)`` is called after each group of cases with the rows so far."""
    report = Report(plan, device, [s.name for s in sides])
    sync = synchronizer(device)
    with contextlib.ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ddpm-bench-")))
        kept: dict[str, dict[str, nn.Module]] = {}
        for precision in plan.precisions if "unet" in plan.cases else []:
            report.peaks[precision] = conv_peak(device, precision, plan.conv_peak_batch, max(plan.repeats, 3))
            log(f"conv peak {precision}: {report.peaks[precision]:.0f} GFLOP/s")
        for name in plan.configs:
            config = configs[name]
            models, path = build_models(config, sides, root / name)
            models = {k: m.to(device) for k, m in models.items()}
            reference = models[sides[0].name]
            channels, size = config.get("in_channels", 3), config["sample_size"]
            generator = torch.Generator().manual_seed(1)

            def inputs(batch: int) -> tuple[torch.Tensor, ...]:
                x = torch.randn(batch, channels, size, size, generator=generator)
                t = torch.randint(0, 1000, (batch,), generator=generator)
                target = torch.randn(batch, channels, size, size, generator=generator)
                return x.to(device), t.to(device), target.to(device)

            x, t, _ = inputs(2)
            for side in sides[1:]:
                report.matches[name] = verify_match(reference, models[side.name], x, t)
            log(f"{name}: outputs match (max rel. difference {report.matches[name]:.2g})")

            def fwd(x: torch.Tensor = x[:1], t: torch.Tensor = t[:1]) -> None:
                with torch.no_grad():
                    reference(x, t)

            def fwd_bwd(x: torch.Tensor = x[:1], t: torch.Tensor = t[:1]) -> None:
                reference(x, t).sample.float().square().mean().backward()

            flops = {"forward": count_flops(fwd), "backward": count_flops(fwd_bwd, backward=True)}
            reference.zero_grad(set_to_none=True)
            if plan.profile:  # first: cheap, and the most useful part of a run that gets cut short
                report.profile += profile_section(name, models, sides, plan, device, inputs)
                log(f"{name} profiled")
                progress(report)
            own = replace(plan, **CONFIG_BATCHES.get(name, {}))  # this config's batch sizes
            for precision in plan.precisions:
                if "unet" in plan.cases:
                    report.rows += unet_rows(name, models, sides, own, device, precision, flops, inputs, log)
                    progress(report)
                if "unet" in plan.cases and plan.compile:
                    report.rows += compile_rows(name, models, sides, own, device, precision, flops, inputs, log)
                    progress(report)
                for side in sides if "memory" in plan.cases and plan.memory_steps else []:
                    result = train_memory(side, path, device, precision, own.train_batch, plan.memory_steps)
                    report.memory.append({"config": name, "precision": precision, "side": side.name, **result})
                    log(f"{name} {precision} training-step memory, {side.name}: peak "
                        f"{report.memory[-1]['peak_rss'] / 2**30:.3f} GiB")
                progress(report)
            if name in plan.sampling_configs and "sampling" in plan.cases:
                kept[name] = models  # sampled last: the long runs should not hold up the other cases
            del models
        if "scheduler" in plan.cases:
            report.rows += scheduler_rows(sides, plan, device)
            log("scheduler loops: " + "; ".join(summary(r, sides) for r in report.rows if r.case.startswith("sch")))
            progress(report)
        for (name, models), precision in ((kv, p) for kv in kept.items() for p in plan.precisions):
            rows, summaries = sampling_rows(models, sides, plan, device, precision, name, log)
            report.rows += rows
            report.sampling += summaries
            progress(report)
        for precision in plan.precisions if "unet" in plan.cases else []:  # again: the ceiling is the better
                again = conv_peak(device, precision, plan.conv_peak_batch, max(plan.repeats, 3))
                report.notes.append(f"conv peak {precision}: {report.peaks[precision]:.0f} GFLOP/s at the start, "
                                    f"{again:.0f} at the end; the table uses the higher")
                report.peaks[precision] = max(report.peaks[precision], again)
    sync()
    return report



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="butterflies-32 only, few repeats, short loops")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--configs", help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--precisions", help="comma-separated subset of fp32,bf16,fp16 (default: all supported)")
    parser.add_argument("--repeats", type=int, help="timed calls per library per case")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.profiler tables (default: on in a full run, off with --quick)")
    parser.add_argument("--sampling", help="sampling runs as kind:steps[:repeats], e.g. ddim:50:3,ddpm:1000:1")
    parser.add_argument("--cases", help=f"comma-separated subset of {','.join(CASES)} (default: all)")
    parser.add_argument("--profile-only", action="store_true", help="verify and profile, time nothing")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="add torch.compile cases (default: on with --device cuda)")
    parser.add_argument("--aa", action="store_true", help="A/A run: diffusers against itself (noise floor)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md", help="where to write the report")
    parser.add_argument("--train-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train_worker:
        print(json.dumps(train_worker(json.loads(args.train_worker))))
        return 0

    device = torch.device(args.device)
    plan = QUICK if args.quick else FULL
    available = supported_precisions(device)
    precisions = tuple(args.precisions.split(",")) if args.precisions else available
    for p in precisions:
        if p not in available:
            raise SystemExit(f"--precisions: {p!r} is not supported on {device} (supported: {', '.join(available)})")
    for case in args.cases.split(",") if args.cases else []:
        if case not in CASES:
            raise SystemExit(f"--cases: unknown case {case!r}; choose from {', '.join(CASES)}")
    configs = tuple(args.configs.split(",")) if args.configs else plan.configs
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"--configs: unknown config {c!r}; choose from {', '.join(CONFIGS)}")
    plan = replace(plan, precisions=precisions, configs=configs,
                   sampling_configs=tuple(c for c in plan.sampling_configs if c in configs),
                   repeats=args.repeats or plan.repeats,
                   profile=args.profile_only or (plan.profile if args.profile is None else args.profile),
                   cases=() if args.profile_only else tuple(args.cases.split(",")) if args.cases else plan.cases,
                   compile=device.type == "cuda" if args.compile is None else args.compile)
    if args.sampling:
        runs = [part.split(":") for part in args.sampling.split(",")]
        if any(len(r) not in (2, 3) or r[0] not in ("ddim", "ddpm") for r in runs):
            raise SystemExit(f"--sampling: {args.sampling!r} is not kind:steps[:repeats] with kind ddim or ddpm")
        plan = replace(plan, sampling=tuple((r[0], int(r[1])) for r in runs),
                       sampling_repeats=tuple(int(r[2]) if len(r) == 3 else 1 for r in runs))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sides = ([make_side(DIFFUSERS), make_side(DIFFUSERS, "diffusers-B")] if args.aa
             else [make_side(DIFFUSERS), make_side(DDPM)])
    start, load_start = time.time(), f"{os.getloadavg()[0]:.2f}"

    def log(message: str) -> None:
        print(f"[{time.time() - start:6.0f} s, load {os.getloadavg()[0]:.1f}] {message}", flush=True)

    command = ("python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    def write(report: Report, final: bool = False) -> None:
        findings = previous_findings(args.output)  # re-read: hand edits made during a long run survive
        if args.aa and final:
            report.notes.append("A/A run: both columns are diffusers, so every ratio should be 1.00 ± the noise.")
        if not final:
            report.notes.append("PARTIAL: the run was still going when this was written.")
        args.output.write_text(render(report, command, time.time() - start,
                                      (load_start, f"{os.getloadavg()[0]:.2f}"), findings))
        if not final:
            report.notes.pop()

    report = run_benchmark(plan, sides, device, log=log, progress=write)
    write(report, final=True)
    print("\n".join(results_table(report)))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

