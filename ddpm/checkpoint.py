"""diffusers' on-disk format: where files are, how weights are read safely, and legacy key names.

A model folder holds ``config.json`` (or ``scheduler_config.json``) and
``diffusion_pytorch_model.safetensors`` (or the older pickled ``.bin``). A pipeline folder adds
``model_index.json`` and one subfolder per component. A hub repo id resolves through huggingface_hub to the
same files in its cache.

Safety: safetensors files are read as data. A ``.bin`` is unpickled only with ``torch.load(weights_only=True)``,
which refuses any object that would run code; that refusal is reported as a clear ``ValueError``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
MODEL_CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
PIPELINE_INDEX_NAME = "model_index.json"

# Attention parameter names written by diffusers' conversion of the original DDPM checkpoints
# (its old ``AttentionBlock``), renamed to today's names at load time. One table, applied once.
LEGACY_ATTENTION_RENAMES = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}


def is_repo_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub id ("user/name" or "name") rather than a path."""
    if name.startswith((".", "/", "~")) or os.sep != "/" and os.sep in name:
        return False
    return 0 < len(name) and name.count("/") <= 1 and all(part for part in name.split("/"))


def resolve_file(path_or_repo_id: str | os.PathLike[str], filename: str, subfolder: str | None = None,
                 required: bool = True) -> Path | None:
    """Path of ``filename`` in a local folder or a hub repo (downloaded into the hub cache).

    A local folder that lacks the file gives ``FileNotFoundError`` naming both (or ``None`` when
    ``required=False``). A name that is neither a folder nor a repo id is ``FileNotFoundError``. A hub
    repo that can't be reached gives ``OSError`` saying so and that a local path works.
    """
    name = os.fspath(path_or_repo_id)
    folder = Path(name) / subfolder if subfolder else Path(name)
    if Path(name).is_dir():
        path = folder / filename
        if path.is_file():
            return path
        if required:
            raise FileNotFoundError(f"{path} not found: {folder} holds no {filename}")
        return None
    if not is_repo_id(name):
        raise FileNotFoundError(f"{name} is not a folder (and not a Hugging Face Hub repo id)")
    return _hub_download(name, filename, subfolder, required)


def _hub_download(repo_id: str, filename: str, subfolder: str | None, required: bool) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder))
    except LocalEntryNotFoundError:  # offline, or the hub unreachable with nothing cached (an EntryNotFoundError too)
        raise _unreachable(repo_id, "offline") from None
    except EntryNotFoundError:
        if required:
            raise FileNotFoundError(f"hub repo {repo_id!r} has no {subfolder + '/' if subfolder else ''}{filename}") from None
        return None
    except RepositoryNotFoundError:
        raise OSError(f"{repo_id!r} is neither a local folder nor a Hugging Face Hub repo you can access") from None
    except Exception as e:  # connection errors, timeouts: all mean "could not reach"
        raise _unreachable(repo_id, type(e).__name__) from None


def _unreachable(repo_id: str, why: str) -> OSError:
    return OSError(f"{repo_id!r} is not a local folder, and the Hugging Face Hub could not be reached to fetch it "
                   f"as a repo id ({why}); pass a local folder path instead, or connect and retry")


def resolve_weights(path_or_repo_id: str | os.PathLike[str], subfolder: str | None = None) -> Path:
    """The weights file of a model folder: safetensors if present, else the legacy ``.bin``."""
    path = resolve_file(path_or_repo_id, WEIGHTS_NAME, subfolder, required=False)
    if path is None:
        path = resolve_file(path_or_repo_id, LEGACY_WEIGHTS_NAME, subfolder, required=False)
    if path is None:
        where = Path(os.fspath(path_or_repo_id)) / (subfolder or "")
        raise FileNotFoundError(f"{where} holds neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")
    return path


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file, or from a ``.bin`` with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{path}: corrupted or truncated safetensors file ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for refused globals, EOFError/RuntimeError for damage
        raise ValueError(
            f"{path}: refused to load this pickle checkpoint: it is damaged or holds objects that would run "
            f"code ({type(e).__name__}). Convert it to safetensors from a trusted source."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def save_weights(state_dict: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    from safetensors.torch import save_file

    # safetensors wants contiguous, unshared storage; clone() also detaches from autograd.
    save_file({k: v.detach().contiguous().clone() for k, v in state_dict.items()}, os.fspath(path),
              metadata={"format": "pt"})


def rename_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map legacy attention names (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0.

    The legacy projections are the same linear maps, so only names change; legacy 1x1-conv-shaped
    weights ``[C, C, 1, 1]`` are squeezed to linear ``[C, C]``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = key
        for old, repl in LEGACY_ATTENTION_RENAMES.items():
            if old in new:
                new = new.replace(old, repl)
                if value.ndim == 4:
                    value = value[:, :, 0, 0]
        out[new] = value
    return out
