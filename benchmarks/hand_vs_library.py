"""Hand-written or library? ddpm's EMA and preprocessing against what torch and torchvision offer.

    python benchmarks/hand_vs_library.py            # both parts, a few minutes on 2 CPU cores
    python benchmarks/hand_vs_library.py --quick    # a tiny model and few repeats: seconds (the smoke test)

EMA: ``ddpm.ema.EMA`` against ``torch.optim.swa_utils.AveragedModel`` with a ``multi_avg_fn`` giving the same
warm-up decay, both against diffusers' ``EMAModel(use_ema_warmup=True)`` as train_unconditional.py builds it
(``foreach=False``). Same model, same parameter updates; after each step every shadow is compared with
diffusers' (bitwise, and the largest difference). Time per update is measured interleaved in one process (A B C,
C B A, ...); memory is the bytes each keeps besides the model.

Preprocessing: ``ddpm.data.Preprocess`` (one image, and a cached batch as ``TrainDataset`` serves it after the
first epoch) against torchvision.transforms.v2 (on PIL images, and on uint8 tensors), all against
train_unconditional.py's own ``transforms.Compose`` (v1): bitwise equal outputs with ``--center_crop``, and time
per image, interleaved.

Ratios are other / ddpm time, so > 1 means ddpm is faster. On a loaded machine trust the ratios, not the times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddpm import UNet  # noqa: E402
from ddpm.data import Preprocess  # noqa: E402
from ddpm.ema import EMA, ema_decay, ema_update_  # noqa: E402

SMALL_UNET = Path(__file__).resolve().parent.parent / "ddpm" / "assets" / "unet-small.json"
TINY_UNET = dict(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
                 sample_size=8, in_channels=3, out_channels=3)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn (forwards, then backwards) ``repeats`` times."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    return times


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def paired_ratio(other: list[float], ours: list[float]) -> float:
    return statistics.median(o / d for o, d in zip(other, ours))


# ---- EMA -------------------------------------------------------------------------------------------------------


class DiffusersRoundingEMA(EMA):
    """ddpm's EMA with diffusers' rounding, ``s - (1 - d) * (s - p)`` in three passes: bitwise diffusers'."""

    @torch.no_grad()
    def step(self, model: nn.Module) -> float:
        self.optimization_step += 1
        self.decay = ema_decay(self.optimization_step, self.max_decay, self.inv_gamma, self.power)
        shadow, params = zip(*((s, p.detach()) for s, p in self._pairs(model)))
        differences = torch._foreach_sub(list(shadow), list(params))
        torch._foreach_mul_(differences, 1.0 - self.decay)
        torch._foreach_sub_(list(shadow), differences)
        return self.decay


class SwaEMA:
    """``AveragedModel`` with diffusers' warm-up decay: update k (1-based) uses ``ema_decay(k)``."""

    def __init__(self, model: nn.Module, max_decay: float = 0.9999, inv_gamma: float = 1.0, power: float = 0.75):
        from torch.optim.swa_utils import AveragedModel

        def warmup_update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
            # AveragedModel copies on update 1 and calls this on update k = n_averaged + 1
            ema_update_(averaged, current, ema_decay(int(n_averaged) + 1, max_decay, inv_gamma, power))

        self.averaged = AveragedModel(model, multi_avg_fn=warmup_update)

    def step(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def shadow(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.averaged.module.parameters()]


ROUNDED = "ddpm with diffusers' rounding"


def ema_case(model: nn.Module, steps: int, repeats: int) -> dict[str, Any]:
    from diffusers.training_utils import EMAModel

    params = list(model.parameters())
    ours = EMA(model)
    exact = DiffusersRoundingEMA(model)
    swa = SwaEMA(model)
    reference = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(p.shape, generator=generator) * 1e-2 for p in params]

    def perturb() -> None:  # stands in for an optimiser step
        with torch.no_grad():
            torch._foreach_add_(params, noise)
            torch._foreach_mul_(params, 0.999)

    same = {"ddpm": True, "swa_utils": True, ROUNDED: True}
    worst = {"ddpm": 0.0, "swa_utils": 0.0, ROUNDED: 0.0}
    swa_is_ddpm = True
    for _ in range(steps):
        perturb()
        ours.step(model)
        exact.step(model)
        swa.step(model)
        reference.step(model.parameters())
        swa_is_ddpm &= all(torch.equal(a, b) for a, b in zip(ours.shadow.values(), swa.shadow()))
        for name, shadow in (("ddpm", list(ours.shadow.values())), ("swa_utils", swa.shadow()),
                             (ROUNDED, list(exact.shadow.values()))):
            for a, b in zip(shadow, reference.shadow_params):
                same[name] &= torch.equal(a, b)
                worst[name] = max(worst[name], float((a - b).abs().max()))
    # Timing: the shadows keep moving, as in training (the decay is near its cap by now for all three).
    times = interleaved({"ddpm": lambda: ours.step(model), "swa_utils": lambda: swa.step(model),
                         "diffusers": lambda: reference.step(model.parameters()),
                         ROUNDED: lambda: exact.step(model)}, repeats)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    swa_bytes = sum(t.numel() * t.element_size() for t in [*swa.averaged.parameters(), *swa.averaged.buffers()])
    return {
        "parameters": sum(p.numel() for p in params), "tensors": len(params), "steps checked": steps,
        "bitwise equal to diffusers": same, "swa_utils bitwise equal to ddpm": swa_is_ddpm,
        "max |difference| from diffusers": worst,
        "ms per update": {k: median_ms(v) for k, v in times.items()},
        "time ratio (other / ddpm)": {k: paired_ratio(times[k], times["ddpm"]) for k in times if k != "ddpm"},
        "extra memory (MB)": {"ddpm": sum(t.numel() * t.element_size() for t in ours.shadow.values()) / 2**20,
                              "swa_utils": swa_bytes / 2**20,
                              "diffusers": sum(t.numel() * t.element_size() for t in reference.shadow_params) / 2**20,
                              "model parameters": param_bytes / 2**20},
    }


# ---- preprocessing ---------------------------------------------------------------------------------------------


def preprocess_case(resolution: int, size: tuple[int, int], count: int, repeats: int) -> dict[str, Any]:
    from torchvision import transforms
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)) for _ in range(count)]
    bilinear = transforms.InterpolationMode.BILINEAR
    script = transforms.Compose([transforms.Resize(resolution, interpolation=bilinear),
                                 transforms.CenterCrop(resolution),
                                 transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])
    v2_pil = v2.Compose([v2.Resize(resolution, interpolation=bilinear), v2.CenterCrop(resolution), v2.PILToTensor(),
                         v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.5])])
    v2_tensor = v2.Compose([v2.Resize(resolution, interpolation=bilinear, antialias=True), v2.CenterCrop(resolution),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5], [0.5])])
    ours = Preprocess(resolution, center_crop=True)
    unused = torch.Generator()
    tensors = [v2.functional.pil_to_tensor(im) for im in images]  # decoding to a tensor is not timed for v2-tensor
    cached = [ours.resize(im) for im in images]  # what TrainDataset keeps after the first epoch

    def cached_batch() -> torch.Tensor:
        return torch.stack([ours.to_unit_range(ours.crop_and_flip(x, (0.0, 0.0, 1.0))) for x in cached])

    expected = torch.stack([script(im) for im in images])
    outputs = {"ddpm": torch.stack([ours(im, unused) for im in images]), "ddpm cached batch": cached_batch(),
               "v2 on PIL": torch.stack([v2_pil(im) for im in images]),
               "v2 on uint8 tensor": torch.stack([v2_tensor(t) for t in tensors])}
    fns = {"ddpm": lambda: [ours(im, unused) for im in images], "ddpm cached batch": cached_batch,
           "v2 on PIL": lambda: [v2_pil(im) for im in images],
           "v2 on uint8 tensor": lambda: [v2_tensor(t) for t in tensors],
           "script (v1 Compose)": lambda: [script(im) for im in images]}
    times = interleaved(fns, repeats)
    return {
        "images": f"{count} RGB {size[1]}x{size[0]} -> {resolution}x{resolution}, center crop",
        "bitwise equal to the script": {k: torch.equal(v, expected) for k, v in outputs.items()},
        "max |difference| from the script": {k: float((v - expected).abs().max()) for k, v in outputs.items()},
        "us per image": {k: median_ms(v) * 1e3 / count for k, v in times.items()},
        "time ratio (other / ddpm)": {k: paired_ratio(times[k], times["ddpm"]) for k in fns if k != "ddpm"},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, few repeats: seconds")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        models = {"tiny": UNet(**TINY_UNET)}
        steps, repeats, pre_repeats, count = 3, 5, 3, 8
    else:
        small = {k: v for k, v in json.loads(SMALL_UNET.read_text()).items() if not k.startswith("_")}
        butterflies = dict(block_out_channels=(64, 128, 128, 256), layers_per_block=2, sample_size=32,
                           down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
        models = {"unet-small.json": UNet(**small), "butterflies-32": UNet(**butterflies)}
        steps, repeats, pre_repeats, count = 20, 60, 15, 64
    results: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for name, model in models.items():
        results[f"EMA, {name}"] = ema_case(model, steps, repeats)
    results["preprocessing, Fashion-MNIST-like"] = preprocess_case(32, (28, 28), count, pre_repeats)
    results["preprocessing, photo-like"] = preprocess_case(64, (96, 128), count, pre_repeats)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
