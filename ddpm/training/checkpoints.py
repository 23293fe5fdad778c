"""Training checkpoints: ``output_dir/checkpoint-<step>/`` folders that are complete or absent, with no pickle.

The weights use the layout of diffusers' train_unconditional.py, so a checkpoint is also a model to sample
from; the trainer's state is our own, in JSON and safetensors (never pickle, never accelerate's ``save_state``):

    checkpoint-<step>/
      unet/config.json, unet/diffusion_pytorch_model.safetensors       the raw training weights
      unet_ema/config.json, unet_ema/diffusion_pytorch_model.safetensors
                                   with --use_ema: the EMA weights; config.json adds diffusers' EMAModel keys
      scheduler/scheduler_config.json  the run's noise scheduler (DDPMScheduler)
      optimizer.safetensors        AdamW's moments and step counts, by parameter name
      rng_state_<rank>.safetensors each process's RNG states: torch CPU and CUDA, numpy, python
      trainer_state.json           step, epoch, seed, data position, LR schedule, optimiser hyper-parameters,
                                   grad scaler, EMA step count
      COMPLETE                     the manifest, written last: size and SHA-256 of every file above

Writing is atomic:

1. every process writes into ``output_dir/.tmp-checkpoint-<step>/`` (the main process the shared files, each
   process its own RNG state); a failure on any process (a full disk) removes the folder on all of them;
2. the main process hashes and fsyncs every file and writes the manifest ``COMPLETE`` last;
3. it renames the folder to ``checkpoint-<step>`` (atomic on POSIX) and fsyncs ``output_dir``;
4. only then are old checkpoints pruned to ``--checkpoints_total_limit``, never the newest complete one.

Reading and checking a checkpoint, before anything is restored from it, is ``resume.py``; the random states are
``rng.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpm.checkpoint import MODEL_CONFIG_NAME, SCHEDULER_CONFIG_NAME, WEIGHTS_NAME
from ddpm.errors import first_line
from ddpm.config import config_to_dict
from ddpm.ema import EMA
from ddpm.training import rng
from ddpm.training.processes import any_process
from ddpm.unet import UNet

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
ABANDONED_PREFIX = "abandoned-"
MARKER = "COMPLETE"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng_state_{}.safetensors"
UNET, UNET_EMA, SCHEDULER = "unet", "unet_ema", "scheduler"
FORMAT = "ddpm-training-checkpoint"
FORMAT_VERSION = 1
# Files that are (or may be) pickles: ddpm never writes one, so a checkpoint holding one is refused.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".joblib")
# The keys diffusers' EMAModel.save_pretrained adds to unet_ema/config.json (train_unconditional.py's values).
EMA_CONFIG_KEYS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma",
                   "power")
NAME_PATTERN = re.compile(r"^checkpoint-(\d+)$")

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, reported as one line."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files differ from what was written (missing, truncated, changed on disk)."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, read-only folder); the earlier ones are kept."""


@dataclass
class TrainingObjects:
    """What a checkpoint saves and restores. ``model`` is the unwrapped UNet, ``optimizer`` the torch optimiser
    (not accelerate's wrapper); ``ema`` and ``scaler`` are ``None`` when not in use (``ema`` lives on the main
    process only)."""

    model: UNet
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: Any
    ema: EMA | None
    noise_scheduler: Any


@dataclass(frozen=True)
class TrainerState:
    """``trainer_state.json``: where the run is. The data position is (``epoch``, ``batches_per_epoch``,
    ``gradient_accumulation_steps``): the next batch is number ``(global_step mod updates per epoch) x
    accumulation`` of epoch ``global_step // updates per epoch``, whose order is a function of (seed, epoch)."""

    global_step: int
    epoch: int  # the epoch of the last step
    seed: int
    nan_skips: int
    batches_per_epoch: int
    gradient_accumulation_steps: int
    num_processes: int
    lr_schedule: dict[str, Any]  # LambdaLR.state_dict()
    optimizer_param_groups: list[dict[str, Any]]  # hyper-parameters of each group, "params" as parameter names
    grad_scaler: dict[str, Any] | None  # GradScaler.state_dict() with --mixed_precision fp16
    ema_optimization_step: int | None  # with --use_ema

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}


# ---- finding checkpoints ----------------------------------------------------------------------------------


def checkpoint_folders(output_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = NAME_PATTERN.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def is_complete(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(output_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    return [(step, path) for step, path in checkpoint_folders(output_dir) if is_complete(path)]


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are skipped with a warning naming them."""
    for step, path in reversed(checkpoint_folders(output_dir)):
        if is_complete(path):
            return path
        logger.warning("warning: skipping incomplete checkpoint %s (no %s marker: it was interrupted while "
                       "being written, or is not a ddpm checkpoint)", path, MARKER)
    return None


# ---- writing ------------------------------------------------------------------------------------------------


def save_checkpoint(accelerator: Any, output_dir: str, step: int, state: TrainerState,
                    objects: TrainingObjects) -> Path:
    """Write ``checkpoint-<step>`` atomically. Call it on every process (each saves its RNG state)."""
    root = Path(output_dir)
    final = root / f"{PREFIX}{step}"
    tmp = root / f"{TMP_PREFIX}{step}"
    if accelerator.is_main_process:
        for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    error: BaseException | None = None
    try:
        tmp.mkdir(exist_ok=True)
        if accelerator.is_main_process:
            _write_shared_files(tmp, state, objects)
        _write_bytes(tmp / RNG_NAME.format(accelerator.process_index), rng.state_bytes())
    except Exception as e:  # OSError (ENOSPC, EROFS), or what safetensors and torch wrap it in
        error = e
    if any_process(accelerator, error is not None):  # every process removes its part and raises alike
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        why = first_line(error) if error is not None else "another process failed to write its part"
        raise CheckpointWriteError(f"could not write {final.name} in {root}: {why}; the earlier checkpoints are "
                                   f"kept") from error
    if accelerator.is_main_process:
        try:
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
                        "files": {rel: describe(tmp / rel) for rel in _relative_files(tmp)}}
            _fsync_tree(tmp)
            _write_bytes(tmp / MARKER, (json.dumps(manifest, indent=2) + "\n").encode())
            fsync_dir(tmp)
            if final.exists():  # not ours (ours never appear half-written): kept aside, never deleted
                _set_aside(final)
            os.replace(tmp, final)
            fsync_dir(root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(f"could not write {final.name} in {root}: {first_line(e)}; the earlier "
                                       f"checkpoints are kept") from e
    accelerator.wait_for_everyone()
    return final


def _write_shared_files(folder: Path, state: TrainerState, objects: TrainingObjects) -> None:
    from safetensors.torch import save

    model = objects.model
    model_dict = config_to_dict(model.config, "UNet2DModel")
    _write_model(folder / UNET, model_dict, model.state_dict())
    if objects.ema is not None:
        ema = objects.ema
        ema_weights = {**model.state_dict(), **ema.shadow}  # buffers (if any) from the model, as diffusers' EMAModel
        ema_keys = {"decay": ema.max_decay, "min_decay": 0.0, "optimization_step": ema.optimization_step,
                    "update_after_step": 0, "use_ema_warmup": True, "inv_gamma": ema.inv_gamma, "power": ema.power}
        _write_model(folder / UNET_EMA, {**model_dict, **ema_keys}, ema_weights)
    (folder / SCHEDULER).mkdir(exist_ok=True)
    _write_json(folder / SCHEDULER / SCHEDULER_CONFIG_NAME,
                config_to_dict(objects.noise_scheduler.config, "DDPMScheduler"))
    names = parameter_names(objects.model, objects.optimizer)
    tensors = {}
    for index, per_param in objects.optimizer.state_dict()["state"].items():
        for key, value in per_param.items():
            tensors[f"{key}.{names[index]}"] = value.detach().contiguous().cpu()
    _write_bytes(folder / OPTIMIZER_NAME, save(tensors, metadata={"format": "pt"}))
    _write_json(folder / STATE_NAME, state.to_json())


def _write_model(folder: Path, config: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    folder.mkdir(exist_ok=True)
    _write_json(folder / MODEL_CONFIG_NAME, config)
    tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
    _write_bytes(folder / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    # allow_nan=False: a NaN in the state is a bug to hear about, not a file that other readers refuse
    _write_bytes(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def set_aside_newer(output_dir: str, step: int) -> list[tuple[Path, Path]]:
    """Rename the checkpoints of steps after ``step`` to ``abandoned-checkpoint-<step>``: resuming from an older
    checkpoint abandons them, and left in place they would be pruned in the new run's stead, kept over its
    checkpoints of the same steps, and picked by a later ``latest``. Renamed, not deleted. Returns the
    ``(old, new)`` paths."""
    return [(path, _set_aside(path)) for later_step, path in checkpoint_folders(output_dir) if later_step > step]


def _set_aside(path: Path) -> Path:
    target = path.with_name(f"{ABANDONED_PREFIX}{path.name}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{ABANDONED_PREFIX}{n}-{path.name}")
    os.replace(path, target)
    return target


def prune_checkpoints(output_dir: str, limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most ``limit`` remain; the newest is always kept."""
    if limit is None:
        return []
    complete = complete_checkpoints(output_dir)
    doomed = [path for _, path in complete[: max(0, len(complete) - max(1, limit))]]
    for path in doomed:
        # Rename first so that a crash half-way through the delete never leaves a complete-looking folder.
        trash = path.with_name(f"{TMP_PREFIX}deleting-{path.name}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


# ---- configs and optimiser state, as written and compared -------------------------------------------------


def normalised_unet_config(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """A UNet config as ``UNet.save_pretrained`` writes it (all keys, lists not tuples), without metadata keys."""
    from ddpm.config import config_from_dict
    from ddpm.unet import UNetConfig

    raw = {k: v for k, v in unet_config.items() if k not in EMA_CONFIG_KEYS}
    try:
        config = config_from_dict(UNetConfig, raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"UNet config: {first_line(e)}") from None
    return without_metadata(json.loads(json.dumps(config_to_dict(config, "UNet2DModel"))))


def without_metadata(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimiser parameter, in the optimiser's order (its state is indexed by position)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_param_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimiser's hyper-parameters per group, with parameter names instead of positions (JSON-ready)."""
    names = parameter_names(model, optimizer)
    groups, start = [], 0
    for group in optimizer.state_dict()["param_groups"]:
        count = len(group["params"])
        groups.append({**{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()},
                       "params": names[start:start + count]})
        start += count
    return groups


# ---- files ------------------------------------------------------------------------------------------------


def _relative_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def describe(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in [*sorted(p for p in folder.rglob("*") if p.is_dir()), folder]:
        fsync_dir(path)


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (renames, new files) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
