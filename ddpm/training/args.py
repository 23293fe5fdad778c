"""Command-line flags of ``python -m ddpm.train``, parsed into a frozen ``TrainConfig``.

Every flag of diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` keeps its name and
default; the extras are marked "ddpm:" in their help. With neither ``--dataset_name`` nor ``--train_data_dir``
the bundled Fashion-MNIST subset is used, and every flag the user did not give takes its value from
``EMBEDDED_DEFAULTS`` instead: a small UNet and a run of a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from ddpm.cli import CLIError
from ddpm.schedule import BETA_SCHEDULES, PREDICTION_TYPES, BetaSchedule, PredictionType

MixedPrecision = Literal["no", "fp16", "bf16"]
LRScheduleName = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                         "constant_with_warmup"]
LR_SCHEDULES: tuple[LRScheduleName, ...] = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                            "constant_with_warmup")
Logger = Literal["tensorboard", "wandb"]
InferenceScheduler = Literal["ddpm", "ddim"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SMALL_UNET_CONFIG = ASSETS / "unet-small.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything the trainer reads. Field names are the flag names (``--train_batch_size`` -> train_batch_size).

    Build it from flags with ``parse_args([...])`` or directly, e.g. for ``accelerate.notebook_launcher``:
    ``TrainConfig(train_data_dir="my_images", resolution=32, num_epochs=5)``. Built directly, the fields are
    used as given (the laptop profile of ``EMBEDDED_DEFAULTS`` is applied only by ``parse_args``).
    """

    # data
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    cache_dir: str | None = None
    resolution: int = 64
    center_crop: bool = False
    random_flip: bool = False
    dataloader_num_workers: int = 0
    preserve_input_precision: bool = False
    # model
    model_config_name_or_path: str | None = None
    # output
    output_dir: str = "ddpm-model-64"
    overwrite_output_dir: bool = False
    # training
    train_batch_size: int = 16
    eval_batch_size: int = 16
    num_epochs: int = 100
    max_train_steps: int | None = None
    save_images_epochs: int = 10
    save_model_epochs: int = 10
    eval_epochs: int = 0  # ddpm: 0 = no quality metric during training
    eval_num_images: int = 256
    eval_extractor_steps: int = 1000  # ddpm: training steps of the metric's feature network (once, then cached)
    gradient_accumulation_steps: int = 1
    seed: int | None = None
    # optimiser
    learning_rate: float = 1e-4
    lr_scheduler: LRScheduleName = "cosine"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.95
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-6
    adam_epsilon: float = 1e-8
    # EMA
    use_ema: bool = False
    ema_inv_gamma: float = 1.0
    ema_power: float = 3 / 4
    ema_max_decay: float = 0.9999
    # precision and diffusion
    mixed_precision: MixedPrecision = "no"
    prediction_type: PredictionType = "epsilon"
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    ddpm_num_steps: int = 1000
    ddpm_num_inference_steps: int = 1000
    ddpm_beta_schedule: BetaSchedule = "linear"
    ddpm_inference_scheduler: InferenceScheduler = "ddpm"
    # checkpoints
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    max_nan_skips: int = 0
    # logging
    logger: Logger = "tensorboard"
    logging_dir: str = "logs"
    # hub
    push_to_hub: bool = False
    hub_token: str | None = None
    hub_model_id: str | None = None
    hub_private_repo: bool = False
    # accepted for compatibility
    local_rank: int = -1
    enable_xformers_memory_efficient_attention: bool = False
    debug: bool = False

    @property
    def uses_embedded_data(self) -> bool:
        return self.dataset_name is None and self.train_data_dir is None

    def __post_init__(self) -> None:
        positive = ("resolution", "train_batch_size", "eval_batch_size", "num_epochs", "save_images_epochs",
                    "save_model_epochs", "gradient_accumulation_steps", "checkpointing_steps", "ddpm_num_steps",
                    "ddpm_num_inference_steps", "eval_num_images", "eval_extractor_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_train_steps", "checkpoints_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")
        for name in ("lr_warmup_steps", "dataloader_num_workers", "max_nan_skips", "eval_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must not be negative, got {getattr(self, name)}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"--seed must not be negative, got {self.seed}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"--snr_gamma must be positive, got {self.snr_gamma}")
        if self.noise_offset < 0:
            raise ValueError(f"--noise_offset must not be negative, got {self.noise_offset}")
        if self.ddpm_num_inference_steps > self.ddpm_num_steps:
            raise ValueError(f"--ddpm_num_inference_steps {self.ddpm_num_inference_steps} is more than "
                             f"--ddpm_num_steps {self.ddpm_num_steps}")
        choices: dict[str, tuple[str, ...]] = {
            "mixed_precision": ("no", "fp16", "bf16"),
            "prediction_type": PREDICTION_TYPES,
            "lr_scheduler": LR_SCHEDULES,
            "logger": ("tensorboard", "wandb"),
            "ddpm_inference_scheduler": ("ddpm", "ddim"),
            "ddpm_beta_schedule": BETA_SCHEDULES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} {getattr(self, name)!r} is not supported; choose one of "
                                 f"{', '.join(allowed)}")


# The laptop profile: used for every flag the user did not give when training on the bundled data.
# About 8 epochs of 5,000 images: measured in docs/training.md.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "model_config_name_or_path": str(SMALL_UNET_CONFIG),
    "resolution": 32,
    "output_dir": "ddpm-fashion-mnist-32",
    "train_batch_size": 64,
    "num_epochs": 8,
    "learning_rate": 1e-3,
    "lr_warmup_steps": 100,
    "save_images_epochs": 4,
    "save_model_epochs": 4,
    "checkpointing_steps": 200,
    "checkpoints_total_limit": 2,
    "ddpm_num_inference_steps": 50,  # DDPM with 50 steps: DDIM's deterministic path is poor on so short a run
    "seed": 0,
}
GPU_HINT = ("ddpm: no --dataset_name or --train_data_dir: training on the bundled Fashion-MNIST subset (5,000 "
            "images). From the command line, flags you do not give then take small laptop-CPU values (a 0.7M-parameter "
            "UNet at 32x32, a few minutes); the full train_unconditional.py defaults (a 114M-parameter UNet at "
            "64x64) want a GPU.")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so a bad flag is one line from ``ddpm.cli.run``."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(message)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(prog="python -m ddpm.train", description="Train an unconditional DDPM (train_unconditional.py "
                "flags). With no dataset flag it trains a small model on the bundled Fashion-MNIST subset.")
    add = p.add_argument
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=d.dataset_name, help="hub dataset id or local dataset path")
    g.add_argument("--dataset_config_name", default=d.dataset_config_name)
    g.add_argument("--train_data_dir", default=d.train_data_dir, help="folder of images (datasets' imagefolder)")
    g.add_argument("--cache_dir", default=d.cache_dir)
    g.add_argument("--resolution", type=int, default=d.resolution)
    g.add_argument("--center_crop", action="store_true", help="center crop (default: random crop)")
    g.add_argument("--random_flip", action="store_true", help="random horizontal flips")
    g.add_argument("--dataloader_num_workers", type=int, default=d.dataloader_num_workers)
    g.add_argument("--preserve_input_precision", action="store_true",
                   help="read 16-bit and float images at full precision instead of through 8-bit RGB")
    g = p.add_argument_group("model and output")
    g.add_argument("--model_config_name_or_path", default=d.model_config_name_or_path,
                   help="UNet config.json, a UNet folder or a pipeline folder (weights are not loaded)")
    g.add_argument("--output_dir", default=d.output_dir)
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="train into an output_dir that already holds a pipeline from a different config")
    g = p.add_argument_group("training")
    g.add_argument("--train_batch_size", type=int, default=d.train_batch_size, help="per process")
    g.add_argument("--eval_batch_size", type=int, default=d.eval_batch_size, help="images per sample grid")
    g.add_argument("--num_epochs", type=int, default=d.num_epochs)
    g.add_argument("--max_train_steps", type=int, default=d.max_train_steps,
                   help="ddpm: stop after this many optimiser steps (overrides --num_epochs)")
    g.add_argument("--save_images_epochs", type=int, default=d.save_images_epochs)
    g.add_argument("--save_model_epochs", type=int, default=d.save_model_epochs)
    g.add_argument("--eval_epochs", type=int, default=d.eval_epochs,
                   help="ddpm: every K epochs (and after the last) score --eval_num_images samples with ddpm.metrics "
                        "against the training images; logged to tensorboard and metrics.jsonl (0 = off)")
    g.add_argument("--eval_num_images", type=int, default=d.eval_num_images, help="ddpm: samples per evaluation")
    g.add_argument("--eval_extractor_steps", type=int, default=d.eval_extractor_steps,
                   help="ddpm: training steps of the metric's feature network (trained once, cached in output_dir)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps)
    g.add_argument("--seed", type=int, default=d.seed, help="ddpm: seed for weights, noise and data order")
    g = p.add_argument_group("optimiser")
    g.add_argument("--learning_rate", type=float, default=d.learning_rate)
    g.add_argument("--lr_scheduler", default=d.lr_scheduler, choices=LR_SCHEDULES)
    g.add_argument("--lr_warmup_steps", type=int, default=d.lr_warmup_steps, help="in optimiser steps")
    g.add_argument("--adam_beta1", type=float, default=d.adam_beta1)
    g.add_argument("--adam_beta2", type=float, default=d.adam_beta2)
    g.add_argument("--adam_weight_decay", type=float, default=d.adam_weight_decay)
    g.add_argument("--adam_epsilon", type=float, default=d.adam_epsilon)
    g = p.add_argument_group("EMA")
    g.add_argument("--use_ema", action="store_true", help="average the weights; the saved pipeline gets the EMA")
    g.add_argument("--ema_inv_gamma", type=float, default=d.ema_inv_gamma)
    g.add_argument("--ema_power", type=float, default=d.ema_power)
    g.add_argument("--ema_max_decay", type=float, default=d.ema_max_decay)
    g = p.add_argument_group("precision and diffusion")
    g.add_argument("--mixed_precision", default=d.mixed_precision, choices=["no", "fp16", "bf16"])
    g.add_argument("--prediction_type", default=d.prediction_type, choices=PREDICTION_TYPES,
                   help="what the UNet predicts; v_prediction is a ddpm extra")
    g.add_argument("--snr_gamma", type=float, default=d.snr_gamma,
                   help="ddpm: Min-SNR loss weighting with this gamma (5.0 is the paper's choice)")
    g.add_argument("--noise_offset", type=float, default=d.noise_offset, help="ddpm: offset noise scale")
    g.add_argument("--ddpm_num_steps", type=int, default=d.ddpm_num_steps)
    g.add_argument("--ddpm_num_inference_steps", type=int, default=d.ddpm_num_inference_steps)
    g.add_argument("--ddpm_beta_schedule", default=d.ddpm_beta_schedule,
                   choices=BETA_SCHEDULES)
    g.add_argument("--ddpm_inference_scheduler", default=d.ddpm_inference_scheduler, choices=["ddpm", "ddim"],
                   help="ddpm: scheduler for the sample grids (ddim is faster)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=d.checkpointing_steps)
    g.add_argument("--checkpoints_total_limit", type=int, default=d.checkpoints_total_limit)
    g.add_argument("--resume_from_checkpoint", default=d.resume_from_checkpoint,
                   help='a checkpoint folder (or its name in output_dir), or "latest"')
    g.add_argument("--max_nan_skips", type=int, default=d.max_nan_skips,
                   help="ddpm: skip up to this many non-finite losses before stopping")
    g = p.add_argument_group("logging and hub")
    g.add_argument("--logger", default=d.logger, choices=["tensorboard", "wandb"])
    g.add_argument("--logging_dir", default=d.logging_dir, help="relative to output_dir")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_token", default=d.hub_token)
    g.add_argument("--hub_model_id", default=d.hub_model_id)
    g.add_argument("--hub_private_repo", action="store_true", help="create the hub repo private")
    g = p.add_argument_group("accepted for compatibility")
    g.add_argument("--local_rank", type=int, default=d.local_rank, help="set by launchers; accelerate handles it")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="no-op: attention already uses PyTorch's scaled_dot_product_attention")
    add("--debug", action="store_true", help="ddpm: show full tracebacks on errors")
    return p


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the flags present in ``argv`` (parsed again with every default suppressed)."""
    actions = parser._actions  # argparse keeps them here; there is no public accessor
    saved = [a.default for a in actions]
    try:
        for a in actions:
            a.default = argparse.SUPPRESS
        return set(vars(parser.parse_args(argv)))
    finally:
        for a, default in zip(actions, saved):
            a.default = default


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags -> TrainConfig, with the laptop profile for unset flags when no dataset flag is given."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        values["local_rank"] = env_rank
    if values["dataset_name"] is None and values["train_data_dir"] is None:
        given = explicit_flags(parser, argv)
        for name, value in EMBEDDED_DEFAULTS.items():
            if name not in given:
                values[name] = value
    return TrainConfig(**values)


def config_for_logging(config: TrainConfig) -> dict[str, int | float | str | bool]:
    """A flat dict of scalars for trackers (tensorboard's hparams refuses None, lists and tuples)."""
    out: dict[str, int | float | str | bool] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "hub_token":
            value = None if value is None else "***"
        out[f.name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
