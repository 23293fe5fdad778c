"""Training images: where they come from, how they are checked, and how they become ``[-1, 1]`` tensors.

Three sources, as in train_unconditional.py plus a bundled default:

- ``--dataset_name``: ``datasets.load_dataset(name, config, split="train")``, a hub id or a local path;
- ``--train_data_dir``: a folder of images through datasets' ``imagefolder``;
- neither: the 5,000-image Fashion-MNIST subset shipped in ``ddpm/assets/fashion-mnist`` (MIT, see its README).

Every image is decoded once before training starts: a file that does not decode is named in a warning and
left out, so a corrupt image never stops an epoch half-way.

Preprocessing is the script's: resize the shorter side to ``resolution`` (bilinear), center or random crop,
optional horizontal flip, to a tensor, normalise to ``[-1, 1]``, bit for bit as its torchvision transforms do it
(without importing torchvision). How the trainer draws batches from these (the epoch order, the crops and flips
as fixed functions of seed, epoch and row, the cache) is ``ddpm.training.dataset``.
"""

from __future__ import annotations

import gzip
import io
import logging
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ddpm.checkpoint import is_repo_id
from ddpm.errors import first_line

EMBEDDED_DIR = Path(__file__).resolve().parent / "assets" / "fashion-mnist"
EMBEDDED_NAME = "the bundled Fashion-MNIST subset"
logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad training data (missing folder, no images, unreachable dataset), reported as one line."""

    def __init__(self, message: str = "") -> None:
        # A DataLoader worker's error reaches the main process as DataError("Caught DataError in DataLoader worker
        # process 0.\nOriginal Traceback ...\nddpm.data.DataError: <message>"): put <message>, which names the
        # file, back on the first line, the one a one-line error shows.
        head, _, rest = message.partition("\n")
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if head.startswith("Caught ") and marker in rest:
            where = head.removeprefix(f"Caught {type(self).__name__} ").rstrip(".")
            message = f"{rest.rsplit(marker, 1)[1].strip()} ({where})"
        super().__init__(message)


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

    def openers(self, rows: Sequence[int]) -> list[Callable[[], Image.Image]]:
        """``open`` for each row, deferred. A source that reads many rows faster at once overrides it."""
        return [partial(self.open, i) for i in rows]


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
        self._cells = self.rows.select_columns([column])  # reads skip the other columns

    def __len__(self) -> int:
        return len(self.rows)

    def _cell(self, i: int) -> dict[str, Any]:
        cell: dict[str, Any] = self._cells[int(i)][self.column]
        return cell

    def open(self, i: int) -> Image.Image:
        return self._open_cell(i, self._cell(i))

    def openers(self, rows: Sequence[int]) -> list[Callable[[], Image.Image]]:
        cells = self._cells[[int(i) for i in rows]][self.column]  # one query for all rows: 4x faster per row
        return [partial(self._open_cell, i, cell) for i, cell in zip(rows, cells)]

    def _open_cell(self, i: int, cell: dict[str, Any]) -> Image.Image:
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


# Anything datasets' split inference (datasets.data_files.get_data_patterns) could match in a path inside the folder:
# split keywords (train/training, test/testing, val/valid/validation/dev, eval/evaluation) anywhere, sharded split
# files (data/train-00000-of-00001.png), its logs and task files, and metadata files (read only under data_dir).
_SPLIT_HINTS = re.compile(r"train|test|val|dev|-[0-9]{5}-of-[0-9]{5}|task\.toml|instruction\.md|metadata",
                          re.IGNORECASE)


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

    # Given only data_dir, datasets tries each of its split-naming patterns in turn, one glob of the folder each
    # (66 for a folder of plain file names: 3.3 s for 5,000 images, against 0.9 s for one pattern). Where no path
    # inside the folder holds anything those patterns look for, its answer is one train split of every file, "**":
    # asked for directly. Otherwise datasets infers the splits itself, as for diffusers' script.
    plain = not any(_SPLIT_HINTS.search(str(p.relative_to(path))) for p in files)
    try:
        dataset = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=cache_dir, split="train",
                                        **({"data_files": {"train": "**"}} if plain else {}))
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


def readable_rows(source: ImageSource, progress: bool = False, *, channels: int | None = None,
                  preserve_input_precision: bool | None = None) -> list[int]:
    """Rows whose image decodes. Each bad one is named in a warning; none readable is a ``DataError``.

    Given the model's ``channels``, one warning counts the images that will be converted to that many channels
    (colour to grayscale or the other way). Given ``preserve_input_precision=False``, one warning counts the
    16-bit and float images (naming one), which are then rounded to 8 bits.
    """
    from tqdm.auto import tqdm

    if isinstance(source, EmbeddedImages):  # known: all decode, all 8-bit grayscale
        good, modes = list(range(len(source))), {"L": [0] * len(source)}
    else:
        good, bad, modes = [], [], {}
        n = len(source)
        with tqdm(total=n, desc="checking images", disable=not progress or n < 1000) as bar:
            for start in range(0, n, 256):
                chunk = range(start, min(start + 256, n))
                for i, opener in zip(chunk, source.openers(chunk)):
                    try:
                        with opener() as image:
                            image.load()
                            modes.setdefault(image.mode, []).append(i)
                        good.append(i)
                    except Exception as e:  # UnidentifiedImageError, truncated or missing files: all mean skip it
                        bad.append(source.name(i))
                        logger.warning("warning: skipping unreadable image %s (%s)", source.name(i), type(e).__name__)
                    bar.update(1)
        if not good:
            raise DataError(f"{source.description} holds no readable images ({len(bad)} files failed to decode, "
                            f"e.g. {bad[0]})" if bad else f"{source.description} holds no images")
    gray = sum(len(rows) for mode, rows in modes.items() if mode in GRAY_MODES)
    if channels == 1 and gray < len(good):
        logger.warning("warning: %d of %d images are in colour and the model takes 1 channel (in_channels=1): they "
                       "are converted to grayscale", len(good) - gray, len(good))
    elif channels == 3 and gray:
        logger.warning("warning: %d of %d images are grayscale and the model takes 3 channels (in_channels=3): "
                       "their gray is copied to R, G and B", gray, len(good))
    deep = [row for mode, rows in modes.items() if mode in DEEP_MODES for row in rows]
    if preserve_input_precision is False and deep:
        logger.warning("warning: %d of %d images are 16-bit or float (e.g. %s): they are rounded to 8 bits; "
                       "--preserve_input_precision keeps all their bits", len(deep), len(good),
                       source.name(min(deep)))
    return good


# ---- preprocessing --------------------------------------------------------------------------------------

# PIL modes with more than 8 bits per pixel: 16-bit integers (I;16..., and I, as PIL opens some 16-bit files),
# read as [0, 65535], and 32-bit floats (F), read as [0, 1] (the range torchvision's ConvertImageDtype assumes).
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
GRAY_MODES = ("1", "L", "LA", "La", *DEEP_MODES)  # every other mode is read as colour


def deep_to_unit(image: Image.Image) -> np.ndarray:
    """A 16-bit or float image as float32 ``[H, W]`` in ``[0, 1]``."""
    x = np.asarray(image, dtype=np.float32)
    return np.clip(x if image.mode == "F" else x / 65535.0, 0.0, 1.0)


@dataclass(frozen=True)
class Preprocess:
    """Resize, crop, flip and normalise one image to a ``[C x resolution x resolution]`` tensor in ``[-1, 1]``.

    The script's transforms, in three steps so that the first, deterministic one can be cached:
    ``resize(image)`` converts the mode and resizes the shorter side to ``resolution`` (bilinear), giving
    ``[C x H x W]`` uint8 (float in ``[0, 1]`` with ``preserve_input_precision``); ``crop_and_flip(x, draws)``
    takes the center or a random ``resolution`` square and maybe mirrors it, from three uniforms in ``[0, 1)``
    (top, left, flip); ``to_unit_range(x)`` scales one image or a batch to ``[-1, 1]``, as ``ToTensor`` then
    ``Normalize([0.5], [0.5])`` do, bit for bit.
    """

    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    channels: int = 3  # 3: RGB, 1: grayscale
    preserve_input_precision: bool = False

    @property
    def is_random(self) -> bool:
        return not self.center_crop or self.random_flip

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        """One image; the random crop and flip draw from ``generator``."""
        draws = torch.rand(3, generator=generator).tolist()
        return self.to_unit_range(self.crop_and_flip(self.resize(image), draws))

    def resize(self, image: Image.Image) -> torch.Tensor:
        # torchvision's Resize(resolution, BILINEAR) without torchvision, whose import costs as much time as
        # torch's and ~180 MB: the same PIL call on PIL images, the same F.interpolate call on tensors
        # (tests/test_data.py checks both bit for bit against torchvision).
        if self.preserve_input_precision:
            x = self._full_precision(image)  # [C, H, W] float in [0, 1]
            size = self._output_size(x.shape[-2], x.shape[-1])
            if size == tuple(x.shape[-2:]):
                return x
            return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        if image.mode in DEEP_MODES:  # PIL's convert() would clip them to 255: mostly a constant image
            image = Image.fromarray(np.round(deep_to_unit(image) * 255).astype(np.uint8))
        image = image.convert("RGB" if self.channels == 3 else "L")
        height, width = self._output_size(image.height, image.width)
        if (height, width) != (image.height, image.width):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(image))  # [H, W] or [H, W, C] uint8
        return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1).contiguous()

    def _output_size(self, height: int, width: int) -> tuple[int, int]:
        """The shorter side becomes ``resolution``, the longer keeps the aspect ratio, rounded down."""
        r = self.resolution
        if width <= height:
            return int(r * height / width), r
        return r, int(r * width / height)

    def crop_and_flip(self, x: torch.Tensor, draws: Sequence[float]) -> torch.Tensor:
        r = self.resolution
        height, width = x.shape[-2:]
        if self.center_crop:  # torchvision's CenterCrop offsets
            top, left = int(round((height - r) / 2.0)), int(round((width - r) / 2.0))
        else:  # RandomCrop: every offset equally likely
            top, left = int(draws[0] * (height - r + 1)), int(draws[1] * (width - r + 1))
        x = x[..., top:top + r, left:left + r]
        if self.random_flip and draws[2] < 0.5:
            x = x.flip(-1)
        return x

    @staticmethod
    def to_unit_range(x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div(255)  # ToTensor
        return x.sub(0.5).div(0.5)  # Normalize([0.5], [0.5]): [0, 1] -> [-1, 1]

    def _full_precision(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> float ``[C, H, W]`` in ``[0, 1]`` at its own bit depth (16-bit stays 16-bit)."""
        if image.mode in DEEP_MODES:
            x = torch.from_numpy(deep_to_unit(image))[None]
        else:
            x = torch.from_numpy(np.asarray(image.convert("RGBA" if "A" in image.mode else "RGB"),
                                            dtype=np.float32) / 255.0).permute(2, 0, 1)[:3]
        if self.channels == 3 and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        elif self.channels == 1 and x.shape[0] == 3:
            x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]  # ITU-R 601 luma, as PIL's "L"
        return x.contiguous()


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
