"""Frozen dataclass configs that round-trip diffusers' JSON config files.

A config class is a plain ``@dataclass(frozen=True)`` whose field names are the keys of diffusers'
``config.json`` / ``scheduler_config.json``. Subclassing ``FrozenConfig`` adds the read-only mapping access that
diffusers' ``FrozenDict`` gives (``config["key"]``, ``dict(config)``, ``**config``, ``keys/items/values``, ``in``). Lists in JSON become tuples here so that configs are hashable
and truly immutable. On save we add ``_class_name`` and ``_diffusers_version``; on load every key that
starts with ``_`` is metadata and is ignored. Any other unknown key is a ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

# The diffusers version whose file formats we write. Loaders only need the keys, not this number.
DIFFUSERS_VERSION = "0.42.1"

C = TypeVar("C")


class FrozenConfig(Mapping[str, Any]):
    """Read-only mapping access for a frozen config dataclass, as diffusers' ``FrozenDict`` allows.

    ``config.key`` and ``config["key"]`` read the same field; ``dict(config)``, ``**config``, ``keys()``,
    ``items()``, ``values()``, ``in`` and ``len`` see the fields in declaration order. Writes of either kind raise.
    """

    def __getitem__(self, key: str) -> Any:
        if isinstance(key, str) and key in _field_names(type(self)):
            return getattr(self, key)
        raise KeyError(f"{type(self).__name__} has no key {key!r}")

    def __iter__(self) -> Iterator[str]:
        return iter(_field_names(type(self)))

    def __len__(self) -> int:
        return len(_field_names(type(self)))

    def __setitem__(self, key: str, value: Any) -> None:
        raise TypeError(f"{type(self).__name__} is frozen: cannot set {key!r}. Build a new object instead, e.g. "
                        f"X.from_config(config, {key}=...) or dataclasses.replace(config, {key}=...)")

    def __delitem__(self, key: str) -> None:
        raise TypeError(f"{type(self).__name__} is frozen: cannot delete {key!r}")


def _field_names(cls: type) -> tuple[str, ...]:
    names: tuple[str, ...] | None = cls.__dict__.get("_FIELD_NAMES")
    if names is None:  # computed once per class
        names = tuple(f.name for f in dataclasses.fields(cls))
        setattr(cls, "_FIELD_NAMES", names)
    return names


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def config_from_dict(cls: type[C], d: Mapping[str, Any], ignore: Iterable[str] = ()) -> C:
    """Build config ``cls`` from a JSON-style dict.

    Keys starting with ``_`` are metadata and skipped; keys in ``ignore`` are skipped silently (used for
    documented legacy keys and for swapping one scheduler's config into another). Any other key that is
    not a field of ``cls`` raises ``ValueError`` naming it.
    """
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    skip = set(ignore)
    kwargs: dict[str, Any] = {}
    for key, value in d.items():
        if key.startswith("_") or key in skip:
            continue
        if key not in names:
            raise ValueError(f"unknown config key {key!r} for {cls.__name__}; known keys: {', '.join(sorted(names))}")
        kwargs[key] = _freeze(value)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a value of the wrong type in the file (check_int, ...): bad input, like a bad value
        raise ValueError(str(e)) from e


def config_to_dict(config: Any, class_name: str) -> dict[str, Any]:
    """The diffusers-style JSON dict of a config: metadata keys first, then fields in declaration order."""
    out: dict[str, Any] = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION}
    for f in dataclasses.fields(config):
        out[f.name] = _thaw(getattr(config, f.name))
    return out


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)} must hold a JSON object, got {type(data).__name__}")
    return data


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise a ValueError naming ``key`` when ``value`` is not one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{key}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")


def check_int(key: str, value: Any, minimum: int, optional: bool = False) -> None:
    """A TypeError or ValueError naming ``key`` unless ``value`` is an int >= ``minimum`` (or None if optional)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key}={value!r} must be an integer{' or None' if optional else ''}")
    if value < minimum:
        raise ValueError(f"{key}={value} must be at least {minimum}")


def check_number(key: str, value: Any) -> float:
    """``value`` if it is a finite int or float; else a TypeError or ValueError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key}={value!r} must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}={value} must be finite")
    return value
