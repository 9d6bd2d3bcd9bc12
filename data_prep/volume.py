"""3D volume → K axial slices: reorientation, brain extent, normalisation, resizing.

Orientation convention (used for every source, the PNG release included):

* Volumes are reoriented to RAS with :func:`nibabel.as_closest_canonical`, so the array
  axes are (x → Right, y → Anterior, z → Superior) and an axial slice is ``vol[:, :, k]``;
  slice ``k = 0`` is the bottom of the volume.
* A slice is displayed upright with ``np.rot90`` (counter-clockwise): rows run from
  anterior (row 0, top) to posterior, columns from the subject's left (column 0) to
  right, i.e. the neurological convention. The PNG release is already stored upright.

Intensities are mapped to [0, 1] by the ``(lo, hi)`` percentiles of the voxels inside
the brain mask (clipped; :mod:`data_prep.intensity`, shared with single slices), slices
are zero-padded to square and resized to ``image_size`` (linear with anti-aliasing for
images, nearest neighbour for masks and tissue labels, which therefore stay aligned pixel
for pixel with the images and with each other: ``tissue > 0`` is the mask wherever both
come from one segmentation).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage.transform import resize

from data_prep.errors import BadInputError, describe
from data_prep.images import check_file_size, open_image, to_ras
from data_prep.intensity import (
    apply_window,
    intensity_window,
)

logger = logging.getLogger(__name__)

#: Largest volume accepted (voxels); bigger header dims are treated as a corrupt header.
MAX_VOXELS = 512**3
#: Largest ratio of the in-plane voxel sizes (x, y); slices are resampled to square pixels,
#: so a corrupt header claiming e.g. 0.001 x 1 mm voxels would ask for a huge image.
MAX_ANISOTROPY = 20.0
#: Axial slices whose mask area is below this fraction of the largest one are left out of the
#: brain's extent: stray voxels, the thin lower brainstem and the last few mm of the vertex.
MIN_AREA_FRACTION = 0.05


@dataclass(frozen=True)
class Volume:
    """A volume in RAS orientation.

    Attributes:
        data: (X, Y, Z) float32 intensities as stored (non-finite voxels set to 0).
        affine: (4, 4) voxel → world (mm) transform of ``data``.
        n_nonfinite: number of NaN/inf voxels that were set to 0.
    """

    data: np.ndarray
    affine: np.ndarray
    n_nonfinite: int = 0

    @property
    def zooms(self) -> tuple[float, float, float]:
        """Voxel size in mm along (x, y, z)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


@dataclass(frozen=True)
class SliceSet:
    """K axial slices of one volume, upright and square.

    Attributes:
        images: (K, S, S) float16 intensities in [0, 1].
        masks: (K, S, S) uint8 brain masks in {0, 1}.
        z_index: (K,) int64 slice position 0..K-1 (bottom to top).
        z_mm: (K,) float64 world z (mm) of each slice's centre; NaN when unknown.
        tissue: (K, S, S) uint8 tissue labels (0 background, 1 CSF, 2 GM, 3 WM;
            ``tissue > 0 == masks``), or None when the source has no tissue segmentation.
    """

    images: np.ndarray
    masks: np.ndarray
    z_index: np.ndarray
    z_mm: np.ndarray
    tissue: np.ndarray | None = None


def load_volume(path: str | Path, *, max_voxels: int | None = None) -> Volume:
    """Read a NIfTI or Analyze volume and reorient it to RAS.

    A singleton 4th axis (as in OASIS-1's ``176x208x176x1`` files) is dropped. The
    header's dims are checked before any voxel data is read. File kinds, pairs and
    compression are decided by :mod:`data_prep.files` (any letter case), the file is opened
    and reoriented by :mod:`data_prep.images`, as every single slice is.

    Args:
        path: ``.nii``, ``.hdr`` or ``.img`` file, compressed or not.
        max_voxels: larger header dims are rejected as implausible (default
            :data:`MAX_VOXELS`), before any voxel is read.

    Returns:
        The volume.

    Raises:
        BadInputError: unreadable, truncated, header-only, 2D, true 4D, RGB/complex voxels,
            implausibly large, invalid voxel sizes, all-zero or all-NaN volume; the reason
            names the problem.
    """
    img = open_image(path)
    shape = tuple(int(s) for s in img.shape)
    _check_shape(shape, MAX_VOXELS if max_voxels is None else max_voxels)
    check_file_size(img)
    try:
        if len(shape) > 3:
            img = img.slicer[(slice(None),) * 3 + (0,) * (len(shape) - 3)]
        canonical = to_ras(img)
        data = np.asarray(canonical.get_fdata(dtype=np.float32))
    except Exception as err:  # truncated gzip streams, bad affines, ...
        raise BadInputError(f"corrupt or truncated data ({describe(err)})") from None
    _check_zooms(canonical.affine)
    finite = np.isfinite(data)
    n_bad = int(data.size - np.count_nonzero(finite))
    if n_bad == data.size:
        raise BadInputError("all voxels are NaN/inf")
    if n_bad:
        data = np.where(finite, data, np.float32(0))
    if not np.any(data):
        raise BadInputError("all-zero volume")
    return Volume(data=data, affine=canonical.affine, n_nonfinite=n_bad)


def _check_shape(shape: tuple[int, ...], max_voxels: int) -> None:
    dims = "x".join(map(str, shape))
    if any(s <= 0 for s in shape):
        raise BadInputError(f"invalid dims {dims} in the header")
    if len(shape) < 3 or min(shape[:3]) == 1:
        raise BadInputError(f"2D image ({dims}); a 3D volume is needed")
    extra = math.prod(shape[3:])  # Python ints: no overflow for hostile dims
    if len(shape) == 5 and shape[3] == 1 and extra > 1:  # NIfTI's vector/RGB convention
        raise BadInputError(
            f"4-D/RGB volume ({dims}: {extra} components per voxel), not a scalar T1 image"
        )
    if extra > 1:
        raise BadInputError(f"true 4D volume ({dims}, {extra} volumes); pass one 3D volume")
    n_voxels = math.prod(shape[:3])
    if n_voxels > max_voxels:
        raise BadInputError(
            f"header dims {dims} imply {n_voxels} voxels (> {max_voxels}); corrupt header?"
        )


def _check_zooms(affine: np.ndarray) -> None:
    """Voxel sizes must be finite and positive, with an in-plane ratio below MAX_ANISOTROPY."""
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    shown = "x".join(f"{z:.3g}" for z in zooms)
    if not (np.all(np.isfinite(zooms)) and zooms.min() > 0):
        raise BadInputError(f"invalid voxel sizes {shown} mm in the header")
    if zooms[:2].max() / zooms[:2].min() > MAX_ANISOTROPY:
        raise BadInputError(
            f"voxel sizes {shown} mm: in-plane ratio above {MAX_ANISOTROPY:g}; corrupt header?"
        )


def load_labels(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """Read a brain mask or tissue segmentation in RAS, values as stored.

    Args:
        path: mask file (any format :func:`load_volume` reads).
        shape: (X, Y, Z) of the image it belongs to.

    Returns:
        (X, Y, Z) float32 values (non-zero = brain; FSL FAST labels 1 CSF, 2 GM, 3 WM).

    Raises:
        BadInputError: unreadable, or its shape differs from ``shape``.
    """
    labels = load_volume(path).data
    if labels.shape != shape:
        raise BadInputError(f"mask shape {labels.shape} differs from the image's {shape}")
    return labels


def load_mask(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """Read a brain mask or tissue segmentation (non-zero = brain) in RAS.

    Args:
        path: mask file (any format :func:`load_volume` reads).
        shape: (X, Y, Z) of the image it belongs to.

    Returns:
        (X, Y, Z) bool mask.

    Raises:
        BadInputError: unreadable, or its shape differs from ``shape``.
    """
    return load_labels(path, shape) > 0


def axial_extent(mask: np.ndarray, min_area_fraction: float = MIN_AREA_FRACTION) -> tuple[int, int]:
    """First and last axial slice (inclusive) whose mask area is a real part of the brain.

    Args:
        mask: (X, Y, Z) bool brain mask.
        min_area_fraction: slices with less than this fraction of the largest slice's
            area (stray voxels) are ignored.

    Returns:
        ``(lo, hi)`` slice indices along z.

    Raises:
        BadInputError: the mask is empty.
    """
    areas = mask.sum(axis=(0, 1))
    if areas.max() == 0:
        raise BadInputError("empty brain mask: no voxel above the foreground threshold")
    inside = np.flatnonzero(areas >= min_area_fraction * areas.max())
    return int(inside[0]), int(inside[-1])


def square_resize(
    stack: np.ndarray, size: int, *, pixel_mm: tuple[float, float] = (1.0, 1.0), nearest: bool
) -> np.ndarray:
    """Make square pixels, zero-pad to a square, resize to ``size``.

    Args:
        stack: (N, H, W) slices.
        size: output side length S.
        pixel_mm: (row, column) pixel spacing; unequal spacings are resampled first so
            anatomy keeps its aspect ratio.
        nearest: nearest-neighbour interpolation without anti-aliasing (masks) instead of
            linear with anti-aliasing (images).

    Returns:
        (N, S, S) float32.
    """
    order = 0 if nearest else 1
    n, h, w = stack.shape
    stack = stack.astype(np.float32, copy=False)
    finest = min(pixel_mm)
    if max(pixel_mm) > 1.01 * finest:
        h, w = round(h * pixel_mm[0] / finest), round(w * pixel_mm[1] / finest)
        stack = _resize(stack, (n, h, w), order)
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    stack = np.pad(stack, ((0, 0), (top, side - h - top), (left, side - w - left)))
    return _resize(stack, (n, size, size), order)


def _resize(stack: np.ndarray, shape: tuple[int, int, int], order: int) -> np.ndarray:
    if stack.shape == shape:
        return stack
    out = resize(
        stack, shape, order=order, mode="constant", anti_aliasing=order > 0, preserve_range=True
    )
    return out.astype(np.float32)


def finish_slices(
    images: np.ndarray,
    masks: np.ndarray,
    window: tuple[float, float],
    image_size: int,
    pixel_mm: tuple[float, float] = (1.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Normalise upright slices to [0, 1] and make them (S, S).

    Args:
        images: (N, H, W) upright slices, raw intensities.
        masks: (N, H, W) bool brain masks.
        window: intensities mapped to 0 and 1 (from :func:`intensity_window`).
        image_size: output side length S.
        pixel_mm: (row, column) pixel spacing in mm.

    Returns:
        ``(images, masks)``: (N, S, S) float16 in [0, 1] and (N, S, S) uint8 in {0, 1}.
    """
    scaled = apply_window(images, window)
    out = np.clip(square_resize(scaled, image_size, pixel_mm=pixel_mm, nearest=False), 0.0, 1.0)
    out_masks = square_resize(masks.astype(np.float32), image_size, pixel_mm=pixel_mm, nearest=True)
    return out.astype(np.float16), (out_masks > 0.5).astype(np.uint8)


def finish_labels(
    labels: np.ndarray, image_size: int, pixel_mm: tuple[float, float] = (1.0, 1.0)
) -> np.ndarray:
    """Make upright label maps (S, S) exactly as :func:`finish_slices` makes the masks.

    Args:
        labels: (N, H, W) integer labels (e.g. tissue 0..3), aligned with the slices.
        image_size: output side length S.
        pixel_mm: (row, column) pixel spacing in mm.

    Returns:
        (N, S, S) uint8 labels (nearest neighbour, so no new values appear).
    """
    out = square_resize(labels.astype(np.float32), image_size, pixel_mm=pixel_mm, nearest=True)
    return np.rint(out).astype(np.uint8)


def volume_slices(
    volume: Volume,
    mask: np.ndarray,
    *,
    n_slices: int,
    image_size: int,
    percentiles: tuple[float, float],
    tissue: np.ndarray | None = None,
) -> SliceSet:
    """K evenly spaced axial slices across the brain's extent, upright, in [0, 1].

    Args:
        volume: RAS volume from :func:`load_volume`.
        mask: (X, Y, Z) bool brain mask of the same shape.
        n_slices: K; slice k sits at ``lo + k * (hi - lo) / (K - 1)`` (rounded) where
            ``lo..hi`` is the brain's axial extent.
        image_size: output side length S.
        percentiles: brain-intensity percentiles mapped to 0 and 1.
        tissue: optional (X, Y, Z) uint8 tissue labels 0..3 with ``tissue > 0 == mask``;
            sliced and resized like the mask.

    Returns:
        The slice set (z_index 0 = bottom of the brain; ``tissue`` None without labels).
    """
    lo, hi = axial_extent(mask)
    picks = np.rint(np.linspace(lo, hi, n_slices)).astype(np.int64)
    window = intensity_window(volume.data, mask, percentiles)
    upright = np.rot90(volume.data[:, :, picks], k=1, axes=(0, 1)).transpose(2, 0, 1)
    upright_masks = np.rot90(mask[:, :, picks], k=1, axes=(0, 1)).transpose(2, 0, 1)
    zx, zy, _ = volume.zooms
    images, masks = finish_slices(upright, upright_masks, window, image_size, pixel_mm=(zy, zx))
    out_tissue = None
    if tissue is not None:
        upright_tissue = np.rot90(tissue[:, :, picks], k=1, axes=(0, 1)).transpose(2, 0, 1)
        out_tissue = finish_labels(upright_tissue, image_size, pixel_mm=(zy, zx))
    centre = np.array([(volume.data.shape[0] - 1) / 2, (volume.data.shape[1] - 1) / 2])
    voxels = np.stack(
        [np.full(n_slices, centre[0]), np.full(n_slices, centre[1]), picks, np.ones(n_slices)]
    )
    z_mm = (volume.affine @ voxels)[2]
    return SliceSet(
        images=images,
        masks=masks,
        z_index=np.arange(n_slices, dtype=np.int64),
        z_mm=z_mm.astype(np.float64),
        tissue=out_tissue,
    )
