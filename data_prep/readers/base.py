"""Record types shared by the readers, the folder index, and demographics tables.

A reader turns a folder into a :class:`Scan`: the cases to convert (one
:class:`VolumeCase` per 3D volume, or one :class:`PngCase` per subject of the 2D PNG
release) plus every file it had to skip, each with a one-line reason. Paths in records
and reports are relative to the scanned folder (POSIX style strings), so outputs do not
depend on where the data lives.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from data_prep.errors import describe
from data_prep.files import file_kind, pair_problem

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Demographic columns of the manifest (blank when a source does not provide them).
DEMOGRAPHICS: tuple[str, ...] = (
    "sex",
    "hand",
    "age",
    "educ",
    "ses",
    "mmse",
    "cdr",
    "etiv",
    "nwbv",
    "asf",
    "delay",
)
_TEXT_COLUMNS = frozenset({"sex", "hand"})
#: Column names seen in OASIS CSVs and BIDS ``participants.tsv`` (lower case) → ours.
_ALIASES: dict[str, str] = {
    "m/f": "sex",
    "sex": "sex",
    "gender": "sex",
    "hand": "hand",
    "handedness": "hand",
    "age": "age",
    "educ": "educ",
    "education": "educ",
    "ses": "ses",
    "mmse": "mmse",
    "cdr": "cdr",
    "etiv": "etiv",
    "nwbv": "nwbv",
    "asf": "asf",
    "delay": "delay",
}

Demographics = Mapping[str, str | float | None]


@dataclass(frozen=True)
class Skip:
    """A file (or folder) left out, with the reason shown to the user.

    Attributes:
        file: path relative to the scanned folder (the folder itself for folder-level skips).
        reason: one line, e.g. ``"truncated: 1024 bytes, header implies 12886016"``.
    """

    file: str
    reason: str

    def line(self) -> str:
        """``"<file>: <reason>"``, the form used in logs and error messages."""
        return f"{self.file}: {self.reason}"


@dataclass(frozen=True)
class VolumeCase:
    """One 3D volume to slice.

    Attributes:
        subject: subject id; all sessions of a subject land in the same split.
        session: session id within the subject (e.g. ``"MR2"``), may be empty.
        root: the scanned folder.
        image: image path relative to ``root`` (``.nii``, ``.nii.gz`` or Analyze ``.img``).
        mask: optional brain mask / tissue segmentation relative to ``root`` (non-zero =
            brain).
        demographics: values for the :data:`DEMOGRAPHICS` keys (None when unknown).
    """

    subject: str
    session: str
    root: Path
    image: str
    mask: str | None = None
    demographics: Demographics = field(default_factory=dict)


@dataclass(frozen=True)
class PngSlice:
    """One slice of the PNG release.

    Attributes:
        z_index: slice index from the file name (``case_001_slice_<z_index>.nii.png``).
        image: 8-bit grayscale image, relative to the scanned folder.
        seg: matching ``seg_*`` segmentation (non-zero = brain), if present.
    """

    z_index: int
    image: str
    seg: str | None = None


@dataclass(frozen=True)
class PngCase:
    """All slices of one subject of the PNG release, which keeps the release's split.

    Attributes:
        subject: ``case_NNN``.
        split: ``train``, ``val`` or ``test``.
        n_slices: K = largest slice index + 1, so z = z_index / (K - 1).
        root: the scanned folder.
        slices: the slices found, sorted by ``z_index``.
        session: always empty (the release has one volume per case).
    """

    subject: str
    split: str
    n_slices: int
    root: Path
    slices: tuple[PngSlice, ...]
    session: str = ""


Case = VolumeCase | PngCase


@dataclass
class Scan:
    """What a reader found in a folder.

    Attributes:
        format: reader name (``oasis1``, ``bids``, ``nifti``, ``png``) or ``unknown``.
        cases: volumes / PNG subjects to convert, in a deterministic order.
        skipped: files (and folders) left out at scan time, each with its reason.
        found: every file found below the folder (relative paths, symbolic links
            followed, broken links included), for the report's accounting.
        used: files read besides the cases' images (demographics tables).
        ignored: files the reader saw and did not take, with the reason (files found but
            neither used, skipped nor listed here get a reason from their kind).
    """

    format: str
    cases: list[Case] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    found: tuple[str, ...] = ()
    used: list[str] = field(default_factory=list)
    ignored: list[Skip] = field(default_factory=list)


@dataclass(frozen=True)
class FileIndex:
    """All files and folders below ``root`` (hidden entries and ``__MACOSX`` left out).

    Symbolic links to folders are followed (a linked BIDS subject or OASIS disc is read
    like a real one); each real folder is read once, so a link loop or a second link to
    the same folder is reported instead of walked again. Broken links are reported.

    Attributes:
        root: the scanned folder.
        files: file paths relative to ``root``, sorted.
        dirs: folder paths relative to ``root``, sorted.
        skipped: broken links and folders not walked (already read, link loops).
    """

    root: Path
    files: tuple[Path, ...]
    dirs: tuple[Path, ...]
    skipped: tuple[Skip, ...] = ()

    @classmethod
    def build(cls, root: Path) -> FileIndex:
        """Walk ``root`` once, following symbolic links to folders, each real folder once."""
        files: list[Path] = []
        dirs: list[Path] = []
        skipped: list[Skip] = []
        seen = {os.path.realpath(root): Path(".")}
        for here, subdirs, names in os.walk(root, followlinks=True):
            rel = Path(here).relative_to(root)
            walk = []
            for name in sorted(subdirs):
                if _hidden(name):
                    continue
                real = os.path.realpath(os.path.join(here, name))
                if real in seen:
                    first = rel_str(seen[real])
                    inside = os.path.realpath(here)
                    loop = inside == real or inside.startswith(real + os.sep)
                    why = "symbolic link loop back to" if loop else "the same folder as"
                    skipped.append(Skip(rel_str(rel / name), f"{why} {first}: read once"))
                    continue
                seen[real] = rel / name
                walk.append(name)
            subdirs[:] = walk
            dirs.extend(rel / d for d in walk)
            for name in names:
                if _hidden(name):
                    continue
                if os.path.islink(os.path.join(here, name)) and not os.path.exists(
                    os.path.join(here, name)
                ):
                    target = os.readlink(os.path.join(here, name))
                    skipped.append(
                        Skip(rel_str(rel / name), f"broken symbolic link: {target} does not exist")
                    )
                else:
                    files.append(rel / name)
        return cls(
            root=root,
            files=tuple(sorted(files)),
            dirs=tuple(sorted(dirs)),
            skipped=tuple(sorted(skipped, key=lambda s: s.file)),
        )

    def path(self, rel: Path) -> Path:
        """Absolute path of a relative entry."""
        return self.root / rel

    def found(self) -> tuple[str, ...]:
        """Every file found, as relative POSIX strings: the files and the broken links."""
        broken = [s.file for s in self.skipped if s.reason.startswith("broken symbolic link")]
        return tuple(sorted([*(rel_str(p) for p in self.files), *broken]))


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def rel_str(path: Path) -> str:
    """POSIX string of a relative path (``"."`` for the folder itself)."""
    return path.as_posix()


def keep_first(
    items: Iterable[tuple[Hashable, Path]], what: str
) -> tuple[dict[Hashable, Path], list[Skip]]:
    """Keep the first path per key; later ones are reported as duplicates.

    Args:
        items: (key, relative path) pairs in priority order.
        what: what a key stands for in the message, e.g. ``"session"``.

    Returns:
        ``(kept, skipped)``: key → first path, and one :class:`Skip` per duplicate.
    """
    kept: dict[Hashable, Path] = {}
    skipped: list[Skip] = []
    for key, path in items:
        if key in kept:
            skipped.append(Skip(rel_str(path), f"duplicate {what}; using {rel_str(kept[key])}"))
        else:
            kept[key] = path
    return kept, skipped


def volume_files(index: FileIndex, paths: Iterable[Path]) -> tuple[list[Path], list[Skip]]:
    """The volumes nibabel can read among ``paths``, and the broken pairs.

    Args:
        index: the folder's file index.
        paths: candidate files (others than ``.nii``/``.hdr``/``.img`` are left out).

    Returns:
        ``(volumes, skipped)``: each NIfTI file and the data (``.img``) file of each complete
        pair, in the order given; one :class:`Skip` per file of an incomplete or misnamed
        pair, naming the missing file and the rename that fixes it.
    """
    present = set(index.files)
    volumes: list[Path] = []
    skipped: list[Skip] = []
    for path in paths:
        kind = file_kind(path)
        if kind == "nifti":
            volumes.append(path)
        elif kind in ("header", "data"):
            problem = pair_problem(path, present)
            if problem is not None:
                skipped.append(Skip(rel_str(path), problem))
            elif kind == "data":
                volumes.append(path)
    return volumes, skipped


def shallowest(index: FileIndex, match: Callable[[Path], bool]) -> Path | None:
    """The matching file closest to the root (ties: alphabetical), or None."""
    found = [p for p in index.files if match(p)]
    return min(found, key=lambda p: (len(p.parts), p)) if found else None


def read_demographics(
    path: Path, id_column: str, source: str, sep: str = ","
) -> tuple[dict[str, dict[str, str | float | None]], list[Skip]]:
    """Read a demographics table keyed by ``id_column``.

    Columns are matched case-insensitively to :data:`DEMOGRAPHICS` (``M/F`` → ``sex``,
    ``Educ`` → ``educ``, ...); other columns are ignored. Blank cells become None.

    Args:
        path: the CSV/TSV file.
        id_column: the id column name (matched case-insensitively), e.g. ``"ID"``.
        source: ``path`` relative to the scanned folder, for the report.
        sep: field separator.

    Returns:
        ``(table, skipped)``: id → {column: value}, and a :class:`Skip` if the file
        cannot be read or has no id column (the table is then empty).
    """
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=True)
    except Exception as err:  # any parse failure is reported, never raised
        return {}, [Skip(source, f"cannot read demographics table ({describe(err)})")]
    columns = {str(c).strip().lower(): c for c in frame.columns}
    if id_column.lower() not in columns:
        return {}, [Skip(source, f"no {id_column!r} column; demographics not joined")]
    ids = frame[columns[id_column.lower()]].astype(str).str.strip()
    table: dict[str, dict[str, str | float | None]] = {}
    for row_id, (_, row) in zip(ids, frame.iterrows(), strict=True):
        values: dict[str, str | float | None] = {}
        for name, column in columns.items():
            ours = _ALIASES.get(name)
            if ours is not None:
                values[ours] = _clean(row[column], text=ours in _TEXT_COLUMNS)
        table[row_id] = values
    logger.info("read demographics for %d ids from %s", len(table), source)
    return table, []


def _clean(value: object, *, text: bool) -> str | float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    value = str(value).strip()
    if value in {"", "N/A", "NA", "n/a", "nan"}:
        return None
    if text:
        return value
    try:
        return float(value)
    except ValueError:
        return None
