"""What every ``stages/*.py`` entry point shares: logging set-up and one-line user errors."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError

logger = logging.getLogger("braingen")

#: Exceptions a user can cause and fix; shown as one line, never as a traceback.
#: Library errors meant for users subclass ValueError (or CheckpointError).
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    CheckpointError,
    FileNotFoundError,
    ValueError,
)


def main(fn: Callable[[], None]) -> None:
    """Run a stage's body: INFO logging to stderr; a user error ends in one line and exit 1."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        fn()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
