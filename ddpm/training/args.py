"""Command-line flags of ``python -m ddpm.train``, parsed into a frozen ``TrainConfig``.

Every flag of diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` keeps its name; the
extras are marked "ddpm:" in their help. Thirteen flags take their default from a *profile*:

- ``train_unconditional``: the script's defaults (a 114M-parameter UNet at 64x64, 1000-step sample grids);
- ``laptop``: a 0.7M-parameter UNet at 32x32, 20-step SDE-DPM-Solver++ grids, a run of under 5 minutes on 2 CPU cores.

``--profile auto`` (the default) picks ``laptop`` when neither ``--dataset_name`` nor ``--train_data_dir`` is
given (the bundled Fashion-MNIST subset is then used) and ``train_unconditional`` otherwise. A flag you give
always wins. ``TrainConfig(...)`` resolves its profile the same way, so the Python API and the command line
agree: ``TrainConfig()`` is the laptop run, ``TrainConfig(train_data_dir=...)`` the script's, and
``TrainConfig(train_data_dir=..., profile="laptop")`` the small model on your own images.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from ddpm.errors import CLIError
from ddpm.schedulers import SAMPLERS
from ddpm.schedule import BETA_SCHEDULES, PREDICTION_TYPES, BetaSchedule, PredictionType

MixedPrecision = Literal["no", "fp16", "bf16"]
LRScheduleName = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                         "constant_with_warmup"]
LR_SCHEDULES: tuple[LRScheduleName, ...] = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                            "constant_with_warmup")
Logger = Literal["tensorboard", "wandb"]
InferenceScheduler = Literal["ddpm", "ddim", "dpm", "sde-dpm", "unipc", "euler", "heun"]  # ddpm.schedulers.SAMPLERS
Profile = Literal["auto", "laptop", "train_unconditional"]
PROFILES: tuple[Profile, ...] = ("auto", "laptop", "train_unconditional")

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SMALL_UNET_CONFIG = ASSETS / "unet-small.json"  # grayscale, for the bundled Fashion-MNIST
SMALL_RGB_UNET_CONFIG = ASSETS / "unet-small-rgb.json"  # the same UNet for RGB images

# The flags whose default depends on the profile, with train_unconditional.py's values.
SCRIPT_PROFILE: dict[str, Any] = {
    "model_config_name_or_path": None,  # the script's six-level UNet (ddpm/training/outputs.py SCRIPT_UNET)
    "resolution": 64,
    "output_dir": "ddpm-model-64",
    "train_batch_size": 16,
    "num_epochs": 100,
    "learning_rate": 1e-4,
    "lr_warmup_steps": 500,
    "save_images_epochs": 10,
    "save_model_epochs": 10,
    "checkpointing_steps": 500,
    "checkpoints_total_limit": None,
    "ddpm_num_inference_steps": 1000,
    "ddpm_inference_scheduler": "ddpm",
    "seed": None,
}
# The laptop profile: 16 epochs of the 5,000 bundled images, under 5 minutes on 2 CPU cores (measured in
# docs/training.md; 8 epochs gave FD 159 and blurry grids, 16 give FD 38 and recognisable clothes). With a
# dataset flag, the same UNet in RGB and an output folder not named after Fashion-MNIST.
LAPTOP_PROFILE: dict[str, Any] = {
    "model_config_name_or_path": str(SMALL_UNET_CONFIG),
    "resolution": 32,
    "output_dir": "ddpm-fashion-mnist-32",
    "train_batch_size": 64,
    "num_epochs": 16,
    "learning_rate": 1e-3,
    "lr_warmup_steps": 100,
    "save_images_epochs": 4,
    "save_model_epochs": 4,
    "checkpointing_steps": 200,
    "checkpoints_total_limit": 2,
    # SDE-DPM-Solver++(2M), 20 steps: as good as DDPM with 1000 on this model, 50x faster (docs/samplers.md)
    "ddpm_num_inference_steps": 20,
    "ddpm_inference_scheduler": "sde-dpm",
    "seed": 0,
}
LAPTOP_WITH_DATASET: dict[str, Any] = {"model_config_name_or_path": str(SMALL_RGB_UNET_CONFIG),
                                       "output_dir": "ddpm-model-32"}
GPU_HINT = "ddpm.train: no dataset flag: the laptop profile on bundled Fashion-MNIST (--help lists it)"


def profile_defaults(profile: Literal["laptop", "train_unconditional"], embedded_data: bool) -> dict[str, Any]:
    """The values of the profile-dependent flags under ``profile``."""
    if profile == "train_unconditional":
        return dict(SCRIPT_PROFILE)
    return {**LAPTOP_PROFILE, **({} if embedded_data else LAPTOP_WITH_DATASET)}


class _ProfileDefault:
    """The default of a profile-dependent field: replaced by the profile's value in ``__post_init__``."""

    def __repr__(self) -> str:
        return "<profile default>"


PROFILE_DEFAULT: Any = _ProfileDefault()


@dataclass(frozen=True)
class TrainConfig:
    """Everything the trainer reads. Field names are the flag names (``--train_batch_size`` -> train_batch_size).

    Build it from flags with ``parse_args([...])`` or directly, e.g. for ``accelerate.notebook_launcher``:
    ``TrainConfig(train_data_dir="my_images", profile="laptop")``. The fields of ``SCRIPT_PROFILE`` that you
    leave out take the value of the profile (see the module docstring); ``config.profile`` then names the one
    that applied. An invalid value is a ``ValueError`` naming the flag.
    """

    # data
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    cache_dir: str | None = None
    resolution: int = PROFILE_DEFAULT
    center_crop: bool = False
    random_flip: bool = False
    dataloader_num_workers: int = 0
    preserve_input_precision: bool = False
    # which defaults apply to the fields left out
    profile: Profile = "auto"
    # model
    model_config_name_or_path: str | None = PROFILE_DEFAULT
    # output
    output_dir: str = PROFILE_DEFAULT
    overwrite_output_dir: bool = False
    # training
    train_batch_size: int = PROFILE_DEFAULT
    eval_batch_size: int = 16
    num_epochs: int = PROFILE_DEFAULT
    max_train_steps: int | None = None
    save_images_epochs: int = PROFILE_DEFAULT
    save_model_epochs: int = PROFILE_DEFAULT
    eval_epochs: int = 0  # ddpm: 0 = no quality metric during training
    eval_num_images: int = 256
    eval_extractor_steps: int = 1000  # ddpm: training steps of the metric's feature network (once, then cached)
    gradient_accumulation_steps: int = 1
    seed: int | None = PROFILE_DEFAULT
    # optimiser
    learning_rate: float = PROFILE_DEFAULT
    lr_scheduler: LRScheduleName = "cosine"
    lr_warmup_steps: int = PROFILE_DEFAULT
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
    ddpm_num_inference_steps: int = PROFILE_DEFAULT
    ddpm_beta_schedule: BetaSchedule = "linear"
    ddpm_inference_scheduler: InferenceScheduler = PROFILE_DEFAULT
    # checkpoints
    checkpointing_steps: int = PROFILE_DEFAULT
    checkpoints_total_limit: int | None = PROFILE_DEFAULT
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
        if self.profile not in PROFILES:
            raise ValueError(f"--profile {self.profile!r} is not supported; choose one of {', '.join(PROFILES)}")
        profile = self.profile
        if profile == "auto":
            profile = "laptop" if self.uses_embedded_data else "train_unconditional"
        for name, value in profile_defaults(profile, self.uses_embedded_data).items():
            if getattr(self, name) is PROFILE_DEFAULT:
                object.__setattr__(self, name, value)  # frozen: the one place a field is filled in
        object.__setattr__(self, "profile", profile)
        self._check()

    def _check(self) -> None:
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
        if self.seed is not None and not 0 <= self.seed < 2**32:  # numpy's seeds are 32-bit
            raise ValueError(f"--seed must be between 0 and 2**32 - 1, got {self.seed}")
        # Real numbers: NaN and infinity pass every comparison below unnoticed, so they are refused first.
        floats = ("learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "ema_inv_gamma",
                  "ema_power", "ema_max_decay", "noise_offset", "snr_gamma")
        for name in floats:
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"--{name} must be a finite number, got {value}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be positive, got {self.learning_rate}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("adam_weight_decay", "adam_epsilon", "noise_offset"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must not be negative, got {getattr(self, name)}")
        for name in ("ema_inv_gamma", "ema_power"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.ema_max_decay <= 1:
            raise ValueError(f"--ema_max_decay must be in [0, 1], got {self.ema_max_decay}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"--snr_gamma must be positive, got {self.snr_gamma}")
        if self.ddpm_num_inference_steps > self.ddpm_num_steps:
            raise ValueError(f"--ddpm_num_inference_steps {self.ddpm_num_inference_steps} is more than "
                             f"--ddpm_num_steps {self.ddpm_num_steps}")
        choices: dict[str, tuple[str, ...]] = {
            "mixed_precision": ("no", "fp16", "bf16"),
            "prediction_type": PREDICTION_TYPES,
            "lr_scheduler": LR_SCHEDULES,
            "logger": ("tensorboard", "wandb"),
            "ddpm_inference_scheduler": tuple(SAMPLERS),
            "ddpm_beta_schedule": BETA_SCHEDULES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} {getattr(self, name)!r} is not supported; choose one of "
                                 f"{', '.join(allowed)}")
        if not self.output_dir:
            raise ValueError("--output_dir must not be empty")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so a bad flag is one line from ``ddpm.cli.run``."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(message)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in ``--help`` (a profile-dependent flag shows both profiles' values); the
    description keeps its line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.dest in SCRIPT_PROFILE:
            laptop = LAPTOP_PROFILE[action.dest]
            if action.dest in LAPTOP_WITH_DATASET:
                laptop = f"{_short(laptop)}, or {_short(LAPTOP_WITH_DATASET[action.dest])} with a dataset flag"
            return f"{text} (default: {_short(SCRIPT_PROFILE[action.dest])}; laptop profile: {_short(laptop)})"
        if action.default is argparse.SUPPRESS or not action.option_strings or action.dest == "help":
            return text
        return f"{text} (default: {_short(action.default)})"


def _short(value: Any) -> str:
    # Asset paths as the package-relative name a reader can find; "%" escaped for argparse's formatting
    text = str(value)
    if text.startswith(str(ASSETS)):
        text = "ddpm/assets/" + Path(text).name
    return text.replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    s = SCRIPT_PROFILE
    p = _Parser(prog="python -m ddpm.train", formatter_class=_HelpFormatter,
                description="Train an unconditional DDPM with train_unconditional.py's flags (docs/training.md).\n"
                "No --dataset_name or --train_data_dir: the laptop profile's values below, on bundled Fashion-MNIST.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None, help="hub dataset id or local dataset path")
    g.add_argument("--dataset_config_name", default=None, help="the dataset's config name")
    g.add_argument("--train_data_dir", default=None,
                   help="folder of images (datasets' imagefolder); ignored with --dataset_name")
    g.add_argument("--cache_dir", default=None, help="where datasets caches downloads")
    g.add_argument("--resolution", type=int, default=s["resolution"], help="square training size in pixels")
    g.add_argument("--center_crop", action="store_true", help="center crop instead of a random crop")
    g.add_argument("--random_flip", action="store_true", help="random horizontal flips")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--preserve_input_precision", action="store_true",
                   help="ddpm: read 16-bit and float images at full precision instead of through 8-bit RGB")
    g = p.add_argument_group("profile, model and output")
    g.add_argument("--profile", default="auto", choices=PROFILES,
                   help="ddpm: defaults for the flags marked 'laptop profile'; auto = laptop without a dataset "
                        "flag, else train_unconditional")
    g.add_argument("--model_config_name_or_path", default=s["model_config_name_or_path"],
                   help="UNet config.json, UNet folder or pipeline folder (weights are not loaded); none = "
                        "train_unconditional.py's 114M-parameter UNet")
    g.add_argument("--output_dir", default=s["output_dir"], help="pipeline, checkpoints, samples and logs")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="ddpm: delete an earlier run's checkpoints, pipeline and samples in --output_dir (after "
                        "every other check passed)")
    g = p.add_argument_group("training")
    g.add_argument("--train_batch_size", type=int, default=s["train_batch_size"], help="per process")
    g.add_argument("--eval_batch_size", type=int, default=16, help="images per sample grid")
    g.add_argument("--num_epochs", type=int, default=s["num_epochs"], help="passes over the data")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="ddpm: stop after this many optimiser steps (overrides --num_epochs)")
    g.add_argument("--save_images_epochs", type=int, default=s["save_images_epochs"],
                   help="a sample grid every N epochs and after the last")
    g.add_argument("--save_model_epochs", type=int, default=s["save_model_epochs"],
                   help="save the pipeline every N epochs and after the last")
    g.add_argument("--eval_epochs", type=int, default=0,
                   help="ddpm: every K epochs (and after the last) score --eval_num_images samples with ddpm.metrics "
                        "against the training images; logged to tensorboard and metrics.jsonl (0 = off)")
    g.add_argument("--eval_num_images", type=int, default=256, help="ddpm: samples per evaluation")
    g.add_argument("--eval_extractor_steps", type=int, default=1000,
                   help="ddpm: training steps of the metric's feature network (trained once, cached in output_dir)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimiser step")
    g.add_argument("--seed", type=int, default=s["seed"],
                   help="ddpm: seed for weights, noise and data order; none = random, printed")
    g = p.add_argument_group("optimiser")
    g.add_argument("--learning_rate", type=float, default=s["learning_rate"], help="AdamW learning rate after warm-up")
    g.add_argument("--lr_scheduler", default="cosine", choices=LR_SCHEDULES, help="shape of the LR schedule")
    g.add_argument("--lr_warmup_steps", type=int, default=s["lr_warmup_steps"], help="in optimiser steps")
    g.add_argument("--adam_beta1", type=float, default=0.95, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_weight_decay", type=float, default=1e-6, help="AdamW weight decay")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g = p.add_argument_group("EMA")
    g.add_argument("--use_ema", action="store_true", help="average the weights; grids and the pipeline use the EMA")
    g.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up speed")
    g.add_argument("--ema_power", type=float, default=0.75, help="EMA warm-up power")
    g.add_argument("--ema_max_decay", type=float, default=0.9999, help="EMA decay cap")
    g = p.add_argument_group("precision and diffusion")
    g.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                   help="autocast dtype (fp16 needs a CUDA GPU)")
    g.add_argument("--prediction_type", default="epsilon", choices=PREDICTION_TYPES,
                   help="what the UNet predicts; v_prediction is a ddpm extra")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="ddpm: Min-SNR loss weighting with this gamma (5.0 is the paper's choice)")
    g.add_argument("--noise_offset", type=float, default=0.0, help="ddpm: offset noise scale")
    g.add_argument("--ddpm_num_steps", type=int, default=1000, help="training timesteps T")
    g.add_argument("--ddpm_num_inference_steps", type=int, default=s["ddpm_num_inference_steps"],
                   help="denoising steps of the sample grids")
    g.add_argument("--ddpm_beta_schedule", default="linear", choices=BETA_SCHEDULES, help="noise schedule")
    g.add_argument("--ddpm_inference_scheduler", default=s["ddpm_inference_scheduler"], choices=list(SAMPLERS),
                   help="sampler of the sample grids (ddpm adds dpm, sde-dpm, unipc, euler, heun: see docs/samplers.md)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=s["checkpointing_steps"],
                   help="a checkpoint every N optimiser steps (and at the end)")
    g.add_argument("--checkpoints_total_limit", type=int, default=s["checkpoints_total_limit"],
                   help="keep at most N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help='a checkpoint folder (or its name in output_dir), or "latest"')
    g.add_argument("--max_nan_skips", type=int, default=0,
                   help="ddpm: skip up to this many optimiser steps with a non-finite loss or gradient")
    g = p.add_argument_group("logging and hub")
    g.add_argument("--logger", default="tensorboard", choices=["tensorboard", "wandb"], help="experiment tracker")
    g.add_argument("--logging_dir", default="logs", help="relative to output_dir")
    g.add_argument("--push_to_hub", action="store_true", help="upload the pipeline after each save")
    g.add_argument("--hub_token", default=None, help="token for the Hub")
    g.add_argument("--hub_model_id", default=None, help="repo id (default: the output folder's name)")
    g.add_argument("--hub_private_repo", action="store_true", help="create the hub repo private")
    g = p.add_argument_group("accepted for compatibility")
    g.add_argument("--local_rank", type=int, default=-1, help="set by launchers; accelerate handles it")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="no-op: attention already uses PyTorch's scaled_dot_product_attention")
    p.add_argument("--debug", action="store_true",
                   help="ddpm: show full tracebacks on errors, and each process's first batch")
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
    """Flags -> TrainConfig. The profile-dependent flags you do not give are left to ``TrainConfig``'s profile."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    given = explicit_flags(parser, argv)
    values = {k: v for k, v in values.items() if k in given or k not in SCRIPT_PROFILE}
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        values["local_rank"] = env_rank
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
