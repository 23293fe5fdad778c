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

Reading checks everything before it changes anything (``verify_checkpoint``, on the main process): the manifest,
each file's size and hash, ``trainer_state.json``'s values against the folder name, the model and noise-schedule
configs against this run's. A folder holding a pickle (``.pkl``, ``.bin``, ``.pt`` ...) is refused, and so is
the pickled format of accelerate's ``save_state`` that earlier ddpm versions wrote. Damaged files make
``--resume_from_checkpoint latest`` fall back to the newest checkpoint that verifies, and say so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ddpm.checkpoint import MODEL_CONFIG_NAME, SCHEDULER_CONFIG_NAME, WEIGHTS_NAME, load_weights
from ddpm.cli import first_line
from ddpm.config import config_to_dict, read_json, write_json
from ddpm.ema import EMA
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
_NAME = re.compile(r"^checkpoint-(\d+)$")

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
        m = _NAME.match(entry.name)
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


def resolve_resume(output_dir: str, value: str) -> Path | None:
    """The checkpoint named by ``--resume_from_checkpoint``: "latest" (None if there is none yet), a path,
    or a folder name inside ``output_dir``. A missing or incomplete one is a ``CheckpointError``."""
    if value == "latest":
        return latest_checkpoint(output_dir)
    candidates = [Path(value), Path(output_dir) / value]
    path = next((p for p in candidates if p.is_dir()), None)
    if path is None:
        available = ", ".join(p.name for _, p in complete_checkpoints(output_dir)) or "none"
        raise CheckpointError(f"--resume_from_checkpoint {value}: no such checkpoint (looked for {candidates[0]} "
                              f"and {candidates[1]}; complete checkpoints in {output_dir}: {available})")
    if not is_complete(path):
        _refuse_pickles(path)  # e.g. a train_unconditional.py checkpoint: say why, not just "incomplete"
        raise CheckpointError(f"--resume_from_checkpoint {value}: {path} is incomplete (no {MARKER} marker: it was "
                              f"interrupted while being written); use 'latest' or an older checkpoint")
    return path


def choose_checkpoint(output_dir: str, value: str, unet_config: Mapping[str, Any],
                      scheduler_config: Mapping[str, Any], use_ema: bool) -> tuple[Path, TrainerState] | None:
    """The checkpoint to resume from, verified (``verify_checkpoint``), with its state; ``None`` for "latest"
    when there is no checkpoint yet. With "latest", a damaged checkpoint is skipped with a warning naming the
    file, and the next older one is tried; a named checkpoint must verify."""
    path = resolve_resume(output_dir, value)
    if path is None:
        return None
    if value != "latest":
        return path, verify_checkpoint(path, unet_config, scheduler_config, use_ema)
    problems = []
    for _, candidate in reversed(complete_checkpoints(output_dir)):  # newest first; ``path`` is the first
        try:
            state = verify_checkpoint(candidate, unet_config, scheduler_config, use_ema)
        except DamagedCheckpoint as e:
            problems.append(f"{candidate.name}: {e}")
            logger.warning("warning: %s is damaged, skipping it (%s)", candidate, e)
            continue
        if problems:
            logger.warning("warning: resuming from %s, the newest checkpoint that loads", candidate)
        return candidate, state
    raise CheckpointError(f"no checkpoint in {output_dir} can be resumed from ({'; '.join(problems)}); start over "
                          f"with --overwrite_output_dir")


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
        _write_bytes(tmp / RNG_NAME.format(accelerator.process_index), _rng_state_bytes())
    except Exception as e:  # OSError (ENOSPC, EROFS), or what safetensors and torch wrap it in
        error = e
    if not _all_succeeded(accelerator, error is None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        why = first_line(error) if error is not None else "another process failed to write its part"
        raise CheckpointWriteError(f"could not write {final.name} in {root}: {why}; the earlier checkpoints are "
                                   f"kept") from error
    if accelerator.is_main_process:
        try:
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
                        "files": {rel: _describe(tmp / rel) for rel in _relative_files(tmp)}}
            _fsync_tree(tmp)
            _write_bytes(tmp / MARKER, (json.dumps(manifest, indent=2) + "\n").encode())
            _fsync_dir(tmp)
            if final.exists():  # not ours (ours never appear half-written): kept aside, never deleted
                _set_aside(final)
            os.replace(tmp, final)
            _fsync_dir(root)
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
    names = _parameter_names(objects.model, objects.optimizer)
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


def _all_succeeded(accelerator: Any, ok: bool) -> bool:
    if accelerator.num_processes == 1:
        return ok
    failures = accelerator.reduce(torch.tensor([0.0 if ok else 1.0], device=accelerator.device), reduction="sum")
    return bool(failures.item() == 0)


def _rng_state_bytes() -> bytes:
    """This process's RNG states as safetensors: torch (CPU and each CUDA device), numpy and python."""
    from safetensors.torch import save

    numpy_state = cast(tuple[Any, ...], np.random.get_state())  # ("MT19937", keys[624], pos, has_gauss, cached)
    version, words, gauss_next = random.getstate()  # words: 624 state words and the position
    tensors = {
        "torch_cpu": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(numpy_state[1], dtype=np.int64)),
        "python_words": torch.tensor(words, dtype=torch.int64),
    }
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = cuda_state
    metadata = {
        "numpy": json.dumps([numpy_state[0], int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])]),
        "python": json.dumps([version, gauss_next]),
    }
    return save(tensors, metadata=metadata)


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


# ---- checking ---------------------------------------------------------------------------------------------


def verify_checkpoint(path: Path, unet_config: Mapping[str, Any], scheduler_config: Mapping[str, Any],
                      use_ema: bool) -> TrainerState:
    """Everything ``load_checkpoint`` will read, checked without changing anything. Returns the state.

    ``DamagedCheckpoint``: a file differs from the manifest, or does not parse. ``CheckpointError``: a pickle,
    the old pickled format, a ``trainer_state.json`` that cannot be right, or configs that differ from this run's.
    """
    manifest = _read_manifest(path)
    _refuse_pickles(path)
    state = read_state(path)
    for rel, expected in manifest["files"].items():
        file = path / rel
        if not file.is_file():
            raise DamagedCheckpoint(f"{file} is missing")
        if _describe(file) != expected:
            raise DamagedCheckpoint(f"{file} differs from when it was written (size or SHA-256)")
    for rel in [f"{UNET}/{MODEL_CONFIG_NAME}", f"{UNET}/{WEIGHTS_NAME}", f"{SCHEDULER}/{SCHEDULER_CONFIG_NAME}",
                OPTIMIZER_NAME, RNG_NAME.format(0)]:
        if rel not in manifest["files"]:
            raise DamagedCheckpoint(f"{path / rel} is missing")
    if use_ema and f"{UNET_EMA}/{WEIGHTS_NAME}" not in manifest["files"]:
        raise CheckpointError(f"{path} holds no EMA weights ({UNET_EMA}/) but --use_ema is on; resume without "
                              f"--use_ema or from a checkpoint of an EMA run")
    if use_ema:
        ema_step = _read_config(path / UNET_EMA / MODEL_CONFIG_NAME).get("optimization_step")
        if ema_step is None or ema_step != state.ema_optimization_step:
            raise CheckpointError(f"{path / UNET_EMA / MODEL_CONFIG_NAME}: optimization_step {ema_step!r} is not "
                                  f"{STATE_NAME}'s ema_optimization_step {state.ema_optimization_step!r}")
    ours = normalised_unet_config(unet_config)
    theirs = normalised_unet_config(_read_config(path / UNET / MODEL_CONFIG_NAME))
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differing:
        raise CheckpointError(f"{path.name} was trained with a different model config ({', '.join(differing[:4])} "
                              f"differ); resume with that run's --model_config_name_or_path and --resolution, or "
                              f"start a new run in another --output_dir")
    theirs = _without_metadata(_read_config(path / SCHEDULER / SCHEDULER_CONFIG_NAME))
    differing = sorted(k for k in set(scheduler_config) | set(theirs)
                       if _without_metadata(scheduler_config).get(k) != theirs.get(k))
    if differing:
        raise CheckpointError(f"{path.name} was trained with a different noise schedule ({', '.join(differing[:4])} "
                              f"differ); resume with that run's --ddpm_num_steps, --ddpm_beta_schedule and "
                              f"--prediction_type")
    for rel in manifest["files"]:
        if rel.endswith(".safetensors"):
            _safetensors_keys(path / rel)  # parses the header: a damaged file is caught here, not half-way through
    return state


def _read_manifest(path: Path) -> dict[str, Any]:
    marker = path / MARKER
    try:
        manifest = json.loads(marker.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        if (path / "model.safetensors").is_file() or any(path.glob("random_states_*.pkl")):
            raise CheckpointError(f"{path} was written by an earlier ddpm through accelerate's pickled save_state; "
                                  f"ddpm no longer loads pickles, so it cannot be resumed: start over with "
                                  f"--overwrite_output_dir (or finish the run with the ddpm version that wrote it)")
        raise DamagedCheckpoint(f"{marker} is not a ddpm checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{marker}: checkpoint format version {manifest.get('format_version')!r} is not "
                              f"{FORMAT_VERSION}, the one this ddpm reads")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise DamagedCheckpoint(f"{marker} lists no files")
    for rel in files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CheckpointError(f"{marker} lists {rel!r}, outside the checkpoint folder")
    return manifest


def _refuse_pickles(path: Path) -> None:
    pickles = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if not pickles:
        return
    if "random_states_0.pkl" in pickles or "optimizer.bin" in pickles:
        raise CheckpointError(f"{path} holds accelerate's pickled training state ({', '.join(pickles[:3])}), as "
                              f"train_unconditional.py and earlier ddpm versions write it; ddpm never unpickles, so "
                              f"it cannot be resumed: start over with --overwrite_output_dir (its unet/ weights can "
                              f"still be sampled from)")
    raise CheckpointError(f"{path} holds {', '.join(pickles[:3])}: ddpm checkpoints never contain pickles, and "
                          f"loading one could run code; refused (remove the file if you trust it and know why "
                          f"it is there)")


def read_state(path: Path) -> TrainerState:
    """``trainer_state.json``, checked: a value that cannot be right is a ``CheckpointError`` naming it."""
    state_path = path / STATE_NAME
    if not state_path.is_file():
        raise DamagedCheckpoint(f"{path} has no {STATE_NAME}")
    try:
        raw = read_json(state_path)
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedCheckpoint(first_line(e)) from None
    if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{state_path} is not a ddpm {FORMAT} version {FORMAT_VERSION} state")

    def integer(key: str, low: int, high: float = float("inf"), optional: bool = False) -> None:
        value = raw.get(key)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise CheckpointError(f"{state_path}: {key} is {value!r}, expected an integer from {low} to {high} "
                                  f"(was the file edited?); restore it or resume from another checkpoint")

    integer("global_step", 1)
    step = raw["global_step"]
    m = _NAME.match(path.name)
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"{state_path}: global_step is {step} but the folder is {path.name} (was the file "
                              f"edited?); restore it or resume from another checkpoint")
    integer("epoch", 0, step)
    integer("seed", 0, 2**32 - 1)
    integer("nan_skips", 0, step)
    integer("batches_per_epoch", 1)
    integer("gradient_accumulation_steps", 1)
    integer("num_processes", 1)
    integer("ema_optimization_step", 0, step, optional=True)
    lr = raw.get("lr_schedule")
    if not isinstance(lr, dict) or not isinstance(lr.get("last_epoch"), int) or not 0 <= lr["last_epoch"] <= step:
        raise CheckpointError(f"{state_path}: lr_schedule is not a learning-rate schedule state at step {step}")
    groups = raw.get("optimizer_param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise CheckpointError(f"{state_path}: optimizer_param_groups is not a list of parameter groups")
    if raw.get("grad_scaler") is not None and not isinstance(raw["grad_scaler"], dict):
        raise CheckpointError(f"{state_path}: grad_scaler is not a gradient scaler state")
    fields = {f.name for f in dataclasses.fields(TrainerState)}
    return TrainerState(**{k: v for k, v in raw.items() if k in fields})


def normalised_unet_config(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """A UNet config as ``UNet.save_pretrained`` writes it (all keys, lists not tuples), without metadata keys."""
    from ddpm.config import config_from_dict
    from ddpm.unet import UNetConfig

    raw = {k: v for k, v in unet_config.items() if k not in EMA_CONFIG_KEYS}
    try:
        config = config_from_dict(UNetConfig, raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"UNet config: {first_line(e)}") from None
    return _without_metadata(json.loads(json.dumps(config_to_dict(config, "UNet2DModel"))))


def _without_metadata(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise DamagedCheckpoint(first_line(e)) from None


def _safetensors_keys(path: Path) -> set[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return set(fh.keys())
    except (SafetensorError, OSError, RuntimeError) as e:
        raise DamagedCheckpoint(f"{path}: corrupted or truncated safetensors file ({first_line(e)})") from None


# ---- loading ----------------------------------------------------------------------------------------------


def load_checkpoint(path: Path, state: TrainerState, objects: TrainingObjects, process_index: int) -> None:
    """Restore the weights, EMA, optimiser, LR schedule, grad scaler and this process's RNG states from a
    checkpoint that ``verify_checkpoint`` accepted. Call it on every process."""
    model_weights = _load(path / UNET / WEIGHTS_NAME)
    try:
        objects.model.load_state_dict(model_weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path / UNET / WEIGHTS_NAME} does not fit the model: {first_line(e)}") from None
    if objects.ema is not None:
        ema_weights = _load(path / UNET_EMA / WEIGHTS_NAME)
        objects.ema.load_state_dict({"shadow": {k: ema_weights[k] for k in objects.ema.shadow},
                                     "optimization_step": state.ema_optimization_step})

    names = _parameter_names(objects.model, objects.optimizer)
    index_of = {name: i for i, name in enumerate(names)}
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _load(path / OPTIMIZER_NAME).items():
        stat, name = key.split(".", 1)
        if name not in index_of:
            raise CheckpointError(f"{path / OPTIMIZER_NAME}: state for {name}, which the model does not have")
        per_param.setdefault(index_of[name], {})[stat] = value
    groups = []
    for group in state.optimizer_param_groups:
        unknown = [n for n in group["params"] if n not in index_of]
        if unknown:
            raise CheckpointError(f"{path / STATE_NAME}: optimiser parameters {unknown[:3]} are not in the model")
        groups.append({k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
                      | {"params": [index_of[n] for n in group["params"]]})
    try:
        objects.optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path / OPTIMIZER_NAME} does not fit the optimiser: {first_line(e)}") from None
    objects.lr_schedule.load_state_dict(state.lr_schedule)
    if objects.scaler is not None and state.grad_scaler:
        objects.scaler.load_state_dict(state.grad_scaler)
    elif objects.scaler is not None:
        logger.warning("warning: %s holds no gradient-scaler state (it was not an fp16 run): the fp16 loss scale "
                       "starts afresh", path)
    _restore_rng(path, process_index)


def _restore_rng(path: Path, process_index: int) -> None:
    from safetensors import safe_open

    rng_path = path / RNG_NAME.format(process_index)
    if not rng_path.is_file():  # more processes than the run that wrote it
        logger.warning("warning: %s is missing (the checkpoint was written by fewer processes): process %d starts "
                       "from fresh random states, so this resume is NOT bit-exact", rng_path, process_index)
        return
    with safe_open(str(rng_path), framework="pt") as fh:
        metadata = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    try:
        name, pos, has_gauss, cached = json.loads(metadata["numpy"])
        version, gauss_next = json.loads(metadata["python"])
        torch.set_rng_state(tensors["torch_cpu"])
        np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate((version, tuple(int(w) for w in tensors["python_words"].tolist()), gauss_next))
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise DamagedCheckpoint(f"{rng_path} is not a random-state file ({first_line(e)})") from None
    if torch.cuda.is_available():
        cuda = [tensors[f"torch_cuda_{i}"] for i in range(torch.cuda.device_count()) if f"torch_cuda_{i}" in tensors]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("warning: %s holds no CUDA random state for this machine's %d GPU(s) (written on another "
                           "machine?): this resume is NOT bit-exact", rng_path, torch.cuda.device_count())


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_weights(path)
    except ValueError as e:
        raise DamagedCheckpoint(first_line(e)) from None


def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimiser parameter, in the optimiser's order (its state is indexed by position)."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_param_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The optimiser's hyper-parameters per group, with parameter names instead of positions (JSON-ready)."""
    names = _parameter_names(model, optimizer)
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


def _describe(path: Path) -> dict[str, Any]:
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
        _fsync_dir(path)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
