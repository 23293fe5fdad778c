"""Small builders shared by the trainer tests (imported as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# The smallest UNet the trainer runs: 2 levels, 8/16 channels, one attention level.
TINY_UNET = {"block_out_channels": [8, 16], "norm_num_groups": 4, "layers_per_block": 1,
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}


def write_training_files(root: Path, count: int, size: tuple[int, int], seed: int) -> tuple[Path, Path]:
    """``count`` random RGB PNGs of ``size`` (height, width) in root/images, and TINY_UNET as root/tiny.json."""
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")).save(images / f"{i:02d}.png")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY_UNET))
    return images, config
