"""One-line errors: the exception for bad user input, and the line of an exception that a user is shown.

A leaf module (it imports nothing from ddpm), so that library code (``data``, ``metrics``, ``training``) can raise
and format user errors without importing the command-line layer in ``ddpm.cli``.
"""

from __future__ import annotations


class CLIError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" if it has none): the part a one-line error shows."""
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
