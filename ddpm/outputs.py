"""Output objects that behave like diffusers' ``BaseOutput``: ``out.sample``, ``out["sample"]``, ``out[0]``,
``out.to_tuple()`` and ``keys/values/items``, with fields that are ``None`` left out, as diffusers does.

Each output class is a ``@dataclass`` subclass of ``BaseOutput``, defined next to what returns it (``UNet``, the
schedulers, ``Pipeline``). As in diffusers, ``Output({"sample": x})`` builds ``Output(sample=x)``: accelerate rebuilds
outputs that way when it moves or casts them. Like diffusers' outputs they are mappings, so ``a, b = out`` unpacks the *keys*: use
``out.to_tuple()`` or ``return_dict=False`` for a tuple.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch.utils._pytree as pytree


class BaseOutput(Mapping[str, Any]):
    """A dataclass of results, readable by attribute, by key, and by position among its non-``None`` fields."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A pytree node, so that DDP (static_graph) and torch.compile see the tensors inside.
        pytree.register_pytree_node(
            cls, lambda out: (list(out.to_tuple()), list(out.keys())),
            lambda values, keys: cls(**dict(zip(keys, values))),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")

    def __post_init__(self) -> None:
        # diffusers' rule: Output({"sample": x}) is Output(sample=x). accelerate relies on it: it rebuilds every
        # mapping it moves or casts (send_to_device, mixed precision's convert_outputs_to_fp32) as type(out)(dict).
        names = [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]
        first = getattr(self, names[0])
        if isinstance(first, Mapping) and all(getattr(self, name) is None for name in names[1:]):
            unknown = [key for key in first if key not in names]
            if unknown:
                raise TypeError(f"{type(self).__name__} has no field {unknown[0]!r}; its fields are {', '.join(names)}")
            for name in names:
                setattr(self, name, first.get(name))

    def _present(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            if key not in self._present():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]  # an int or a slice: by position, as in a tuple

    def __iter__(self) -> Iterator[str]:
        return iter(self._present())

    def __len__(self) -> int:
        return len(self._present())

    def to_tuple(self) -> tuple[Any, ...]:
        """The non-``None`` fields in declaration order (what ``return_dict=False`` returns)."""
        return tuple(getattr(self, name) for name in self._present())
