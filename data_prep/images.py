"""Image files → arrays: the one reader of slices and volume files for every command.

``prepare`` (PNG release slices, their segmentations, NIfTI slices, and through
:mod:`data_prep.volume` every 3-D volume), ``sdedit``/``inpaint`` and the augmentation
dataset read files here, so one file gives the same pixels whichever command reads it:

* **Kind** from the name, any letter case, compressed or not (:mod:`data_prep.files`).
* **Orientation** from the NIfTI/Analyze affine: :func:`to_ras` is nibabel's
  ``as_closest_canonical``, the reorientation ``prepare`` applies to volumes, so a slice
  stored LPS, LAS or RAS gives one array; it is then shown upright (``np.rot90`` of the RAS
  (x, y) plane: anterior at the top, the subject's left on the left). PNGs carry no
  orientation and are taken as stored upright (the PNG release's convention).
* **Bit depth and colour**: 8-bit, 16-bit (``I;16``), 32-bit integer and float PNG/TIFF
  pixels keep their full range (never clamped to 255); RGB and palette images become grey
  by the ITU-R 601 luminance (exactly one channel when the channels are equal), and an
  alpha channel is composited on black (the background of an MRI slice).
* **Intensities** come back in the units stored. :func:`read_slice` then normalises a
  single slice the way ``prepare`` normalises a volume (the percentile window inside the
  foreground, :func:`data_prep.intensity.normalise_slice`), so 8-bit, 16-bit full-range and
  raw scanner units give the same slice; only files braingen wrote itself (a PNG text
  chunk or NIfTI ``descrip`` marking intensities already in [0, 1]) are read back as they are.

Errors a file can cause raise :class:`~data_prep.errors.BadInputError` with the real cause
(``prepare`` reports it as the file's skip reason); :func:`read_slice` and :func:`read_mask`
turn it into an :class:`~pipeline.core.errors.InputError` naming the file.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from data_prep.errors import BadInputError, describe
from data_prep.files import file_kind, is_compressed, pair_problem, parse_name, partner
from data_prep.intensity import normalise_slice
from pipeline.core.errors import InputError

#: Largest slice accepted (pixels). Checked on the header, before any pixel is decoded, so a
#: corrupt or hostile file cannot claim gigabytes.
MAX_PIXELS = 4096**2
#: The window ``read_slice`` maps to [0, 1] (the ``prepare.percentiles`` default).
SLICE_PERCENTILES = (0.5, 99.5)
#: PNG text chunk (key, value) and NIfTI ``descrip`` that mark braingen's own outputs,
#: whose intensities are already in [0, 1] and are read back unchanged.
PNG_MARK = ("braingen", "intensities in [0, 1]")
NIFTI_MARK = b"braingen: intensities in [0, 1]"
_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI_HEADER_SIZES = (348, 540)
#: ITU-R 601-2 luma weights (what Pillow's ``convert("L")`` uses).
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class RawSlice:
    """One upright slice as stored.

    Attributes:
        data: (H, W) float32 intensities in the file's units.
        normalised: the file marks its intensities as already in [0, 1] (braingen wrote it).
    """

    data: np.ndarray
    normalised: bool = False


# ------------------------------------------------------------------ volumes (nibabel)


def open_image(path: str | Path) -> nib.spatialimages.SpatialImage:
    """Open a NIfTI or Analyze file with nibabel (header only) and check its voxel type.

    Args:
        path: ``.nii``/``.hdr``/``.img``, compressed or not, any letter case.

    Returns:
        The image, voxels not yet read.

    Raises:
        BadInputError: the real cause: not a volume file, a pair whose other file is missing
            or named unlike it, data compressed but not named so (or the reverse), an
            unreadable header, RGB or complex voxels.
    """
    path = Path(path)
    kind = file_kind(path)
    if kind in ("header", "data"):
        if not partner(path).exists():
            present = set(path.parent.iterdir()) if path.parent.is_dir() else set()
            raise BadInputError(pair_problem(path, present) or f"{partner(path).name} is missing")
    elif kind != "nifti":
        raise BadInputError(f"not a NIfTI/Analyze file ({path.name})")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for corrupt input
        raise BadInputError(_unreadable(path, err)) from None
    check_scalar(img)
    return img


def _unreadable(path: Path, err: Exception) -> str:
    """The skip reason for a file nibabel cannot open, naming a misnamed file's fix."""
    name = parse_name(path)
    if not (name.suffix.islower() or name.suffix.isupper()):
        return (
            f"unreadable: nibabel reads a {name.suffix} suffix in one letter case only; "
            f"rename it to {name.stem}{name.suffix.lower()}{name.compression}"
        )
    files = [path] if file_kind(path) == "nifti" else [path, partner(path)]
    for file in files:
        try:
            with open(file, "rb") as handle:
                head = handle.read(4)
        except OSError:
            continue
        gzipped = head[:2] == _GZIP_MAGIC
        if gzipped and not is_compressed(file):
            return (
                f"unreadable: {file.name} holds gzip-compressed data but its name has no .gz; "
                f"rename it to {file.name}.gz"
            )
        if is_compressed(file) and not gzipped and parse_name(file).compression.lower() == ".gz":
            plain = file.name[: -len(".gz")]
            if file_kind(file) != "nifti" or _looks_like_nifti_header(head):
                return f"unreadable: {file.name} is not gzip-compressed; rename it to {plain}"
    return f"unreadable ({describe(err)})"


def _looks_like_nifti_header(head: bytes) -> bool:
    if len(head) < 4:
        return False
    return any(int.from_bytes(head, order) in _NIFTI_HEADER_SIZES for order in ("little", "big"))


def check_scalar(img: nib.spatialimages.SpatialImage) -> None:
    """Refuse voxels that are not one real number: RGB/RGBA records and complex values.

    Raises:
        BadInputError: ``"4-D/RGB volume (...), not a scalar T1 image"`` or complex data.
    """
    dtype = img.get_data_dtype()
    dims = "x".join(str(int(s)) for s in img.shape)
    if dtype.fields is not None:
        channels = "".join(dtype.names or ())
        raise BadInputError(
            f"4-D/RGB volume ({dims}, {channels} colour voxels), not a scalar T1 image"
        )
    if dtype.kind == "c":
        raise BadInputError(f"complex-valued volume ({dims}, {dtype}), not a scalar T1 image")


def check_file_size(img: nib.spatialimages.SpatialImage) -> None:
    """Compare an uncompressed data file's size with what the header implies.

    Compressed files (any letter case, as nibabel decides) are not checked here: their
    truncation shows when the voxels are decompressed.

    Raises:
        BadInputError: ``header only`` or ``truncated``.
    """
    filename = img.file_map["image"].filename
    if filename is None or is_compressed(filename) or not Path(filename).exists():
        return
    offset = int(getattr(img.dataobj, "offset", img.header.get_data_offset()))
    itemsize = img.header.get_data_dtype().itemsize
    needed = offset + int(np.prod(img.shape, dtype=np.int64)) * itemsize
    size = Path(filename).stat().st_size
    if size <= offset:
        raise BadInputError(f"header only: {Path(filename).name} holds no voxel data")
    if size < needed:
        raise BadInputError(f"truncated: {size} bytes, the header implies {needed}")


def to_ras(img: nib.spatialimages.SpatialImage) -> nib.spatialimages.SpatialImage:
    """The image reoriented to RAS (nibabel's ``as_closest_canonical``): array axes
    (x → Right, y → Anterior, z → Superior), whatever order the file stores them in."""
    return nib.as_closest_canonical(img)


def is_braingen_nifti(img: nib.spatialimages.SpatialImage) -> bool:
    """True if the header's ``descrip`` carries braingen's [0, 1] mark."""
    try:
        return bytes(np.asarray(img.header["descrip"]).item()).startswith(NIFTI_MARK)
    except (KeyError, ValueError, TypeError):
        return False


def _nifti_slice(path: Path, max_pixels: int) -> RawSlice:
    """A single-slice NIfTI/Analyze file as an upright (H, W) array, oriented by its affine."""
    img = open_image(path)
    shape = tuple(int(s) for s in img.shape)
    dims = "x".join(map(str, shape))
    if any(s <= 0 for s in shape) or len(shape) < 2:
        raise BadInputError(f"invalid dims {dims} in the header")
    if math.prod(shape[3:]) > 1 or sum(s > 1 for s in shape[:3]) > 2:
        raise BadInputError(
            f"data of shape {dims} is not one slice; pass one axial slice (a 2-D image or an "
            "X x Y x 1 volume)"
        )
    if math.prod(shape) > max_pixels:
        raise BadInputError(f"{dims} pixels (> {max_pixels}); corrupt header or not a slice")
    check_file_size(img)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(
            (*shape[:2], shape[2] if len(shape) > 2 else 1)
        )
    except Exception as err:  # truncated gzip streams, odd scalings, ...
        raise BadInputError(f"corrupt or truncated data ({describe(err)})") from None
    ras = to_ras(nib.Nifti1Image(data, _slice_affine(img.affine)))
    if ras.shape[2] != 1:
        codes = "".join(nib.aff2axcodes(img.affine))
        plane = "sagittal" if ras.shape[0] == 1 else "coronal"
        raise BadInputError(
            f"a {plane} slice (shape {dims}, axes {codes} by its affine); sdedit and inpaint "
            "take axial slices: reslice it to axial first"
        )
    plane = np.asarray(ras.dataobj, dtype=np.float32)[:, :, 0]
    data = np.nan_to_num(np.rot90(plane, k=1), nan=0.0, posinf=0.0, neginf=0.0)
    return RawSlice(np.ascontiguousarray(data), normalised=is_braingen_nifti(img))


def _slice_affine(affine: np.ndarray) -> np.ndarray:
    """The affine with a usable third column: a 2-D file's may be zero (no slice spacing);
    the slice normal (right-handed) then stands in for it."""
    affine = np.array(affine, dtype=np.float64)
    columns = affine[:3, :3]
    if not np.all(np.isfinite(columns)) or np.linalg.norm(columns[:, :2], axis=0).min() == 0:
        raise BadInputError("invalid affine (voxel sizes or directions) in the header")
    if abs(np.linalg.det(columns)) < 1e-12:
        normal = np.cross(columns[:, 0], columns[:, 1])
        affine[:3, 2] = normal / np.linalg.norm(normal)
    return affine


# ------------------------------------------------------------------ PNG and other pictures


def read_picture(
    path: str | Path, *, max_pixels: int | None = None, labels: bool = False
) -> RawSlice:
    """A PNG (or any picture Pillow reads) as one grey (H, W) array, full bit depth.

    The file is read into memory first (at most ``8 * max_pixels`` bytes): Pillow reading
    from a file object trusts chunk lengths and may reserve whatever a corrupt length
    claims. The image size is checked before any pixel is decoded.

    Args:
        path: the file.
        max_pixels: largest accepted width x height (default :data:`MAX_PIXELS`).
        labels: read a label map or mask: a palette image gives its indices and a colour
            image its largest channel (non-zero = labelled), instead of the luminance.

    Returns:
        The slice in the stored units (8-bit 0..255, 16-bit 0..65535, ...).

    Raises:
        BadInputError: unreadable, truncated or corrupt file, or too many pixels.
    """
    path = Path(path)
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    what = "PNG" if file_kind(path) == "png" else "image"
    try:
        n_bytes = path.stat().st_size
        if n_bytes > 8 * max_pixels:
            raise BadInputError(f"{n_bytes} bytes, too large for a slice of <= {max_pixels} px")
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise BadInputError(
                    f"{width}x{height} pixels (> {max_pixels}); corrupt header or not a slice"
                )
            img.load()
            marked = getattr(img, "text", {}).get(PNG_MARK[0]) == PNG_MARK[1]
            full_scale = 65535.0 if img.mode.startswith("I;16") else 255.0
            data = _grey(img, labels=labels)
    except BadInputError:
        raise
    except Exception as err:  # Pillow raises many types for corrupt input
        raise BadInputError(f"unreadable {what} ({describe(err)})") from None
    if marked:
        return RawSlice((data / full_scale).astype(np.float32), normalised=True)
    return RawSlice(data)


def _grey(img: Image.Image, *, labels: bool) -> np.ndarray:
    """Pixels of any Pillow mode as (H, W) float32 grey, keeping the full range."""
    mode = img.mode
    if mode in ("P", "PA") and labels:  # the palette indices are the labels
        indices = np.asarray(img, dtype=np.float32)
        return indices[..., 0] if indices.ndim == 3 else indices
    if mode == "1":
        img = img.convert("L")
    elif mode in ("P", "PA"):
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
    elif mode not in ("L", "LA", "RGB", "RGBA", "F") and not mode.startswith("I"):
        img = img.convert("RGBA" if "A" in mode or "a" in mode else "RGB")
    array = np.asarray(img)
    if array.ndim == 2:
        return array.astype(np.float32)
    n_colour = array.shape[2] - (1 if img.mode in ("LA", "RGBA") else 0)
    colour = array[..., :n_colour].astype(np.float64)
    if labels:
        grey = colour.max(axis=2)
    elif n_colour == 1 or np.all(colour == colour[..., :1]):
        grey = colour[..., 0]
    else:
        grey = colour @ _LUMA
    if n_colour < array.shape[2]:  # alpha: composite on black
        alpha = array[..., -1].astype(np.float64)
        grey = grey * (alpha / 255.0) if alpha.min() < 255 else grey
    return grey.astype(np.float32)


# ------------------------------------------------------------------ slices for every command


def read_raw_slice(
    path: str | Path, *, max_pixels: int | None = None, labels: bool = False
) -> RawSlice:
    """One slice file, upright, in its stored units: a PNG/picture or a single-slice NIfTI.

    Args:
        path: PNG (any bit depth and colour type), single-slice NIfTI/Analyze (any letter
            case, compressed or not), or another picture Pillow reads.
        max_pixels: largest accepted slice (default :data:`MAX_PIXELS`).
        labels: read a label map or mask (see :func:`read_picture`).

    Raises:
        BadInputError: the file cannot be used; the reason names the real cause.
    """
    path = Path(path)
    max_pixels = MAX_PIXELS if max_pixels is None else max_pixels
    if file_kind(path) in ("nifti", "header", "data"):
        return _nifti_slice(path, max_pixels)
    return read_picture(path, max_pixels=max_pixels, labels=labels)


def read_slice(
    path: str | Path, percentiles: tuple[float, float] = SLICE_PERCENTILES
) -> np.ndarray:
    """Read one user slice as an upright (H, W) float32 array in [0, 1].

    PNG (8/16-bit, grey, RGB, RGBA, palette), other pictures Pillow reads, and single-slice
    NIfTI/Analyze files (``.nii``, ``.nii.gz``, ``.hdr``/``.img``, any letter case; oriented
    by the affine). Intensities are normalised as ``prepare`` normalises a volume: the
    ``percentiles`` window inside the foreground, so the same slice stored in 8 bits, 16 bits
    or raw scanner units gives the same array. Files braingen wrote (``generate``,
    ``sdedit``, ``inpaint``) are already in [0, 1] and read back unchanged.

    Args:
        path: the file.
        percentiles: intensity percentiles mapped to 0 and 1.

    Raises:
        FileNotFoundError: no such file.
        InputError: unreadable file, not one axial slice, or a blank/constant image; one
            line naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        raw = read_raw_slice(path)
        if raw.normalised:
            return np.clip(raw.data, 0.0, 1.0)
        return normalise_slice(raw.data, percentiles)
    except BadInputError as err:
        raise InputError(f"{path}: {err.reason}") from None


def read_mask(path: str | Path) -> np.ndarray:
    """Read a region mask (same files as :func:`read_slice`): non-zero = inside.

    Returns:
        (H, W) bool array, upright.

    Raises:
        FileNotFoundError: no such file.
        InputError: unreadable file, more than one slice, or an empty mask.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        mask = read_raw_slice(path, labels=True).data > 0
    except BadInputError as err:
        raise InputError(f"{path}: {err.reason}") from None
    if not mask.any():
        raise InputError(f"{path}: the mask is empty (no non-zero pixel marks a region)")
    return mask
