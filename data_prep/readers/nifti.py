"""BIDS / OASIS-3 trees and any folder of ``*.nii`` / ``*.nii.gz`` volumes.

Subject and session come from the path:

* BIDS entities anywhere in the file name win: ``sub-OAS30001_ses-d0129_T1w.nii.gz`` →
  subject ``sub-OAS30001``, session ``ses-d0129`` (also inside OASIS-3 download folders
  such as ``OAS30001_MR_d0129/anat2/NIFTI/``); ``sub-*`` / ``ses-*`` folders fill in
  missing entities.
* Otherwise a file directly in the folder is its own subject (``brain01.nii.gz`` →
  ``brain01``), and in nested folders the first folder is the subject and the rest of
  the path the session (``s01/visit2/t1.nii`` → ``s01``, ``visit2/t1``).

The BIDS reader takes only ``*_T1w`` images outside ``derivatives/`` and joins
``participants.tsv``; the generic reader takes every NIfTI file and Analyze/NIfTI pair
except names that look like masks or segmentations, which are reported as skipped. File
kinds are decided by :mod:`data_prep.files`: any letter case, gzipped or not
(``sub-01_T1w.NII.GZ``, ``scan.hdr.gz`` + ``scan.img.gz``).
"""

from __future__ import annotations

import re
from pathlib import Path

from data_prep.files import is_volume, volume_stem
from data_prep.readers.base import (
    DEMOGRAPHICS,
    FileIndex,
    Scan,
    Skip,
    VolumeCase,
    keep_first,
    read_demographics,
    rel_str,
    shallowest,
    volume_files,
)

ENTITY_RE = re.compile(r"(?:^|_)(sub|ses)-([A-Za-z0-9]+)")
MASK_LIKE_RE = re.compile(
    r"(?:^|[_.-])(mask|brainmask|seg|fseg|pveseg|dseg|probseg|aseg|label|labels)(?:[_.-]|$)",
    re.IGNORECASE,
)


def is_nifti(path: Path) -> bool:
    """True for every volume file nibabel reads: ``.nii``, ``.hdr``, ``.img``, compressed or
    not, any letter case (:mod:`data_prep.files`)."""
    return is_volume(path)


def _is_t1w(path: Path) -> bool:
    return is_volume(path) and volume_stem(path).lower().endswith("_t1w")


def _in_bids(path: Path) -> bool:
    return "derivatives" not in path.parts and any(
        part.startswith("sub-") for part in (*path.parts[:-1], path.name)
    )


def matches_bids(index: FileIndex) -> bool:
    """True if the folder holds ``sub-*..._T1w`` images (``.nii``, ``.nii.gz``, pairs)."""
    return any(_is_t1w(p) and _in_bids(p) for p in index.files)


def matches_nifti(index: FileIndex) -> bool:
    """True if the folder holds any NIfTI or Analyze file."""
    return any(is_nifti(p) for p in index.files)


def scan_bids(index: FileIndex) -> Scan:
    """One case per (subject, session) ``*_T1w`` image (first run kept), with demographics.

    Args:
        index: the data folder's file index.

    Returns:
        Cases sorted by (subject, session); further runs of a session are reported, other
        images (not T1w, under ``derivatives/``) are listed as ignored with the reason.
    """
    wanted = [p for p in index.files if _is_t1w(p) and _in_bids(p)]
    paths, skipped = volume_files(index, wanted)
    ignored = [
        Skip(
            rel_str(p),
            "under derivatives/: the BIDS reader takes raw *_T1w images only"
            if "derivatives" in p.parts
            else "not a *_T1w image: the BIDS reader takes T1-weighted images only",
        )
        for p in index.files
        if is_volume(p) and not (_is_t1w(p) and _in_bids(p))
    ]
    table: dict[str, dict[str, str | float | None]] = {}
    used: list[str] = []
    tsv = shallowest(index, lambda p: p.name.lower() == "participants.tsv")
    if tsv is not None:
        table, tsv_skips = read_demographics(index.path(tsv), "participant_id", rel_str(tsv), "\t")
        skipped.extend(tsv_skips)
        used += [] if tsv_skips else [rel_str(tsv)]
    scan = _scan(index, "bids", paths, table, skipped)
    scan.used, scan.ignored = used, ignored
    return scan


def scan_nifti(index: FileIndex) -> Scan:
    """One case per NIfTI file or Analyze/NIfTI pair; mask/segmentation-like names are
    reported and skipped.

    Args:
        index: the data folder's file index.

    Returns:
        Cases sorted by (subject, session).
    """
    paths, skipped = volume_files(index, index.files)
    images: list[Path] = []
    for path in paths:
        if MASK_LIKE_RE.search(volume_stem(path)):
            skipped.append(Skip(rel_str(path), "looks like a mask/segmentation, not an image"))
        else:
            images.append(path)
    return _scan(index, "nifti", images, {}, skipped)


def subject_session(path: Path) -> tuple[str, str]:
    """Subject and session of a relative NIfTI path (rules in the module docstring)."""
    stem = volume_stem(path)
    entities: dict[str, str] = {}
    for part in (*path.parts[:-1], stem):
        for kind, label in ENTITY_RE.findall(part):
            entities[kind] = f"{kind}-{label}"
    if "sub" in entities:
        return entities["sub"], entities.get("ses", "")
    if len(path.parts) == 1:
        return stem, ""
    return path.parts[0], "/".join((*path.parts[1:-1], stem))


def _scan(
    index: FileIndex,
    name: str,
    paths: list[Path],
    table: dict[str, dict[str, str | float | None]],
    skipped: list[Skip],
) -> Scan:
    keyed = sorted(((subject_session(p), p) for p in paths), key=lambda kp: (kp[0], kp[1]))
    kept, dups = keep_first(keyed, "session")
    cases = [
        VolumeCase(
            subject=subject,
            session=session,
            root=index.root,
            image=rel_str(path),
            demographics={k: table.get(subject, {}).get(k) for k in DEMOGRAPHICS},
        )
        for (subject, session), path in sorted(kept.items())
    ]
    return Scan(format=name, cases=cases, skipped=[*skipped, *dups])
