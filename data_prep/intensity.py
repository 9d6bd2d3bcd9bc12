"""Foreground masks and the intensity window: how ``prepare`` maps raw intensities to [0, 1].

One definition for volumes, the PNG release and the single slices ``sdedit``/``inpaint``
read, so that a file gives the same normalised pixels in any unit it is stored in (8-bit,
16-bit full range, raw scanner units): the window is the ``(lo, hi)`` percentiles of the
intensities inside the brain mask, which scale with the data.
"""

from __future__ import annotations

import numpy as np

from data_prep.errors import BadInputError

#: Foreground threshold, as a fraction of the robust intensity range above the minimum.
FOREGROUND_FRACTION = 0.05


def threshold_mask(data: np.ndarray, fraction: float = FOREGROUND_FRACTION) -> np.ndarray:
    """Foreground mask: voxels above ``min + fraction * (p99 - min)``.

    For skull-stripped images (zero background) this is the brain mask. It does not change
    when the intensities are scaled or shifted.

    Args:
        data: intensities of any shape.
        fraction: threshold position in the robust range, in [0, 1).

    Returns:
        bool array of ``data``'s shape.
    """
    low = float(data.min())
    above = data[data > low]
    if above.size == 0:
        return np.zeros(data.shape, dtype=bool)
    high = float(np.percentile(above, 99))
    return data > low + fraction * (high - low)


def intensity_window(
    data: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float]
) -> tuple[float, float]:
    """The intensities mapped to 0 and 1: ``percentiles`` of ``data`` inside ``mask``.

    Raises:
        BadInputError: the window is empty (constant intensity inside the mask).
    """
    lo, hi = (float(v) for v in np.percentile(data[mask], percentiles))
    if not hi > lo:
        raise BadInputError(f"constant intensity ({lo:g}) inside the brain mask")
    return lo, hi


def apply_window(data: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """``(data - lo) / (hi - lo)`` clipped to [0, 1], float32."""
    lo, hi = window
    return np.clip((data.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def normalise_slice(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """One slice to [0, 1] the way ``prepare`` normalises a volume: its own threshold mask
    and the ``percentiles`` window inside it.

    Args:
        image: (H, W) intensities in any unit.
        percentiles: ``(lo, hi)`` percentiles mapped to 0 and 1.

    Returns:
        (H, W) float32 in [0, 1].

    Raises:
        BadInputError: blank image, or constant intensity inside the foreground.
    """
    mask = threshold_mask(image)
    if not mask.any():
        value = float(image.flat[0]) if image.size else 0.0
        raise BadInputError(f"blank image: every pixel is {value:g}")
    return apply_window(image, intensity_window(image, mask, percentiles))
