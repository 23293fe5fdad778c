"""``python -m ddpm.evaluate``: sample from a saved pipeline or a training checkpoint and score the samples against
real images, offline, in a few CPU minutes with the defaults.

    python -m ddpm.evaluate --model ddpm-fashion-mnist-32
    python -m ddpm.evaluate --model ddpm-fashion-mnist-32/checkpoint-1200 --num_images 1000

The scores (see ddpm.metrics) are the Fréchet distance ("fd"), KID ("kid", "kid_std") and k-NN precision and
recall, all in the feature space of one network, named in the output and in metrics.jsonl:

- by default a small CNN trained on half of the real images (a progress bar; cached in
  <output_dir>/feature_extractors/ and reused). Its scores compare models on this dataset; they are not
  comparable with published FIDs;
- --feature_extractor inception: the TF-Inception network as torch-fidelity ports it (the one torchmetrics'
  FID uses), for the standard FID (reported as "fid"). Needs pip install "ddpm[inception]" and the network's
  weights file on disk (the error says where);
- --feature_extractor FILE: your own TorchScript or .pt2 network.

Each run appends one JSON line to <output_dir>/metrics.jsonl and logs eval/<score> to tensorboard under
<output_dir>/logs. The real set has as many images as the generated one (--num_images), drawn with --seed from the
half of the real images the default network does not train on.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ddpm import metrics
from ddpm.cli import (DEFAULT_SCHEDULER, CLIError, HelpFormatter, add_debug_flag, add_sampling_flags,
                      check_sampling_flags, open_pipeline, pick_device, run)
from ddpm.data import load_real_images, split_real_images
from ddpm.metrics import log_metrics
from ddpm.pipeline import generate


@dataclass(frozen=True)
class EvalConfig:
    model: str
    num_images: int = 500
    batch_size: int = 64
    num_inference_steps: int | None = None  # None: the scheduler's own (ddim: 50, ddpm: num_train_timesteps)
    scheduler: str = DEFAULT_SCHEDULER      # a key of ddpm.schedulers.SAMPLERS
    solver_order: int | None = None         # dpm, sde-dpm, unipc: their order (None: 2)
    karras_sigmas: bool = False             # the σ-based samplers: Karras et al.'s noise levels
    eta: float = 0.0
    seed: int = 0
    no_ema: bool = False                    # a training checkpoint's raw unet/ instead of unet_ema/
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    cache_dir: str | None = None            # datasets' cache
    resolution: int | None = None           # None: the model's sample_size
    feature_extractor: str | None = None    # None: the dataset CNN; "inception": standard FID; else a file
    # 300 steps separate as well as 1000 at 30% of the cost: bundled Fashion-MNIST at 32x32, FD to held-out real
    # images of noisy (sigma 0.2) / blurred (3x3) ones 2.5x / 2.0x that of clean ones, against 2.9x / 2.1x.
    extractor_steps: int = 300
    output_dir: str | None = None           # None: the model folder (a checkpoint's: its run's output_dir)
    device: str | None = None


def note(message: str) -> None:
    """A one-line note on stderr, printed through any running progress bar."""
    tqdm.write(message, file=sys.stderr)


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Sample, score against real images, append to ``metrics.jsonl`` and tensorboard; returns the JSON record."""
    if config.num_images < 4 or config.batch_size < 1:
        raise CLIError("--num_images must be at least 4 and --batch_size at least 1")
    check_sampling_flags(config.eta, config.seed, config.num_images)
    if config.extractor_steps < 1:
        raise CLIError(f"--extractor_steps {config.extractor_steps} must be at least 1")
    device = pick_device(config.device)
    loaded = open_pipeline(config.model, config.scheduler, config.num_inference_steps, use_ema=not config.no_ema,
                           solver_order=config.solver_order, karras_sigmas=config.karras_sigmas,
                           warn=note)
    pipe, steps = loaded.pipeline, loaded.num_inference_steps
    size = pipe.unet.config.sample_size
    if not isinstance(size, int):
        raise CLIError(f"the model's sample_size {size} is not square; ddpm.evaluate needs square images")
    if config.resolution is not None and config.resolution != size:
        raise CLIError(f"--resolution {config.resolution} does not match the model's sample_size {size}")
    channels = pipe.unet.config.in_channels
    output = Path(config.output_dir if config.output_dir is not None else loaded.run_dir or config.model)
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output_dir {output} is a file, not a folder")

    extractor: metrics.FeatureExtractor
    fd_name = "fd"
    if config.feature_extractor == "inception":  # load it first: a missing package or file fails before sampling
        extractor = metrics.inception_extractor(device)
        extractor_name, fd_name = metrics.INCEPTION_NAME, "fid"
    elif config.feature_extractor is not None:
        extractor = metrics.load_extractor(config.feature_extractor, device)
        extractor_name = str(config.feature_extractor)
    real = load_real_images(config.dataset_name, config.train_data_dir, size, channels, config.dataset_config_name,
                            config.cache_dir)
    output.mkdir(parents=True, exist_ok=True)
    pool = real.images
    if config.feature_extractor is None:
        train, pool = split_real_images(real)
        net = metrics.dataset_extractor(train.images, train.labels, output, train.description,
                                        steps=config.extractor_steps, device=device, progress=True)
        extractor = net
        extractor_name = f"ddpm dataset CNN ({net.config.task}, {net.config.feature_dim}-d)"
    pick = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(config.seed))
    reference = pool[pick[:config.num_images]]
    if reference.shape[0] < config.num_images:
        note(f"note: only {reference.shape[0]} real images to compare {config.num_images} samples with")

    pipe.to(device)
    start = time.perf_counter()
    generated = generate(pipe, config.num_images, config.batch_size, steps, config.seed, config.eta)
    sample_seconds = time.perf_counter() - start
    scores = metrics.evaluate_images(generated, reference, extractor, seed=config.seed)
    scores = {(fd_name if name == "fd" else name): value for name, value in scores.items()}

    model = str(Path(config.model).resolve()) if Path(config.model).exists() else config.model
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **scores, "feature_extractor": extractor_name,
              "num_images": config.num_images, "num_real_images": reference.shape[0],
              "scheduler": type(pipe.scheduler).__name__, "num_inference_steps": steps, "eta": config.eta,
              "seed": config.seed, "model": model, "weights": loaded.weights, "real_images": real.description,
              "sample_seconds": round(sample_seconds, 1)}
    if loaded.checkpoint_step is not None:
        record["step"] = loaded.checkpoint_step
    log_metrics(output, record, scores, step=loaded.checkpoint_step)
    width = max(map(len, scores))
    lines = [f"{config.num_images} samples ({record['scheduler']}, {steps} steps) vs {reference.shape[0]} real "
             f"images, in the feature space of {extractor_name}:"]
    lines += [f"  {name:<{width}}  {value:10.4f}" for name, value in scores.items()]
    if config.feature_extractor is None:
        lines.append("  (these compare models on this dataset; they are not comparable with published FIDs)")
    lines.append(f"appended to {output / 'metrics.jsonl'}")
    tqdm.write("\n".join(lines))
    return record


def parse_args(argv: Sequence[str] | None = None) -> EvalConfig:
    p = argparse.ArgumentParser(prog="python -m ddpm.evaluate", formatter_class=HelpFormatter,
                                description=__doc__.replace("``", "") if __doc__ else None)
    add_sampling_flags(p, num_images=500, batch_size=64)
    p.add_argument("--dataset_name", default=None,
                   help="a datasets name or local path for the real images (default: --train_data_dir, else the "
                        "bundled Fashion-MNIST subset)")
    p.add_argument("--dataset_config_name", default=None, help="the dataset's configuration name, if it has several")
    p.add_argument("--train_data_dir", default=None, help="a folder of real images (class sub-folders = labels)")
    p.add_argument("--cache_dir", default=None, help="datasets' cache folder")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's sample_size")
    p.add_argument("--feature_extractor", default=None,
                   help="'inception' for the standard FID (pip install \"ddpm[inception]\"), or a TorchScript or "
                        ".pt2 file mapping [-1, 1] NCHW images to NxD features (default: a small CNN trained on the "
                        "real images)")
    p.add_argument("--extractor_steps", type=int, default=300, help="training steps of the default CNN")
    p.add_argument("--output_dir", default=None,
                   help="where metrics.jsonl, logs/ and the CNN cache go (default: --model, or a checkpoint's run "
                        "folder)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    return EvalConfig(**{k: v for k, v in vars(args).items() if k != "debug"})


def main(argv: Sequence[str] | None = None) -> None:
    evaluate(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run(main, prog="ddpm.evaluate"))
