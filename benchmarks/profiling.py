"""torch.profiler tables of both UNets' forward: self CPU time by op category, the heaviest ops, and the memory
formats the convolutions see."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from benchmarks.harness import Side, autocast
from benchmarks.plan import Plan


# ---- profile -----------------------------------------------------------------------------------------------

# Op-name prefixes -> category, checked in order; self CPU time is summed per category.
CATEGORIES = (
    ("conv, oneDNN", ("aten::mkldnn_convolution",)),
    ("conv, slow THNN path", ("aten::_slow_conv2d", "aten::thnn_conv", "aten::slow_conv")),
    ("copy_ / clone / contiguous", ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")),
    ("mm / addmm", ("aten::mm", "aten::addmm", "aten::matmul")),
    # both libraries call bmm / baddbmm / softmax in attention only (ddpm's narrow heads; diffusers' AttnProcessor)
    ("attention (SDPA, or bmm + softmax)", ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_softmax",
                                           "aten::bmm", "aten::baddbmm")),
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


