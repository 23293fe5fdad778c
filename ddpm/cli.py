"""What every ddpm command line shares: one-line errors, a non-zero exit, ``--debug`` for the traceback, help
that shows the defaults, and the flags and model loading of ``ddpm.sample`` and ``ddpm.evaluate``.

``--model`` takes any of three folders (or a hub repo id of the first two):

- a pipeline in diffusers' layout (``model_index.json``, ``unet/``, ``scheduler/``);
- the single-folder layout of the original google/ddpm-* repos (``config.json`` next to ``scheduler_config.json``);
- a training checkpoint, ``<output_dir>/checkpoint-<step>/``, as ``ddpm.train`` or diffusers'
  train_unconditional.py write it: ``unet/``, with ``--use_ema`` also ``unet_ema/``, and (ddpm only)
  ``scheduler/``. The EMA weights are used when present (``--no_ema``: the raw ``unet/``); the scheduler comes
  from ``scheduler/``, else from the run's saved pipeline in ``<output_dir>``, else diffusers' default
  ``DDPMScheduler``, with a warning.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ddpm.errors import CLIError, first_line
from ddpm.schedulers import KARRAS_SAMPLERS, SAMPLERS, SCHEDULERS, SOLVER_ORDER_SAMPLERS

if TYPE_CHECKING:
    from ddpm.pipeline import Pipeline

__all__ = ["CLIError", "first_line", "USER_ERRORS", "HelpFormatter", "DEFAULT_SCHEDULER",
           "LoadedModel", "open_pipeline", "add_sampling_flags", "pick_device", "check_sampling_flags",
           "add_debug_flag", "run"]

# Errors that describe bad input (paths, files, values) rather than bugs: shown as one line. OSError covers the
# missing files and folders. TypeError and KeyError are bugs until proven otherwise: they keep their traceback.
USER_ERRORS = (CLIError, ValueError, OSError)

# --scheduler NAME: a key of ddpm.schedulers.SAMPLERS
# SDE-DPM-Solver++(2M) with its 20 steps: on the laptop model as good as DDPM with 1000 steps (docs/samplers.md)
DEFAULT_SCHEDULER = "sde-dpm"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with every default shown (``(default: 16)``), and the description's examples kept as written.

    A default of None or False is not shown: the help text says what leaving the flag out means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def pick_device(flag: str | None) -> torch.device:
    """``--device``, or cuda when available, else cpu. A device that does not exist is a CLIError naming it."""
    try:
        device = torch.device(flag or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=device)  # fails now, not mid-run, for an unknown type, index or a missing driver
    except (RuntimeError, AssertionError) as e:  # AssertionError: "Torch not compiled with CUDA enabled"
        raise CLIError(f"--device {flag}: {first_line(e)}") from None
    return device


def check_sampling_flags(eta: float, seed: int, num_images: int) -> None:
    """The flags ``ddpm.sample`` and ``ddpm.evaluate`` share; image i is seeded ``seed + i``."""
    if not 0 <= eta <= 1:  # also refuses NaN
        raise CLIError(f"--eta {eta} must be between 0 (deterministic DDIM) and 1")
    if not 0 <= seed <= 2**64 - num_images:  # torch seeds are uint64
        raise CLIError(f"--seed {seed} must be between 0 and 2**64 - --num_images")


def add_sampling_flags(parser: argparse.ArgumentParser, num_images: int, batch_size: int) -> None:
    """The flags ``ddpm.sample`` and ``ddpm.evaluate`` share, with their defaults."""
    parser.add_argument("--model", required=True,
                        help="pipeline folder, hub repo id, or training checkpoint folder (<output_dir>/checkpoint-N)")
    parser.add_argument("--no_ema", action="store_true",
                        help="with a training checkpoint: sample the raw weights (unet/) instead of the EMA ones "
                             "(unet_ema/, used when present)")
    parser.add_argument("--num_images", type=int, default=num_images, help="images to sample")
    parser.add_argument("--batch_size", type=int, default=batch_size, help="images sampled at once")
    parser.add_argument("--scheduler", choices=list(SAMPLERS), default=DEFAULT_SCHEDULER,
                        help="the sampler, on the model's training schedule: dpm is DPM-Solver++(2M), sde-dpm its "
                             "stochastic variant (docs/samplers.md compares them)")
    own = ", ".join(f"{name} {SCHEDULERS[cls].default_num_inference_steps or 'num_train_timesteps'}"
                    for name, (cls, _) in SAMPLERS.items())
    parser.add_argument("--num_inference_steps", type=int, default=None,
                        help=f"sampling steps (default: the sampler's own: {own})")
    parser.add_argument("--solver_order", type=int, default=None, choices=[1, 2, 3],
                        help="order of the multistep samplers (dpm, sde-dpm, unipc); default: theirs, 2")
    parser.add_argument("--karras_sigmas", action="store_true",
                        help="noise levels spaced as in Karras et al. 2022 (dpm, sde-dpm, unipc, euler, heun)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise scale (0 = deterministic)")
    parser.add_argument("--seed", type=int, default=0, help="image i is drawn with seed + i, whatever --batch_size")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


# ---- opening --model ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadedModel:
    """What ``--model`` named, ready to sample: the pipeline, the checked step count and what was loaded."""

    pipeline: Pipeline
    num_inference_steps: int
    weights: str                   # "pipeline", "ema" (a checkpoint's unet_ema/) or "raw" (its unet/)
    checkpoint_step: int | None    # N of a checkpoint-N folder, else None
    run_dir: Path | None           # a checkpoint's output_dir (its parent folder), else None


def open_pipeline(model: str, scheduler: str = DEFAULT_SCHEDULER, num_inference_steps: int | None = None,
                  use_ema: bool = True, warn: Callable[[str], object] | None = None, solver_order: int | None = None,
                  karras_sigmas: bool = False) -> LoadedModel:
    """The pipeline at ``model`` (see the module docstring for the folders it takes) with the ``--scheduler``
    sampler swapped in on the model's own schedule, and the checked number of sampling steps (default: the
    sampler's own, at most the model's ``num_train_timesteps``). ``warn`` gets one-line notes (e.g. a checkpoint
    without a scheduler)."""
    # Imported here: ddpm.train imports this module for run(), and its --help should not wait for the UNet.
    from ddpm.pipeline import Pipeline, checkpoint_pipeline, is_training_checkpoint
    from ddpm.schedulers import sampler

    if scheduler not in SAMPLERS:
        raise CLIError(f"--scheduler {scheduler} is not one of {', '.join(SAMPLERS)}")
    if solver_order is not None and scheduler not in SOLVER_ORDER_SAMPLERS:
        raise CLIError(f"--solver_order applies to --scheduler {' or '.join(SOLVER_ORDER_SAMPLERS)}, not {scheduler}")
    if karras_sigmas and scheduler not in KARRAS_SAMPLERS:
        raise CLIError(f"--karras_sigmas applies to --scheduler {' or '.join(KARRAS_SAMPLERS)}, not {scheduler}")
    folder = Path(model).expanduser()
    weights, step, run_dir = "pipeline", None, None
    if is_training_checkpoint(folder):
        pipe, weights = checkpoint_pipeline(folder, use_ema, warn)
        match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        step = int(match.group(1)) if match else None
        run_dir = folder.parent
    else:
        _refuse_run_folder_without_pipeline(folder)
        if not use_ema:
            raise CLIError(f"--no_ema applies to training checkpoints (<output_dir>/checkpoint-N); {model} is a saved "
                           f"pipeline, which holds one set of weights")
        pipe = Pipeline.from_pretrained(model)
    pipe.scheduler = sampler(scheduler, pipe.scheduler.config, solver_order, karras_sigmas)
    total = pipe.scheduler.num_train_timesteps
    steps = num_inference_steps if num_inference_steps is not None else min(pipe.default_num_inference_steps, total)
    if not 1 <= steps <= total:
        raise CLIError(f"--num_inference_steps {steps} must be between 1 and the model's num_train_timesteps ({total})")
    pipe.scheduler.set_timesteps(steps)  # the sampler's own limits (a ValueError) before anything is written
    # Multistep solvers merge timesteps that round together near steps = num_train_timesteps: report what runs.
    steps = pipe.scheduler.num_inference_steps or steps
    return LoadedModel(pipe, steps, weights, step, run_dir)


def _refuse_run_folder_without_pipeline(folder: Path) -> None:
    # A run's output_dir before its first pipeline save holds only checkpoints: name the newest one.
    if not folder.is_dir() or (folder / "model_index.json").exists() or (folder / "config.json").exists():
        return
    steps = sorted(int(m.group(1)) for p in folder.iterdir()
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    if steps:
        raise CLIError(f"{folder} holds no saved pipeline yet; sample a training checkpoint instead, "
                       f"e.g. --model {folder / f'checkpoint-{steps[-1]}'}")


# ---- running a command ----------------------------------------------------------------------------------------

def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None, prog: str = "ddpm") -> int:
    """Run ``main(argv)``; turn user errors into ``prog: error: <message>`` on stderr and exit status 2.

    Ctrl-C exits with 130. Pass ``--debug`` to let the exception propagate with its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        main(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        message = first_line(e) or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return 0
