"""What every ddpm command line shares: one-line errors, a non-zero exit, and ``--debug`` for the traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch


class CLIError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


# Errors that describe bad input (paths, files, values) rather than bugs: shown as one line.
USER_ERRORS = (CLIError, ValueError, TypeError, OSError, KeyError)  # OSError covers the missing files and folders


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" if it has none): the part a one-line error shows."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def pick_device(flag: str | None) -> torch.device:
    """``--device``, or cuda when available, else cpu. A device that does not exist is a CLIError naming it."""
    try:
        device = torch.device(flag or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.empty(0, device=device)  # fails now, not mid-run, for an unknown type, index or a missing driver
    except (RuntimeError, AssertionError) as e:  # AssertionError: "Torch not compiled with CUDA enabled"
        raise CLIError(f"--device {flag}: {first_line(e)}") from None
    return device


def check_sampling_flags(eta: float, seed: int, num_images: int) -> None:
    """The flags ``ddpm.sample`` and ``ddpm.evaluate`` share; image i is seeded ``seed + i``."""
    if not 0 <= eta <= 1:  # also refuses NaN
        raise CLIError(f"--eta {eta} must be between 0 (deterministic DDIM) and 1")
    if not 0 <= seed <= 2**64 - num_images:  # torch seeds are uint64
        raise CLIError(f"--seed {seed} must be between 0 and 2**64 - --num_images")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None, prog: str = "ddpm") -> int:
    """Run ``main(argv)``; turn user errors into ``prog: error: <message>`` on stderr and exit status 2.

    Ctrl-C exits with 130. Pass ``--debug`` to let the exception propagate with its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        main(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if debug:
            raise
        message = first_line(e) or type(e).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return 0
