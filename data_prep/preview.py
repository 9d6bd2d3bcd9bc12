"""Preview grid of prepared slices: one row per subject, columns from bottom to top of brain."""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Value of the separator lines between tiles (mid grey on black backgrounds).
SEPARATOR = 0.5


def preview_grid(
    images: np.ndarray,
    manifest: pd.DataFrame,
    *,
    max_rows: int = 8,
    max_cols: int = 12,
    pad: int = 2,
) -> np.ndarray:
    """Tile slices of the first ``max_rows`` subjects at evenly spaced z.

    Each row is the first session of one subject (subjects in sorted order); column j
    shows the slice whose z is nearest to ``j / (ncols - 1)`` (z = 0, the bottom of the
    brain, on the left).

    Args:
        images: (N, 1, H, W) slices with intensities in [0, 1], rows matching ``manifest``.
        manifest: the split's manifest (columns ``subject``, ``session``, ``z``,
            ``n_slices``).
        max_rows: most subjects shown.
        max_cols: most z positions shown.
        pad: separator width in pixels.

    Returns:
        (R*(H+pad)+pad, C*(W+pad)+pad) float32 array in [0, 1]; a single separator-valued
        pixel when ``images`` is empty.
    """
    if len(manifest) == 0:
        return np.full((1, 1), SEPARATOR, dtype=np.float32)
    first = manifest.groupby("subject", sort=True)["session"].first()
    rows = list(first.items())[:max_rows]
    n_cols = int(min(max_cols, manifest["n_slices"].max()))
    targets = np.linspace(0.0, 1.0, n_cols)
    h, w = images.shape[-2:]
    grid = np.full(
        (len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad), SEPARATOR, dtype=np.float32
    )
    for r, (subject, session) in enumerate(rows):
        case = manifest[(manifest["subject"] == subject) & (manifest["session"] == session)]
        z = case["z"].to_numpy()
        for c, target in enumerate(targets):
            index = case.index[int(np.argmin(np.abs(z - target)))]
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            grid[top : top + h, left : left + w] = images[index, 0]
    return grid
