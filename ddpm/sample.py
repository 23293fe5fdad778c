"""``python -m ddpm.sample``: sample images from a saved pipeline and write a PNG grid and the single images.

    python -m ddpm.sample --model ddpm-model-64 --num_images 16 --scheduler ddim --num_inference_steps 50

Image i is drawn with its own generator seeded ``seed + i``, so it is the same whatever ``--batch_size``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from PIL import Image

from ddpm.cli import CLIError, add_debug_flag, check_sampling_flags, pick_device, run
from ddpm.images import make_grid
from ddpm.pipeline import Pipeline
from ddpm.schedulers import DDIMScheduler, DDPMScheduler


@dataclass(frozen=True)
class SampleConfig:
    model: str
    num_images: int = 16
    batch_size: int = 16
    num_inference_steps: int | None = None  # None: 1000 for DDPM, 50 for DDIM
    scheduler: Literal["ddpm", "ddim"] | None = None  # None: the scheduler saved with the model
    eta: float = 0.0
    seed: int = 0
    output: str = "samples"
    device: str | None = None


def open_pipeline(model: str, scheduler: Literal["ddpm", "ddim"] | None,
                  num_inference_steps: int | None) -> tuple[Pipeline, int]:
    """The pipeline at ``model`` with ``--scheduler`` swapped in, and the checked number of sampling steps
    (default: 50 for DDIM, ``num_train_timesteps`` for DDPM). Shared by ``ddpm.sample`` and ``ddpm.evaluate``."""
    pipe = Pipeline.from_pretrained(model)
    if scheduler is not None:
        cls = DDIMScheduler if scheduler == "ddim" else DDPMScheduler
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    steps = num_inference_steps
    if steps is None:
        steps = 50 if isinstance(pipe.scheduler, DDIMScheduler) else pipe.scheduler.num_train_timesteps
    if not 1 <= steps <= pipe.scheduler.num_train_timesteps:
        raise CLIError(f"--num_inference_steps {steps} must be between 1 and the model's "
                       f"num_train_timesteps ({pipe.scheduler.num_train_timesteps})")
    return pipe, steps


def sample_batches(pipe: Pipeline, num_images: int, batch_size: int, num_inference_steps: int, seed: int = 0,
                   eta: float = 0.0, output_type: Literal["pil", "np", "pt"] = "pil",
                   progress: bool = True, leave: bool = True) -> Iterator[tuple[int, Any]]:
    """``(first, images)`` per batch of at most ``batch_size``: images ``first``, ``first + 1``, ... of
    ``num_images``, image i drawn with its own generator seeded ``seed + i`` (so the set does not depend on
    ``batch_size``). ``progress=False`` hides the per-step bars; ``leave=False`` clears each when done. Shared
    by ``ddpm.sample`` and ``ddpm.evaluate``."""
    num_batches = math.ceil(num_images / batch_size)
    for b in range(num_batches):
        first = b * batch_size
        count = min(batch_size, num_images - first)
        generators = [torch.Generator().manual_seed(seed + first + i) for i in range(count)]
        pipe.set_progress_bar_config(desc=f"batch {b + 1}/{num_batches}", leave=leave, disable=not progress)
        yield first, pipe(batch_size=count, generator=generators, num_inference_steps=num_inference_steps,
                          eta=eta, output_type=output_type)[0]


def sample(config: SampleConfig) -> Path:
    """Sample ``config.num_images`` images; write ``grid.png`` and ``00000.png``... into ``config.output``."""
    if config.num_images < 1 or config.batch_size < 1:
        raise CLIError("--num_images and --batch_size must be at least 1")
    check_sampling_flags(config.eta, config.seed, config.num_images)
    device = pick_device(config.device)
    pipe, steps = open_pipeline(config.model, config.scheduler, config.num_inference_steps)
    pipe.to(device)

    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    images: list[Image.Image] = []
    for first, batch in sample_batches(pipe, config.num_images, config.batch_size, steps, config.seed, config.eta):
        for i, image in enumerate(batch):
            image.save(out / f"{first + i:05d}.png")
        images.extend(batch)
    make_grid(images).save(out / "grid.png")
    print(f"wrote {len(images)} images and {out / 'grid.png'}")
    return out


def parse_args(argv: Sequence[str] | None = None) -> SampleConfig:
    p = argparse.ArgumentParser(prog="python -m ddpm.sample", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model", required=True, help="pipeline folder or hub repo id")
    p.add_argument("--num_images", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_inference_steps", type=int, default=None, help="default: 1000 (ddpm) or 50 (ddim)")
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default=None, help="default: the model's own")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="samples", help="folder for grid.png and the single images")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    add_debug_flag(p)
    args = p.parse_args(argv)
    return SampleConfig(model=args.model, num_images=args.num_images, batch_size=args.batch_size,
                        num_inference_steps=args.num_inference_steps, scheduler=args.scheduler, eta=args.eta,
                        seed=args.seed, output=args.output, device=args.device)


def main(argv: Sequence[str] | None = None) -> None:
    sample(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run(main, prog="ddpm.sample"))
