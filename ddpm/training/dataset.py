"""What the trainer iterates over: the readable rows of an image source, preprocessed (``TrainDataset``), in an
order that is a fixed function of (seed, epoch) (``EpochSampler``).

The random crops and flips of an epoch come from a generator seeded by (seed, epoch), one draw per image row,
instead of the global RNG, so the data of a step does not depend on worker processes, prefetching or where a
resumed run starts: resume is bit-exact. Each image is decoded and resized once and kept in memory, so later
epochs only crop, flip and scale it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, get_worker_info

from ddpm.data import DataError, ImageSource, Preprocess
from ddpm.errors import first_line


def mix_seed(*numbers: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers, e.g. (seed, epoch) for one epoch's shuffle."""
    state = np.random.SeedSequence(list(numbers)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


CACHE_BYTES = 2**30  # resized images a TrainDataset keeps in memory, shared out among its DataLoader workers
AUGMENTATIONS = 1  # mix_seed(seed, epoch, AUGMENTATIONS) seeds an epoch's crops and flips; (seed, epoch) its order


class TrainDataset(Dataset):
    """Readable rows of a source, preprocessed. Indexed by ``(position, epoch)`` as ``EpochSampler`` yields.

    An item is ``{"input": [C x R x R] float tensor in [-1, 1], "index": source row}``. The DataLoader fetches a
    batch at once (``__getitems__``): the rows not cached are read from the source in one query.

    The random crop and flip of a row come from row ``row`` of a table of uniforms drawn once per epoch from
    ``mix_seed(seed, epoch, AUGMENTATIONS)``: a fixed function of (seed, epoch, row), whatever the worker, the
    batch or where a resumed run starts. Each row's resized image (before crop and flip) is kept in memory, up
    to ``cache_bytes`` in all, so from the second epoch on an image is neither decoded nor resized again. The
    cache changes the speed, never the values.
    """

    def __init__(self, source: ImageSource, rows: Sequence[int], preprocess: Preprocess, seed: int,
                 cache_bytes: int = CACHE_BYTES) -> None:
        self.source = source
        self.rows = list(rows)
        self.preprocess = preprocess
        self.seed = seed
        self.cache_bytes = cache_bytes
        self._cache: dict[int, torch.Tensor] = {}  # row -> preprocess.resize(image)
        self._cached_bytes = 0
        self._draws: tuple[int, torch.Tensor] | None = None  # (epoch, [len(source), 3] uniforms)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        rows = [self.rows[position] for position, _ in keys]
        missing = [row for row in rows if row not in self._cache]
        openers = dict(zip(missing, self.source.openers(missing)))
        crops = [self.preprocess.crop_and_flip(self._resized(row, openers), self._row_draws(epoch, row))
                 for row, (_, epoch) in zip(rows, keys)]
        # Scaled one image at a time: tensors this small stay on one thread (a batch-sized op would use OpenMP
        # threads, which stall when other processes hold the cores).
        return [{"input": self.preprocess.to_unit_range(x), "index": row} for x, row in zip(crops, rows)]

    def __getstate__(self) -> dict[str, Any]:  # a worker started by pickling (spawn) gets an empty cache
        return {**self.__dict__, "_cache": {}, "_cached_bytes": 0}

    def _row_draws(self, epoch: int, row: int) -> list[float]:
        if not self.preprocess.is_random:
            return [0.0, 0.0, 1.0]
        if self._draws is None or self._draws[0] != epoch:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, AUGMENTATIONS))
            self._draws = (epoch, torch.rand(len(self.source), 3, generator=generator))
        draws: list[float] = self._draws[1][row].tolist()
        return draws

    def _resized(self, row: int, openers: dict[int, Callable[[], Image.Image]]) -> torch.Tensor:
        x = self._cache.get(row)
        if x is not None:
            return x
        try:  # checked before training, so only a file changed since then fails here
            image = openers[row]()
            image.load()
        except Exception as e:
            raise DataError(f"image {self.source.name(row)} can no longer be read "
                            f"({type(e).__name__}: {first_line(e)})") from None
        try:
            with image:
                x = self.preprocess.resize(image)
        except Exception as e:
            raise DataError(f"image {self.source.name(row)} could not be preprocessed "
                            f"({type(e).__name__}: {first_line(e)})") from None
        worker = get_worker_info()
        size = x.numel() * x.element_size()
        if self._cached_bytes + size <= self.cache_bytes // (worker.num_workers if worker else 1):
            self._cache[row] = x
            self._cached_bytes += size
        return x


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffled positions, a fixed function of (seed, epoch): ``set_epoch(e)`` then iterate.

    Every process draws the same permutation (accelerate then gives each its own batches), and a resumed run
    draws the same one as the run it continues, whatever happened to any RNG in between.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        for position in torch.randperm(self.length, generator=generator).tolist():
            yield position, self.epoch
