"""diffusers' on-disk format: where files are, how weights are read and written safely, and legacy key names.

A model folder holds ``config.json`` (or ``scheduler_config.json``) and ``diffusion_pytorch_model.safetensors``
(or the older pickled ``.bin``). A *variant* ``v`` names its files ``diffusion_pytorch_model.v.safetensors``. A
*sharded* checkpoint splits the weights over ``diffusion_pytorch_model-00001-of-00003.safetensors``, ... and lists
which tensor is in which file in ``diffusion_pytorch_model.safetensors.index.json`` (``...index.v.json`` for a
variant), the files that diffusers and huggingface_hub write and read. A pipeline folder adds ``model_index.json``
and one subfolder per component. A hub repo id resolves through huggingface_hub to the same files in its cache.

Safety: safetensors files are read as data and are all we write. A ``.bin`` is unpickled only with
``torch.load(weights_only=True)``, which refuses any object that would run code; that refusal is reported as a
clear ``ValueError``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm.config import read_json, write_json

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
MODEL_CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
PIPELINE_INDEX_NAME = "model_index.json"
DEFAULT_MAX_SHARD_SIZE = "10GB"  # diffusers' default: a checkpoint larger than this is split into shards

# Attention parameter names written by diffusers' conversion of the original DDPM checkpoints
# (its old ``AttentionBlock``), renamed to today's names at load time. One table, applied once.
LEGACY_ATTENTION_RENAMES = {
    ".query.": ".to_q.",
    ".key.": ".to_k.",
    ".value.": ".to_v.",
    ".proj_attn.": ".to_out.0.",
}

NO_PICKLE = ("ddpm writes safetensors only: a pickled .bin can run arbitrary code when it is loaded, and "
             "safetensors is what diffusers writes and reads by default")


class MissingWeightsError(FileNotFoundError):
    """A model folder has no weights file of the requested kind (variant, safetensors or not)."""


@dataclass(frozen=True)
class HubOptions:
    """How to fetch files of a Hub repo id, with huggingface_hub's meaning (unused for local folders)."""

    cache_dir: str | Path | None = None
    revision: str | None = None
    token: str | bool | None = None
    local_files_only: bool = False
    force_download: bool = False


def add_variant(filename: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors`` -> ``diffusion_pytorch_model.fp16.safetensors`` (and
    ``...safetensors.index.json`` -> ``...safetensors.index.fp16.json``), as diffusers names variants."""
    if variant is None:
        return filename
    stem, ext = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def check_variant(variant: str | None) -> None:
    if variant is not None and (not isinstance(variant, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", variant)):
        raise ValueError(f"variant={variant!r} must be a short name such as 'fp16' (letters, digits, - and _)")


def is_repo_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub id ("user/name" or "name") rather than a path."""
    if name.startswith((".", "/", "~")) or os.sep != "/" and os.sep in name:
        return False
    return 0 < len(name) and name.count("/") <= 1 and all(part for part in name.split("/"))


def resolve_file(path_or_repo_id: str | os.PathLike[str], filename: str, subfolder: str | None = None,
                 required: bool = True, hub: HubOptions | None = None) -> Path | None:
    """Path of ``filename`` in a local folder or a hub repo (downloaded into the hub cache, with ``hub``'s options).

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
    return _hub_download(name, filename, subfolder, required, hub or HubOptions())


def _hub_download(repo_id: str, filename: str, subfolder: str | None, required: bool,
                  hub: HubOptions) -> Path | None:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f"{subfolder}/{filename}" if subfolder else filename
    try:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder, cache_dir=hub.cache_dir,
                                    revision=hub.revision, token=hub.token, local_files_only=hub.local_files_only,
                                    force_download=hub.force_download))
    except LocalEntryNotFoundError:  # offline (or local_files_only) and not in the cache; an EntryNotFoundError too
        try:  # a cached copy of this revision that lacks the file: the file is missing, not the network
            snapshot_download(repo_id, cache_dir=hub.cache_dir, revision=hub.revision, local_files_only=True)
        except Exception:
            why = "local_files_only=True" if hub.local_files_only else "offline"
            raise _unreachable(repo_id, why, hub) from None
        if required:
            raise FileNotFoundError(f"the cached copy of hub repo {repo_id!r} has no {where}") from None
        return None
    except EntryNotFoundError:
        if required:
            raise FileNotFoundError(f"hub repo {repo_id!r} has no {where}") from None
        return None
    except RepositoryNotFoundError:
        raise OSError(f"{repo_id!r} is neither a local folder nor a Hugging Face Hub repo you can access"
                      f"{'' if hub.token else ' (pass token= for a private repo)'}") from None
    except Exception as e:  # connection errors, timeouts, a revision that does not exist: all mean "could not fetch"
        raise _unreachable(repo_id, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", hub) from None


def _unreachable(repo_id: str, why: str, hub: HubOptions) -> OSError:
    cache = f" in {os.fspath(hub.cache_dir)}" if hub.cache_dir else ""
    revision = f" at revision {hub.revision!r}" if hub.revision else ""
    return OSError(f"{repo_id!r} is not a local folder, and it could not be fetched from the Hugging Face Hub as a "
                   f"repo id{revision} ({why}; nothing cached{cache}); pass a local folder path instead, or connect "
                   f"and retry")


def resolve_weights(path_or_repo_id: str | os.PathLike[str], subfolder: str | None = None,
                    variant: str | None = None, use_safetensors: bool | None = None,
                    hub: HubOptions | None = None) -> list[Path]:
    """The weight files of a model folder, in the order diffusers looks for them: a sharded checkpoint's index
    and shards, else one safetensors file, else (unless ``use_safetensors=True``) the legacy ``.bin``.
    ``variant`` picks ``diffusion_pytorch_model.<variant>.*``. Returns the index (if any) followed by the shards."""
    check_variant(variant)
    if use_safetensors is not False:
        index = resolve_file(path_or_repo_id, add_variant(WEIGHTS_INDEX_NAME, variant), subfolder, False, hub)
        if index is not None:
            return [index, *(_resolve_shard(path_or_repo_id, subfolder, index, name, hub)
                             for name in shard_names(index))]
        path = resolve_file(path_or_repo_id, add_variant(WEIGHTS_NAME, variant), subfolder, False, hub)
        if path is not None:
            return [path]
    if use_safetensors is not True:
        path = resolve_file(path_or_repo_id, add_variant(LEGACY_WEIGHTS_NAME, variant), subfolder, False, hub)
        if path is not None:
            return [path]
    where = Path(os.fspath(path_or_repo_id)) / (subfolder or "")
    wanted = [add_variant(n, variant) for n in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, LEGACY_WEIGHTS_NAME)]
    if use_safetensors is not None:
        wanted = wanted[:2] if use_safetensors else wanted[2:]
    # diffusers' wording ("Error no file named ... found in directory") kept, so that code matching it still works
    hint = _variant_hint(where, variant)
    raise MissingWeightsError(f"Error no file named {add_variant(LEGACY_WEIGHTS_NAME, variant)} found in directory "
                            f"{where} (looked for {', '.join(wanted)}){hint}")


def _variant_hint(folder: Path, variant: str | None) -> str:
    # Local folders only: which variants the folder does hold, so the fix is one keyword away.
    if not folder.is_dir():
        return ""
    pattern = re.compile(r"diffusion_pytorch_model\.([A-Za-z0-9_-]+)\.(safetensors|bin)$|"
                         r"diffusion_pytorch_model\.safetensors\.index\.([A-Za-z0-9_-]+)\.json$")
    found = sorted({m.group(1) or m.group(3) for p in folder.iterdir() if (m := pattern.match(p.name))})
    plain = any((folder / n).is_file() for n in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, LEGACY_WEIGHTS_NAME))
    options = [f"variant={v!r}" for v in found if v != variant] + (["no variant"] if plain and variant else [])
    return f"; it holds weights for {' and '.join(options)}" if options else ""


def shard_names(index_path: Path) -> list[str]:
    """The shard files an index names, in order of first appearance; a malformed index is a ValueError."""
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{index_path}: 'weight_map' must map every tensor name to a shard file name")
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise ValueError(f"{index_path}: shard {name!r} must be a .safetensors file name in the same folder")
    return names


def _resolve_shard(path_or_repo_id: str | os.PathLike[str], subfolder: str | None, index: Path, name: str,
                   hub: HubOptions | None) -> Path:
    path = resolve_file(path_or_repo_id, name, subfolder, False, hub)
    if path is None:
        raise FileNotFoundError(f"{index} lists the shard {name}, which is missing")
    return path


def load_state(files: list[Path]) -> dict[str, torch.Tensor]:
    """The state dict in ``files`` as ``resolve_weights`` returns them: one file, or an index and its shards
    (every tensor must sit in the shard the index names, and every shard tensor must be listed)."""
    if len(files) == 1:
        return load_weights(files[0])
    index, shards = files[0], files[1:]
    weight_map: dict[str, str] = read_json(index)["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors = load_weights(shard)
        listed = {k for k, v in weight_map.items() if v == shard.name}
        if set(tensors) != listed:
            odd = sorted(set(tensors) ^ listed)
            raise ValueError(f"{shard} does not hold what {index.name} lists for it (differs in "
                             f"{', '.join(odd[:5])}{', ...' if len(odd) > 5 else ''})")
        state.update(tensors)
    return state


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


def save_state(state_dict: dict[str, torch.Tensor], folder: Path, variant: str | None = None,
               max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[Path]:
    """Write ``state_dict`` into ``folder`` as diffusers does: one ``diffusion_pytorch_model[.variant].safetensors``,
    or, when it exceeds ``max_shard_size`` (bytes, or a string such as ``"5GB"``/``"200KB"``), numbered shards
    plus the index. Weight files of the same variant left by an earlier save are removed, so that a reader never
    mixes two saves. Returns the files written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    check_variant(variant)
    pattern = add_variant(WEIGHTS_NAME, variant).replace(".safetensors", "{suffix}.safetensors")
    try:
        split = split_torch_state_dict_into_shards(state_dict, filename_pattern=pattern, max_shard_size=max_shard_size)
    except (ValueError, TypeError) as e:
        raise ValueError(f"max_shard_size={max_shard_size!r} is not a size (bytes, or e.g. '5GB', '200KB'): "
                         f"{e}") from None
    index_name = add_variant(WEIGHTS_INDEX_NAME, variant)
    written = set(split.filename_to_tensors) | ({index_name} if split.is_sharded else set())
    stem = add_variant(WEIGHTS_NAME, variant)[: -len(".safetensors")]
    stale = re.compile(re.escape(stem) + r"(-\d{5}-of-\d{5})?\.safetensors$")
    for old in folder.iterdir():
        if old.name not in written and (stale.match(old.name) or old.name == index_name):
            old.unlink()
    files = []
    for filename, names in split.filename_to_tensors.items():
        save_weights({name: state_dict[name] for name in names}, folder / filename)
        files.append(folder / filename)
    if split.is_sharded:
        write_json(folder / index_name, {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename})
        files.append(folder / index_name)
    return files


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
