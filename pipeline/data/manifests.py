"""The manifest of a synthetic set: ``manifest.csv`` beside the files ``generate`` writes.

One row per written file (slice or pseudo-volume) with its labels and provenance. Several
``generate`` runs may share one folder: rows are merged under an exclusive ``fcntl.flock``
on ``.manifest.lock`` and the result is renamed into place, so readers always see a
complete manifest and every finished run's rows are in it exactly once.
"""

from __future__ import annotations

import csv
import fcntl
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError
from pipeline.core.labels import KNOWN_COVARIATES
from pipeline.data.slice_files import publish

MANIFEST = "manifest.csv"
LOCK = ".manifest.lock"
#: One column per covariate a model may condition on: the value a slice was generated with,
#: empty where it was unconditioned (or the model has no such covariate).
COVARIATE_COLUMNS: tuple[str, ...] = tuple(KNOWN_COVARIATES)
#: ``mask_file``: the slice's tissue-label file (same name plus ``_mask``), empty without masks.
#: ``guidance_min_t``: the first guided timestep (ldm). ``posterior_std``: the std of the
#: posterior sample the LDM's latent was decoded as (scaled latent units; 0 for none).
#: ``nearest_train_*``: the novelty check's similarities (``generate --novelty``;
#: :data:`pipeline.inference.generate.NOVELTY_COLUMNS`). New columns go last: an older
#: manifest's header is a prefix of this one.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "file",
    "type",
    "z_index",
    "z",
    "sample",
    "model",
    "checkpoint_sha256",
    "seed",
    "sampler",
    "steps",
    "guidance",
    "timestamp",
    "texture_sigma",
    "background_floor",
    "nearest_train_corr",
    "nearest_train_ssim",
    "nearest_train_alex",
    "novelty_attempts",
    *COVARIATE_COLUMNS,
    "mask_file",
    "guidance_min_t",
    "posterior_std",
    "decode_noise",
    "nearest_train_relative",
    "texture_residual_std",
)
#: The columns every generate manifest has had; later columns are blank when read from an
#: older manifest (written before texture, novelty, covariates and masks were recorded).
REQUIRED_COLUMNS = MANIFEST_COLUMNS[:12]
def read_manifest(path: Path) -> list[dict[str, str]]:
    """Rows of a ``manifest.csv`` written by :func:`generate`.

    A manifest written by an older braingen (the first :data:`REQUIRED_COLUMNS` only) is
    read with the newer columns blank, so a folder keeps growing across versions.

    Raises:
        ValueError: the file's header is not the generate manifest's.
    """
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = tuple(reader.fieldnames or ())
        if columns != MANIFEST_COLUMNS[: len(columns)] or len(columns) < len(REQUIRED_COLUMNS):
            raise InputError(
                f"{path} is not a braingen generate manifest (columns {reader.fieldnames}); "
                "write into another folder"
            )
        return [dict.fromkeys(MANIFEST_COLUMNS, "") | row for row in reader]


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def merge_manifest(out_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """Add this run's rows to ``out_dir/manifest.csv`` under an exclusive folder lock.

    Rows already listing one of this run's files (an overwritten output) are replaced.

    Args:
        out_dir: the output folder (exists).
        rows: this run's manifest rows (keys :data:`MANIFEST_COLUMNS`).

    Returns:
        The manifest path.
    """
    path = out_dir / MANIFEST
    with (out_dir / LOCK).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        old = read_manifest(path) if path.is_file() else []
        ours = {row["file"] for row in rows}
        merged = [row for row in old if row["file"] not in ours] + rows
        publish(path, lambda tmp: _write_manifest(tmp, merged), overwrite=True)
    return path


