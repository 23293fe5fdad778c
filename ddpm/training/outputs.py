"""What the trainer builds from flags and writes besides checkpoints: the model config, the checks on the
output folder (made before anything is created or deleted), the pipeline swapped in atomically, sample grids
and the Hub upload."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ddpm import checkpoint
from ddpm.config import read_json
from ddpm.errors import first_line
from ddpm.training.args import TrainConfig
from ddpm.training.checkpoints import (ABANDONED_PREFIX, MARKER, PREFIX, TMP_PREFIX, checkpoint_folders,
                                       fsync_dir, is_complete, normalised_unet_config, without_metadata)
from ddpm.training.lock import LOCK_NAME
from ddpm.unet_config import UNetConfig, check_resolution

# train_unconditional.py's default model: six levels, attention in the 5th down and 2nd up block.
SCRIPT_UNET: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                         "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}
PIPELINE_FILES = (checkpoint.PIPELINE_INDEX_NAME, "unet", "scheduler")
STAGE_NAME = ".tmp-pipeline"
TRACKER_PROJECT = "train_unconditional"  # the tracker's project name, as in the script: logs/train_unconditional/


def read_model_config(name: str) -> tuple[dict[str, Any], str]:
    """``--model_config_name_or_path``: a config.json, a UNet folder, a pipeline folder or a hub id.

    Returns the config dict and where it came from. Only the config is read: the model starts from scratch.
    """
    path = Path(name).expanduser()
    if path.is_file():
        return read_json(path), str(path)
    if path.is_dir() and not (path / checkpoint.MODEL_CONFIG_NAME).is_file() \
            and not (path / "unet" / checkpoint.MODEL_CONFIG_NAME).is_file():
        raise FileNotFoundError(f"--model_config_name_or_path {name}: the folder holds neither config.json nor "
                                f"unet/config.json")
    index = checkpoint.resolve_file(name, checkpoint.PIPELINE_INDEX_NAME, required=False)
    found = None
    if index is not None:
        found = checkpoint.resolve_file(name, checkpoint.MODEL_CONFIG_NAME, "unet", required=False)
    if found is None:
        found = checkpoint.resolve_file(name, checkpoint.MODEL_CONFIG_NAME)
    assert found is not None
    return read_json(found), str(found)


def model_config(config: TrainConfig) -> dict[str, Any]:
    """The UNet config dict to train, checked against ``--resolution``."""
    if config.model_config_name_or_path is None:
        raw, where = dict(SCRIPT_UNET), "the default model"
    else:
        raw, where = read_model_config(config.model_config_name_or_path)
    raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    size = raw.get("sample_size")
    if size is None:
        raw["sample_size"] = config.resolution
    elif size not in (config.resolution, [config.resolution] * 2):
        raise ValueError(f"--resolution {config.resolution} differs from sample_size={size} in {where}; pass "
                         f"--resolution {size if isinstance(size, int) else size[0]} or change the config")
    levels = len(raw.get("block_out_channels", UNetConfig.block_out_channels))
    check_resolution(f"--resolution {config.resolution} ({where})", config.resolution, levels)
    if raw.get("in_channels", 3) not in (1, 3) or raw.get("out_channels", 3) != raw.get("in_channels", 3):
        raise ValueError(f"in_channels={raw.get('in_channels', 3)} and out_channels={raw.get('out_channels', 3)} "
                         f"in {where}: the trainer needs 3 (RGB) or 1 (grayscale) for both")
    return raw


def check_paths(config: TrainConfig) -> None:
    """The output and logging folders can be created and written, checked without creating anything."""
    out = Path(config.output_dir)
    logs = out / config.logging_dir
    for path, flag in ((out, "--output_dir"), (logs, "--logging_dir"), (logs / TRACKER_PROJECT, "--logging_dir")):
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise NotADirectoryError(f"{flag}: {existing} exists and is not a folder"
                                     + ("" if existing == path else f" (needed for {path})"))
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"{flag}: {existing} is not writable" + ("" if existing == path else
                                                                            f" (needed to create {path})"))


def check_output_dir(config: TrainConfig, unet_config: dict[str, Any], resuming: bool,
                     scheduler_config: dict[str, Any] | None = None) -> list[Path]:
    """Refuse to mix a new run into an output folder that holds another run, unless --overwrite_output_dir: its
    checkpoints, or a pipeline with another model config or (given ``scheduler_config``) noise schedule. So
    within a run only the pipeline's weights file ever changes, and ``StagedPipeline`` swaps it with one rename.

    Changes nothing. Returns what --overwrite_output_dir (without a resume) will delete once every other check
    has passed: the earlier run's checkpoints, pipeline and sample grids.
    """
    out = Path(config.output_dir)
    if not out.exists() or resuming:
        return []
    if not out.is_dir():
        raise NotADirectoryError(f"--output_dir {out} exists and is not a folder")
    if config.overwrite_output_dir:
        return sorted(entry for entry in out.iterdir()
                      if entry.name.startswith((PREFIX, TMP_PREFIX, ABANDONED_PREFIX, STAGE_NAME))
                      or entry.name in (*PIPELINE_FILES, "samples"))
    folders = checkpoint_folders(out)
    if any(is_complete(path) for _, path in folders):
        names = ", ".join(path.name for _, path in folders)
        raise ValueError(f"--output_dir {out} already holds checkpoints of an earlier run ({names}); continue it "
                         f"with --resume_from_checkpoint latest, or start over with --overwrite_output_dir")
    if folders:  # none of them complete: nothing to resume from, but not ours to delete either
        names = ", ".join(path.name for _, path in folders)
        raise ValueError(f"--output_dir {out} holds checkpoint folders that cannot be resumed (no {MARKER} marker: "
                         f"{names}); start over with --overwrite_output_dir, or choose another --output_dir")
    unet_json = out / "unet" / checkpoint.MODEL_CONFIG_NAME
    if (out / checkpoint.PIPELINE_INDEX_NAME).is_file() and unet_json.is_file():
        new = normalised_unet_config(unet_config)
        try:
            old = normalised_unet_config(read_json(unet_json))
        except ValueError:  # keys we do not know: certainly not our config
            old = {}
        differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        scheduler_json = out / "scheduler" / checkpoint.SCHEDULER_CONFIG_NAME
        if not differing and scheduler_config is not None and scheduler_json.is_file():
            ours, theirs = without_metadata(scheduler_config), without_metadata(read_json(scheduler_json))
            differing = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        if differing:
            raise ValueError(f"--output_dir {out} already holds a pipeline trained with a different model config "
                             f"or noise schedule ({', '.join(differing[:4])} differ); pass --overwrite_output_dir to "
                             f"replace it, or choose another --output_dir")
    return []


def delete(paths: list[Path]) -> None:
    """Delete what ``check_output_dir`` listed (--overwrite_output_dir), each entry renamed away first."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            trash = path.with_name(f"{TMP_PREFIX}deleting-{path.name}")
            os.replace(path, trash)
            shutil.rmtree(trash)
        else:
            path.unlink(missing_ok=True)


# ---- the pipeline in output_dir, replaced atomically -----------------------------------------------------


class StagedPipeline:
    """A pipeline written completely into ``output_dir/.tmp-pipeline/``, then swapped in by ``commit()``.

    The pipeline stays in ``output_dir`` itself (``model_index.json``, ``unet/``, ``scheduler/`` next to the
    checkpoints), where ``DDPMPipeline.from_pretrained(output_dir)`` finds it, so no single rename can replace
    three entries. What makes one rename enough: within a run only the weights file changes. The configs are
    fixed by the run's flags, and a run refuses to start on a folder whose pipeline has another model config
    (or to resume a checkpoint with another model or noise schedule) unless --overwrite_output_dir deleted it.
    So ``commit()`` compares the staged files with the current ones (JSON by content) and:

    - nothing differs: nothing to do (a finished run resumed stays bitwise identical);
    - only the weights differ: ``os.replace`` of ``unet/diffusion_pytorch_model.safetensors``, atomic. A kill at
      any moment leaves the old complete pipeline or the new one;
    - no pipeline yet (no ``model_index.json``): the files are moved in with ``model_index.json`` last, so a kill
      half-way leaves a folder that diffusers does not take for a pipeline (there was none before);
    - anything else (a foreign pipeline with the same model config but other files): ``model_index.json`` is
      removed first and written last, so the folder is never a mix that loads.
    """

    def __init__(self, pipeline: Any, output_dir: str) -> None:
        self.out = Path(output_dir)
        self.stage = self.out / STAGE_NAME
        shutil.rmtree(self.stage, ignore_errors=True)  # left by a crash during an earlier save
        try:
            pipeline.save_pretrained(self.stage)
        except Exception as e:  # a full disk: the current pipeline is untouched
            shutil.rmtree(self.stage, ignore_errors=True)
            raise OSError(f"could not save the pipeline in {self.out}: {first_line(e)}; the previous one is kept") \
                from e
        self.files = sorted(str(p.relative_to(self.stage)) for p in self.stage.rglob("*") if p.is_file())
        self.differing = [rel for rel in self.files if not _same_file(self.stage / rel, self.out / rel)]

    @property
    def changed(self) -> bool:
        """Whether ``output_dir`` holds another pipeline (or none) than the staged one."""
        return bool(self.differing)

    def commit(self) -> None:
        index = checkpoint.PIPELINE_INDEX_NAME
        weights = f"unet/{checkpoint.WEIGHTS_NAME}"
        try:
            for rel in self.files:
                with open(self.stage / rel, "rb") as fh:
                    os.fsync(fh.fileno())
            current = (self.out / index).is_file()
            if current and self.differing == [weights]:
                os.replace(self.stage / weights, self.out / weights)  # the swap: one rename
                fsync_dir(self.out / "unet")
            elif self.differing:
                if current:
                    (self.out / index).unlink()
                    fsync_dir(self.out)
                for rel in sorted(self.differing, key=lambda r: r == index):  # model_index.json last
                    target = self.out / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self.stage / rel, target)
                    fsync_dir(target.parent)
                if index not in self.differing:
                    os.replace(self.stage / index, self.out / index)
                fsync_dir(self.out)
        except OSError as e:
            raise OSError(f"could not save the pipeline in {self.out}: {first_line(e)}") from e
        finally:
            self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)


def _same_file(a: Path, b: Path) -> bool:
    if not b.is_file():
        return False
    if a.suffix == ".json":  # by content: another writer's formatting or version stamp does not matter
        try:
            return _comparable(read_json(a)) == _comparable(read_json(b))
        except (ValueError, UnicodeDecodeError):
            return False
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            block = fa.read(1 << 20)
            if block != fb.read(1 << 20):
                return False
            if not block:
                return True


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "_diffusers_version"}


def save_image_atomically(image: Any, path: Path) -> None:
    """``image.save(path)`` through a temporary name: a kill never leaves half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def create_hub_repo(config: TrainConfig) -> str:
    """Create (or reuse) the Hub repo; with --hub_private_repo it is private, and a public one is refused."""
    import huggingface_hub

    repo_id = config.hub_model_id or Path(config.output_dir).name
    try:
        repo_id = huggingface_hub.create_repo(repo_id, exist_ok=True, private=config.hub_private_repo,
                                              token=config.hub_token).repo_id
        if config.hub_private_repo:
            info = huggingface_hub.HfApi(token=config.hub_token).repo_info(repo_id)
            if not info.private:
                raise ValueError(f"--hub_private_repo: the Hub repo {repo_id} already exists and is public; make it "
                                 f"private on the Hub or choose another --hub_model_id")
    except ValueError:
        raise
    except Exception as e:  # offline, no token, no permission
        raise OSError(f"--push_to_hub: could not create the Hub repo {repo_id} ({type(e).__name__}: "
                      f"{first_line(e)})") from None
    return str(repo_id)


def upload_to_hub(config: TrainConfig, repo_id: str, message: str) -> None:
    import huggingface_hub

    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=config.output_dir, commit_message=message,
                                  token=config.hub_token,
                                  ignore_patterns=["step_*", "epoch_*", f"{PREFIX}*", f"{ABANDONED_PREFIX}*",
                                                   ".tmp-*", LOCK_NAME, f"{config.logging_dir}/*"])
