"""Tissue label maps: stored segmentation values → labels 0 background, 1 CSF, 2 GM, 3 WM.

``prepare`` writes ``{split}/tissue.npy`` from these labels when every case has them
(:mod:`data_prep.prepare`). A segmentation is taken as a tissue map only when its values
are exactly the four classes, in one of the storage conventions of the sources read:

* volumes (OASIS-1 ``FSL_SEG``, FSL FAST; generic NIfTI): the values 0, 1, 2, 3 themselves;
* slices of the PNG release (``keras_png_slices_seg_*``): grey levels 0, 85, 170, 255
  (8-bit), 0, 21845, 43690, 65535 (16-bit re-exports), or 0..3 (palette indices, NIfTI
  slices).

Anything else (a binary brain mask, a FreeSurfer ``aseg``, a two-class map) is still a
brain mask (non-zero = brain) but gives no tissue labels; the reason says why. The label
names are :data:`pipeline.data.datasets.TISSUE_CLASSES`.
"""

from __future__ import annotations

import numpy as np

#: Stored value of label 1 (CSF) for volumes: the labels themselves.
VOLUME_STEPS: tuple[float, ...] = (1.0,)
#: Stored value of label 1 (CSF) for single slices: the labels, 8-bit and 16-bit grey levels.
SLICE_STEPS: tuple[float, ...] = (1.0, 85.0, 21845.0)


def tissue_labels(
    values: np.ndarray, steps: tuple[float, ...] = VOLUME_STEPS
) -> tuple[np.ndarray | None, str | None]:
    """Map a stored segmentation to tissue labels 0..3, if it is one.

    Args:
        values: (...) segmentation as stored (any shape, float or int).
        steps: accepted values of label 1 (label k is stored as ``k * step``);
            :data:`VOLUME_STEPS` for volumes, :data:`SLICE_STEPS` for PNG/NIfTI slices.

    Returns:
        ``(labels, None)``: uint8 labels of ``values``' shape, 0 background, 1 CSF, 2 GM,
        3 WM, ``labels > 0`` exactly where ``values > 0``; or ``(None, reason)`` when the
        stored values are not exactly the four classes in one of the conventions.
    """
    found = np.unique(values)
    for step in steps:
        if np.array_equal(found, step * np.arange(4, dtype=np.float64)):
            return np.rint(np.asarray(values, dtype=np.float64) / step).astype(np.uint8), None
    shown = ", ".join(f"{v:g}" for v in found[:6]) + (", ..." if len(found) > 6 else "")
    wanted = " or ".join("/".join(f"{k * s:g}" for k in range(4)) for s in steps)
    return None, f"segmentation values {{{shown}}} are not the tissue classes {wanted}"
