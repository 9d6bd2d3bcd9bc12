"""Checkpoint files: atomic writes and safe loads.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled
objects), so it loads with ``torch.load(weights_only=True)``::

    {"version": 1, "kind": "ae_vqvae", "step": 1200,
     "modules": {"model": state_dict, ...}, "optimizers": {...}, "ema": state_dict | None,
     "rng": {"torch": ByteTensor, "cuda": [...]}, "config": {...}, "metadata": {...}}

Writes go to a temporary file in the same folder which is then renamed over the target,
so a killed run or a full disk never leaves a half-written file under the real name.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import torch

from pipeline.core.errors import BraingenError

CHECKPOINT_VERSION = 1


class CheckpointError(BraingenError, RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file and the fix."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temp file in the same folder + rename).

    Args:
        path: destination file; parent folders are created.
        payload: a dict of tensors and JSON-like values; ``version`` is added.

    Raises:
        CheckpointError: the file could not be written (e.g. disk full); any previous file
            at ``path`` is left intact and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = None
    try:
        with tmp.open("wb") as fh:
            writer = _Writer(fh)
            torch.save({"version": CHECKPOINT_VERSION, **payload}, writer)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else err
        raise CheckpointError(
            f"could not write checkpoint {path}: {cause}; the previous checkpoint is intact "
            f"(free disk space in {path.parent} and re-run the stage)"
        ) from None


class _Writer:
    """A binary file for ``torch.save`` that remembers the first failed write.

    torch reports a failed write (e.g. ENOSPC, EFBIG) only as a file-position mismatch; the
    remembered ``OSError`` names the real cause.
    """

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.fh.flush()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code from the file ever runs).

    Args:
        path: checkpoint file.
        map_location: device for the tensors.

    Returns:
        The checkpoint dict.

    Raises:
        CheckpointError: missing file, a file holding pickled objects (refused), a corrupt
            or truncated file, or a checkpoint of a newer format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} not found; run the stage that writes it first (dvc repro)"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} refused: it contains pickled objects that are not plain "
            f"tensors or values ({first[:160]}); only load checkpoints written by braingen"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(err).__name__}); "
            f"delete it and re-run the stage that writes it"
        ) from None
    if not isinstance(ckpt, dict) or "version" not in ckpt:
        raise CheckpointError(f"{path} is not a braingen checkpoint (no version field)")
    if ckpt["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {ckpt['version']}, newer than this braingen "
            f"({CHECKPOINT_VERSION}); upgrade braingen"
        )
    return ckpt
