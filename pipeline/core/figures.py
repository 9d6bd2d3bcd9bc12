"""Image grids people look at: reconstructions and samples with one row per z level."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from skimage.util import montage

from pipeline.core.io import atomic_write
from pipeline.core.tracking import to_uint8_image


def grid(images: torch.Tensor, ncol: int, pad: int = 2) -> np.ndarray:
    """Tile images row by row.

    Args:
        images: (N, 1, H, W) intensities in [0, 1]; a short last row is filled grey.
        ncol: images per row.
        pad: grey (0.5) separator and border width in pixels.

    Returns:
        (H', W') float array in [0, 1].
    """
    tiles = images.detach().float().cpu().clamp(0, 1)[:, 0].numpy()
    nrow = math.ceil(len(tiles) / ncol)
    return montage(tiles, grid_shape=(nrow, ncol), padding_width=pad, fill=0.5)


def rows_by_z(rows: list[torch.Tensor], z: torch.Tensor) -> np.ndarray:
    """Grid whose row i shows, side by side, ``rows[j][i]`` for every j, rows sorted by z.

    Used for "real | reconstruction" comparisons and for samples per z level.

    Args:
        rows: tensors of the same shape (N, 1, H, W) in [0, 1] (e.g. ``[real, recon]``).
        z: (N,) slice positions in [0, 1]; the grid's rows go from low z (top) to high z.

    Returns:
        (N*(H+pad), len(rows)*(W+pad)) float array in [0, 1].
    """
    order = torch.argsort(z.detach().cpu())
    stacked = torch.stack([r.detach().cpu()[order] for r in rows], dim=1)  # (N, R, 1, H, W)
    return grid(stacked.flatten(0, 1), ncol=len(rows))


def figure_image(fig: Figure) -> np.ndarray:
    """Render a matplotlib figure (Agg canvas, no pyplot state) to a (H, W, 3) uint8 array."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Save a (H, W) or (H, W, 3) array (values in [0, 1], or uint8) as a PNG, atomically."""
    arr = np.asarray(image)
    pil = Image.fromarray(arr if arr.dtype == np.uint8 else to_uint8_image(arr))
    return atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))
