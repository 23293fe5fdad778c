"""Stop requests: SIGTERM and Ctrl-C (SIGINT) ask the trainer to checkpoint and stop at the next step.

The first signal only sets a flag; the loop sees it after the current optimiser step, saves a checkpoint and
returns. While it does, a further SIGTERM is ignored (launchers often follow SIGINT with SIGTERM), and a second
Ctrl-C stops at once with ``KeyboardInterrupt`` (the checkpoints already on disk stay valid: they are atomic).
Handlers are only installed from the main thread, and the previous ones come back on exit. Messages are printed
above the progress bar (``tqdm.write``).
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

from tqdm.auto import tqdm


class StopRequest:
    """``with StopRequest() as stop: ... if stop.requested: ...``; ``stop.signal_name`` says which signal."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
            tqdm.write(f"ddpm.train: got {name}: saving a checkpoint after this step, then stopping "
                       f"(Ctrl-C again to stop at once)", file=sys.stderr)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            tqdm.write(f"ddpm.train: got {name}: already stopping", file=sys.stderr)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
