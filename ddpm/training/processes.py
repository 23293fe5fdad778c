"""How the processes of one run cooperate and talk: the main process decides, and every process follows (its
result or its error); flags are agreed by a vote; messages are printed once, above the progress bar; the output
folder is created and locked by the main process. With one process, all of this is a plain function call."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from ddpm.training.lock import OutputLock

T = TypeVar("T")


class TqdmHandler(logging.Handler):
    """Log records printed above the progress bar (``tqdm.write``), never glued onto it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def setup_logging(accelerator: Accelerator) -> None:
    root = logging.getLogger("ddpm")
    if not root.handlers and not logging.getLogger().handlers:  # nobody configured logging: print ours plainly
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.propagate = False
    # Warnings once, from the main process; errors from everyone.
    root.setLevel(logging.INFO if accelerator.is_main_process else logging.ERROR)


def say(accelerator: Accelerator, message: str) -> None:
    """A message on stdout from the main process of each machine, printed above the progress bar."""
    if accelerator.is_local_main_process:
        tqdm.write(message)


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that a later ``train()`` in this process may differ."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def on_main(accelerator: Accelerator, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process and give its result to all; its error is raised on every process."""
    if accelerator.num_processes == 1:
        return fn()
    payload: list[Any] = [None, None]
    if accelerator.is_main_process:
        try:
            payload = [fn(), None]
        except Exception as e:
            payload = [None, f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)]
    broadcast_object_list(payload)  # between this run's own processes
    if payload[1] is not None:
        raise ValueError(payload[1])
    result: T = payload[0]
    return result


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    votes = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(votes.item() > 0)


@contextmanager
def output_folder(accelerator: Accelerator, output_dir: str) -> Iterator[None]:
    """Create ``output_dir`` if needed and hold its lock (main process). On an error, a folder this run created
    and left empty is removed again."""
    folder = Path(output_dir)
    created = False
    lock = OutputLock(folder)

    def enter() -> None:
        nonlocal created
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()
        except BaseException:
            if created and not any(folder.iterdir()):
                folder.rmdir()
            raise

    on_main(accelerator, enter)
    try:
        yield
    except BaseException:
        lock.release()
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
    else:
        lock.release()
