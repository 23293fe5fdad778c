"""Peak memory of a training step, in a fresh process per library so that the two peaks do not mix."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import Side, make_side, synchronizer
from benchmarks.unet_cases import make_train_step

RUN = Path(__file__).resolve().parent / "run.py"

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
    done = subprocess.run([sys.executable, str(RUN), "--train-worker", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"training-step worker for {side.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


