"""What a benchmark run measures: the UNet configs, the batch sizes, the repeats (``Plan``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# The UNets measured, as diffusers UNet2DModel kwargs.
CONFIGS: dict[str, dict[str, Any]] = {
    # The default laptop model (`python -m ddpm.train` trains it first): grayscale 32x32, 16/32/64 channels.
    "unet-small": {**{k: v for k, v in json.loads((REPO / "ddpm" / "assets" / "unet-small.json").read_text()).items()
                      if not k.startswith("_")}, "sample_size": 32},
    # The Hugging Face diffusion course's butterflies model (18.5M parameters).
    "butterflies-32": dict(
        sample_size=32, layers_per_block=2, block_out_channels=(64, 128, 128, 256),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    # The 35.7M CIFAR-10 model of Ho et al. 2020 (google/ddpm-cifar10-32).
    "cifar10-35.7M": dict(
        sample_size=32, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
    ),
}


@dataclass(frozen=True)
class Plan:
    """What one run measures. ``FULL`` and ``QUICK`` below; tests use a tiny one."""

    configs: tuple[str, ...]
    precisions: tuple[str, ...]
    forward_batches: tuple[int, ...] = (1, 8, 32)
    backward_batch: int = 16
    train_batch: int = 16
    repeats: int = 7  # timed calls per library per case
    warmup: int = 2
    memory_steps: int = 4  # training steps in each peak-memory subprocess (0: no memory measurement)
    sampling_configs: tuple[str, ...] = ("butterflies-32",)
    sampling_batch: int = 8
    sampling: tuple[tuple[str, int], ...] = (("ddim", 50), ("ddpm", 1000))
    sampling_repeats: tuple[int, ...] = (3, 1)  # per entry of ``sampling``
    scheduler_steps: tuple[tuple[str, int], ...] = (("ddpm", 1000), ("ddim", 50))
    scheduler_batch: int = 8
    conv_peak_batch: int = 16
    compile: bool = False  # add torch.compile rows: compiled ddpm against compiled diffusers
    compile_backend: str = "inductor"  # torch.compile's default; the smoke test uses "aot_eager" (no C++ build)
    profile: bool = True
    cases: tuple[str, ...] = ("unet", "memory", "scheduler", "sampling")  # a subset of CASES
    profile_batches: tuple[int, ...] = (1, 8)


# Batch sizes of a config where they differ from the plan's: the laptop model is timed where it trains, at 64.
CONFIG_BATCHES: dict[str, dict[str, Any]] = {
    "unet-small": dict(forward_batches=(64,), backward_batch=64, train_batch=64),
}
GOAL = 1.25  # ratio (diffusers time / ddpm time) that the forward, forward+backward and training rows aim for

CASES = ("unet", "memory", "scheduler", "sampling")
FULL = Plan(configs=tuple(CONFIGS), precisions=("fp32", "bf16"))
QUICK = Plan(configs=("unet-small", "butterflies-32"), precisions=("fp32", "bf16"), forward_batches=(1, 8), repeats=3,
             warmup=1, memory_steps=2, sampling=(("ddim", 10), ("ddpm", 20)), sampling_repeats=(2, 1),
             conv_peak_batch=8, profile=False)


