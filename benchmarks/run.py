"""Benchmark ddpm against diffusers: same machine, same weights, same precision, interleaved in one process.

    python benchmarks/run.py                 # full run (tens of minutes on 2 CPU cores) -> benchmarks/RESULTS.md
    python benchmarks/run.py --quick         # butterflies-32 only, few repeats, short sampling loops (~2-4 min)
    python benchmarks/run.py --profile       # add torch.profiler tables of both UNets (on by default in full)
    python benchmarks/run.py --device cuda   # the same cases on a GPU, plus fp16 and torch.compile
    python benchmarks/run.py --aa            # A/A run: diffusers against itself, shows the machine's noise floor

How it measures (see benchmarks/README.md): diffusers' ``UNet2DModel`` is built with seeded random weights and
saved; both libraries load that folder; their outputs must match before anything is timed. Every case calls the
two libraries alternately (A B, B A, ...) and reports the median and the min-max of the repeats. Ratios are
diffusers time / ddpm time, so > 1 means ddpm is faster. Peak memory of a training step is measured in a fresh
subprocess per library so the two peaks do not mix.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run from a clean clone without installing the package
    sys.path.insert(1, str(REPO))

DIFFUSERS, DDPM = "diffusers", "ddpm"
FINDINGS_START, FINDINGS_END = "<!-- findings:start -->", "<!-- findings:end -->"

# The two UNets of issue 5, as diffusers UNet2DModel kwargs.
CONFIGS: dict[str, dict[str, Any]] = {
    # The Hugging Face diffusion course's butterflies model (18.5M parameters).
    "butterflies-32": dict(
        sample_size=32, layers_per_block=2, block_out_channels=(64, 128, 128, 256),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    # The 35.7M CIFAR-10 model of Ho et al. 2020 (google/ddpm-cifar10-32).
    "cifar10-35.7M": dict(
        sample_size=32, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
    ),
}


@dataclass(frozen=True)
class Plan:
    """What one run measures. ``FULL`` and ``QUICK`` below; tests use a tiny one."""

    configs: tuple[str, ...]
    precisions: tuple[str, ...]
    forward_batches: tuple[int, ...] = (1, 8, 32)
    backward_batch: int = 16
    train_batch: int = 16
    repeats: int = 7  # timed calls per library per case
    warmup: int = 2
    memory_steps: int = 4  # training steps in each peak-memory subprocess (0: no memory measurement)
    sampling_configs: tuple[str, ...] = ("butterflies-32",)
    sampling_batch: int = 8
    sampling: tuple[tuple[str, int], ...] = (("ddim", 50), ("ddpm", 1000))
    sampling_repeats: tuple[int, ...] = (3, 1)  # per entry of ``sampling``
    scheduler_steps: tuple[tuple[str, int], ...] = (("ddpm", 1000), ("ddim", 50))
    scheduler_batch: int = 8
    conv_peak_batch: int = 16
    compile: bool = False
    profile: bool = True
    cases: tuple[str, ...] = ("unet", "memory", "scheduler", "sampling")  # a subset of CASES
    profile_batches: tuple[int, ...] = (1, 8)


CASES = ("unet", "memory", "scheduler", "sampling")
FULL = Plan(configs=tuple(CONFIGS), precisions=("fp32", "bf16"))
QUICK = Plan(configs=("butterflies-32",), precisions=("fp32", "bf16"), forward_batches=(1, 8), repeats=3,
             warmup=1, memory_steps=2, sampling=(("ddim", 10), ("ddpm", 20)), sampling_repeats=(2, 1),
             conv_peak_batch=8, profile=False)


# ---- the two libraries -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Side:
    """One library under test: how it loads a UNet, builds a scheduler, and wraps both in a pipeline."""

    name: str
    library: str  # "diffusers" or "ddpm"
    load_unet: Callable[[Path], nn.Module]
    scheduler: Callable[[str], Any]  # "ddpm" | "ddim" -> a scheduler with default settings
    pipeline: Callable[[nn.Module, Any, str], Callable[..., Any]]


def make_side(library: str, name: str | None = None) -> Side:
    if library == DIFFUSERS:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()

        def diffusers_pipeline(unet: nn.Module, scheduler: Any, kind: str) -> Any:
            cls = diffusers.DDIMPipeline if kind == "ddim" else diffusers.DDPMPipeline
            pipe: Any = cls(unet=unet, scheduler=scheduler)
            pipe.set_progress_bar_config(disable=True)
            return pipe

        schedulers = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}
        return Side(name or DIFFUSERS, DIFFUSERS, lambda path: diffusers.UNet2DModel.from_pretrained(path),
                    lambda kind: schedulers[kind](num_train_timesteps=1000), diffusers_pipeline)
    if library == DDPM:
        import ddpm

        def ddpm_pipeline(unet: nn.Module, scheduler: Any, kind: str) -> Any:
            pipe = ddpm.Pipeline(unet=unet, scheduler=scheduler)  # type: ignore[arg-type]
            pipe.set_progress_bar_config(disable=True)
            return pipe

        ours = {"ddpm": ddpm.DDPMScheduler, "ddim": ddpm.DDIMScheduler}
        return Side(name or DDPM, DDPM, lambda path: ddpm.UNet.from_pretrained(path),
                    lambda kind: ours[kind](num_train_timesteps=1000), ddpm_pipeline)
    raise ValueError(f"library={library!r} is not benchmarked; choose 'diffusers' or 'ddpm'")


class OutputMismatch(AssertionError):
    """The two libraries disagree on the same weights and inputs: timing them would compare different work."""


def build_models(config: dict[str, Any], sides: list[Side], workdir: Path, seed: int = 0
                 ) -> tuple[dict[str, nn.Module], Path]:
    """diffusers' UNet2DModel with seeded random weights, saved to ``workdir``; every side loads that folder."""
    import diffusers

    torch.manual_seed(seed)
    reference: Any = diffusers.UNet2DModel(**config)
    path = workdir / "unet"
    reference.save_pretrained(path)
    return {side.name: side.load_unet(path).eval() for side in sides}, path


def verify_match(reference: nn.Module, other: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                 rtol: float = 1e-4) -> float:
    """Max |difference| of the two UNets' fp32 outputs relative to max |reference output|; raises
    ``OutputMismatch`` above ``rtol`` (or on NaN)."""
    with torch.no_grad():
        a = reference(sample, timestep).sample.float()
        b = other(sample, timestep).sample.float()
    if a.shape != b.shape:
        raise OutputMismatch(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    error = ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
    if not error <= rtol:
        raise OutputMismatch(f"outputs differ: max |a - b| / max |a| = {error:.3g} > rtol={rtol:g}")
    return error


# ---- timing machinery --------------------------------------------------------------------------------------

def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def autocast(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """A factory of fresh autocast contexts: fp32 runs as is, bf16/fp16 through torch.autocast."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision not in ("bf16", "fp16"):
        raise ValueError(f"precision={precision!r} is not supported; choose fp32, bf16 or fp16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device.type, dtype=dtype)


def supported_precisions(device: torch.device) -> tuple[str, ...]:
    """fp32, plus bf16 where the hardware has it natively (AVX512-BF16/AMX on CPU), plus fp16 on CUDA."""
    if device.type == "cuda":
        return ("fp32", "bf16", "fp16") if torch.cuda.is_bf16_supported() else ("fp32", "fp16")
    flags = cpu_flags()
    return ("fp32", "bf16") if {"avx512_bf16", "amx_bf16"} & flags else ("fp32",)


def time_interleaved(fns: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them in turn (A B, B A, A B, ...) so that load on a shared
    machine hits every function alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


class ModuleTimer:
    """Wall time spent inside a module's forward, summed over calls (forward pre-hook and hook)."""

    def __init__(self, module: nn.Module, sync: Callable[[], None]) -> None:
        self.total, self.calls, self._start, self._sync = 0.0, 0, 0.0, sync
        self._handles = [module.register_forward_pre_hook(self._enter), module.register_forward_hook(self._exit)]

    def _enter(self, module: nn.Module, args: Any) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        self._sync()
        self.total += time.perf_counter() - self._start
        self.calls += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# ---- FLOPs -------------------------------------------------------------------------------------------------

class _AttentionShapes(TorchFunctionMode):
    """Records the FLOPs of every F.scaled_dot_product_attention call: 2*Lq*Lk*E for QK^T plus 2*Lq*Lk*Ev for
    the weighted sum of V, per batch*head."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            batch = q.numel() // (q.shape[-2] * q.shape[-1])
            self.flops += 2 * batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return func(*args, **(kwargs or {}))


def count_flops(fn: Callable[[], object], backward: bool = False) -> int:
    """FLOPs of one call of ``fn`` by FlopCounterMode. If the attention kernel in use is not in its table (it
    counts 0 for some CPU kernels), the attention FLOPs are added by hand (backward = 2.5x forward, as
    FlopCounterMode counts flash attention)."""
    attention = _AttentionShapes()
    with attention, FlopCounterMode(display=False) as counter:
        fn()
    total = counter.get_total_flops()
    counted = sum(v for k, v in counter.get_flop_counts().get("Global", {}).items() if "attention" in str(k))
    if counted == 0:
        total += int(attention.flops * (3.5 if backward else 1.0))
    return total


def conv_peak(device: torch.device, precision: str, batch: int, repeats: int) -> float:
    """GFLOP/s of a large 3x3 convolution (256 -> 256 channels, 32x32), best of NCHW and channels_last."""
    sync, ctx = synchronizer(device), autocast(device, precision)
    conv = nn.Conv2d(256, 256, 3, padding=1, bias=False).to(device)
    x = torch.randn(batch, 256, 32, 32, device=device)
    flops = 2 * batch * 256 * 256 * 9 * 32 * 32
    best = 0.0
    for fmt in (torch.contiguous_format, torch.channels_last):
        c, xx = copy.deepcopy(conv).to(memory_format=fmt), x.to(memory_format=fmt)

        def call(c: nn.Module = c, xx: torch.Tensor = xx) -> None:
            with torch.no_grad(), ctx():
                c(xx)

        median = statistics.median(time_interleaved({"conv": call}, repeats, warmup=2, sync=sync)["conv"])
        best = max(best, flops / median / 1e9)
    return best


# ---- results -----------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One case: seconds per call for each side; ``flops`` per call; ``goal`` the ratio it should reach."""

    case: str
    precision: str
    times: dict[str, list[float]]
    flops: float | None = None
    goal: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    load: float = field(default_factory=lambda: os.getloadavg()[0])  # 1-min load average when the row finished

    def median(self, side: str) -> float:
        return statistics.median(self.times[side])

    def ratio(self, baseline: str, ours: str) -> float:
        return self.median(baseline) / self.median(ours)

    def paired_ratio(self, baseline: str, ours: str) -> float:
        """Median over repeats of baseline_i / ours_i: the two calls of a repeat run back to back, so they
        see nearly the same load; steadier than the ratio of medians on a shared machine."""
        return statistics.median(a / b for a, b in zip(self.times[baseline], self.times[ours]))


@dataclass
class Report:
    plan: Plan
    device: torch.device
    sides: list[str]  # [baseline, ours]
    rows: list[Row] = field(default_factory=list)
    peaks: dict[str, float] = field(default_factory=dict)  # precision -> conv GFLOP/s
    memory: list[dict[str, Any]] = field(default_factory=list)
    sampling: list[dict[str, Any]] = field(default_factory=list)
    matches: dict[str, float] = field(default_factory=dict)
    profile: list[str] = field(default_factory=list)  # markdown lines
    notes: list[str] = field(default_factory=list)


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.4g} ms" if seconds < 1 else f"{seconds:.4g} s"


def fmt_times(times: list[float]) -> str:
    median, lo, hi = statistics.median(times), min(times), max(times)
    scale, unit = (1e3, "ms") if median < 1 else (1.0, "s")
    return f"{median * scale:.4g} {unit} ({lo * scale:.4g}–{hi * scale:.4g})"


def results_table(report: Report) -> list[str]:
    base, ours = report.sides
    lines = [f"| case | prec | {base} median (min–max) | {ours} median (min–max) | ratio {base}/{ours} "
             f"| paired ratio | goal | GFLOP/s {base} / {ours} | % of conv peak {base} / {ours} | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report.rows:
        ratio = row.ratio(base, ours)
        goal = "" if row.goal is None else f"≥{row.goal:g} {'✓' if ratio >= row.goal else '✗'}"
        gflops = peak = ""
        if row.flops:
            rates = [row.flops / row.median(side) / 1e9 for side in (base, ours)]
            gflops = " / ".join(f"{r:.3g}" for r in rates)
            if report.peaks.get(row.precision):
                peak = " / ".join(f"{100 * r / report.peaks[row.precision]:.0f}%" for r in rates)
        lines.append(f"| {row.case} | {row.precision} | {fmt_times(row.times[base])} | {fmt_times(row.times[ours])} "
                     f"| {ratio:.2f} | {row.paired_ratio(base, ours):.2f} | {goal} | {gflops} | {peak} "
                     f"| {row.load:.1f} |")
    return lines


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


def make_train_step(model: nn.Module, scheduler: Any, clean: torch.Tensor, precision: str, seed: int = 0
                    ) -> Callable[[], None]:
    """One step of train_unconditional.py: noise, add_noise, predict, MSE loss in fp32, backward, clip the
    gradient norm to 1, AdamW, zero_grad, EMA update."""
    device = clean.device
    ctx = autocast(device, precision)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    ema = ReferenceEMA(model)
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
        ema.step()

    return step


def summary(row: Row, sides: list[Side]) -> str:
    base, ours = (s.name for s in sides)
    return (f"{row.case} {row.precision}: {base} {fmt_times(row.times[base])}, {ours} {fmt_times(row.times[ours])}, "
            f"ratio {row.ratio(base, ours):.2f} (paired {row.paired_ratio(base, ours):.2f})")


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
        rows.append(Row(f"{name} forward b{batch}", precision, times, flops_per_image["forward"] * batch, 1.2))
        log(summary(rows[-1], sides))
        ours = [m for s in sides if s.library == DDPM for m in [models[s.name]]]
        if ours:
            # A sampling loop's calls: ddpm inside one frozen_weights() block (what its Pipeline does), so each
            # convolution weight is reordered for oneDNN once. diffusers is untouched by it.
            with ours[0].frozen_weights():
                times = time_interleaved({s.name: forward(models[s.name]) for s in sides}, plan.repeats,
                                         plan.warmup, sync)
            rows.append(Row(f"{name} forward b{batch}, ddpm in frozen_weights()", precision, times,
                            flops_per_image["forward"] * batch, 1.2))
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
                    flops_per_image["backward"] * plan.backward_batch, 1.2))
    log(summary(rows[-1], sides))

    clean = inputs(plan.train_batch)[0].clamp(-1, 1)
    steps = {s.name: make_train_step(copy.deepcopy(models[s.name]), s.scheduler("ddpm"), clean, precision)
             for s in sides}
    times = time_interleaved(steps, plan.repeats, plan.warmup, sync)
    rows.append(Row(f"{name} train step b{plan.train_batch}", precision, times,
                    flops_per_image["backward"] * plan.train_batch, 1.2,
                    {"images/s": {s: plan.train_batch / statistics.median(v) for s, v in times.items()}}))
    log(summary(rows[-1], sides))
    return rows


def compile_rows(name: str, models: dict[str, nn.Module], sides: list[Side], plan: Plan, device: torch.device,
                 precision: str, flops_per_image: dict[str, int], inputs: Callable[[int], tuple[torch.Tensor, ...]],
                 log: Callable[[str], None]) -> list[Row]:
    """torch.compile (inductor, default mode) of each UNet, forward at the largest batch."""
    sync, ctx = synchronizer(device), autocast(device, precision)
    batch = max(plan.forward_batches)
    x, t, _ = inputs(batch)
    compiled = {s.name: torch.compile(models[s.name]) for s in sides}

    def forward(model: Callable[..., Any]) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad(), ctx():
                model(x, t)
        return call

    times = time_interleaved({k: forward(m) for k, m in compiled.items()}, plan.repeats, warmup=3, sync=sync)
    log(f"{name} compiled forward b{batch}")
    return [Row(f"{name} torch.compile forward b{batch}", precision, times, flops_per_image["forward"] * batch, 1.2)]


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
                        goal=2.0))
    return rows


# ---- peak memory of a training step, one fresh process per library -----------------------------------------

def current_rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """This process's RSS high-water mark in bytes. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss
    over exec(), so a worker forked from a big parent would report the parent's peak."""
    try:
        match = re.search(r"^VmHWM:\s*(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        match = None
    if match:
        return int(match.group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: load the checkpoint with one library, run a few training steps, report peaks."""
    device = torch.device(spec["device"])
    side = make_side(spec["library"])
    model: Any = side.load_unet(Path(spec["checkpoint"])).to(device)
    size = model.config.sample_size
    clean = torch.rand(spec["batch"], model.config.in_channels, size, size,
                       generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    step = make_train_step(model, side.scheduler("ddpm"), clean, spec["precision"])
    sync = synchronizer(device)
    rss_before = current_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    result = {"peak_rss": peak_rss(), "rss_before": rss_before, "times": times}
    if device.type == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    return result


def train_memory(side: Side, checkpoint: Path, device: torch.device, precision: str, batch: int, steps: int
                 ) -> dict[str, Any]:
    spec = {"library": side.library, "checkpoint": str(checkpoint), "device": str(device), "precision": precision,
            "batch": batch, "steps": steps}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--train-worker", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"training-step worker for {side.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
            for precision in plan.precisions:
                if "unet" in plan.cases:
                    report.rows += unet_rows(name, models, sides, plan, device, precision, flops, inputs, log)
                    progress(report)
                if "unet" in plan.cases and plan.compile:
                    report.rows += compile_rows(name, models, sides, plan, device, precision, flops, inputs, log)
                for side in sides if "memory" in plan.cases and plan.memory_steps else []:
                    result = train_memory(side, path, device, precision, plan.train_batch, plan.memory_steps)
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


# ---- profile -----------------------------------------------------------------------------------------------

# Op-name prefixes -> category, checked in order; self CPU time is summed per category.
CATEGORIES = (
    ("conv, oneDNN", ("aten::mkldnn_convolution",)),
    ("conv, slow THNN path", ("aten::_slow_conv2d", "aten::thnn_conv", "aten::slow_conv")),
    ("copy_ / clone / contiguous", ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")),
    ("mm / addmm / bmm", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")),
    ("attention (SDPA, softmax)", ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_softmax")),
    ("group_norm", ("aten::native_group_norm", "aten::group_norm")),
    ("silu", ("aten::silu",)),
    ("add / mul / div", ("aten::add", "aten::mul", "aten::div", "aten::sub")),
    ("cat", ("aten::cat",)),
    ("upsample", ("aten::upsample",)),
)


def categorise(op: str) -> str:
    return next((cat for cat, prefixes in CATEGORIES if op.startswith(prefixes)), "other")


class _ConvFormats(TorchFunctionMode):
    """Counts conv2d calls (F.conv2d or a direct torch.mkldnn_convolution) by (input, weight) memory format: a
    channels_last input with an NCHW weight makes PyTorch copy the weight on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is F.conv2d or func is torch.mkldnn_convolution:
            key = f"input {memory_format(args[0])}, weight {memory_format(args[1])}"
            self.counts[key] = self.counts.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def memory_format(t: torch.Tensor) -> str:
    """NCHW, NHWC, "either" (both at once, e.g. a 1x1 kernel or a 1x1 map), or "strided" (neither)."""
    nchw = t.is_contiguous()
    nhwc = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    return {(True, True): "either", (True, False): "NCHW", (False, True): "NHWC"}.get((nchw, nhwc), "strided")


def profile_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                    ctx: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
                    ) -> dict[str, Any]:
    """One profiled forward: self CPU ms and calls per op, by category, the input shapes of copy_ and slow
    convs."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), ctx(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(x, t)
    ops = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}
    shapes = [(e.key, str(e.input_shapes), e.self_cpu_time_total / 1e3, e.count)
              for e in prof.key_averages(group_by_input_shape=True)
              if e.key in ("aten::copy_", "aten::_slow_conv2d_forward")]
    categories: dict[str, float] = {}
    for op, (ms, _) in ops.items():
        categories[categorise(op)] = categories.get(categorise(op), 0.0) + ms
    return {"ops": ops, "categories": categories, "shapes": sorted(shapes, key=lambda s: -s[2]),
            "total": sum(ms for ms, _ in ops.values())}


def profile_interleaved(models: dict[str, nn.Module], x: torch.Tensor, t: torch.Tensor, rounds: int = 3,
                        ctx: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
                        ) -> dict[str, dict[str, Any]]:
    """Profiles of each model, one forward per round in alternating order; every figure is the median over
    rounds, so a burst of load during one side's turn does not land on that side alone."""
    names = list(models)
    with torch.no_grad(), ctx():
        for model in models.values():
            model(x, t)  # warm-up
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(profile_forward(models[name], x, t, ctx))
    out = {}
    for name, rs in runs.items():
        formats = _ConvFormats()
        with torch.no_grad(), ctx(), formats:
            models[name](x, t)
        median = statistics.median
        ops = {op: (median(r["ops"].get(op, (0.0, 0))[0] for r in rs), rs[0]["ops"].get(op, (0.0, 0))[1])
               for op in set().union(*(r["ops"] for r in rs))}
        categories = {c: median(r["categories"].get(c, 0.0) for r in rs)
                      for c in set().union(*(r["categories"] for r in rs))}
        out[name] = {"ops": ops, "categories": categories, "shapes": rs[len(rs) // 2]["shapes"],
                     "total": median(r["total"] for r in rs), "formats": formats.counts}
    return out


def profile_section(name: str, models: dict[str, nn.Module], sides: list[Side], plan: Plan, device: torch.device,
                    inputs: Callable[[int], tuple[torch.Tensor, ...]], top: int = 12) -> list[str]:
    lines = []
    base, ours = (s.name for s in sides)
    for precision, batch in ((p, b) for p in plan.precisions for b in plan.profile_batches):
        x, t, _ = inputs(batch)
        prof = profile_interleaved({s.name: models[s.name] for s in sides}, x, t, ctx=autocast(device, precision))
        lines += [f"### {name}, forward batch {batch}, {precision} (self CPU ms per forward)", "",
                  f"| category | {base} | {ours} |", "|---|---|---|"]
        cats = [c for c, _ in CATEGORIES] + ["other"]
        for cat in cats:
            values = [prof[s]["categories"].get(cat, 0.0) for s in (base, ours)]
            if any(v >= 0.01 for v in values):
                lines.append(f"| {cat} | {values[0]:.2f} | {values[1]:.2f} |")
        lines.append(f"| **total self CPU** | **{prof[base]['total']:.2f}** | **{prof[ours]['total']:.2f}** |")
        lines += ["", "conv2d memory formats: " + "; ".join(
            f"{s}: " + ", ".join(f"{k} ×{v}" for k, v in sorted(prof[s]["formats"].items())) for s in (base, ours)), ""]
        for s in (base, ours):
            ranked = sorted(prof[s]["ops"].items(), key=lambda kv: -kv[1][0])[:top]
            lines.append(f"{s} top ops: " + ", ".join(f"{op.removeprefix('aten::')} {ms:.2f} ms ×{n}"
                                                       for op, (ms, n) in ranked))
            lines.append("")
            heavy = prof[s]["shapes"][:4]
            if heavy:
                lines.append(f"{s} heaviest copy_/slow-conv shapes: " + "; ".join(
                    f"{op.removeprefix('aten::')} {shape} {ms:.2f} ms ×{n}" for op, shape, ms, n in heavy))
                lines.append("")
    return lines


# ---- machine, output ---------------------------------------------------------------------------------------

def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def machine(device: torch.device) -> list[str]:
    model = platform.processor() or "unknown CPU"
    try:
        match = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = match.group(1) if match else model
    except OSError:
        pass
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))
    import diffusers

    lines = [f"- CPU: {model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
             f"flags {' '.join(flags) or 'n/a'}",
             f"- torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}",
             f"- date {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}"]
    if device.type == "cuda":
        lines.insert(0, f"- GPU: {torch.cuda.get_device_name(device)}")
    return lines


def render(report: Report, command: str, elapsed: float, load: tuple[str, str], findings: str) -> str:
    base, ours = report.sides
    out = ["# ddpm vs diffusers: benchmark results", "",
           f"`{command}` — {elapsed / 60:.1f} min, device {report.device}. Written by benchmarks/run.py; "
           "see benchmarks/README.md for the method.", "", *machine(report.device),
           f"- load average (1 min) at start {load[0]}, at end {load[1]} (other jobs share these cores; ratios "
           "come from interleaved calls in one process, so they are more stable than the absolute times)", ""]
    out += ["## Ceiling", "", "Large 3×3 convolution (256→256 channels, 32×32, best of NCHW and channels_last): " +
            ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in report.peaks.items()) + ".", ""]
    if report.matches:
        out += ["Outputs checked before timing (fp32, max |diffusers − ddpm| / max |diffusers|): " +
                ", ".join(f"{k} {v:.2g}" for k, v in report.matches.items()) + ".", ""]
    out += ["## Results", "",
            f"Median (min–max) seconds per call over interleaved repeats; ratio = {base} median / {ours} median "
            f"(> 1: {ours} is faster; the goal mark uses it); paired ratio = median over repeats of the two "
            f"back-to-back calls' ratio, steadier under load. GFLOP/s from FlopCounterMode's count per call (the same "
            f"work on both sides). load = 1-min load average when the row finished; with load above the "
            f"{os.cpu_count()} cores, absolute times are inflated and ratios are noisy.", "",
            *results_table(report), ""]
    train = [r for r in report.rows if "images/s" in r.extra]
    if train:
        out += ["Training step images/s: " + "; ".join(
            f"{r.case} {r.precision}: " + " / ".join(f"{s} {r.extra['images/s'][s]:.1f}" for s in report.sides)
            for r in train) + ".", ""]
    if report.memory:
        out += ["## Training-step memory (fresh process per library)", "",
                "Peak RSS counts the whole process (torch and the library imported, the model, the EMA copy); the "
                "training itself adds peak − RSS before the first step (optimizer state, activations, gradients).",
                "", "| config | prec | side | peak | RSS before first step | peak − before | step s (median) "
                "| peak / baseline peak | (peak − before) / baseline's |", "|---|---|---|---|---|---|---|---|---|"]
        peaks = {(m["config"], m["precision"], m["side"]): m.get("cuda_peak", m["peak_rss"]) for m in report.memory}
        befores = {(m["config"], m["precision"], m["side"]): m["rss_before"] for m in report.memory}
        for m in report.memory:
            key = "cuda_peak" if "cuda_peak" in m else "peak_rss"
            base_key = (m["config"], m["precision"], base)
            ratio = m[key] / peaks[base_key]
            goal = f" {'✓' if ratio <= 0.8 else '✗'} (goal ≤0.8)" if m["side"] != base else ""
            if key == "peak_rss":
                added = m[key] - m["rss_before"]
                added_text = f"{added / 2**30:.3f} GiB | "
                added_ratio = f"{added / (peaks[base_key] - befores[base_key]):.2f}"
            else:  # on the GPU the peak is of allocated tensors only
                added_text, added_ratio = "n/a | ", "n/a"
            out.append(f"| {m['config']} | {m['precision']} | {m['side']} | {m[key] / 2**30:.3f} GiB "
                       f"| {m['rss_before'] / 2**30:.3f} GiB | {added_text}{statistics.median(m['times']):.3f} "
                       f"| {ratio:.2f}{goal} | {added_ratio} |")
        out.append("")
    if report.sampling:
        forward = {(r.case, r.precision): r for r in report.rows}
        out += ["## Sampling: time outside the UNet", "",
                "`outside` = pipeline time − time inside the UNet's forward (measured by hooks); "
                "`vs fwd` = pipeline time / (steps × median UNet forward at the same batch from the table); "
                "goal: within 2 %.", "",
                "| case | prec | side | pipeline | inside UNet | outside | outside % | pipeline / (steps × fwd) |",
                "|---|---|---|---|---|---|---|---|"]
        for s in report.sampling:
            fwd_row = forward.get((f"{s['config']} forward b{report.plan.sampling_batch}", s["precision"]))
            for side in report.sides:
                total, outside = s["total"][side], s["outside"][side]
                vs = f"{total / (s['steps'] * fwd_row.median(side)):.3f}" if fwd_row else "n/a"
                out.append(f"| {s['case']} | {s['precision']} | {side} | {fmt_time(total)} | "
                           f"{fmt_time(s['inside'][side])} | {fmt_time(outside)} | {100 * outside / total:.2f} % "
                           f"| {vs} |")
        out.append("")
    out += ["## Profile", "", FINDINGS_START, findings.strip(), FINDINGS_END, ""]
    if report.profile:
        out += ["Measured by this run (torch.profiler, self CPU time; median of 3 profiled forwards per library, "
                "taken in alternation):", "",
                *report.profile]
    else:
        out += ["(This run did not profile; run with --profile.)", ""]
    if report.notes:
        out += ["## Notes", "", *[f"- {n}" for n in report.notes], ""]
    return "\n".join(out)


def previous_findings(path: Path) -> str:
    """The hand-written analysis between the findings markers of an earlier RESULTS.md, kept across runs."""
    if not path.exists():
        return "(No findings written yet.)"
    text = path.read_text()
    start, end = text.find(FINDINGS_START), text.find(FINDINGS_END)
    return text[start + len(FINDINGS_START):end] if 0 <= start < end else "(No findings written yet.)"


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
