"""``python -m ddpm.evaluate``: sample from a saved pipeline and score the samples against real images, offline.

    python -m ddpm.evaluate --model ddpm-model-64 --num_images 1000 --scheduler ddim --num_inference_steps 50

The scores (FID, KID, precision, recall; see ``ddpm.metrics``) are computed in the feature space of a small
CNN trained on the real images and cached in ``<output_dir>/feature_extractors/``, or of ``--feature_extractor``
(a TorchScript or ``.pt2`` file) for standard Inception FID. Each run appends one JSON line to
``<output_dir>/metrics.jsonl`` and logs ``eval/<metric>`` scalars to tensorboard under ``<output_dir>/logs``.
The real set has as many images as the generated one (``--num_images``), drawn at random with ``--seed`` from
the half of the real images that the default extractor does not train on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm import data, metrics
from ddpm.cli import CLIError, add_debug_flag, check_sampling_flags, pick_device, run
from ddpm.pipeline import Pipeline
from ddpm.sample import open_pipeline, sample_batches

# At most this many real images are loaded: the default extractor trains on half of them, the reference images
# are drawn from the other half.
MAX_REAL_IMAGES = 10_000


@dataclass(frozen=True)
class EvalConfig:
    model: str
    num_images: int = 1000
    batch_size: int = 64
    num_inference_steps: int | None = None  # None: 1000 for DDPM, 50 for DDIM
    scheduler: Literal["ddpm", "ddim"] | None = None  # None: the scheduler saved with the model
    eta: float = 0.0
    seed: int = 0
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    cache_dir: str | None = None  # datasets' cache
    resolution: int | None = None  # None: the model's sample_size
    feature_extractor: str | None = None  # None: the cached dataset CNN
    extractor_steps: int = 1000
    output_dir: str | None = None  # None: the model folder
    device: str | None = None


@dataclass(frozen=True)
class RealImages:
    images: torch.Tensor  # [N x C x H x W] in [-1, 1]
    labels: torch.Tensor | None  # [N] integers, or None for an unlabelled folder
    description: str


# ---- real images ---------------------------------------------------------------------------------------------

def _labels(source: data.ImageSource, rows: list[int]) -> torch.Tensor | None:
    # Class labels where the source has them: the embedded set's, or a datasets ClassLabel column (which
    # imagefolder makes from class sub-folders).
    if isinstance(source, data.EmbeddedImages):
        return torch.as_tensor(source.labels[rows].astype(np.int64))
    if isinstance(source, data.HFImages):
        import datasets

        columns = [c for c, f in source.rows.features.items() if isinstance(f, datasets.ClassLabel)]
        if columns:
            return torch.tensor(source.rows.select(rows)[columns[0]], dtype=torch.long)
    return None


def load_real_images(dataset_name: str | None, train_data_dir: str | None, resolution: int, channels: int,
                     dataset_config_name: str | None = None, cache_dir: str | None = None) -> RealImages:
    """Up to ``MAX_REAL_IMAGES`` readable real images of the training data (``ddpm.data``'s sources: a
    ``datasets`` name, an image folder, or the embedded Fashion-MNIST subset), preprocessed as for training with
    a center crop and no flip, with class labels where the source has them. A larger source is read in a fixed
    random order, so the cap does not keep only the first class folders of a sorted image folder."""
    source = data.open_source(dataset_name, dataset_config_name, train_data_dir, cache_dir)
    preprocess = data.Preprocess(resolution, center_crop=True, random_flip=False, channels=channels)
    unused = torch.Generator()  # the preprocessing draws nothing without random crops and flips
    images: list[torch.Tensor] = []
    rows: list[int] = []
    n = len(source)
    order = range(n) if n <= MAX_REAL_IMAGES else torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    for i in order:
        if len(rows) == MAX_REAL_IMAGES:
            break
        try:
            with source.open(i) as image:
                images.append(preprocess(image, unused))
        except Exception as e:  # an unreadable file is left out, as in training
            print(f"warning: skipping unreadable image {source.name(i)} ({type(e).__name__})", file=sys.stderr)
            continue
        rows.append(i)
    if not rows:
        raise data.DataError(f"{source.description} holds no readable images")
    description = f"{source.description} at {resolution}x{resolution}, {channels} channel(s)"
    return RealImages(torch.stack(images), _labels(source, rows), description)


def split_real_images(real: RealImages) -> tuple[RealImages, torch.Tensor]:
    """Two fixed halves of the real images (the same split every run): ``(train, reference_pool)``.

    The default extractor trains on ``train``; reference images come from the other half, so that, like
    generated samples, they are unseen by it. Against the extractor's own training images, held-out real images
    score worse (embedded Fashion-MNIST at 28x28, 1,000 vs 1,000 images: FID 12.7 and recall 0.76 instead of 6.2
    and 0.91 between two unseen sets), which would set a floor that no model could go below.
    """
    n = real.images.shape[0]
    if n < 8:
        raise data.DataError(f"{real.description}: {n} real images are too few to evaluate against (need 8)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    train, pool = order[n // 2:], order[:n // 2]
    labels = None if real.labels is None else real.labels[train]
    return RealImages(real.images[train], labels, real.description), real.images[pool]


# ---- sampling and scoring ------------------------------------------------------------------------------------

def generate(pipe: Pipeline, num_images: int, batch_size: int, num_inference_steps: int, seed: int = 0,
             eta: float = 0.0, progress: bool = True) -> torch.Tensor:
    """``num_images`` samples as an ``[N x C x H x W]`` CPU tensor in ``[-1, 1]``; image i uses seed ``seed + i``
    (as ``ddpm.sample`` does), so the set does not depend on ``batch_size``. ``progress=False``: no bars."""
    out = []
    with tqdm(total=num_images, desc="sampling", unit="image", disable=not progress) as bar:  # inner bars: steps
        for _, images in sample_batches(pipe, num_images, batch_size, num_inference_steps, seed, eta,
                                        output_type="pt", progress=progress, leave=False):
            assert isinstance(images, torch.Tensor)
            out.append(images.float().cpu() * 2 - 1)  # the pipeline's [0, 1] back to model space [-1, 1]
            bar.update(images.shape[0])
    return torch.cat(out)


def log_metrics(output_dir: str | Path, record: dict[str, Any], scalars: dict[str, float],
                step: int | None = None) -> None:
    """Append ``record`` as one JSON line to ``<output_dir>/metrics.jsonl`` and write ``scalars`` as tensorboard
    ``eval/<name>`` at ``step`` under ``<output_dir>/logs`` (default step: the number of earlier records)."""
    jsonl = Path(output_dir) / "metrics.jsonl"
    if step is None:
        step = sum(1 for _ in jsonl.open(encoding="utf-8")) if jsonl.is_file() else 0
    with jsonl.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    if not scalars:
        return
    from torch.utils.tensorboard import SummaryWriter  # imported here: it is slow, and only needed now

    with SummaryWriter(str(Path(output_dir) / "logs")) as writer:
        for name, value in scalars.items():
            writer.add_scalar(f"eval/{name}", value, step)


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Sample, score against real images, append to ``metrics.jsonl`` and tensorboard; returns the JSON record."""
    if config.num_images < 4 or config.batch_size < 1:
        raise CLIError("--num_images must be at least 4 and --batch_size at least 1")
    check_sampling_flags(config.eta, config.seed, config.num_images)
    if config.extractor_steps < 1:
        raise CLIError(f"--extractor_steps {config.extractor_steps} must be at least 1")
    device = pick_device(config.device)
    pipe, steps = open_pipeline(config.model, config.scheduler, config.num_inference_steps)
    size = pipe.unet.config.sample_size
    if not isinstance(size, int):
        raise CLIError(f"the model's sample_size {size} is not square; ddpm.evaluate needs square images")
    if config.resolution is not None and config.resolution != size:
        raise CLIError(f"--resolution {config.resolution} does not match the model's sample_size {size}")
    channels = pipe.unet.config.in_channels
    output = Path(config.output_dir if config.output_dir is not None else config.model)
    output.mkdir(parents=True, exist_ok=True)

    extractor: metrics.FeatureExtractor
    extractor_name = config.feature_extractor
    if config.feature_extractor is not None:  # load it first: a bad file should fail before any sampling
        extractor = metrics.load_extractor(config.feature_extractor, device)
    real = load_real_images(config.dataset_name, config.train_data_dir, size, channels, config.dataset_config_name,
                            config.cache_dir)
    pool = real.images
    if config.feature_extractor is None:
        train, pool = split_real_images(real)
        net = metrics.dataset_extractor(train.images, train.labels, output, train.description,
                                        steps=config.extractor_steps, device=device)
        extractor = net
        extractor_name = f"ddpm-cnn {net.config.task} {net.config.feature_dim}-d"
    pick = torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(config.seed))
    reference = pool[pick[:config.num_images]]
    if reference.shape[0] < config.num_images:
        print(f"note: only {reference.shape[0]} real images to compare {config.num_images} samples with",
              file=sys.stderr)

    pipe.to(device)
    start = time.perf_counter()
    generated = generate(pipe, config.num_images, config.batch_size, steps, config.seed, config.eta)
    sample_seconds = time.perf_counter() - start
    scores = metrics.evaluate_images(generated, reference, extractor, seed=config.seed)

    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **scores, "num_images": config.num_images,
              "num_real_images": reference.shape[0], "scheduler": type(pipe.scheduler).__name__,
              "num_inference_steps": steps, "eta": config.eta, "seed": config.seed,
              "model": str(Path(config.model).resolve()) if Path(config.model).exists() else config.model,
              "real_images": real.description, "feature_extractor": extractor_name,
              "sample_seconds": round(sample_seconds, 1)}
    log_metrics(output, record, scores)
    width = max(map(len, scores))
    print(f"{config.num_images} samples ({record['scheduler']}, {steps} steps) vs {reference.shape[0]} real images "
          f"in the space of {extractor_name}:")
    for name, value in scores.items():
        print(f"  {name:<{width}}  {value:10.4f}")
    print(f"appended to {output / 'metrics.jsonl'}")
    return record


def parse_args(argv: Sequence[str] | None = None) -> EvalConfig:
    p = argparse.ArgumentParser(prog="python -m ddpm.evaluate",
                                description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", required=True, help="pipeline folder or hub repo id")
    p.add_argument("--num_images", type=int, default=1000, help="samples to draw, and real images to compare with")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_inference_steps", type=int, default=None, help="default: 1000 (ddpm) or 50 (ddim)")
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default=None, help="default: the model's own")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset_name", default=None, help="a datasets name or local path for the real images")
    p.add_argument("--dataset_config_name", default=None)
    p.add_argument("--train_data_dir", default=None, help="a folder of real images (class sub-folders = labels)")
    p.add_argument("--cache_dir", default=None, help="datasets' cache folder")
    p.add_argument("--resolution", type=int, default=None, help="default: the model's sample_size")
    p.add_argument("--feature_extractor", default=None,
                   help="TorchScript or .pt2 file mapping [-1, 1] NCHW images to NxD features (e.g. Inception)")
    p.add_argument("--extractor_steps", type=int, default=1000, help="training steps of the default extractor")
    p.add_argument("--output_dir", default=None, help="where metrics.jsonl, logs/ and the cache go (default: --model)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    add_debug_flag(p)
    args = p.parse_args(argv)
    return EvalConfig(**{k: v for k, v in vars(args).items() if k != "debug"})


def main(argv: Sequence[str] | None = None) -> None:
    evaluate(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run(main, prog="ddpm.evaluate"))
