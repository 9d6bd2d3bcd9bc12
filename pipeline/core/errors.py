"""The one error policy: what a user can cause is a :class:`BraingenError` (one line).

Every command (``braingen ...``, ``python -m stages.*``) prints a :class:`BraingenError` as
``error: <message>`` and exits 1; so does a missing file the user named
(``FileNotFoundError``) and a full disk (see :mod:`pipeline.core.stage`). Anything else is a
bug and keeps its traceback. Library code raises :class:`InputError` (a ``ValueError``) for a
bad argument, parameter or input file, naming the value and the fix.
"""

from __future__ import annotations


class BraingenError(Exception):
    """An error a user can cause and fix; its message names the file or value and the fix."""


class InputError(BraingenError, ValueError):
    """A bad argument, parameter value or input file."""
