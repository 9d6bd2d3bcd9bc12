"""The widely shared 2D PNG release of OASIS (``keras_png_slices_data``).

Layout (at any depth)::

    keras_png_slices_{train,validate,test}/case_NNN_slice_K.nii.png        8-bit images
    keras_png_slices_seg_{train,validate,test}/seg_NNN_slice_K.nii.png     tissue labels

The release's split is kept (``validate`` → ``val``). Images are already upright axial
slices (the display convention of :mod:`data_prep.volume`); z comes from the file name,
with K = largest slice index + 1 per case. A segmentation becomes the brain mask
(label > 0); a case with any slice lacking its segmentation falls back to the
threshold mask for all its slices.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.errors import BadInputError, describe
from data_prep.readers.base import FileIndex, PngCase, PngSlice, Scan, Skip, rel_str

NAME = "png"
DIR_RE = re.compile(r"^keras_png_slices_(?P<seg>seg_)?(?P<split>train|validate|test)$")
IMAGE_RE = re.compile(r"^case_(?P<case>\d+)_slice_(?P<z>\d+)\.nii\.png$")
SEG_RE = re.compile(r"^seg_(?P<case>\d+)_slice_(?P<z>\d+)\.nii\.png$")
_SPLIT = {"train": "train", "validate": "val", "test": "test"}
#: Largest slice accepted (pixels); the release's slices are 256x256. Checked on the header,
#: before any pixel is decoded, so a corrupt or hostile file cannot claim gigabytes.
MAX_PIXELS = 4096**2


def matches(index: FileIndex) -> bool:
    """True if the folder holds ``keras_png_slices_*`` folders."""
    return any(DIR_RE.match(d.name) for d in index.dirs)


def scan(index: FileIndex) -> Scan:
    """Group the release's slices per case and pair them with their segmentations.

    Args:
        index: the data folder's file index.

    Returns:
        One :class:`PngCase` per (split, case), sorted; skipped: unexpected file names,
        duplicate slices, segmentations without an image, single-slice cases.
    """
    skipped: list[Skip] = []
    images: dict[tuple[str, str, int], Path] = {}
    segs: dict[tuple[str, str, int], Path] = {}
    for path in index.files:
        folder = DIR_RE.match(path.parent.name)
        if folder is None:
            continue
        is_seg = folder["seg"] is not None
        m = (SEG_RE if is_seg else IMAGE_RE).match(path.name)
        if m is None:
            expected = "seg_NNN_slice_K.nii.png" if is_seg else "case_NNN_slice_K.nii.png"
            skipped.append(Skip(rel_str(path), f"unexpected file name (expected {expected})"))
            continue
        key = (_SPLIT[folder["split"]], f"case_{m['case']}", int(m["z"]))
        target = segs if is_seg else images
        if key in target:
            skipped.append(Skip(rel_str(path), f"duplicate slice; using {rel_str(target[key])}"))
        else:
            target[key] = path

    for key in sorted(segs.keys() - images.keys()):
        skipped.append(Skip(rel_str(segs[key]), "segmentation without a matching image"))

    grouped: dict[tuple[str, str], list[PngSlice]] = defaultdict(list)
    for (split, case, z), path in sorted(images.items()):
        seg = segs.get((split, case, z))
        grouped[(split, case)].append(PngSlice(z, rel_str(path), rel_str(seg) if seg else None))
    cases = []
    for (split, case), slices in sorted(grouped.items()):
        n_slices = max(s.z_index for s in slices) + 1
        if n_slices < 2:
            skipped.append(Skip(slices[0].image, "only slice 0 of the case: z is undefined"))
            continue
        cases.append(PngCase(case, split, n_slices, index.root, tuple(slices)))
    return Scan(format=NAME, cases=cases, skipped=skipped)


@dataclass(frozen=True)
class PngStack:
    """The readable slices of one case, upright.

    Attributes:
        images: (N, H, W) float32 intensities as stored (0..255).
        masks: (N, H, W) bool brain masks, or None when a segmentation is missing.
        slices: the N slices read, in order.
        skipped: slices that could not be used.
    """

    images: np.ndarray
    masks: np.ndarray | None
    slices: tuple[PngSlice, ...]
    skipped: tuple[Skip, ...]


def load_case(case: PngCase) -> PngStack:
    """Read a case's images and segmentations; unreadable or odd-sized slices are skipped.

    Args:
        case: the case from :func:`scan`.

    Returns:
        The stack (possibly empty: ``images.shape[0] == 0``).
    """
    images: list[np.ndarray] = []
    masks: list[np.ndarray | None] = []
    kept: list[PngSlice] = []
    skipped: list[Skip] = []
    for item in case.slices:
        try:
            image = _read_gray(case.root / item.image)
        except BadInputError as err:
            skipped.append(Skip(item.image, err.reason))
            continue
        if images and image.shape != images[0].shape:
            shape = "x".join(map(str, images[0].shape))
            skipped.append(Skip(item.image, f"size {image.shape} differs from the case's {shape}"))
            continue
        mask = None
        if item.seg is not None:
            try:
                seg = _read_gray(case.root / item.seg)
                mask = seg > 0 if seg.shape == image.shape else None
            except BadInputError:
                mask = None
        images.append(image)
        masks.append(mask)
        kept.append(item)
    have_all_masks = bool(masks) and all(m is not None for m in masks)
    stack = np.stack(images).astype(np.float32) if images else np.zeros((0, 1, 1), np.float32)
    return PngStack(
        images=stack,
        masks=np.stack(masks) if have_all_masks else None,  # type: ignore[arg-type]
        slices=tuple(kept),
        skipped=tuple(skipped),
    )


def _read_gray(path: Path) -> np.ndarray:
    """A slice as (H, W) uint8; file and image size are checked before any pixel is decoded.

    The file is read into memory first (at most ``8 * MAX_PIXELS`` bytes): Pillow reading
    from a file object trusts chunk lengths and may reserve whatever a corrupt length claims.

    Raises:
        BadInputError: unreadable, truncated or corrupt file, or more than
            :data:`MAX_PIXELS` pixels.
    """
    try:
        n_bytes = path.stat().st_size
        if n_bytes > 8 * MAX_PIXELS:
            raise BadInputError(f"{n_bytes} bytes, too large for a slice of <= {MAX_PIXELS} px")
        with Image.open(io.BytesIO(path.read_bytes())) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise BadInputError(
                    f"{width}x{height} pixels (> {MAX_PIXELS}); corrupt header or not a slice"
                )
            return np.asarray(img.convert("L"))
    except BadInputError:
        raise
    except Exception as err:  # Pillow raises many types for corrupt input
        raise BadInputError(f"unreadable PNG ({describe(err)})") from None
