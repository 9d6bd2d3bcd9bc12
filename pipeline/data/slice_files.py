"""Slice files users exchange with braingen: 16-bit PNG and NIfTI, written safely.

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

from pipeline.core.errors import InputError

#: Tokens allowed in generated file names (e.g. a user's prefix): no dots, no separators.
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
#: Percentiles of the non-zero pixels mapped to 0 and 1 for inputs not already in [0, 1]
#: (the ``prepare.percentiles`` default).
INPUT_PERCENTILES = (0.5, 99.5)


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
    """Save a (H, W) array in [0, 1] as a 16-bit greyscale PNG (not atomic; see publish)."""
    Image.fromarray(to_uint16(image)).save(path, format="PNG")


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
    nib.save(nib.Nifti1Image(ras, affine), path)


def _scale_to_unit(data: np.ndarray) -> np.ndarray:
    """Map intensities to [0, 1]: kept if already there, else a percentile window."""
    data = np.nan_to_num(data.astype(np.float32))
    if data.min() >= 0.0 and data.max() <= 1.0:
        return data
    foreground = data[data != 0]
    if foreground.size == 0:
        raise InputError("the image is all zeros")
    lo, hi = np.percentile(foreground, INPUT_PERCENTILES)
    if hi <= lo:
        raise InputError(f"the image has constant intensity ({lo:g})")
    return np.clip((data - lo) / (hi - lo), 0.0, 1.0)


def _read_upright(path: Path) -> np.ndarray:
    """A user's slice file as an upright (H, W) array (integers divided to [0, 1])."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.name.endswith((".nii", ".nii.gz")):
        try:
            data = np.squeeze(np.asarray(nib.load(path).get_fdata(), np.float32))
        except Exception as err:  # nibabel raises many types for a bad file
            raise InputError(f"{path}: not a readable NIfTI file ({err})") from None
        if data.ndim != 2:
            raise InputError(
                f"{path}: expected one axial slice, got data of shape {data.shape}; "
                "extract the slice first"
            )
        return np.rot90(data, k=1, axes=(0, 1))
    try:
        with Image.open(path) as img:
            keep = img.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L")
            data = np.asarray(img if keep else img.convert("L"))
    except OSError as err:
        raise InputError(f"{path}: not a readable image ({err})") from None
    if data.dtype.kind in "iu":  # 16-bit files are uint16 (I;16) or int32 (I)
        wide = data.dtype != np.uint8 and (data.dtype == np.uint16 or data.max() > 255)
        data = data / (65535.0 if wide else 255.0)
    return data


def read_slice(path: str | Path) -> np.ndarray:
    """Read one user slice as an upright (H, W) float32 array in [0, 1].

    PNG/JPEG/TIFF: 8-bit and 16-bit greyscale are divided by 255 or 65535 (colour is
    converted to grey). NIfTI (``.nii``/``.nii.gz``): one axial slice, i.e. 2-D data or a
    3-D volume with one slice, stored in RAS order as :func:`write_nifti` writes it. Float
    data outside [0, 1] is windowed to its 0.5-99.5th non-zero percentiles, as ``prepare``
    does.

    Args:
        path: the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, more than one slice, or an all-zero/constant image.
    """
    path = Path(path)
    data = _read_upright(path)
    try:
        return _scale_to_unit(data)
    except ValueError as err:
        raise InputError(f"{path}: {err}") from None


def read_mask(path: str | Path) -> np.ndarray:
    """Read a region mask (PNG or NIfTI, same rules as :func:`read_slice`): non-zero = inside.

    Returns:
        (H, W) bool array, upright.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, more than one slice, or an empty mask.
    """
    path = Path(path)
    mask = np.asarray(_read_upright(path)) > 0
    if not mask.any():
        raise InputError(f"{path}: the mask is empty (no non-zero pixel marks a region)")
    return mask
