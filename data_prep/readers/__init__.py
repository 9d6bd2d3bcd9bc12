"""Readers for every supported source, and auto-detection of the folder's format.

Detection order (first match wins): the PNG release (``keras_png_slices_*`` folders),
OASIS-1 (``OAS1_XXXX_MRn`` T88 images or session folders), BIDS (``sub-*..._T1w``
images), then any folder holding NIfTI files or Analyze pairs. File kinds are decided by
:mod:`data_prep.files` (any letter case, gzipped or not); symbolic links to folders are
followed (:class:`~data_prep.readers.base.FileIndex`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from data_prep.readers import nifti, oasis1, png_slices
from data_prep.readers.base import (
    DEMOGRAPHICS,
    SPLITS,
    Case,
    FileIndex,
    PngCase,
    PngSlice,
    Scan,
    Skip,
    VolumeCase,
)
from pipeline.core.errors import InputError

__all__ = [
    "DEMOGRAPHICS",
    "FORMATS",
    "SPLITS",
    "Case",
    "PngCase",
    "PngSlice",
    "Scan",
    "Skip",
    "VolumeCase",
    "detect_format",
    "layout",
    "scan_folder",
]

logger = logging.getLogger(__name__)

_Reader = tuple[Callable[[FileIndex], bool], Callable[[FileIndex], Scan], str]
_READERS: dict[str, _Reader] = {
    "png": (
        png_slices.matches,
        png_slices.scan,
        "keras_png_slices_* folders of case_NNN_slice_K .png/.nii slices",
    ),
    "oasis1": (
        oasis1.matches,
        oasis1.scan,
        "OAS1_XXXX_MRn T88_111 masked_gfc/gfc Analyze images and FSL_SEG masks",
    ),
    "bids": (
        nifti.matches_bids,
        nifti.scan_bids,
        "sub-*_T1w images (.nii, .nii.gz, .hdr/.img) outside derivatives/",
    ),
    "nifti": (nifti.matches_nifti, nifti.scan_nifti, "*.nii / *.nii.gz files, .hdr/.img pairs"),
}
#: Formats a user can ask for (``data.format``); ``auto`` detects one of them.
FORMATS: tuple[str, ...] = ("auto", *_READERS)


def detect_format(index: FileIndex) -> str | None:
    """The first reader whose files are present (order in the module docstring), or None."""
    return next((name for name, (match, _, _) in _READERS.items() if match(index)), None)


def layout(fmt: str) -> str:
    """What the reader ``fmt`` takes, in words (empty for ``unknown``)."""
    return _READERS[fmt][2] if fmt in _READERS else ""


def scan_folder(root: str | Path, fmt: str = "auto") -> Scan:
    """Index ``root`` and scan it with the requested (or detected) reader.

    A missing, empty or unrecognised folder is not an exception: it comes back as a
    :class:`Scan` of format ``unknown`` with no cases and one :class:`Skip` naming the
    folder and the reason.

    Args:
        root: the data folder.
        fmt: one of :data:`FORMATS`.

    Returns:
        The scan.

    Raises:
        ValueError: ``fmt`` is not one of :data:`FORMATS`.
    """
    if fmt not in FORMATS:
        raise InputError(f"data.format must be one of {list(FORMATS)}, got {fmt!r}")
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        return Scan("unknown", skipped=[Skip(str(root), f"data folder {what}")])
    index = FileIndex.build(root)
    scan = _scan_index(index, fmt)
    scan.found = index.found()
    scan.skipped = [*index.skipped, *scan.skipped]
    logger.info(
        "%s: format %s%s, %d cases, %d files found, %d skipped at scan",
        root,
        scan.format,
        " (detected)" if fmt == "auto" else "",
        len(scan.cases),
        len(scan.found),
        len(scan.skipped),
    )
    return scan


def _scan_index(index: FileIndex, fmt: str) -> Scan:
    """The requested (or detected) reader's scan, or an ``unknown`` scan saying why."""
    if not index.files:
        return Scan("unknown", skipped=[Skip(str(index.root), "empty folder: no files found")])
    name = detect_format(index) if fmt == "auto" else fmt
    if name is None or (fmt != "auto" and not _READERS[fmt][0](index)):
        expected = "; ".join(f"{k}: {v[2]}" for k, v in _READERS.items())
        if fmt != "auto":
            expected = f"{fmt}: {_READERS[fmt][2]}"
        examples = ", ".join(p.as_posix() for p in index.files[:3])
        reason = (
            f"unknown folder: none of the expected files ({expected}) among "
            f"{len(index.files)} files (e.g. {examples})"
        )
        return Scan("unknown", skipped=[Skip(str(index.root), reason)])
    return _READERS[name][1](index)
