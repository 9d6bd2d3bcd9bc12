"""The widely shared 2D PNG release of OASIS (``keras_png_slices_data``).

Layout (at any depth)::

    keras_png_slices_{train,validate,test}/case_NNN_slice_K.nii.png        8-bit images
    keras_png_slices_seg_{train,validate,test}/seg_NNN_slice_K.nii.png     tissue labels

The release's split is kept (``validate`` → ``val``); a case number found in two split
folders names two subjects there, kept apart as ``case_NNN_<split>``. Images are already
upright axial slices (the display convention of :mod:`data_prep.volume`); z comes from the
file name, with K = largest slice index + 1 per case. A segmentation becomes the brain mask
(label > 0) and, when its grey levels are the release's four classes (0, 85, 170, 255 =
background, CSF, GM, WM; :mod:`data_prep.tissue`), the tissue labels 0..3; a case with any
slice lacking its segmentation falls back to the threshold mask for all its slices, and
has no tissue labels.

Re-exports of the release are read too: names in any letter case, ``.png`` without the
``.nii``, 16-bit or colour PNGs, and single-slice NIfTI files (``case_NNN_slice_K.nii.gz``,
oriented by their affine). Every slice is read by :mod:`data_prep.images`, as
``sdedit``/``inpaint`` read a slice, in its stored units: ``prepare`` normalises a case
by the percentiles inside its masks, so 8-bit, 16-bit and raw-unit exports agree.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep import images
from data_prep.errors import BadInputError
from data_prep.files import parse_name
from data_prep.readers.base import FileIndex, PngCase, PngSlice, Scan, Skip, rel_str

NAME = "png"
DIR_RE = re.compile(
    r"^keras_png_slices_(?P<seg>seg_)?(?P<split>train|validate|test)$", re.IGNORECASE
)
#: Patterns of the name without its ``.png`` / ``.nii(.gz)`` suffix (any letter case).
IMAGE_RE = re.compile(r"^case_(?P<case>\d+)_slice_(?P<z>\d+)(\.nii)?$", re.IGNORECASE)
SEG_RE = re.compile(r"^seg_(?P<case>\d+)_slice_(?P<z>\d+)(\.nii)?$", re.IGNORECASE)
_SPLIT = {"train": "train", "validate": "val", "test": "test"}
#: Slice files the release layout takes.
_SLICE_KINDS = ("png", "nifti")
#: Largest slice accepted (pixels); the release's slices are 256x256. Checked on the header,
#: before any pixel is decoded, so a corrupt or hostile file cannot claim gigabytes.
MAX_PIXELS = images.MAX_PIXELS


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
        name = parse_name(path)
        m = (SEG_RE if is_seg else IMAGE_RE).match(name.stem) if name.kind in _SLICE_KINDS else None
        if m is None:
            expected = "seg_NNN_slice_K.nii.png" if is_seg else "case_NNN_slice_K.nii.png"
            skipped.append(Skip(rel_str(path), f"unexpected file name (expected {expected})"))
            continue
        key = (_SPLIT[folder["split"].lower()], f"case_{m['case']}", int(m["z"]))
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
    splits_of: dict[str, set[str]] = defaultdict(set)
    for split, case in grouped:
        splits_of[case].add(split)
    cases = []
    ignored = []
    for (split, case), slices in sorted(grouped.items()):
        # numbered per folder: the same number in two folders is two subjects
        subject = f"{case}_{split}" if len(splits_of[case]) > 1 else case
        n_slices = max(s.z_index for s in slices) + 1
        if n_slices < 2:
            skipped.append(Skip(slices[0].image, "only slice 0 of the case: z is undefined"))
            if slices[0].seg is not None:
                ignored.append(Skip(slices[0].seg, f"the segmentation of {slices[0].image}"))
            continue
        cases.append(PngCase(subject, split, n_slices, index.root, tuple(slices)))
    return Scan(format=NAME, cases=cases, skipped=skipped, ignored=ignored)


@dataclass(frozen=True)
class PngStack:
    """The readable slices of one case, upright.

    Attributes:
        images: (N, H, W) float32 intensities as stored (0..255 for 8-bit PNGs, 0..65535
            for 16-bit ones, the file's units for NIfTI slices).
        masks: (N, H, W) bool brain masks, or None when a segmentation is missing.
        slices: the N slices read, in order.
        skipped: slices that could not be used.
        labels: (N, H, W) float32 segmentation values as stored (e.g. 0/85/170/255), or
            None when a segmentation is missing; ``masks == labels > 0``.
    """

    images: np.ndarray
    masks: np.ndarray | None
    slices: tuple[PngSlice, ...]
    skipped: tuple[Skip, ...]
    labels: np.ndarray | None = None


def load_case(case: PngCase) -> PngStack:
    """Read a case's images and segmentations; unreadable or odd-sized slices are skipped.

    Args:
        case: the case from :func:`scan`.

    Returns:
        The stack (possibly empty: ``images.shape[0] == 0``).
    """
    stack: list[np.ndarray] = []
    labels: list[np.ndarray | None] = []
    kept: list[PngSlice] = []
    skipped: list[Skip] = []
    for item in case.slices:
        try:
            image = images.read_raw_slice(case.root / item.image, max_pixels=MAX_PIXELS).data
        except BadInputError as err:
            skipped.append(Skip(item.image, err.reason))
            continue
        if stack and image.shape != stack[0].shape:
            shape = "x".join(map(str, stack[0].shape))
            skipped.append(Skip(item.image, f"size {image.shape} differs from the case's {shape}"))
            continue
        label = None
        if item.seg is not None:
            try:
                seg = images.read_raw_slice(
                    case.root / item.seg, max_pixels=MAX_PIXELS, labels=True
                )
            except BadInputError as err:
                skipped.append(Skip(item.seg, f"{err.reason}; threshold mask used for the case"))
            else:
                if seg.data.shape == image.shape:
                    label = seg.data
                else:
                    skipped.append(
                        Skip(
                            item.seg,
                            f"size {seg.data.shape} differs from its image's {image.shape}",
                        )
                    )
        stack.append(image)
        labels.append(label)
        kept.append(item)
    have_all = bool(labels) and all(m is not None for m in labels)
    stored = np.stack(labels).astype(np.float32) if have_all else None  # type: ignore[arg-type]
    return PngStack(
        images=np.stack(stack).astype(np.float32) if stack else np.zeros((0, 1, 1), np.float32),
        masks=None if stored is None else stored > 0,
        slices=tuple(kept),
        skipped=tuple(skipped),
        labels=stored,
    )
