"""What the trainer builds from flags and writes besides checkpoints: the model config, the output folder's
safety checks, sample grids, the saved pipeline and the Hub upload."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ddpm import checkpoint
from ddpm.cli import first_line
from ddpm.config import config_to_dict, read_json
from ddpm.training.args import TrainConfig
from ddpm.training.checkpoints import PREFIX, TMP_PREFIX, complete_checkpoints

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
    levels = len(raw.get("block_out_channels", (224, 448, 672, 896)))  # UNet2DModel's default has 4 levels
    factor = 2 ** (levels - 1)
    if config.resolution % factor:
        raise ValueError(f"--resolution {config.resolution} is not divisible by {factor}: the model ({where}) "
                         f"halves the image {levels - 1} times; use a multiple of {factor}")
    if raw.get("in_channels", 3) not in (1, 3) or raw.get("out_channels", 3) != raw.get("in_channels", 3):
        raise ValueError(f"in_channels={raw.get('in_channels', 3)} and out_channels={raw.get('out_channels', 3)} "
                         f"in {where}: the trainer needs 3 (RGB) or 1 (grayscale) for both")
    return raw


def check_output_dir(config: TrainConfig, unet_config: dict[str, Any], resuming: bool) -> None:
    """Refuse to mix a new run into an output folder that holds another run, unless --overwrite_output_dir.

    With --overwrite_output_dir (and no resume) the old checkpoints, pipeline and sample grids are deleted.
    """
    out = Path(config.output_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"--output_dir {out} exists and is not a folder")
    if resuming:
        return
    old_checkpoints = [p.name for _, p in complete_checkpoints(out)]
    if config.overwrite_output_dir:
        for entry in out.iterdir():
            if entry.name.startswith((PREFIX, TMP_PREFIX)) or entry.name in (*PIPELINE_FILES, "samples"):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return
    if old_checkpoints:
        raise ValueError(f"--output_dir {out} already holds checkpoints of an earlier run ({', '.join(old_checkpoints)}); "
                         f"continue it with --resume_from_checkpoint latest, or start over with --overwrite_output_dir")
    unet_json = out / "unet" / checkpoint.MODEL_CONFIG_NAME
    if (out / checkpoint.PIPELINE_INDEX_NAME).is_file() and unet_json.is_file():
        new = _normalised(unet_config)
        try:
            old = _normalised(read_json(unet_json))
        except ValueError:  # keys we do not know: certainly not our config
            old = {}
        differing = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and not k.startswith("_"))
        if differing:
            raise ValueError(f"--output_dir {out} already holds a pipeline trained with a different model config "
                             f"({', '.join(differing[:4])} differ); pass --overwrite_output_dir to replace it, or "
                             f"choose another --output_dir")


def _normalised(unet_config: dict[str, Any]) -> dict[str, Any]:
    """The config as ``UNet.save_pretrained`` would write it (all keys, lists not tuples)."""
    from ddpm.config import config_from_dict
    from ddpm.unet import UNetConfig

    return json.loads(json.dumps(config_to_dict(config_from_dict(UNetConfig, unet_config), "UNet2DModel")))


def save_pipeline_atomically(pipeline: Any, output_dir: str) -> None:
    """``pipeline.save_pretrained(output_dir)`` through a temporary folder: each file appears complete."""
    out = Path(output_dir)
    tmp = out / f"{TMP_PREFIX}pipeline"
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp)
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        target = out / path.relative_to(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(path, target)
    shutil.rmtree(tmp, ignore_errors=True)


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
                                  ignore_patterns=["step_*", "epoch_*", f"{PREFIX}*", f"{TMP_PREFIX}*",
                                                   f"{config.logging_dir}/*"])
