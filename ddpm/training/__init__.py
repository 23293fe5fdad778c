"""The trainer behind ``python -m ddpm.train``.

    from ddpm.training import TrainConfig, train
    train(TrainConfig(train_data_dir="my_images", resolution=32, num_epochs=5))

``parse_args(argv)`` turns command-line flags into a ``TrainConfig`` (with the laptop defaults when no dataset
flag is given). ``train`` and its heavy imports load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ddpm.training.args import TrainConfig, parse_args

__all__ = ["TrainConfig", "TrainResult", "parse_args", "train"]

if TYPE_CHECKING:
    from ddpm.training.loop import TrainResult, train


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult"):
        from ddpm.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'ddpm.training' has no attribute {name!r}")
