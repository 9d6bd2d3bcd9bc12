"""OASIS-1 cross-sectional release (Analyze 7.5 discs) and the demo stand-in cohort.

Layout (any nesting depth; the ``discN`` folders may sit inside
``oasis_cross-sectional_discN/`` or directly in the data folder)::

    disc1/OAS1_0001_MR1/PROCESSED/MPRAGE/T88_111/
        OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc.{hdr,img}   <- preferred image
        OAS1_0001_MR1_mpr_n4_anon_111_t88_gfc.{hdr,img}          <- fallback (not skull-stripped)
    disc1/OAS1_0001_MR1/FSL_SEG/
        OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc_fseg.{hdr,img}   <- brain mask (seg > 0)
    oasis_cross-sectional.csv   ID,M/F,Hand,Age,Educ,SES,MMSE,CDR,eTIV,nWBV,ASF,Delay

``mpr_nN`` (N = number of averaged MPRAGE scans, 3..6 in the release) varies between
sessions. ``OAS1_XXXX_MR2`` is a rescan of subject ``OAS1_XXXX`` and shares its split.
"""

from __future__ import annotations

import re
from pathlib import Path

from data_prep.files import file_kind, volume_stem
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

NAME = "oasis1"
#: Patterns of the name without its ``.hdr``/``.img`` (+ compression) suffix, any case.
IMAGE_RE = re.compile(
    r"^(?P<subject>OAS1_\d{4})_(?P<session>MR\d+)_mpr_n\d+_anon_111_t88_"
    r"(?P<kind>masked_gfc|gfc)$"
)
SEG_RE = re.compile(
    r"^(?P<subject>OAS1_\d{4})_(?P<session>MR\d+)_mpr_n\d+_anon_111_t88_masked_gfc_fseg$"
)
SESSION_DIR_RE = re.compile(r"^(?P<subject>OAS1_\d{4})_(?P<session>MR\d+)$")
CSV_NAME = "oasis_cross-sectional.csv"
_KIND_RANK = {"masked_gfc": 0, "gfc": 1}


def _match(pattern: re.Pattern[str], path: Path) -> re.Match[str] | None:
    """The name's match if ``path`` is a ``.hdr``/``.img`` file (any case, compressed or not)."""
    return pattern.match(volume_stem(path)) if file_kind(path) in ("header", "data") else None


def matches(index: FileIndex) -> bool:
    """True if the folder holds OASIS-1 T88 images or session folders."""
    return any(_match(IMAGE_RE, p) for p in index.files) or any(
        SESSION_DIR_RE.match(d.name) for d in index.dirs
    )


def scan(index: FileIndex) -> Scan:
    """Find one image per (subject, session), its FSL_SEG mask and its demographics.

    Args:
        index: the data folder's file index.

    Returns:
        Cases sorted by (subject, session); skipped: header-only / data-only Analyze
        files, duplicate sessions, session folders without a T88 image, an unreadable CSV.
    """
    skipped: list[Skip] = []
    images = _analyze_pairs(index, IMAGE_RE, skipped)
    segs = _analyze_pairs(index, SEG_RE, skipped)

    ranked = sorted(
        images.items(),
        key=lambda kv: (_key(kv[1]), _KIND_RANK[kv[1]["kind"]], len(kv[0].parts), kv[0]),
    )
    by_kind: dict[tuple[str, str, str], Path] = {}
    chosen: dict[tuple[str, str], Path] = {}
    ignored: list[Skip] = []
    for path, groups in ranked:
        kind_key = (*_key(groups), groups["kind"])
        if kind_key in by_kind:
            skipped.append(Skip(rel_str(path), f"duplicate session; using {by_kind[kind_key]}"))
            continue
        by_kind[kind_key] = path
        first = chosen.setdefault(_key(groups), path)
        if first != path:
            ignored.append(
                Skip(rel_str(path), f"not skull-stripped; the session's {first.name} is used")
            )

    masks, seg_dups = keep_first(
        ((_key(g), p) for p, g in sorted(segs.items(), key=lambda kv: (len(kv[0].parts), kv[0]))),
        "FSL_SEG mask",
    )
    skipped.extend(seg_dups)

    reported = {Path(s.file).name.split("_mpr")[0] for s in skipped}
    for folder in index.dirs:
        m = SESSION_DIR_RE.match(folder.name)
        if m and (m["subject"], m["session"]) not in chosen and folder.name not in reported:
            skipped.append(
                Skip(
                    rel_str(folder),
                    "session folder without a T88 image (expected PROCESSED/MPRAGE/T88_111/"
                    f"{folder.name}_mpr_nN_anon_111_t88_masked_gfc.hdr/.img)",
                )
            )

    table, csv_skips, used = _demographics(index)
    skipped.extend(csv_skips)
    cases = [
        VolumeCase(
            subject=subject,
            session=session,
            root=index.root,
            image=rel_str(path),
            mask=rel_str(masks[(subject, session)]) if (subject, session) in masks else None,
            demographics=_lookup(table, subject, session),
        )
        for (subject, session), path in sorted(chosen.items())
    ]
    return Scan(format=NAME, cases=cases, skipped=skipped, used=used, ignored=ignored)


def _key(groups: dict[str, str]) -> tuple[str, str]:
    return groups["subject"], groups["session"]


def _analyze_pairs(
    index: FileIndex, pattern: re.Pattern[str], skipped: list[Skip]
) -> dict[Path, dict[str, str]]:
    """Complete ``.hdr``/``.img`` pairs matching ``pattern``: ``.img`` path → name groups.

    Each file of an incomplete or misnamed pair is appended to ``skipped``.
    """
    groups: dict[Path, dict[str, str]] = {}
    for path in index.files:
        m = _match(pattern, path)
        if m:
            groups[path] = m.groupdict()
    images, broken = volume_files(index, groups)
    skipped.extend(broken)
    return {path: groups[path] for path in images}


def _demographics(
    index: FileIndex,
) -> tuple[dict[str, dict[str, str | float | None]], list[Skip], list[str]]:
    """The CSV's table, its skip (unreadable) and the files read, for the report."""
    csv = shallowest(index, lambda p: p.name.lower() == CSV_NAME)
    if csv is None:
        return {}, [], []
    table, skipped = read_demographics(index.path(csv), "ID", rel_str(csv))
    return table, skipped, [] if skipped else [rel_str(csv)]


def _lookup(
    table: dict[str, dict[str, str | float | None]], subject: str, session: str
) -> dict[str, str | float | None]:
    """The session's row; else (a rescan missing from the CSV) the subject's first row."""
    row = table.get(f"{subject}_{session}")
    if row is None:
        rows = [table[k] for k in sorted(table) if k.startswith(f"{subject}_")]
        row = rows[0] if rows else {}
    return {k: row.get(k) for k in DEMOGRAPHICS}
