"""Slice files users exchange with braingen: 16-bit PNG and NIfTI, written safely.

Reading is :mod:`data_prep.images` (:func:`read_slice`, :func:`read_mask`, re-exported
here), the reader ``prepare`` uses too. What braingen writes carries a mark (a PNG text
chunk, the NIfTI ``descrip``) saying its intensities are already in [0, 1], so it is read
back unchanged; a user's own slice is normalised like a prepared one.

Orientation follows ``prepare`` (``data_prep.volume.volume_slices``): a slice array is
upright, rows running anterior → posterior and columns left → right, i.e. ``np.rot90`` of the
RAS volume's (x, y) plane. NIfTI files store the RAS plane back, so viewers show them the
right way round; PNGs store the upright array as is.

Every write goes through :func:`publish`: the content is written to a uniquely named
temporary sibling and then renamed (``overwrite=True``) or hard-linked (``overwrite=False``)
onto the real name. A killed process therefore never leaves a half-written file under a
real name, and the hard link refuses atomically when another process created the same
name first.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from data_prep.images import NIFTI_MARK, PNG_MARK, read_mask, read_slice
from pipeline.core.errors import InputError

__all__ = [
    "OutputExistsError",
    "check_token",
    "publish",
    "read_mask",
    "read_slice",
    "to_uint16",
    "upright_to_ras",
    "write_label_nifti",
    "write_label_png",
    "write_nifti",
    "write_png16",
]

#: Grey value of tissue label k in a label PNG: the OASIS PNG release's convention
#: (0 background, 85 CSF, 170 GM, 255 WM), which ``prepare`` reads back as labels 0..3.
LABEL_PNG_STEP = 85

#: Tokens allowed in generated file names (e.g. a user's prefix): no dots, no separators.
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class OutputExistsError(InputError):
    """An output file already exists and overwriting was not asked for."""


def check_token(value: str, name: str) -> str:
    """Validate a user-given piece of a file name.

    Args:
        value: e.g. a file prefix.
        name: argument name for the error message.

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: ``value`` is not 1-64 characters of letters, digits, ``_`` or ``-``
            starting with a letter or digit (so ``../x``, ``a/b`` and ``.hidden`` are refused).
    """
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise InputError(
            f"{name} must be 1-64 letters, digits, '_' or '-' (no dots or path separators); "
            f"got {value!r}"
        )
    return value


def publish(path: Path, write: Callable[[Path], None], *, overwrite: bool) -> Path:
    """Write a file under a temporary name, then move it to ``path`` in one step.

    Args:
        path: destination; its folder must exist.
        write: writes the complete content to the path it is given (same suffixes as
            ``path``, so format-by-extension writers such as nibabel work).
        overwrite: replace an existing ``path``; otherwise refuse it.

    Returns:
        ``path``.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False (checked atomically at
            the final link, so two processes racing for one name cannot both win).
    """
    suffix = "".join(path.suffixes)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f".{stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        write(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputExistsError(
                    f"{path} already exists; pass --overwrite (overwrite=True) to replace it"
                ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def to_uint16(image: np.ndarray) -> np.ndarray:
    """(H, W) intensities in [0, 1] → uint16 in [0, 65535] (clipped, rounded)."""
    return (np.clip(np.asarray(image, np.float64), 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)


def write_png16(image: np.ndarray, path: Path) -> None:
    """Save a (H, W) array in [0, 1] as a 16-bit greyscale PNG (not atomic; see publish).

    A text chunk marks the intensities as already in [0, 1], so :func:`read_slice` reads
    them back unchanged instead of normalising them like a user's slice.
    """
    info = PngInfo()
    info.add_text(*PNG_MARK)
    Image.fromarray(to_uint16(image)).save(path, format="PNG", pnginfo=info)


def upright_to_ras(image: np.ndarray) -> np.ndarray:
    """Undo prepare's ``np.rot90(plane, 1)``: (H, W) upright slice → (X, Y) RAS plane."""
    return np.rot90(image, k=-1, axes=(0, 1))


def write_nifti(stack: np.ndarray, path: Path, pixel_mm: float, slice_mm: float) -> None:
    """Save upright slices as a float32 RAS NIfTI volume (not atomic; see :func:`publish`).

    Args:
        stack: (H, W) one slice or (K, H, W) slices from bottom (z=0) to top.
        path: ``.nii`` or ``.nii.gz`` file.
        pixel_mm: in-plane spacing in mm.
        slice_mm: spacing between slices in mm.
    """
    stack = np.asarray(stack, np.float32)
    if stack.ndim == 2:
        stack = stack[None]
    ras = np.ascontiguousarray(np.stack([upright_to_ras(s) for s in stack], axis=-1))
    affine = np.diag([pixel_mm, pixel_mm, slice_mm, 1.0])
    img = nib.Nifti1Image(ras, affine)
    img.header["descrip"] = NIFTI_MARK  # read back unchanged by read_slice
    nib.save(img, path)


def write_label_png(labels: np.ndarray, path: Path) -> None:
    """Save (H, W) tissue labels 0..3 as an 8-bit PNG in the OASIS PNG release's grey
    levels (label * 85), not atomic (see :func:`publish`)."""
    grey = (np.asarray(labels, np.int64) * LABEL_PNG_STEP).clip(0, 255).astype(np.uint8)
    Image.fromarray(grey).save(path, format="PNG")


def write_label_nifti(stack: np.ndarray, path: Path, pixel_mm: float, slice_mm: float) -> None:
    """Save upright (H, W) or (K, H, W) tissue labels 0..3 as a uint8 RAS NIfTI, on the grid
    :func:`write_nifti` gives the image (not atomic; see :func:`publish`)."""
    stack = np.asarray(stack, np.uint8)
    if stack.ndim == 2:
        stack = stack[None]
    ras = np.ascontiguousarray(np.stack([upright_to_ras(s) for s in stack], axis=-1))
    img = nib.Nifti1Image(ras, np.diag([pixel_mm, pixel_mm, slice_mm, 1.0]))
    img.header["descrip"] = b"braingen tissue labels 0 bg 1 CSF 2 GM 3 WM"
    nib.save(img, path)
