"""Errors of the data preparation a user can cause and fix."""

from __future__ import annotations

from pipeline.core.errors import InputError


class PrepareError(InputError):
    """``prepare`` cannot produce a dataset (nothing usable left, or ``strict`` and a bad file).

    The message is one line naming the folder or file and the fix; the stage prints it and
    exits with status 1.
    """


class BadInputError(InputError):
    """One input file cannot be used; it is skipped and reported with this reason.

    Args:
        reason: short human-readable reason, e.g. ``"true 4D volume (176x208x176x3)"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe(err: BaseException) -> str:
    """One short line for an exception from a third-party reader: ``"Type: first line"``."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
