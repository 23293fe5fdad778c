"""Training images: where they come from, how they are checked, and how they become ``[-1, 1]`` tensors.

Three sources, as in train_unconditional.py plus a bundled default:

- ``--dataset_name``: ``datasets.load_dataset(name, config, split="train")``, a hub id or a local path;
- ``--train_data_dir``: a folder of images through datasets' ``imagefolder``;
- neither: the 5,000-image Fashion-MNIST subset shipped in ``ddpm/assets/fashion-mnist`` (MIT, see its README).

Every image is decoded once before training starts: a file that does not decode is named in a warning and
left out, so a corrupt image never stops an epoch half-way.

Preprocessing is the script's: resize the shorter side to ``resolution`` (bilinear), center or random crop,
optional horizontal flip, to a tensor, normalise to ``[-1, 1]``. The random crop and flip draw from a
generator seeded by (seed, epoch, row) instead of the global RNG, so the data of a step does not depend on
worker processes, prefetching or where a resumed run starts: resume is bit-exact.
"""

from __future__ import annotations

import gzip
import io
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ddpm.checkpoint import is_repo_id
from ddpm.errors import first_line

EMBEDDED_DIR = Path(__file__).resolve().parent / "assets" / "fashion-mnist"
EMBEDDED_NAME = "the bundled Fashion-MNIST subset"
logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad training data (missing folder, no images, unreachable dataset), reported as one line."""


# ---- sources: a list of rows that each decode to one PIL image -------------------------------------------


class ImageSource:
    """Rows of images: ``len()``, ``open(i) -> PIL.Image`` (may raise on a bad file), ``name(i)`` for messages."""

    description: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def open(self, i: int) -> Image.Image:
        raise NotImplementedError

    def name(self, i: int) -> str:
        return f"row {i} of {self.description}"


class EmbeddedImages(ImageSource):
    """The bundled Fashion-MNIST subset: IDX files, 28x28 grayscale."""

    description = EMBEDDED_NAME

    def __init__(self, folder: Path = EMBEDDED_DIR) -> None:
        self.pixels = read_idx(folder / "train-images-idx3-ubyte.gz")  # [N, 28, 28] uint8
        self.labels = read_idx(folder / "train-labels-idx1-ubyte.gz")  # [N] uint8

    def __len__(self) -> int:
        return len(self.pixels)

    def open(self, i: int) -> Image.Image:
        return Image.fromarray(self.pixels[i], mode="L")


class HFImages(ImageSource):
    """One image column of a ``datasets.Dataset``, read undecoded so each row decodes on its own."""

    def __init__(self, dataset: Any, column: str, description: str) -> None:
        import datasets

        self.rows = dataset.cast_column(column, datasets.Image(decode=False))
        self.column = column
        self.description = description

    def __len__(self) -> int:
        return len(self.rows)

    def _cell(self, i: int) -> dict[str, Any]:
        cell: dict[str, Any] = self.rows[int(i)][self.column]
        return cell

    def open(self, i: int) -> Image.Image:
        cell = self._cell(i)
        if cell.get("bytes") is not None:
            return Image.open(io.BytesIO(cell["bytes"]))
        if cell.get("path") is None:
            raise ValueError(f"{self.name(i)} holds no image")
        return Image.open(cell["path"])

    def name(self, i: int) -> str:
        path = self._cell(i).get("path")
        return str(path) if path else super().name(i)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped): big-endian header ``magic, dims...`` then uint8 data."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(x) for x in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


def open_image_folder(folder: str, cache_dir: str | None = None) -> HFImages:
    """``--train_data_dir``: check the folder, then load it with datasets' imagefolder."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise DataError(f"--train_data_dir {folder} does not exist")
    if not path.is_dir():
        raise DataError(f"--train_data_dir {folder} is not a folder")
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise DataError(f"--train_data_dir {folder} is empty")
    extensions = image_extensions()
    if not any(p.suffix.lower() in extensions for p in files):
        raise DataError(f"--train_data_dir {folder} holds no image files ({len(files)} other files; "
                        f"looked for .png, .jpg, .jpeg, .webp, ...)")
    import datasets

    try:
        dataset = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir, split="train")
    except Exception as e:  # datasets' own errors for folders it cannot read
        raise DataError(f"--train_data_dir {folder}: datasets' imagefolder could not read it "
                        f"({type(e).__name__}: {first_line(e)})") from None
    return HFImages(dataset, _image_column(dataset, folder), f"--train_data_dir {folder}")


def open_dataset(name: str, config_name: str | None = None, cache_dir: str | None = None) -> HFImages:
    """``--dataset_name``: a local dataset path or a hub id through ``datasets.load_dataset``."""
    import datasets

    if not is_repo_id(name) and not Path(name).expanduser().exists():
        raise DataError(f"--dataset_name {name} looks like a path but does not exist")
    try:
        dataset = datasets.load_dataset(name, config_name, cache_dir=cache_dir, split="train")
    except (ConnectionError, TimeoutError) as e:
        raise DataError(f"--dataset_name {name}: could not reach the Hugging Face Hub "
                        f"({first_line(e) or type(e).__name__}); offline, train on a "
                        f"local folder of images with --train_data_dir") from None
    except Exception as e:  # not found, no train split, bad config name, unreadable files
        raise DataError(f"--dataset_name {name} could not be loaded ({type(e).__name__}: {first_line(e)}); "
                        f"for a local folder of images use --train_data_dir") from None
    return HFImages(dataset, _image_column(dataset, name), f"--dataset_name {name}")


def _image_column(dataset: Any, what: str) -> str:
    import datasets

    columns = [c for c, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if "image" in columns:
        return "image"
    if not columns:
        raise DataError(f"{what} has no image column (columns: {', '.join(dataset.column_names)})")
    return str(columns[0])


def open_source(dataset_name: str | None, dataset_config_name: str | None, train_data_dir: str | None,
                cache_dir: str | None) -> ImageSource:
    """The source picked by the flags: ``--dataset_name`` wins over ``--train_data_dir``, as in the script."""
    if dataset_name is not None:
        return open_dataset(dataset_name, dataset_config_name, cache_dir)
    if train_data_dir is not None:
        return open_image_folder(train_data_dir, cache_dir)
    return EmbeddedImages()


def readable_rows(source: ImageSource, progress: bool = False) -> list[int]:
    """Rows whose image decodes. Each bad one is named in a warning; none readable is a ``DataError``."""
    if isinstance(source, EmbeddedImages):
        return list(range(len(source)))
    from tqdm.auto import tqdm

    good: list[int] = []
    bad: list[str] = []
    for i in tqdm(range(len(source)), desc="checking images", disable=not progress or len(source) < 1000):
        try:
            with source.open(i) as image:
                image.load()
            good.append(i)
        except Exception as e:  # UnidentifiedImageError, truncated files, missing files: all mean skip it
            bad.append(source.name(i))
            logger.warning("warning: skipping unreadable image %s (%s)", source.name(i), type(e).__name__)
    if not good:
        raise DataError(f"{source.description} holds no readable images ({len(bad)} files failed to decode, "
                        f"e.g. {bad[0]})" if bad else f"{source.description} holds no images")
    return good


# ---- preprocessing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """Resize, crop, flip and normalise one image to a ``[C x resolution x resolution]`` tensor in ``[-1, 1]``."""

    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    channels: int = 3  # 3: RGB, 1: grayscale
    preserve_input_precision: bool = False

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        # Imported here: torchvision takes as long to import as torch, and bad flags should fail fast.
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        if self.preserve_input_precision:
            x = self._to_tensor_full_precision(image)  # [C, H, W] in [0, 1]
            x = TF.resize(x, [self.resolution], interpolation=InterpolationMode.BILINEAR, antialias=True)
            x = self._crop_and_flip(x, generator)
        else:
            image = image.convert("RGB" if self.channels == 3 else "L")
            image = TF.resize(image, [self.resolution], interpolation=InterpolationMode.BILINEAR)
            x = TF.to_tensor(self._crop_and_flip(image, generator))  # [C, H, W] in [0, 1]
        return TF.normalize(x, [0.5], [0.5])  # -> [-1, 1]

    def _crop_and_flip(self, image: Any, generator: torch.Generator) -> Any:
        from torchvision.transforms import functional as TF

        r = self.resolution
        if self.center_crop:
            image = TF.center_crop(image, [r, r])
        else:  # torchvision's RandomCrop, with our generator
            width, height = TF.get_image_size(image)
            top = int(torch.randint(0, height - r + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - r + 1, (1,), generator=generator))
            image = TF.crop(image, top, left, r, r)
        if self.random_flip and float(torch.rand(1, generator=generator)) < 0.5:
            image = TF.hflip(image)
        return image

    def _to_tensor_full_precision(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> float ``[C, H, W]`` in ``[0, 1]`` at its own bit depth (16-bit stays 16-bit)."""
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 65535.0)[None]
        elif image.mode == "F":
            x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())[None]
        else:
            x = torch.from_numpy(np.asarray(image.convert("RGBA" if "A" in image.mode else "RGB"),
                                            dtype=np.float32) / 255.0).permute(2, 0, 1)[:3]
        if self.channels == 3 and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        elif self.channels == 1 and x.shape[0] == 3:
            x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]  # ITU-R 601 luma, as PIL's "L"
        return x.clamp(0, 1).contiguous()


def mix_seed(*numbers: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers, e.g. (seed, epoch, row) for one augmentation."""
    state = np.random.SeedSequence(list(numbers)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class TrainDataset(Dataset):
    """Readable rows of a source, preprocessed. Indexed by ``(position, epoch)`` as ``EpochSampler`` yields.

    An item is ``{"input": [C x R x R] float tensor in [-1, 1], "index": source row}``.
    """

    def __init__(self, source: ImageSource, rows: Sequence[int], preprocess: Preprocess, seed: int) -> None:
        self.source = source
        self.rows = list(rows)
        self.preprocess = preprocess
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        position, epoch = key
        row = self.rows[position]
        try:
            image = self.source.open(row)
            image.load()
        except Exception as e:  # checked before training, so only a file changed since then gets here
            raise DataError(f"image {self.source.name(row)} can no longer be read ({type(e).__name__})") from None
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, row))
        return {"input": self.preprocess(image, generator), "index": row}


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


# ---- real images for scoring samples (ddpm.evaluate and the trainer's --eval_epochs) -------------------------

# At most this many real images are loaded: the default feature network trains on half of them, the reference
# images are drawn from the other half.
MAX_REAL_IMAGES = 10_000


@dataclass(frozen=True)
class RealImages:
    images: torch.Tensor  # [N x C x H x W] in [-1, 1]
    labels: torch.Tensor | None  # [N] integers, or None for an unlabelled folder
    description: str


def _class_labels(source: ImageSource, rows: list[int]) -> torch.Tensor | None:
    # Class labels where the source has them: the embedded set's, or a datasets ClassLabel column (which
    # imagefolder makes from class sub-folders).
    if isinstance(source, EmbeddedImages):
        return torch.as_tensor(source.labels[rows].astype(np.int64))
    if isinstance(source, HFImages):
        import datasets

        columns = [c for c, f in source.rows.features.items() if isinstance(f, datasets.ClassLabel)]
        if columns:
            return torch.tensor(source.rows.select(rows)[columns[0]], dtype=torch.long)
    return None


def load_real_images(dataset_name: str | None, train_data_dir: str | None, resolution: int, channels: int,
                     dataset_config_name: str | None = None, cache_dir: str | None = None) -> RealImages:
    """Up to ``MAX_REAL_IMAGES`` readable real images of the training data (a ``datasets`` name, an image
    folder, or the embedded Fashion-MNIST subset), preprocessed as for training with a center crop and no flip,
    with class labels where the source has them. A larger source is read in a fixed random order, so the cap
    does not keep only the first class folders of a sorted image folder."""
    from tqdm.auto import tqdm

    source = open_source(dataset_name, dataset_config_name, train_data_dir, cache_dir)
    preprocess = Preprocess(resolution, center_crop=True, random_flip=False, channels=channels)
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
            tqdm.write(f"warning: skipping unreadable image {source.name(i)} ({type(e).__name__})", file=sys.stderr)
            continue
        rows.append(i)
    if not rows:
        raise DataError(f"{source.description} holds no readable images")
    description = f"{source.description} at {resolution}x{resolution}, {channels} channel(s)"
    return RealImages(torch.stack(images), _class_labels(source, rows), description)


def split_real_images(real: RealImages) -> tuple[RealImages, torch.Tensor]:
    """Two fixed halves of the real images (the same split every run): ``(train, reference_pool)``.

    The default feature network trains on ``train``; reference images come from the other half, so that, like
    generated samples, they are unseen by it. Against the network's own training images, held-out real images
    score worse (embedded Fashion-MNIST at 28x28, 1,000 vs 1,000 images: FD 12.7 and recall 0.76 instead of 6.2
    and 0.91 between two unseen sets), which would set a floor that no model could go below.
    """
    n = real.images.shape[0]
    if n < 8:
        raise DataError(f"{real.description}: {n} real images are too few to evaluate against (need 8)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    train, pool = order[n // 2:], order[:n // 2]
    labels = None if real.labels is None else real.labels[train]
    return RealImages(real.images[train], labels, real.description), real.images[pool]
