"""Training checkpoints: ``output_dir/checkpoint-<step>/`` folders that are complete or absent.

A checkpoint holds what ``accelerator.save_state`` writes (model, optimiser, LR schedule, gradient scaler, the
RNG state of every process), the EMA weights (``ema.safetensors``) and ``trainer_state.json`` (step, epoch,
seed, EMA step). It is written atomically:

1. every process writes into ``output_dir/.tmp-checkpoint-<step>/`` (the main process writes the shared
   files, each process its own RNG state);
2. the main process fsyncs every file, writes the completion marker ``COMPLETE`` and fsyncs it;
3. it renames the folder to ``checkpoint-<step>`` (atomic on POSIX) and fsyncs ``output_dir``;
4. only then does it prune old checkpoints to ``--checkpoints_total_limit``, never the newest complete one.

A crash at any moment leaves either the previous checkpoints untouched plus a ``.tmp-`` folder (removed by
the next save), or the new complete checkpoint. ``--resume_from_checkpoint latest`` picks the newest folder
that has the marker, and warns naming any newer folder without it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ddpm.checkpoint import load_weights, save_weights
from ddpm.config import read_json, write_json
from ddpm.ema import EMA

PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
MARKER = "COMPLETE"
STATE_NAME = "trainer_state.json"
EMA_NAME = "ema.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that is missing or incomplete, reported as one line."""


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
                       "being written)", path, MARKER)
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
        raise CheckpointError(f"--resume_from_checkpoint {value}: {path} is incomplete (no {MARKER} marker: it was "
                              f"interrupted while being written); use 'latest' or an older checkpoint")
    return path


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


def save_checkpoint(accelerator: Any, output_dir: str, step: int, state: Mapping[str, Any],
                    ema: EMA | None) -> Path:
    """Write ``checkpoint-<step>`` atomically. Call it on every process (each saves its RNG state)."""
    root = Path(output_dir)
    final = root / f"{PREFIX}{step}"
    tmp = root / f"{TMP_PREFIX}{step}"
    if accelerator.is_main_process:
        for stale in root.glob(f"{TMP_PREFIX}*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        if ema is not None:
            save_weights(ema.shadow, tmp / EMA_NAME)
        write_json(tmp / STATE_NAME, {**state, "ema_optimization_step": ema.optimization_step if ema else None})
    accelerator.wait_for_everyone()  # every process has written its RNG state
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        with open(tmp / MARKER, "w", encoding="utf-8") as fh:
            fh.write(f"ddpm training checkpoint of step {step}, completely written\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # an incomplete folder of the same name (not ours: ours never appear half-written)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    accelerator.wait_for_everyone()
    return final


def set_aside_newer(output_dir: str, step: int) -> list[tuple[Path, Path]]:
    """Rename the checkpoints of steps after ``step`` to ``abandoned-checkpoint-<step>``: resuming from an older
    checkpoint abandons them, and left in place they would be pruned in the new run's stead, kept over its
    checkpoints of the same steps, and picked by a later ``latest``. Renamed, not deleted. Returns the
    ``(old, new)`` paths."""
    moved = []
    for later_step, path in checkpoint_folders(output_dir):
        if later_step > step:
            target = path.with_name(f"abandoned-{path.name}")
            n = 1
            while target.exists():
                n += 1
                target = path.with_name(f"abandoned-{n}-{path.name}")
            os.replace(path, target)
            moved.append((path, target))
    return moved


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


def read_state(path: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint: global_step, epoch, seed, nan_skips, batches_per_epoch, ..."""
    state_path = path / STATE_NAME
    if not state_path.is_file():
        raise CheckpointError(f"{path} has no {STATE_NAME}: it is not a ddpm training checkpoint")
    return read_json(state_path)


def load_checkpoint(accelerator: Any, path: Path, ema: EMA | None, expect_ema: bool) -> dict[str, Any]:
    """Restore ``accelerator``'s objects and RNG states, and ``ema`` (held by the main process only).

    Returns ``trainer_state.json``. ``expect_ema`` is checked on every process, so all of them fail alike.
    """
    state = read_state(path)
    if expect_ema and not (path / EMA_NAME).is_file():
        raise CheckpointError(f"{path} holds no EMA weights ({EMA_NAME}) but --use_ema is on; resume without "
                              f"--use_ema or from a checkpoint of an EMA run")
    accelerator.load_state(str(path))
    if ema is not None:
        ema.load_state_dict({"shadow": load_weights(path / EMA_NAME), "optimization_step": state["ema_optimization_step"]})
    return state
