"""What kind of file a path names: the one place braingen decides it.

Every reader, the truncation check, ``sdedit``/``inpaint`` and the augmentation dataset
ask :func:`file_kind`, so they agree with each other and with nibabel, which also
recognises suffixes in any letter case and decompresses ``.gz``/``.bz2``/``.zst`` files by
their name:

=========  =====================================================================
kind       names (any letter case; volumes may carry a compression suffix)
=========  =====================================================================
``nifti``  ``x.nii``, ``x.nii.gz``, ``x.nii.bz2``, ``x.nii.zst``
``header`` ``x.hdr`` (+ compression): the header of an Analyze 7.5 / NIfTI pair
``data``   ``x.img`` (+ compression): the voxel data of such a pair
``png``    ``x.png`` (never compressed)
=========  =====================================================================

A pair's two files must share the stem, the letter case of the suffix and the
compression (``x.hdr`` + ``x.img``, ``X.HDR.GZ`` + ``X.IMG.GZ``): that is what nibabel
looks for, and :func:`pair_problem` names what is wrong when they do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["nifti", "header", "data", "png"]

#: Compression suffixes nibabel decompresses (by name, any letter case).
COMPRESSIONS: tuple[str, ...] = (".gz", ".bz2", ".zst")
_VOLUME_SUFFIXES: dict[str, Kind] = {".nii": "nifti", ".hdr": "header", ".img": "data"}
#: Kinds that hold (part of) a 3-D volume nibabel reads.
VOLUME_KINDS: frozenset[str] = frozenset(_VOLUME_SUFFIXES.values())
#: What the readers take, for messages.
READABLE = ".nii, .nii.gz, .hdr/.img pairs (also gzipped), .png"


@dataclass(frozen=True)
class FileName:
    """A file name split into stem, kind suffix and compression suffix.

    Attributes:
        stem: the name without the kind and compression suffixes, as written.
        kind: see the module docstring, or None for any other file.
        suffix: the kind suffix as written (``.nii``, ``.HDR``, ...); empty if no kind.
        compression: the compression suffix as written (``.gz``, ``.GZ``, ...) or empty.
    """

    stem: str
    kind: Kind | None
    suffix: str = ""
    compression: str = ""


def parse_name(path: str | Path) -> FileName:
    """Split a file name into stem, kind and compression (rules in the module docstring)."""
    name = Path(path).name
    lower = name.lower()
    compression = next((c for c in COMPRESSIONS if lower.endswith(c)), "")
    body = name[: len(name) - len(compression)]
    dot = body.rfind(".")
    suffix = body[dot:] if dot > 0 else ""
    kind = _VOLUME_SUFFIXES.get(suffix.lower())
    if kind is None and not compression and suffix.lower() == ".png":
        kind = "png"
    if kind is None:
        return FileName(stem=name, kind=None)
    return FileName(stem=body[:dot], kind=kind, suffix=suffix, compression=name[len(body) :])


def file_kind(path: str | Path) -> Kind | None:
    """``nifti``, ``header``, ``data``, ``png`` or None (see the module docstring)."""
    return parse_name(path).kind


def is_compressed(path: str | Path) -> bool:
    """True if nibabel decompresses the file on reading (a compression suffix, any case)."""
    return Path(path).name.lower().endswith(COMPRESSIONS)


def is_volume(path: str | Path) -> bool:
    """True for every file of a volume: ``.nii``, ``.hdr`` or ``.img``, compressed or not."""
    return file_kind(path) in VOLUME_KINDS


def volume_stem(path: str | Path) -> str:
    """The name without volume and compression suffixes (``a.NII.GZ`` → ``a``)."""
    parsed = parse_name(path)
    return parsed.stem if parsed.kind is not None else Path(path).name


def partner(path: str | Path) -> Path:
    """The other file of an Analyze/NIfTI pair, named the way nibabel looks for it.

    ``x.img`` → ``x.hdr``, ``X.HDR.GZ`` → ``X.IMG.GZ`` (letter case and compression kept).

    Raises:
        ValueError: ``path`` is not a ``.hdr`` or ``.img`` file.
    """
    path = Path(path)
    parsed = parse_name(path)
    if parsed.kind not in ("header", "data"):
        raise ValueError(f"{path.name} is not a .hdr/.img file")
    other = ".img" if parsed.kind == "header" else ".hdr"
    if parsed.suffix[1:].isupper():
        other = other.upper()
    return path.with_name(parsed.stem + other + parsed.compression)


def pair_problem(path: Path, present: set[Path]) -> str | None:
    """Why the pair of ``path`` (a ``.hdr`` or ``.img`` file) cannot be read, or None.

    Args:
        path: one file of the pair (relative or absolute, like the entries of ``present``).
        present: the files that exist.

    Returns:
        None if :func:`partner` exists; else one line naming the missing file and, when a
        near miss exists (other letter case or compression), the rename that fixes it.
    """
    wanted = partner(path)
    if wanted in present:
        return None
    parsed = parse_name(wanted)
    near = [
        p
        for p in present
        if p.parent == wanted.parent
        and p != path
        and parse_name(p).kind == parsed.kind
        and parse_name(p).stem.lower() == parsed.stem.lower()
    ]
    own = "header-only" if parse_name(path).kind == "header" else "no header"
    if near:
        return (
            f"{own}: {wanted.name} is missing but {near[0].name} exists; nibabel needs the "
            "two files of a pair named alike (same letter case, both gzipped or neither): "
            f"rename it to {wanted.name}"
        )
    return f"{own}: {wanted.name} is missing"
