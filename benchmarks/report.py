"""RESULTS.md: the machine, the results table, memory and sampling sections, the profile, and the hand-written
findings kept between runs."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
from pathlib import Path

import torch

from benchmarks.harness import Report, cpu_flags, fmt_time, results_table

FINDINGS_START, FINDINGS_END = "<!-- findings:start -->", "<!-- findings:end -->"


# ---- machine, output ---------------------------------------------------------------------------------------

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
    compiled = [r for r in report.rows if "compile s" in r.extra]
    if compiled:
        out += ["torch.compile, seconds to compile (the first call): " + "; ".join(
            f"{r.case} {r.precision}: " + " / ".join(f"{s} {r.extra['compile s'][s]:.0f} s" for s in report.sides)
            for r in compiled) + ".", ""]
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


