"""Resuming: which checkpoint, checked how, and restored into the run's objects (``checkpoints.py`` writes them).

``choose_checkpoint`` resolves ``--resume_from_checkpoint`` ("latest", a folder name in ``output_dir``, or a
path) and runs ``verify_checkpoint`` on it, on the main process, before anything changes:

1. the manifest ``COMPLETE``; the pickled format that accelerate's ``save_state`` wrote for earlier ddpm
   versions (and for train_unconditional.py) is refused, saying why;
2. no pickle anywhere in the folder (``.pkl``, ``.bin``, ``.pt`` ...): ddpm never writes one and never reads one;
3. ``trainer_state.json``: every value in range, the step that of the folder's name (a hand-edited step is a
   one-line error, never a renamed or skipped run);
4. each file's size and SHA-256 against the manifest; each safetensors header;
5. the model and noise-schedule configs against this run's flags, and the EMA against --use_ema.

A ``DamagedCheckpoint`` (step 4, or a file that does not parse) makes "latest" fall back to the newest
checkpoint that verifies, with a warning naming the file; any other ``CheckpointError`` stops the run.
``load_checkpoint`` then restores the weights, EMA, optimiser, LR schedule, grad scaler and this process's RNG
states, on every process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ddpm.checkpoint import MODEL_CONFIG_NAME, SCHEDULER_CONFIG_NAME, WEIGHTS_NAME, load_weights
from ddpm.errors import first_line
from ddpm.config import read_json
from ddpm.training import rng
from ddpm.training.checkpoints import (FORMAT, FORMAT_VERSION, MARKER, NAME_PATTERN, OPTIMIZER_NAME,
                                       PICKLE_SUFFIXES, RNG_NAME, SCHEDULER, STATE_NAME, UNET, UNET_EMA,
                                       CheckpointError, DamagedCheckpoint, TrainerState, TrainingObjects,
                                       complete_checkpoints, describe, is_complete, latest_checkpoint,
                                       normalised_unet_config, parameter_names, without_metadata)

logger = logging.getLogger(__name__)


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
        if describe(file) != expected:
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
    ours, theirs = without_metadata(scheduler_config), without_metadata(_read_config(path / SCHEDULER /
                                                                                       SCHEDULER_CONFIG_NAME))
    differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
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
    m = NAME_PATTERN.match(path.name)
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

    names = parameter_names(objects.model, objects.optimizer)
    index_of = {name: i for i, name in enumerate(names)}
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in _load(path / OPTIMIZER_NAME).items():
        stat, name = key.split(".", 1)
        if name not in index_of:
            raise CheckpointError(f"{path / OPTIMIZER_NAME}: state for {name}, which the model does not have")
        per_param.setdefault(index_of[name], {})[stat] = value
    # The moments in their parameter's memory format (safetensors gives them contiguous, the conv weights are
    # channels_last): fused AdamW walks a parameter and its moments as if their strides agreed.
    params = [p for group in objects.optimizer.param_groups for p in group["params"]]
    for index, stats in per_param.items():
        for stat, value in stats.items():
            if value.shape == params[index].shape:
                stats[stat] = torch.empty_like(params[index], dtype=value.dtype).copy_(value)
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
    rng_path = path / RNG_NAME.format(process_index)
    if not rng_path.is_file():  # more processes than the run that wrote it
        logger.warning("warning: %s is missing (the checkpoint was written by fewer processes): process %d starts "
                       "from fresh random states, so this resume is NOT bit-exact", rng_path, process_index)
        return
    try:
        rng.restore(rng_path)
    except ValueError as e:
        raise DamagedCheckpoint(first_line(e)) from None


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_weights(path)
    except ValueError as e:
        raise DamagedCheckpoint(first_line(e)) from None
