"""ddpm.metrics' hand-written Fréchet distance and KID against torchmetrics: exactness and speed.

torchmetrics is not a dependency of ddpm, so run this in an environment that has it (and scipy), with the
repository on the path:

    python3 -m venv /tmp/tm && /tmp/tm/bin/pip install torch torchmetrics scipy
    PYTHONPATH=. /tmp/tm/bin/python benchmarks/fd_kid_vs_torchmetrics.py [--quick]

Exactness: cases whose answer is known in closed form from the features alone, on realistic sizes (the CNN's
64-d features, Inception's 2048-d ones, N above and below D):
- shift: B = A + c, so both covariances are equal and FD = |c|^2 exactly;
- scale: B = s A, so C_B = s^2 C_A and FD = (1 - s)^2 (|mu_A|^2 + tr C_A);
- self: FD(A, A) = 0.
FD inputs are float64 features, so that the shifted and scaled copies are exact and the error is the method's
own; every method computes in float64 inside (torchmetrics accumulates its sums in float64). The scipy column is
the classic reference formula (pytorch-fid / TTUR: scipy.linalg.sqrtm of C_A C_B).
KID: both on the same whole sets (one "subset" of all N rows, so no random draw differs), against a float64
numpy evaluation of the unbiased MMD^2 with the cubic kernel; torchmetrics gets the features in float32, as its
Inception gives them, and in float64.
Speed: medians of interleaved repeats (A, B, A, B, ...) in one process; ratios are what to compare.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ddpm import metrics as M


class Identity(nn.Module):
    """Lets torchmetrics take features directly: its "images" are the [N x D] features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def features(n: int, d: int, seed: int) -> torch.Tensor:
    # Inception-like: non-negative (after ReLU and pooling), correlated, with a decaying spectrum.
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing.T + 0.5).relu().float()


def fd_torchmetrics(a: torch.Tensor, b: torch.Tensor) -> float:
    fid = FrechetInceptionDistance(feature=Identity(a.shape[1]), normalize=False)
    fid.update(a, real=True)
    fid.update(b, real=False)
    return float(fid.compute())


def fd_scipy(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.double().numpy(), b.double().numpy()
    mu1, mu2 = x.mean(0), y.mean(0)
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


def kid_torchmetrics(a: torch.Tensor, b: torch.Tensor, subsets: int, size: int) -> float:
    kid = KernelInceptionDistance(feature=Identity(a.shape[1]), subsets=subsets, subset_size=size, normalize=False)
    kid.update(a, real=True)
    kid.update(b, real=False)
    return float(kid.compute()[0])


def kid_reference(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.double().numpy(), b.double().numpy()
    m, d = x.shape

    def k(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return (p @ q.T / d + 1) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def relative(value: float, exact: float, scale: float) -> float:
    return abs(value - exact) / scale


def exactness(sizes: list[tuple[int, int]]) -> None:
    print("FD exactness: |computed - exact| / exact (self: / tr C_A), float64 features")
    print(f"{'N':>6} {'D':>5} {'case':>6} {'ddpm':>10} {'torchmetrics':>13} {'scipy sqrtm':>12}")
    for n, d in sizes:
        a = features(n, d, 0).double()
        mu, trace = a.mean(0), torch.cov(a.T).trace()
        c = torch.full((d,), 2.0**-6)  # a power of two: A + c is exact in float64 for these magnitudes
        s = 1.125                      # likewise s A
        cases = {"shift": (a + c, float(c.square().sum())),
                 "scale": (a * s, float((1 - s) ** 2 * (mu.square().sum() + trace))),
                 "self": (a.clone(), 0.0)}
        for name, (b, exact) in cases.items():
            scale = abs(exact) if exact else float(trace)
            row = [relative(f(a, b), exact, scale) for f in (M.frechet_distance, fd_torchmetrics, fd_scipy)]
            print(f"{n:>6} {d:>5} {name:>6} {row[0]:10.1e} {row[1]:13.1e} {row[2]:12.1e}")
    print()
    print("KID exactness: |computed - float64 reference| / |reference|, one subset = the whole sets")
    print(f"{'N':>6} {'D':>5} {'ddpm':>10} {'tm float32':>11} {'tm float64':>11}")
    for n, d in sizes:
        if n > 4000:
            continue  # three N x N float64 kernels
        a, b = features(n, d, 0), features(n, d, 1)
        ref = kid_reference(a, b)
        ours = M.kernel_inception_distance(a, b, num_subsets=1, subset_size=n)[0]
        tm32 = kid_torchmetrics(a, b, 1, n)
        tm64 = kid_torchmetrics(a.double(), b.double(), 1, n)
        print(f"{n:>6} {d:>5} {relative(ours, ref, abs(ref)):10.1e} {relative(tm32, ref, abs(ref)):11.1e} "
              f"{relative(tm64, ref, abs(ref)):11.1e}")
    print()


def interleaved(fns: dict[str, object], repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def speed(sizes: list[tuple[int, int]], repeats: int, kid_subsets: int = 100, fd: bool = True) -> None:
    print(f"Speed: medians of {repeats} interleaved repeats, seconds (ratio = torchmetrics / ddpm)")
    for n, d in sizes if fd else []:
        a, b = features(n, d, 0), features(n, d, 1)
        t = interleaved({"ddpm": lambda: M.frechet_distance(a, b), "tm": lambda: fd_torchmetrics(a, b)}, repeats)
        print(f"FD  N={n:>6} D={d:>5}: ddpm {t['ddpm']:.3f}  torchmetrics {t['tm']:.3f}  ratio {t['tm'] / t['ddpm']:.2f}")
    for n, d in sizes:
        a, b = features(n, d, 0), features(n, d, 1)
        size = min(1000, n)
        t = interleaved({"ddpm": lambda: M.kernel_inception_distance(a, b, kid_subsets, size),
                         "tm": lambda: kid_torchmetrics(a, b, kid_subsets, size)}, repeats)
        print(f"KID N={n:>6} D={d:>5} {kid_subsets} subsets of {size}: ddpm {t['ddpm']:.3f}  torchmetrics {t['tm']:.3f}  "
              f"ratio {t['tm'] / t['ddpm']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (a loaded machine)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--kid_speed_only", action="store_true", help="only the KID timings")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    if args.kid_speed_only:
        speed([(500, 64), (2000, 2048)] if args.quick else [(500, 64), (10000, 64), (10000, 2048)],
              repeats=3 if args.quick else 5, kid_subsets=20 if args.quick else 100, fd=False)
    elif args.quick:
        exactness([(500, 64), (2000, 64), (2000, 2048)])
        speed([(500, 64), (2000, 2048)], repeats=3, kid_subsets=20)
    else:
        exactness([(500, 64), (10000, 64), (2000, 2048), (10000, 2048)])
        speed([(500, 64), (10000, 64), (10000, 2048)], repeats=5)


if __name__ == "__main__":
    main()
