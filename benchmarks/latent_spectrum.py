"""How image-like the LDM's latent is: its spatial power spectrum beside the slices'.

A diffusion model decides coarse structure at high noise and fine detail at low noise. That
order works when the data's power falls with spatial frequency, as an image's does. A first
stage whose latent is close to white noise in space leaves the early steps nothing coarse to
decide, and every latent pixel's value has to be right on its own (Skorokhodov et al. 2025,
"Improving the diffusability of autoencoders"; docs/realism_log.md, "A latent the LDM can
model"). This
prints two figures for the training latents and, as the reference, for the training slices
average-pooled to the latent's size:

- the share of the power above half the Nyquist frequency (radius > 0.25 cycles per pixel),
  after the mean over slices is removed: white noise 1 - pi / 16 = 0.80, an image far less;
- the correlation of vertically neighbouring pixels (white noise 0).

Written by hand: two numpy FFT lines and a mean, which no library packages for this use.

Usage::

    python -m benchmarks.latent_spectrum [--latents data/latents/vaegan/train]
        [--slices data/prepared/train]

Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.core.errors import InputError
from pipeline.core.stage import main as run_command

#: Radius in cycles per pixel above which power counts as high-frequency (half of Nyquist).
HIGH_FREQUENCY = 0.25


@dataclass(frozen=True)
class Spectrum:
    """Spatial statistics of a set of maps.

    Attributes:
        high_frequency_share: share of the power (mean over slices removed) at radius >
            ``HIGH_FREQUENCY`` cycles per pixel, in [0, 1]; white noise 0.80.
        neighbour_correlation: correlation of vertically neighbouring pixels, in [-1, 1].
    """

    high_frequency_share: float
    neighbour_correlation: float


def spectrum(maps: np.ndarray) -> Spectrum:
    """:class:`Spectrum` of ``maps``.

    Args:
        maps: (N, C, h, w) latents or slices; each channel counts as a map.

    Returns:
        The figures over every map, after the mean over the N slices is removed (what every
        slice shares, e.g. a template, is not what a generator has to draw).

    Raises:
        InputError: not 4-D, fewer than two slices, or constant.
    """
    if maps.ndim != 4 or len(maps) < 2:
        raise InputError(f"maps must be (N >= 2, C, h, w); got {maps.shape}")
    x = maps.astype(np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    if not x.any():
        raise InputError("the maps do not vary over slices")
    power = (np.abs(np.fft.fft2(x)) ** 2).mean(axis=(0, 1))
    fy, fx = np.fft.fftfreq(x.shape[-2]), np.fft.fftfreq(x.shape[-1])
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    share = power[radius > HIGH_FREQUENCY].sum() / power.sum()
    corr = np.corrcoef(x[..., 1:, :].ravel(), x[..., :-1, :].ravel())[0, 1]
    return Spectrum(float(share), float(corr))


def pooled(slices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Slices average-pooled to a latent's spatial size.

    Args:
        slices: (N, 1, H, W) or (N, H, W) intensities.
        size: (h, w) with H and W multiples of h and w.

    Returns:
        (N, 1, h, w).

    Raises:
        InputError: H or W is not a multiple of the size.
    """
    x = slices[:, None] if slices.ndim == 3 else slices
    n, c, height, width = x.shape
    h, w = size
    if height % h or width % w:
        raise InputError(f"slices of {height}x{width} do not pool to {h}x{w}")
    return x.reshape(n, c, h, height // h, w, width // w).mean(axis=(3, 5))


def main() -> None:
    """Command line: print the spectrum of the latents and of the pooled slices."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latent_spectrum")
    parser.add_argument("--latents", type=Path, default=Path("data/latents/vaegan/train"))
    parser.add_argument("--slices", type=Path, default=Path("data/prepared/train"))
    args = parser.parse_args()
    for folder, name in ((args.latents, "latents.npy"), (args.slices, "slices.npy")):
        if not (folder / name).is_file():
            raise InputError(f"{folder / name} not found: run dvc repro first")
    latents = np.load(args.latents / "latents.npy")
    images = pooled(np.load(args.slices / "slices.npy", mmap_mode="r"), latents.shape[-2:])
    table = Table(title="Spatial spectrum (mean over slices removed)")
    for column in ("maps", "power above half Nyquist", "neighbour correlation"):
        table.add_column(column)
    table.add_row("white noise", "0.80", "0.00")
    for label, maps in ((f"latents {latents.shape[1:]}", latents), ("slices pooled", images)):
        s = spectrum(maps)
        table.add_row(label, f"{s.high_frequency_share:.3f}", f"{s.neighbour_correlation:.3f}")
    Console().print(table)


if __name__ == "__main__":
    run_command(main)
