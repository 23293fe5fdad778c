"""``python -m ddpm.sample``: sample images from a saved pipeline or a training checkpoint; write a PNG grid and
the single images.

    python -m ddpm.sample --model ddpm-fashion-mnist-32 --num_images 16 --output samples
    python -m ddpm.sample --model ddpm-fashion-mnist-32/checkpoint-1200 --no_ema --output samples-1200

Image i is drawn with its own generator seeded ``seed + i``, so it is the same whatever ``--batch_size``.
A ``--output`` folder that already holds images is refused (old and new samples would mix) unless ``--overwrite``
is given, which deletes the images an earlier ``ddpm.sample`` wrote there first.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ddpm.cli import (DEFAULT_SCHEDULER, CLIError, HelpFormatter, add_debug_flag, add_sampling_flags,
                      check_sampling_flags, open_pipeline, pick_device, run)
from ddpm.data import image_extensions
from ddpm.images import make_grid
from ddpm.pipeline import sample_batches

# The files ddpm.sample writes: 00000.png, 00001.png, ... and grid.png.
OWN_FILE = re.compile(r"^(\d{5,}|grid)\.png$")


@dataclass(frozen=True)
class SampleConfig:
    model: str
    num_images: int = 16
    batch_size: int = 16
    num_inference_steps: int | None = None  # None: the scheduler's own (ddim: 50, ddpm: num_train_timesteps)
    scheduler: str = DEFAULT_SCHEDULER      # a key of ddpm.schedulers.SAMPLERS
    solver_order: int | None = None         # dpm, sde-dpm, unipc: their order (None: 2)
    karras_sigmas: bool = False             # the σ-based samplers: Karras et al.'s noise levels
    eta: float = 0.0
    seed: int = 0
    output: str = "samples"
    overwrite: bool = False
    no_ema: bool = False                    # a training checkpoint's raw unet/ instead of unet_ema/
    device: str | None = None


def check_output(folder: Path, overwrite: bool) -> list[Path]:
    """The images an earlier run left in ``folder`` that this run replaces (none if it is new or holds no
    images). Images in it are a CLIError unless ``overwrite``; images ddpm.sample did not write always are."""
    if folder.exists() and not folder.is_dir():
        raise CLIError(f"--output {folder} is a file, not a folder")
    if not folder.is_dir():
        return []
    extensions = image_extensions()
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)
    if not images:
        return []
    if not overwrite:
        raise CLIError(f"--output {folder} already holds {len(images)} image(s) (e.g. {images[0].name}); pass "
                       f"--overwrite to replace them, or choose another --output")
    foreign = [p for p in images if not OWN_FILE.match(p.name)]
    if foreign:
        raise CLIError(f"--output {folder} holds images ddpm.sample did not write (e.g. {foreign[0].name}); "
                       f"--overwrite only replaces its own: choose another --output")
    return images


def sample(config: SampleConfig) -> Path:
    """Sample ``config.num_images`` images; write ``grid.png`` and ``00000.png``... into ``config.output``."""
    if config.num_images < 1 or config.batch_size < 1:
        raise CLIError("--num_images and --batch_size must be at least 1")
    check_sampling_flags(config.eta, config.seed, config.num_images)
    out = Path(config.output)
    old = check_output(out, config.overwrite)
    device = pick_device(config.device)
    loaded = open_pipeline(config.model, config.scheduler, config.num_inference_steps, use_ema=not config.no_ema,
                           solver_order=config.solver_order, karras_sigmas=config.karras_sigmas,
                           warn=lambda message: tqdm.write(message, file=sys.stderr))
    pipe = loaded.pipeline.to(device)

    for path in old:  # everything is checked: only now replace the earlier run's images
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    images: list[Image.Image] = []
    for first, batch in sample_batches(pipe, config.num_images, config.batch_size, loaded.num_inference_steps,
                                       config.seed, config.eta):
        for i, image in enumerate(batch):
            image.save(out / f"{first + i:05d}.png")
        images.extend(batch)
    make_grid(images).save(out / "grid.png")
    weights = {"ema": " (EMA weights)", "raw": " (raw weights, no EMA)"}.get(loaded.weights, "")
    tqdm.write(f"wrote {len(images)} images and {out / 'grid.png'}: {config.model}{weights}, "
               f"{type(pipe.scheduler).__name__} with {loaded.num_inference_steps} steps")
    return out


def parse_args(argv: Sequence[str] | None = None) -> SampleConfig:
    p = argparse.ArgumentParser(prog="python -m ddpm.sample", formatter_class=HelpFormatter,
                                description=__doc__.replace("``", "") if __doc__ else None)
    add_sampling_flags(p, num_images=16, batch_size=16)
    p.add_argument("--output", default="samples", help="folder for grid.png and the single images")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the images an earlier ddpm.sample wrote into --output (default: refuse)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    return SampleConfig(**{k: v for k, v in vars(args).items() if k != "debug"})


def main(argv: Sequence[str] | None = None) -> None:
    sample(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run(main, prog="ddpm.sample"))
