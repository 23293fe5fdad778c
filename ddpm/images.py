"""Image conversions and grids: model space ``[-1, 1]`` NCHW tensors to ``[0, 1]`` arrays and PIL images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """``[N x C x H x W]`` in ``[-1, 1]`` -> the same shape in ``[0, 1]``, clamped."""
    return (images / 2 + 0.5).clamp(0, 1)


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """``[N x C x H x W]`` floats in ``[0, 1]`` -> ``[N x H x W x C]`` float32 numpy in ``[0, 1]``."""
    return images.detach().float().cpu().permute(0, 2, 3, 1).numpy()


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """``[N x H x W x C]`` (or ``[H x W x C]``) floats in ``[0, 1]`` -> PIL images (mode L for one channel)."""
    if images.ndim == 3:
        images = images[None]
    pixels = (images * 255).round().astype("uint8")
    if pixels.shape[-1] == 1:
        return [Image.fromarray(p[..., 0], mode="L") for p in pixels]
    return [Image.fromarray(p) for p in pixels]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[N x C x H x W]`` tensor in ``[-1, 1]`` -> a list of N PIL images."""
    return numpy_to_pil(to_numpy(to_unit_range(images)))


def make_grid(images: Sequence[Image.Image], rows: int | None = None, cols: int | None = None) -> Image.Image:
    """Paste equal-sized PIL images into a rows x cols grid (defaults: as square as possible)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    if cols is None:
        cols = math.ceil(math.sqrt(n)) if rows is None else math.ceil(n / rows)
    if rows is None:
        rows = math.ceil(n / cols)
    if rows * cols < n:
        raise ValueError(f"a {rows}x{cols} grid cannot hold {n} images")
    w, h = images[0].size
    grid = Image.new(images[0].mode, (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, box=(i % cols * w, i // cols * h))
    return grid
