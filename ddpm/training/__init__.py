"""The trainer behind ``python -m ddpm.train``.

    from ddpm.training import TrainConfig, train
    train(TrainConfig(train_data_dir="my_images", profile="laptop", num_epochs=5))

``parse_args(argv)`` turns command-line flags into a ``TrainConfig``. Both pick the laptop profile when no dataset
flag is given and train_unconditional.py's defaults otherwise (``profile=`` chooses). ``train`` and its heavy
imports load on first use.
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
