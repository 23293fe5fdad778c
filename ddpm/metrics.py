"""Sample quality that works offline: Fréchet distance, KID and k-NN precision/recall in a feature space.

Inception weights cannot be downloaded everywhere, so the default feature space is the penultimate layer of a
small CNN trained for a few seconds to minutes on the dataset's own real images: it classifies the labels when
the dataset has them, and otherwise predicts which of 0/90/180/270 degrees an image was rotated by
(a self-supervised proxy, Gidaris et al. 2018), so that any image folder works. It is cached per dataset.
Numbers from it compare models on the same dataset; they are not comparable with published Inception FIDs,
which is why the Fréchet distance is called ``fd`` here, not ``fid``. For a standard FID use
``inception_extractor()`` (torchmetrics' copy of the TF-Inception network, an optional extra) or pass your own
extractor (a TorchScript or ``torch.export`` file, or any Python callable).

    extractor = dataset_extractor(real_images, labels, cache_dir="out")
    evaluate_images(generated, real_images, extractor)  # {"fd": ..., "kid": ..., "precision": ..., ...}

Every image tensor here is ``[N x C x H x W]`` in ``[-1, 1]``; features are ``[N x D]``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ddpm.checkpoint import load_weights, save_weights
from ddpm.errors import first_line
from ddpm.config import config_from_dict, read_json, write_json

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]
Features = torch.Tensor | np.ndarray

# Bumped whenever the network or its training recipe changes, so that old caches are not reused.
RECIPE_VERSION = 1
# KID computes the kernel of every pair of rows once when it takes at most this much memory (float64) and fewer
# products than one kernel per subset; otherwise one kernel per subset.
KID_KERNEL_BYTES = 2**29


# --------------------------------------------------------------------------------------------------------------
# Statistics of two feature sets
# --------------------------------------------------------------------------------------------------------------

def _as_features(name: str, features: Features, min_rows: int = 2) -> torch.Tensor:
    f = torch.as_tensor(features).detach().cpu().to(torch.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} must be an [N x D] feature matrix, got shape {tuple(f.shape)}")
    if f.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {f.shape[0]}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return f


def mean_and_covariance(features: Features) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N x D]`` -> the mean ``[D]`` and the unbiased covariance ``[D x D]``, both float64."""
    f = _as_features("features", features)
    mu = f.mean(0)
    x = f - mu
    return mu, x.T @ x / (f.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    # Symmetric square root through the eigendecomposition; round-off negative eigenvalues are clamped to 0.
    w, v = torch.linalg.eigh(matrix)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance_from_stats(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Squared Fréchet distance between the Gaussians N(mu1, cov1) and N(mu2, cov2) (float64 inside)."""
    mu1, mu2, cov1, cov2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"mismatched statistics: mu1 {tuple(mu1.shape)}, cov1 {tuple(cov1.shape)}, "
                         f"mu2 {tuple(mu2.shape)}, cov2 {tuple(cov2.shape)}")
    # FID, Heusel et al. 2017: d^2 = |mu1 - mu2|^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)).
    # C1 C2 is not symmetric, but it is similar to S C2 S with S = C1^(1/2), which is symmetric PSD. So
    # tr((C1 C2)^(1/2)) is the sum of the square roots of the eigenvalues of S C2 S: no complex sqrtm needed.
    s1 = _psd_sqrt(cov1)
    middle = s1 @ cov2 @ s1
    middle = (middle + middle.T) / 2  # symmetric up to round-off; make it exactly so for eigvalsh
    tr_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt)


def frechet_distance(features_a: Features, features_b: Features) -> float:
    """Fréchet distance between Gaussians fitted to two ``[N x D]`` feature sets (FID when D is Inception's)."""
    return frechet_distance_from_stats(*mean_and_covariance(features_a), *mean_and_covariance(features_b))


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # The KID kernel of Bińkowski et al. 2018: k(x, y) = (x.y / d + 1)^3, for (..., m, d) batches of rows.
    return (x @ y.mT / x.shape[-1] + 1) ** 3


def kernel_inception_distance(features_a: Features, features_b: Features, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): the unbiased MMD^2 with a cubic polynomial kernel, averaged over random
    subsets of ``min(subset_size, N_a, N_b)`` rows. Returns ``(mean, std)`` over the subsets (std 0 when the
    subsets are the whole sets); ~0, possibly slightly negative, when both sets come from one distribution.
    """
    a, b = _as_features("features_a", features_a), _as_features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features_a has {a.shape[1]} dimensions but features_b has {b.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be at least 1, got {num_subsets}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"subset_size must be at least 2, got {subset_size}")
    if m == a.shape[0] == b.shape[0]:
        num_subsets = 1  # every "subset" would be both whole sets again
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for _ in range(num_subsets):
        picks.append((torch.randperm(a.shape[0], generator=generator)[:m],
                      torch.randperm(b.shape[0], generator=generator)[:m]))
    estimates = []
    n_a, n_b = a.shape[0], b.shape[0]
    whole = n_a * n_a + n_b * n_b + n_a * n_b  # kernel entries over every pair of rows
    if num_subsets > 1 and whole < 3 * num_subsets * m * m and whole * 8 <= KID_KERNEL_BYTES:
        # Fewer products than kernels per subset, in little memory: every pair's kernel once, then each
        # subset's kernels are gathered from it (the same float64 numbers either way).
        kaa, kbb, kab = _polynomial_kernel(a, a), _polynomial_kernel(b, b), _polynomial_kernel(a, b)
        for i, j in picks:
            estimates.append(_unbiased_mmd2(kaa[i[:, None], i][None], kbb[j[:, None], j][None],
                                            kab[i[:, None], j][None]))
    else:
        group = max(1, 2**23 // (m * m))  # subsets per batched kernel: about 64 MB of float64 per kernel matrix
        for start in range(0, num_subsets, group):
            x = torch.stack([a[i] for i, _ in picks[start:start + group]])  # (G, m, D)
            y = torch.stack([b[j] for _, j in picks[start:start + group]])  # (G, m, D)
            estimates.append(_unbiased_mmd2(_polynomial_kernel(x, x), _polynomial_kernel(y, y),
                                            _polynomial_kernel(x, y)))
    values = torch.cat(estimates)
    return float(values.mean()), float(values.std()) if num_subsets > 1 else 0.0


def _unbiased_mmd2(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
    # Unbiased MMD^2 (Gretton et al. 2012) of (G, m, m) kernel blocks -> (G,): within-set means leave out the
    # diagonal k(x_i, x_i).
    m = kxx.shape[-1]
    diagonals = kxx.diagonal(dim1=1, dim2=2).sum(1) + kyy.diagonal(dim1=1, dim2=2).sum(1)
    within = (kxx.sum((1, 2)) + kyy.sum((1, 2)) - diagonals) / (m * (m - 1))
    return within - 2 * kxy.mean((1, 2))


def _kth_neighbour_radii(features: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for rows in features.split(chunk):
        d = torch.cdist(rows, features, compute_mode="donot_use_mm_for_euclid_dist")
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: each point is its own nearest neighbour
    return torch.cat(radii)


def _fraction_inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    inside = []
    for rows in queries.split(chunk):
        d = torch.cdist(rows, centres, compute_mode="donot_use_mm_for_euclid_dist")
        inside.append((d <= radii[None]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Features, generated: Features, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``[N x D]`` feature sets.

    Each set's manifold is the union of balls around its points, each reaching to that point's k-th nearest
    neighbour in its own set. Precision is the fraction of generated points inside the real manifold (are the
    samples realistic?); recall is the fraction of real points inside the generated manifold (is the variety
    covered?). Both lie in ``[0, 1]``; identical sets give 1.
    """
    r, g = _as_features("real", real, min_rows=k + 1), _as_features("generated", generated, min_rows=k + 1)
    if r.shape[1] != g.shape[1]:
        raise ValueError(f"real features have {r.shape[1]} dimensions but generated have {g.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    precision = _fraction_inside(g, r, _kth_neighbour_radii(r, k, chunk), chunk)
    recall = _fraction_inside(r, g, _kth_neighbour_radii(g, k, chunk), chunk)
    return precision, recall


# --------------------------------------------------------------------------------------------------------------
# Features of images, and all metrics at once
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def compute_features(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Run ``extractor`` over ``[N x C x H x W]`` images in ``[-1, 1]`` in batches -> float64 ``[N x D]`` on CPU.

    An ``nn.Module`` extractor should be in eval mode (``load_extractor`` and ``dataset_extractor`` return it so).
    """
    device = images.device
    if isinstance(extractor, nn.Module):  # batches go where its weights are; its train/eval mode is its own
        device = next(extractor.parameters(), torch.empty(0, device=device)).device
    outputs = []
    for batch in images.split(batch_size):
        try:
            out = extractor(batch.to(device))
        except RuntimeError as e:  # e.g. a 3-channel Inception given grayscale images
            raise ValueError(f"feature_extractor failed on images of shape {tuple(batch.shape)}: "
                             f"{first_line(e) or type(e).__name__}") from e
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"feature_extractor must map [N x C x H x W] images to [N x D] features; "
                             f"got {shape} for a batch of shape {tuple(batch.shape)}")
        outputs.append(out.detach().to("cpu", torch.float64))
    return torch.cat(outputs)


def evaluate_images(generated: torch.Tensor, reference: torch.Tensor, extractor: FeatureExtractor, k: int = 3,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, batch_size: int = 256,
                    seed: int = 0) -> dict[str, float]:
    """Compare generated images with real ones, both ``[N x C x H x W]`` in ``[-1, 1]``, in the extractor's space.

    Returns ``fd`` (Fréchet distance; 0 is best; FID when the extractor is Inception's), ``kid`` and ``kid_std``
    (0 is best), ``precision`` and ``recall`` (k-NN, 1 is best).
    """
    if generated.shape[1:] != reference.shape[1:]:
        raise ValueError(f"generated images have shape {tuple(generated.shape[1:])} but the reference images "
                         f"have {tuple(reference.shape[1:])}; evaluate at the model's resolution and channels")
    fake = compute_features(extractor, generated, batch_size)
    real = compute_features(extractor, reference, batch_size)
    return feature_metrics(real, fake, k, kid_subsets, kid_subset_size, seed)


def feature_metrics(real: Features, generated: Features, k: int = 3, kid_subsets: int = 100,
                    kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """``evaluate_images`` on features already computed (``[N x D]`` each), e.g. real ones computed once."""
    kid, kid_std = kernel_inception_distance(real, generated, kid_subsets, kid_subset_size, seed)
    precision, recall = precision_recall(real, generated, k)
    return {"fd": frechet_distance(real, generated), "kid": kid, "kid_std": kid_std,
            "precision": precision, "recall": recall}


def load_extractor(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> FeatureExtractor:
    """Load a user-supplied feature extractor: a ``torch.export`` program (``.pt2``) or else a TorchScript file.

    It must map ``[N x C x H x W]`` images in ``[-1, 1]`` to ``[N x D]`` features; resizing and normalising for
    its own network (e.g. 299x299 for Inception) is its job.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature extractor file {str(path)!r} does not exist")
    try:
        if path.suffix == ".pt2":
            return torch.export.load(path).module().to(device)
        with warnings.catch_warnings():  # torch marks TorchScript deprecated, but that is what people have
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"feature extractor {str(path)!r} is not a TorchScript or torch.export file: "
                         f"{first_line(e) or type(e).__name__}") from e
    module.eval()
    return module


# The standard FID's network: the TF-Inception v3 graph of Heusel et al. 2017 (2015-12-05 weights), ported to
# PyTorch by torch-fidelity (the package torchmetrics' FID uses). An optional extra: pip install "ddpm[inception]".
INCEPTION_NAME = "Inception-v3 pool3 2048-d (torch-fidelity's port of the TF-FID network)"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")


def inception_weights_path() -> Path:
    """Where torch-fidelity keeps the Inception weights once downloaded: torch hub's checkpoint cache
    (``$TORCH_HOME/hub/checkpoints/``). ddpm never downloads them itself."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]


class InceptionFeatures(nn.Module):
    """``[N x C x H x W]`` images in ``[-1, 1]`` (C = 1 or 3) -> ``[N x 2048]`` pool3 features of the FID network.

    The images are quantised to 8 bits as a saved PNG would be (grayscale repeated to RGB); the network resizes
    them to 299x299 with TF1's bilinear resize, as the original FID code does."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # = to_pil's 8 bits
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return self.network(pixels)[0]  # (N, 2048)


def inception_extractor(device: torch.device | str = "cpu",
                        weights: str | os.PathLike[str] | None = None) -> InceptionFeatures:
    """The FID network as a feature extractor, from ``weights`` (default: ``inception_weights_path()``).

    Needs the torch-fidelity package and the weights file on disk; a missing one is a one-line error saying how
    to get it. The file is read with ``torch.load(weights_only=True)`` first, so a pickle that would run code is
    refused before torch-fidelity opens it."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ValueError('the Inception FID needs the torch-fidelity package: pip install "ddpm[inception]" '
                         '(or pip install torch-fidelity)')
    path = Path(weights) if weights is not None else inception_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found at {path}: download them there from "
                                f"{INCEPTION_WEIGHTS_URL}")
    load_weights(path)  # a ValueError naming the file unless it holds only tensors
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    forced, os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD"), "1"
    try:  # torch-fidelity calls torch.load(weights_only=False); the variable makes torch refuse code anyway
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    finally:
        if forced is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = forced
    return InceptionFeatures(network).to(device).eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------
# The default extractor: a small CNN trained on the dataset's real images, cached per dataset
# --------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ExtractorConfig:
    in_channels: int
    resolution: int
    num_outputs: int                         # classes, or 4 rotations
    task: Literal["classes", "rotation"]
    feature_dim: int = 64                    # D of the feature space
    width: int = 32                          # channels of the first conv; doubled per downsampling, up to 4x


class FeatureNet(nn.Module):
    """A small CNN: ``[N x C x H x W]`` in ``[-1, 1]`` -> ``[N x feature_dim]`` features (``forward``), or the
    logits of its training task (``logits``). GroupNorm keeps each image's features independent of its batch."""

    def __init__(self, config: ExtractorConfig) -> None:
        super().__init__()
        self.config = config
        ch, size = config.width, config.resolution
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, ch, 3, padding=1), nn.GroupNorm(8, ch), nn.SiLU()]
        while size > 4:  # halve until about 4x4: 8 -> 4, 28 -> 14 -> 7 -> 4, 64 -> ... -> 4
            out = min(2 * ch, 4 * config.width)
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            ch, size = out, (size + 1) // 2
        layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.GroupNorm(8, ch), nn.SiLU(), nn.AdaptiveAvgPool2d(4)]
        self.body = nn.Sequential(*layers)
        self.features = nn.Linear(ch * 16, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_outputs)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(self.body(images).flatten(1))  # (N, D), taken before the final non-linearity

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.silu(self(images)))  # (N, num_outputs)


def _rotate(images: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    # Image i turned by quarter_turns[i] * 90 degrees (square images); only the images of each turn are rotated
    out = images.clone()
    for r in range(1, 4):
        pick = quarter_turns == r
        out[pick] = torch.rot90(images[pick], r, dims=(2, 3))
    return out


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[0] < 2 or images.shape[2] != images.shape[3]:
        raise ValueError(f"images must be a square [N x C x H x W] batch with N >= 2, got shape {tuple(images.shape)}")


def train_extractor(images: torch.Tensor, labels: torch.Tensor | None = None, steps: int = 1000,
                    batch_size: int = 128, learning_rate: float = 2e-3, seed: int = 0,
                    device: torch.device | str = "cpu", progress: bool = False) -> FeatureNet:
    """Train a ``FeatureNet`` on real images ``[N x C x H x W]`` in ``[-1, 1]``: classification of ``labels``
    (``[N]`` integers) when given, else rotation prediction. Deterministic for a given seed and thread count;
    the global RNG is left untouched. ``progress``: a tqdm bar over the steps.
    """
    _check_images(images)
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if labels is not None:
        classes, targets = torch.unique(labels.cpu(), return_inverse=True)
        config = ExtractorConfig(images.shape[1], images.shape[2], len(classes), "classes")
    else:
        targets = torch.zeros(images.shape[0], dtype=torch.long)
        config = ExtractorConfig(images.shape[1], images.shape[2], 4, "rotation")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(config).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps)
    net.train()
    for _ in tqdm(range(steps), desc="training the feature network", unit="step", disable=not progress):
        index = torch.randint(images.shape[0], (batch_size,), generator=generator)
        x, y = images[index].to(device), targets[index]
        if config.task == "rotation":
            y = torch.randint(4, (batch_size,), generator=generator).to(device)
            x = _rotate(x, y)
        loss = F.cross_entropy(net.logits(x).float(), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def task_accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor | None = None, seed: int = 0) -> float:
    """Accuracy of ``net`` on its own task (classes of ``labels``, or rotations) on images ``[N x C x H x W]``."""
    device = next(net.parameters()).device
    if net.config.task == "rotation":
        targets = torch.randint(4, (images.shape[0],), generator=torch.Generator().manual_seed(seed))
        images = _rotate(images, targets)
    else:
        if labels is None:
            raise ValueError("labels are required to measure a classifier's accuracy")
        targets = torch.unique(labels.cpu(), return_inverse=True)[1]
    hits = [(net.logits(x.to(device)).argmax(1).cpu() == t) for x, t in zip(images.split(512), targets.split(512))]
    return float(torch.cat(hits).double().mean())


def dataset_key(images: torch.Tensor, labels: torch.Tensor | None, recipe: Mapping[str, object]) -> str:
    """A short hash naming a dataset (its pixels at 8 bits, shape and labels) and the training recipe."""
    h = hashlib.sha256(json.dumps({**recipe, "shape": list(images.shape), "version": RECIPE_VERSION},
                                  sort_keys=True).encode())
    h.update(((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy().tobytes())
    if labels is not None:
        h.update(labels.detach().cpu().to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def _load_cached(weights: Path, card: Path) -> FeatureNet:
    config = read_json(card).get("config")
    if not isinstance(config, dict):
        raise ValueError(f"{card} has no 'config' object")
    net = FeatureNet(config_from_dict(ExtractorConfig, config))
    net.load_state_dict(load_weights(weights))  # RuntimeError when the weights do not fit the config
    return net


def dataset_extractor(images: torch.Tensor, labels: torch.Tensor | None, cache_dir: str | os.PathLike[str],
                      description: str = "", steps: int = 1000, seed: int = 0,
                      device: torch.device | str = "cpu",
                      log: Callable[[str], object] | None = tqdm.write, progress: bool = False) -> FeatureNet:
    """The default feature extractor for a dataset: trained by ``train_extractor`` on ``images``/``labels`` the
    first time, saved as ``<cache_dir>/feature_extractors/<key>.safetensors`` (+ ``.json``), reused afterwards.
    ``log`` gets a one-line note when it trains; ``progress`` shows a bar over the training steps.

    ``key`` hashes the pixels, labels, resolution and recipe, so another dataset or resolution trains anew.
    """
    _check_images(images)
    recipe = {"steps": steps, "seed": seed, "labels": labels is not None}
    key = dataset_key(images, labels, recipe)
    folder = Path(cache_dir) / "feature_extractors"
    weights, card = folder / f"{key}.safetensors", folder / f"{key}.json"
    if weights.is_file() and card.is_file():
        try:
            return _load_cached(weights, card).to(device).eval().requires_grad_(False)
        except (ValueError, RuntimeError) as e:  # a damaged cache is rebuilt, not fatal
            if log is not None:
                log(f"warning: the cached feature extractor {weights} is damaged ({first_line(e)}); training it again")
    if log is not None:
        task = "classifying its labels" if labels is not None else "predicting rotations"
        log(f"training the feature extractor on {images.shape[0]} real images ({task}), cached as {weights}")
    start = time.perf_counter()
    net = train_extractor(images, labels, steps=steps, seed=seed, device=device, progress=progress)
    seconds = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    # Write under temporary names and rename, so that a crash or a parallel run never leaves half a cache.
    save_weights({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, f"{weights}.tmp")
    write_json(f"{card}.tmp", {"config": dataclasses.asdict(net.config), "description": description,
                               "num_images": images.shape[0], **recipe, "train_seconds": round(seconds, 1),
                               "train_accuracy": round(task_accuracy(net, images, labels, seed), 4)})
    os.replace(f"{weights}.tmp", weights)
    os.replace(f"{card}.tmp", card)
    return net



# --------------------------------------------------------------------------------------------------------------
# Recording scores
# --------------------------------------------------------------------------------------------------------------

def log_metrics(output_dir: str | os.PathLike[str], record: Mapping[str, Any], scalars: Mapping[str, float],
                step: int | None = None) -> None:
    """Append ``record`` as one JSON line to ``<output_dir>/metrics.jsonl`` and write ``scalars`` as tensorboard
    ``eval/<name>`` at ``step`` under ``<output_dir>/logs`` (default step: the number of earlier records)."""
    jsonl = Path(output_dir) / "metrics.jsonl"
    if step is None:
        step = sum(1 for _ in jsonl.open(encoding="utf-8")) if jsonl.is_file() else 0
    with jsonl.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(dict(record)) + "\n")
    if not scalars:
        return
    from torch.utils.tensorboard import SummaryWriter  # imported here: it is slow, and only needed now

    with SummaryWriter(str(Path(output_dir) / "logs")) as writer:
        for name, value in scalars.items():
            writer.add_scalar(f"eval/{name}", value, step)
