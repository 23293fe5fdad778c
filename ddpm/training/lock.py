"""One training run per output folder: ``output_dir/.ddpm-train.lock`` holds the PID and host of the run.

The lock file appears with its content in one step (written to a private name, then hard-linked to the lock
name, which fails if it exists), so a reader never sees it empty. A second run into the same folder gets a
one-line ``LockError`` naming the holder. A lock left by a run that died (SIGKILL, power loss) is taken over
with a warning when its PID no longer runs on this host; a lock from another host cannot be checked, and the
error says which file to delete. The lock is removed when the run ends, however it ends short of SIGKILL.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".ddpm-train.lock"
logger = logging.getLogger(__name__)


class LockError(OSError):
    """The output folder is in use by another run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return None
    return holder


class OutputLock:
    """``with OutputLock(output_dir): ...``, or ``acquire()`` and ``release()``. The folder must exist."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.me = {"pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        self.held = False

    def acquire(self) -> None:
        private = self.path.with_name(f"{LOCK_NAME}.{self.me['pid']}")
        private.write_text(json.dumps(self.me) + "\n", encoding="utf-8")
        try:
            for _ in range(3):  # a stale lock is moved away, then the link is tried again
                try:
                    os.link(private, self.path)
                    self.held = True
                    return
                except FileExistsError:
                    self._handle_existing()
                except OSError:  # a file system without hard links: exclusive create instead
                    try:
                        with open(self.path, "x", encoding="utf-8") as fh:
                            fh.write(json.dumps(self.me) + "\n")
                        self.held = True
                        return
                    except FileExistsError:
                        self._handle_existing()
            raise LockError(f"could not take the lock {self.path}: other runs keep taking it")
        finally:
            private.unlink(missing_ok=True)

    def _handle_existing(self) -> None:
        holder = _holder(self.path)
        if holder is None:  # unreadable: written by something else, or damaged; nothing can be running from it
            logger.warning("warning: %s is not a ddpm lock file; replacing it", self.path)
        elif holder.get("host") != self.me["host"]:
            raise LockError(f"--output_dir {self.path.parent} is in use by a ddpm.train run on host "
                            f"{holder.get('host')} (pid {holder['pid']}, started {holder.get('started')}); if that "
                            f"run is gone, delete {self.path}")
        elif holder["pid"] != self.me["pid"] and _alive(holder["pid"]):
            raise LockError(f"--output_dir {self.path.parent} is in use by another ddpm.train run (pid "
                            f"{holder['pid']}, started {holder.get('started')}); wait for it to finish or choose "
                            f"another --output_dir")
        else:
            logger.warning("warning: taking over %s from process %s, which is no longer running (killed?)",
                           self.path, holder["pid"])
        stale = self.path.with_name(f"{LOCK_NAME}.stale.{self.me['pid']}")
        try:
            os.replace(self.path, stale)  # only one of several runs taking it over moves it; the others retry
            stale.unlink(missing_ok=True)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if not self.held:
            return
        holder = _holder(self.path)
        if holder is not None and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
