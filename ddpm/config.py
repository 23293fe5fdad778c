"""Frozen dataclass configs that round-trip diffusers' JSON config files.

A config class is a plain ``@dataclass(frozen=True)`` whose field names are the keys of diffusers'
``config.json`` / ``scheduler_config.json``. Subclassing ``FrozenConfig`` makes it also a read-only ``dict``, as
diffusers' ``FrozenDict`` is (``config["key"]``, ``dict(config)``, ``**config``, ``keys/items/values``, ``in``,
``json.dumps(config)``, and diffusers' ``from_config`` accepts it). Lists in JSON become tuples here so that
configs are hashable and truly immutable. On save we add ``_class_name`` and ``_diffusers_version``; on load every key that
starts with ``_`` is metadata and is ignored. Any other unknown key is a ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

# The diffusers version whose file formats we write. Loaders only need the keys, not this number.
DIFFUSERS_VERSION = "0.42.1"

C = TypeVar("C")


class _SyncedAfterInit(type):
    """Metaclass of ``FrozenConfig``: once a config is fully built (its ``__post_init__`` checks and normalisation
    done), copy what it shows into the ``dict`` it also is, so C-level readers (``dict(c)``, ``**c``, ``json.dumps``,
    diffusers' ``isinstance(config, dict)``) see the final values."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        config = super().__call__(*args, **kwargs)
        config._sync()
        return config


class FrozenConfig(dict, metaclass=_SyncedAfterInit):  # type: ignore[type-arg]
    """A frozen config dataclass that is also a read-only ``dict``, as diffusers' ``FrozenDict`` is.

    ``config.key`` and ``config["key"]`` read the same field; ``dict(config)``, ``**config``, ``keys()``,
    ``items()``, ``values()``, ``in``, ``len`` and ``json.dumps`` see the fields in declaration order, and
    ``isinstance(config, dict)`` holds, so diffusers' ``from_config`` accepts it. Writes of any kind raise
    ``TypeError``; build a new config instead (``X.from_config(config, key=...)``, ``dataclasses.replace``).
    """

    def _metadata(self) -> dict[str, Any]:
        """Entries shown after the fields, as diffusers keeps ``_class_name`` and the like in its ``FrozenDict``;
        none here (the scheduler configs add theirs)."""
        return {}

    def _sync(self) -> None:
        # the dict storage holds what the mapping shows: the fields, then the metadata
        dict.clear(self)
        dict.update(self, ((name, getattr(self, name)) for name in _field_names(type(self))))
        dict.update(self, self._metadata())

    def __getitem__(self, key: str) -> Any:
        if isinstance(key, str) and key in _field_names(type(self)):
            return getattr(self, key)
        meta = self._metadata()
        if key in meta:
            return meta[key]
        raise KeyError(f"{type(self).__name__} has no key {key!r}")

    def _refuse(self, what: str) -> TypeError:
        return TypeError(f"{type(self).__name__} is frozen: cannot {what}. Build a new config instead, e.g. "
                         f"X.from_config(config, key=value) or dataclasses.replace(config, key=value)")

    def __setitem__(self, key: str, value: Any) -> None:
        raise self._refuse(f"set {key!r}")

    def __delitem__(self, key: str) -> None:
        raise self._refuse(f"delete {key!r}")

    def __ior__(self, other: Any) -> Any:  # type: ignore[misc]
        raise self._refuse("update it")

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise self._refuse("update it")

    def pop(self, *args: Any) -> Any:
        raise self._refuse("pop a key")

    def popitem(self) -> Any:
        raise self._refuse("pop a key")

    def setdefault(self, *args: Any) -> Any:
        raise self._refuse("set a default")

    def clear(self) -> None:
        raise self._refuse("clear it")

    def __reduce__(self) -> tuple[Any, ...]:
        # copy, deepcopy and pickle rebuild through the constructor (dict's own protocol would write items back)
        return (_rebuild, (type(self), tuple((name, getattr(self, name)) for name in _field_names(type(self)))))


def _rebuild(cls: type[C], items: tuple[tuple[str, Any], ...]) -> C:
    return cls(**dict(items))


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
    """A JSON object from ``path``; a file that is not one is a one-line ``ValueError`` naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)} is not valid JSON: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{os.fspath(path)} is not valid JSON: it is not UTF-8 text") from None
    except RecursionError:  # json's decoder recurses once per level of [ or {
        raise ValueError(f"{os.fspath(path)} is not a config file: its JSON is nested too deeply to read") from None
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
