"""The machinery every case uses: the two libraries under test (``Side``), interleaved timing, FLOP counts, and
the rows of results."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.plan import Plan

DIFFUSERS, DDPM = "diffusers", "ddpm"


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


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


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



def summary(row: Row, sides: list[Side]) -> str:
    base, ours = (s.name for s in sides)
    return (f"{row.case} {row.precision}: {base} {fmt_times(row.times[base])}, {ours} {fmt_times(row.times[ours])}, "
            f"ratio {row.ratio(base, ours):.2f} (paired {row.paired_ratio(base, ours):.2f})")


