"""What every ``stages/*.py`` entry point shares: logging set-up, one-line user errors and
the standard file layout of a training stage."""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import BraingenError

logger = logging.getLogger("braingen")

#: Exceptions a user can cause and fix; shown as one line, never as a traceback. Anything
#: else (a genuine bug) keeps its traceback. See :mod:`pipeline.core.errors`.
USER_ERRORS: tuple[type[Exception], ...] = (BraingenError, FileNotFoundError)


#: ``OSError`` numbers of a full disk or quota (and a file-size limit): the user's to fix.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def user_error_message(err: BaseException) -> str | None:
    """The one line to show for ``err`` if a user can fix it, else None (a traceback is due).

    A user error is a :class:`~pipeline.core.errors.BraingenError`, a missing file, or a full
    disk (or quota, or file-size limit): every writer goes through a temporary file and a
    rename, so what was finished before stays intact and a re-run resumes or redoes the rest.
    """
    if isinstance(err, USER_ERRORS):
        return f"error: {err}"
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        where = f" writing {err.filename}" if err.filename else ""
        return (
            f"error: {err.strerror or err}{where}; free space and re-run the stage "
            "(finished outputs are kept)"
        )
    return None


def main(fn: Callable[[], None]) -> None:
    """Run a stage's body: INFO logging to stderr; a user error ends in one line and exit 1."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        fn()
    except Exception as err:
        message = user_error_message(err)
        if message is None:
            raise
        print(message, file=sys.stderr)
        sys.exit(1)


@dataclass(frozen=True)
class StagePaths:
    """The files one training stage reads and writes.

    Attributes:
        model: final model file, ``models/<model>.pt``.
        report: test-split figures, ``reports/<report>.json`` (a DVC metric).
        grid: the final image grid, ``reports/<grid>`` (a DVC plot).
        resume_dir: folder of the resume checkpoint, ``checkpoints/<report>``.
        latents: the latents the stage trains on, ``data/latents/<source>`` (second stage).
    """

    model: Path
    report: Path
    grid: Path
    resume_dir: Path
    latents: Path = Path("data/latents")

    @classmethod
    def standard(
        cls, model: str, report: str, grid: str, latents: str = "", root: str | Path = "."
    ) -> StagePaths:
        """The standard layout under ``root``.

        Args:
            model: model file stem (``ae_vqvae``, ``pixelcnn``, ``ldm``).
            report: report stem, also the resume folder name (``ae_vqvae``, ``prior``, ``ldm``).
            grid: grid file name (``ae_vqvae_recon.png``, ``prior_samples.png``).
            latents: latent source folder under ``data/latents`` (second stage only).
            root: project root.
        """
        root = Path(root)
        return cls(
            model=root / "models" / f"{model}.pt",
            report=root / "reports" / f"{report}.json",
            grid=root / "reports" / grid,
            resume_dir=root / "checkpoints" / report,
            latents=root / "data" / "latents" / latents,
        )
