"""The whole training job, side by side: ``python -m ddpm.train`` against diffusers' train_unconditional.py.

    python benchmarks/train_e2e.py                  # Fashion-MNIST folder, 32x32, batch 64, 6 epochs = 474 steps
    python benchmarks/train_e2e.py --repeats 3      # run each job 3 times (A B B A A B): medians
    python benchmarks/train_e2e.py --train_data_dir my_images --resolution 64 --num_epochs 2
    python benchmarks/train_e2e.py --quick          # 32 tiny images, a tiny UNet, 8 steps: the smoke test
    python benchmarks/train_e2e.py --data_only      # only the two DataLoaders, batch by batch in one process

The script is not vendored: it is read at run time from the diffusers git mirror (``--diffusers_repo``, by default
/work/.mirror/huggingface+diffusers/repo, ``git show HEAD:examples/...``), from a file (``--script``), or else
downloaded from GitHub at the installed diffusers version.

What both jobs get (see benchmarks/README.md): the same image folder; the same UNet config file through
``--model_config_name_or_path`` (train_unconditional.py always trains in RGB, so the config is
ddpm/assets/unet-small.json with 3 channels instead of 1, and ``sample_size`` set); the same flags, which are the
laptop profile of ``ddpm.train`` (learning rate 1e-3, 100 warm-up steps, grids of 50 DDPM steps at epochs 0 and
4 and the last, checkpoints every 200 steps, two kept); each its own fresh datasets cache; one process, no
DataLoader workers, default threads. ``ddpm.train`` draws a random seed (the script has no seed flag).

Each job runs under a small probe (written to the temporary folder) that times every batch the DataLoader hands
out, records every logged loss, and reads the peak RSS (``VmHWM``) at exit; the wall time is measured around
the whole process, imports included. Jobs alternate (A B, B A, ...) so that a loaded machine slows both alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SMALL_UNET = ROOT / "ddpm" / "assets" / "unet-small.json"
DIFFUSERS_MIRROR = Path("/work/.mirror/huggingface+diffusers/repo")
SCRIPT_PATH = "examples/unconditional_image_generation/train_unconditional.py"
TINY_UNET = {"block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "layers_per_block": 1, "norm_num_groups": 4}
LOSS_WINDOW = 50  # "final loss" is the mean of the last this many logged losses

# Runs inside each job's process: time the DataLoader, keep the logged losses, write them and VmHWM at exit.
PROBE = r'''
import atexit, json, os, runpy, sys, time
import torch.utils.data.dataloader as dataloader
import accelerate

record = {"data_times": [], "losses": [], "log_times": []}
next_batch = dataloader._BaseDataLoaderIter.__next__

def timed_next(self):
    t = time.perf_counter()
    try:
        return next_batch(self)
    finally:
        record["data_times"].append(time.perf_counter() - t)  # the last call of an epoch raises StopIteration

dataloader._BaseDataLoaderIter.__next__ = timed_next
log = accelerate.Accelerator.log

def logged(self, values, *args, **kwargs):
    if "loss" in values:
        record["losses"].append(float(values["loss"]))
        record["log_times"].append(time.perf_counter())
    return log(self, values, *args, **kwargs)

accelerate.Accelerator.log = logged

def write():
    with open("/proc/self/status") as f:
        record["peak_rss_mb"] = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
    with open(os.environ["E2E_RECORD"], "w") as f:
        json.dump(record, f)

atexit.register(write)
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
'''


def fetch_script(args: argparse.Namespace, workdir: Path) -> Path:
    """train_unconditional.py into ``workdir``: from --script, the git mirror, or GitHub at diffusers' version."""
    if args.script:
        return Path(args.script).resolve()
    target = workdir / "train_unconditional.py"
    repo = Path(args.diffusers_repo)
    if repo.exists():
        text = subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{SCRIPT_PATH}"], capture_output=True,
                              text=True, check=True).stdout
    else:
        import diffusers

        url = f"https://raw.githubusercontent.com/huggingface/diffusers/v{diffusers.__version__}/{SCRIPT_PATH}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                text = response.read().decode()
        except OSError as e:
            raise SystemExit(f"train_e2e: no diffusers mirror at {repo} and {url} is unreachable ({e}); pass "
                             f"--script path/to/train_unconditional.py") from None
    target.write_text(text)
    return target


def write_images(folder: Path, count: int, size: int | None) -> None:
    """The first ``count`` bundled Fashion-MNIST images as RGB PNGs (28x28, or ``size`` x ``size``)."""
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from ddpm.data import EmbeddedImages

    folder.mkdir(parents=True)
    source = EmbeddedImages()
    for i in range(count):
        image = source.open(i).convert("RGB")
        if size is not None:
            image = image.resize((size, size), Image.BILINEAR)
        image.save(folder / f"{i:05d}.png")


def write_config(path: Path, quick: bool, resolution: int) -> None:
    """unet-small.json (or a tiny UNet) in RGB, at ``resolution``: a config both trainers read as given."""
    config = dict(TINY_UNET) if quick else {k: v for k, v in json.loads(SMALL_UNET.read_text()).items()
                                              if not k.startswith("_")}
    config.update({"_class_name": "UNet2DModel", "in_channels": 3, "out_channels": 3, "sample_size": resolution})
    path.write_text(json.dumps(config, indent=2))


def job_flags(args: argparse.Namespace, images: Path, config: Path) -> list[str]:
    flags = {"train_data_dir": images, "model_config_name_or_path": config, "resolution": args.resolution,
             "train_batch_size": args.train_batch_size, "num_epochs": args.num_epochs,
             "learning_rate": 1e-3, "lr_warmup_steps": 100, "save_images_epochs": 4, "save_model_epochs": 4,
             "checkpointing_steps": 200, "checkpoints_total_limit": 2, "eval_batch_size": args.eval_batch_size,
             "ddpm_num_inference_steps": args.ddpm_num_inference_steps, "dataloader_num_workers": 0}
    if args.quick:
        flags.update(lr_warmup_steps=2, checkpointing_steps=4, ddpm_num_steps=50)
    return [f"--{k}={v}" for k, v in flags.items()]


def run_job(name: str, target: str, flags: list[str], workdir: Path, run: int) -> dict[str, Any]:
    out = workdir / f"{name}-{run}"
    record = workdir / f"{name}-{run}.json"
    env = {**os.environ, "E2E_RECORD": str(record), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    command = [sys.executable, str(workdir / "probe.py"), target, *flags, f"--output_dir={out}",
               f"--cache_dir={workdir / f'cache-{name}-{run}'}"]
    start = time.perf_counter()  # CLOCK_MONOTONIC on Linux: comparable with the probe's log times
    result = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True)
    end = time.perf_counter()
    wall = end - start
    if result.returncode != 0 or not record.exists():
        raise SystemExit(f"train_e2e: the {name} job failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    data = json.loads(record.read_text())
    losses = data["losses"]
    times = data["log_times"]
    return {"wall_s": wall, "startup_s": times[0] - start if times else math.nan,
            "teardown_s": end - times[-1] if times else math.nan, "steps": len(losses),
            "steps_per_s": len(losses) / wall,
            "loop_steps_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else math.nan,
            "peak_rss_mb": data["peak_rss_mb"], "data_ms_per_batch": 1e3 * sum(data["data_times"]) / len(losses),
            "data_ms_median": 1e3 * statistics.median(data["data_times"]),
            "final_loss": statistics.fmean(losses[-LOSS_WINDOW:]) if losses else math.nan,
            "data_ms": [round(1e3 * t, 3) for t in data["data_times"]], "losses": losses}


def data_only(args: argparse.Namespace, images: Path, workdir: Path) -> dict[str, Any]:
    """The two DataLoaders alone, in one process, one batch of each in turn: ms per batch, epoch by epoch.

    ddpm's is built as ``ddpm.train`` builds it; the script's as train_unconditional.py does without
    --center_crop and --random_flip (imagefolder, ``set_transform`` with its torchvision transforms, shuffle).
    """
    import datasets
    import torch
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from ddpm import data
    from ddpm.training.dataset import EpochSampler, TrainDataset

    batch, r = args.train_batch_size, args.resolution
    source = data.open_image_folder(str(images), str(workdir / "cache-ddpm"))
    dataset = TrainDataset(source, data.readable_rows(source), data.Preprocess(r, channels=3), seed=0)
    sampler = EpochSampler(len(dataset), seed=0)
    ours = DataLoader(dataset, batch_size=batch, sampler=sampler, generator=torch.Generator().manual_seed(0))
    folder = datasets.load_dataset("imagefolder", data_dir=str(images), cache_dir=str(workdir / "cache-diffusers"),
                                   split="train")
    augment = transforms.Compose([transforms.Resize(r, interpolation=transforms.InterpolationMode.BILINEAR),
                                  transforms.RandomCrop(r), transforms.Lambda(lambda x: x), transforms.ToTensor(),
                                  transforms.Normalize([0.5], [0.5])])
    folder.set_transform(lambda batch: {"input": [augment(image.convert("RGB")) for image in batch["image"]]})
    theirs = DataLoader(folder, batch_size=batch, shuffle=True)
    epochs = []
    for epoch in range(args.num_epochs):
        sampler.set_epoch(epoch)
        loaders = {"ddpm": iter(ours), "diffusers": iter(theirs)}
        times: dict[str, list[float]] = {"ddpm": [], "diffusers": []}
        for i in range(len(ours)):
            for name in (("ddpm", "diffusers") if i % 2 == 0 else ("diffusers", "ddpm")):
                start = time.perf_counter()
                next(loaders[name])
                times[name].append(time.perf_counter() - start)
        epochs.append({"ddpm_ms": 1e3 * statistics.fmean(times["ddpm"]),
                       "diffusers_ms": 1e3 * statistics.fmean(times["diffusers"]),
                       "paired_ratio": statistics.median(b / a for a, b in zip(times["ddpm"], times["diffusers"]))})
    print("\n| epoch | ddpm (ms/batch) | diffusers (ms/batch) | diffusers / ddpm (paired median) |\n|---|---|---|---|")
    for epoch, e in enumerate(epochs):
        print(f"| {epoch} | {e['ddpm_ms']:.2f} | {e['diffusers_ms']:.2f} | {e['paired_ratio']:.2f} |")
    return {"data_only": epochs, "load_average": os.getloadavg()}


ROWS = [("wall time (s)", "wall_s", "{:.1f}"), ("launch to first step (s)", "startup_s", "{:.1f}"),
        ("last step to exit (s)", "teardown_s", "{:.1f}"), ("optimiser steps", "steps", "{:d}"),
        ("steps/s, whole job", "steps_per_s", "{:.2f}"), ("steps/s, training loop", "loop_steps_per_s", "{:.2f}"),
        ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"), ("data loading, mean (ms/batch)", "data_ms_per_batch", "{:.2f}"),
        ("data loading, median (ms/batch)", "data_ms_median", "{:.2f}"),
        (f"final loss (mean of last {LOSS_WINDOW})", "final_loss", "{:.4f}")]


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """Medians over the runs; ratio = diffusers / ddpm (> 1: ddpm is faster, or lighter, or lower)."""
    median = {side: {key: statistics.median(run[key] for run in runs) for _, key, _ in ROWS}
              for side, runs in results.items()}
    lines = ["| | ddpm | diffusers | diffusers / ddpm |", "|---|---|---|---|"]
    for label, key, fmt in ROWS:
        a, b = median["ddpm"][key], median["diffusers"][key]
        if key == "steps":
            a, b = int(a), int(b)
        ratio = b / a if a else math.nan
        if key in ("steps_per_s", "loop_steps_per_s"):
            ratio = a / b if b else math.nan  # a rate: ddpm / diffusers, so > 1 still means ddpm is faster
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32 tiny images, a tiny UNet, 8 steps")
    parser.add_argument("--train_data_dir", help="an image folder (default: write Fashion-MNIST as RGB PNGs)")
    parser.add_argument("--num_images", type=int, default=5000, help="images written when no folder is given")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--num_epochs", type=int, default=6)
    parser.add_argument("--eval_batch_size", type=int, default=16)
    parser.add_argument("--ddpm_num_inference_steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each job, alternating")
    parser.add_argument("--script", help="a train_unconditional.py to use instead of fetching one")
    parser.add_argument("--diffusers_repo", default=str(DIFFUSERS_MIRROR), help="git mirror of diffusers")
    parser.add_argument("--json", help="also write every run's figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (outputs, logs)")
    parser.add_argument("--data_only", action="store_true",
                        help="time the two DataLoaders alone, interleaved in this process, for --num_epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.resolution, args.train_batch_size, args.num_epochs = 32, 8, 8, 2
        args.eval_batch_size, args.ddpm_num_inference_steps = 2, 2

    workdir = Path(tempfile.mkdtemp(prefix="ddpm-e2e-"))
    try:
        images = Path(args.train_data_dir).resolve() if args.train_data_dir else workdir / "images"
        if not args.train_data_dir:
            write_images(images, args.num_images, 8 if args.quick else None)
        if args.data_only:
            return data_only(args, images, workdir)
        script = fetch_script(args, workdir)
        (workdir / "probe.py").write_text(PROBE)
        config = workdir / "unet" / "config.json"
        config.parent.mkdir()
        write_config(config, args.quick, args.resolution)
        flags = job_flags(args, images, config)
        jobs = {"ddpm": "ddpm.train", "diffusers": str(script)}
        results: dict[str, list[dict[str, Any]]] = {"ddpm": [], "diffusers": []}
        for run in range(args.repeats):
            for name in (("ddpm", "diffusers") if run % 2 == 0 else ("diffusers", "ddpm")):
                results[name].append(run_job(name, jobs[name], flags, workdir, run))
                print(f"{name} run {run}: {results[name][-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
        report = {"flags": flags, "script": str(script), "load_average": os.getloadavg(), "runs": results}
        print(f"\n{args.repeats} run(s) each, medians; flags: {' '.join(f.split('=')[0] for f in flags)}\n")
        print(table(results))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        return report
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
