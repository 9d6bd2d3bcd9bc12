"""Texture: measure what the first stage gets wrong about real slices, and fix it on decoded ones.

Every real MR slice carries acquisition noise (Rician in magnitude images); the autoencoders
reconstruct a denoised slice, so even their reconstructions are told from real slices by a
classifier at AUC 0.999 on texture alone (issue 15). This module calibrates the missing noise
on the training slices and adds it to generated slices:

- :func:`noise_sigma` estimates the noise standard deviation inside the brain with
  Immerkær's fast estimator (1996): the image convolved with the Laplacian-difference kernel
  ``[[1,-2,1],[-2,4,-2],[1,-2,1]]`` cancels smooth structure, and
  ``sigma = sqrt(pi/2) / 6 * mean|response|`` over interior brain pixels. Written here because
  scikit-image's wavelet estimator needs PyWavelets (not a dependency) and cannot be restricted
  to a mask; zero background would bias it low.
- :func:`missing_sigma` is the noise the first stage removes: ``sqrt(max(s_real^2 - s_recon^2,
  0))`` from the same estimator on real training slices and on their reconstructions.
- :func:`add_scan_noise` adds Rician noise of that level inside the foreground (magnitude of a
  complex signal with Gaussian noise of std ``sigma`` in each channel), leaving the zero
  background of skull-stripped slices untouched. It keeps each pixel's mean: a decoder
  trained on real magnitude images already outputs their mean, Rician bias included, so the
  signal put under the noise is :func:`rician_signal` of the decoded value, not the value
  itself. Adding the noise to the value counted the bias twice in dark tissue (CSF), and a
  judge saw it through the 1-px blur: on the demo VQ-VAE's reconstructions the blurred judge
  read 0.914 with the biased noise, 0.679 with mean-keeping noise and 0.674 with none
  (docs/realism_log.md, "Scan noise that keeps the mean").
- :func:`background_floor` is the haze a decoder leaves where real slices are exactly 0 (the
  background of skull-stripped slices): the ``quantile`` of the reconstructions' intensities
  over the real background pixels. The demo's VQ-VAE leaves 0.03 there, and a judge that
  sees both sides blurred tells its reconstructions from real slices at AUC 1.00 on that
  alone; cleared, 0.53 (issue 15). :func:`clear_background` sets the pixels below it to 0.
- :func:`finish` does both, in that order: what ``generate`` writes.

The calibration (:class:`Texture`) is written by ``encode_latents`` into the latents'
``meta.json`` (``texture_sigma``, ``background_floor``), copied into each generator's model
file and recorded per slice in the ``generate`` manifest.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import InputError

#: Immerkær's noise-estimation kernel (3x3 Laplacian difference).
_KERNEL = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
#: Intensity above which a pixel is foreground (prepared slices are in [0, 1], background 0).
FOREGROUND = 0.02
#: Quantile of the decoded real-background intensities that :func:`background_floor` returns.
BACKGROUND_QUANTILE = 0.99
#: At most this many background pixels enter the quantile (torch.quantile's input limit is 2^24).
_QUANTILE_PIXELS = 1_000_000


class Texture(NamedTuple):
    """How decoded slices are finished to look like real ones, calibrated on training slices.

    Attributes:
        sigma: scan-noise std the first stage removes (intensity units, >= 0).
        background_floor: decoded intensities below it are background and become 0 (>= 0).
    """

    sigma: float = 0.0
    background_floor: float = 0.0

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Texture:
        """The calibration stored in a latents ``meta.json`` or a model file's metadata
        (0 for a key a file made before it was calibrated lacks)."""
        return cls(
            float(meta.get("texture_sigma") or 0.0), float(meta.get("background_floor") or 0.0)
        )

    def as_meta(self) -> dict[str, float]:
        """The metadata keys :meth:`from_meta` reads."""
        return {"texture_sigma": self.sigma, "background_floor": self.background_floor}


def _interior(images: torch.Tensor) -> torch.Tensor:
    """Foreground pixels whose whole 3x3 neighbourhood is foreground, (N, 1, H-2, W-2) bool."""
    fg = (images > FOREGROUND).float()
    return F.avg_pool2d(fg, 3, stride=1) > 0.999


def noise_sigma(images: torch.Tensor) -> float:
    """Noise standard deviation inside the brain (Immerkær 1996), in intensity units.

    Args:
        images: (N, 1, H, W) slices in [0, 1], background 0, H and W >= 3.

    Returns:
        The estimate over every interior foreground pixel of every slice (0.0 if none).

    Raises:
        InputError: not a (N, 1, H, W) batch with H, W >= 3.
    """
    if images.ndim != 4 or images.shape[1] != 1 or min(images.shape[-2:]) < 3:
        raise InputError(f"expected (N, 1, H>=3, W>=3) slices; got shape {tuple(images.shape)}")
    x = images.float()
    response = F.conv2d(x, _KERNEL.to(x.device).view(1, 1, 3, 3)).abs()
    inside = _interior(x)
    if not bool(inside.any()):
        return 0.0
    return float(math.sqrt(math.pi / 2) / 6 * response[inside].mean())


def missing_sigma(real: torch.Tensor, reconstructed: torch.Tensor) -> float:
    """The noise a first stage removes: ``sqrt(max(s_real^2 - s_recon^2, 0))``.

    Args:
        real: (N, 1, H, W) real slices in [0, 1].
        reconstructed: (N, 1, H, W) their reconstructions.

    Returns:
        Standard deviation in intensity units (0.0 when the reconstructions are no smoother).
    """
    return math.sqrt(max(noise_sigma(real) ** 2 - noise_sigma(reconstructed) ** 2, 0.0))


def rician_mean(nu: torch.Tensor) -> torch.Tensor:
    """``E|nu + n1 + i n2|`` for standard normal ``n1, n2`` (the Rice distribution's mean at
    unit noise): ``sqrt(pi/2) L_1/2(-nu^2 / 2)``, written with exponentially scaled Bessel
    functions so it stays finite for large ``nu`` (any shape, float64 advised)."""
    x = nu**2 / 2
    return math.sqrt(math.pi / 2) * (
        (1 + x) * torch.special.i0e(x / 2) + x * torch.special.i1e(x / 2)
    )


#: Signal-to-noise ratios of the table :func:`rician_signal` inverts (beyond it the mean's
#: bias is below 0.02 %).
_NU_MAX = 60.0
_NU_TABLE = np.linspace(0.0, _NU_MAX, 12001)
_MEAN_TABLE = rician_mean(torch.from_numpy(_NU_TABLE)).numpy()


def rician_signal(mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """The signal whose Rician magnitude at noise ``sigma`` has expectation ``mean``.

    Args:
        mean: intensities >= 0 (any shape and device).
        sigma: noise std of each channel (> 0).

    Returns:
        Same shape, dtype and device: the inverse of :func:`rician_mean` (scaled by
        ``sigma``), by interpolation on a table; 0 where ``mean`` is below the noise floor
        ``sigma sqrt(pi/2)``, ``mean`` itself above ``_NU_MAX sigma`` (bias < 0.02 %).
    """
    ratio = (mean.detach().double() / sigma).cpu().numpy()
    nu = np.interp(ratio, _MEAN_TABLE, _NU_TABLE)
    nu = np.where(ratio > _MEAN_TABLE[-1], ratio, nu)
    return torch.from_numpy(nu * sigma).to(mean.device, mean.dtype)


def add_scan_noise(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Rician noise of level ``sigma`` on the foreground of decoded slices, keeping the mean.

    Args:
        images: (N, 1, H, W) decoded slices in [0, 1] (each pixel the mean of a magnitude
            image, as a decoder trained on them outputs).
        sigma: Gaussian std of each channel of the complex signal (>= 0; 0 returns a copy).
        generator: a seeded CPU generator (the draws do not depend on the device).

    Returns:
        (N, 1, H, W) ``clamp(|s + sigma (n1 + i n2)|, 0, 1)`` with ``s =``
        :func:`rician_signal` ``(x, sigma)`` (so its expectation is ``x`` wherever ``x`` is
        above the noise floor) where ``x > FOREGROUND``, ``x`` elsewhere.
    """
    if sigma < 0 or not math.isfinite(sigma):
        raise InputError(f"texture sigma must be a finite number >= 0; got {sigma}")
    if sigma == 0:
        return images.clone()
    signal = rician_signal(images, sigma)
    noise = torch.randn((2, *images.shape), generator=generator).to(images.device, images.dtype)
    noisy = torch.sqrt((signal + sigma * noise[0]) ** 2 + (sigma * noise[1]) ** 2).clamp(0, 1)
    return torch.where(images > FOREGROUND, noisy, images)


def background_floor(
    real: torch.Tensor, reconstructed: torch.Tensor, quantile: float = BACKGROUND_QUANTILE
) -> float:
    """The haze a first stage decodes where real slices are background.

    Args:
        real: (N, 1, H, W) real slices in [0, 1], background exactly 0.
        reconstructed: (N, 1, H, W) their reconstructions, clamped to [0, 1].
        quantile: which quantile of the reconstructed background intensities to return.

    Returns:
        The ``quantile`` of ``reconstructed`` over the pixels where ``real == 0`` (at most
        1e6 of them, drawn with a fixed seed), in intensity units; 0.0 without background.
    """
    values = reconstructed[real == 0].float()
    if values.numel() == 0:
        return 0.0
    if values.numel() > _QUANTILE_PIXELS:
        pick = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))
        values = values[pick[:_QUANTILE_PIXELS]]
    return max(float(torch.quantile(values, quantile)), 0.0)


def clear_background(images: torch.Tensor, floor: float) -> torch.Tensor:
    """Decoded slices with every pixel below ``floor`` set to 0 (the others unchanged).

    Args:
        images: (N, 1, H, W) decoded slices.
        floor: :func:`background_floor` (0 returns a copy).

    Returns:
        (N, 1, H, W), same dtype and device.
    """
    return images.masked_fill(images < floor, 0.0)


def finish(images: torch.Tensor, texture: Texture, generator: torch.Generator) -> torch.Tensor:
    """Decoded slices as ``generate`` writes them: background cleared, then scan noise added.

    Args:
        images: (N, 1, H, W) decoded slices in [0, 1].
        texture: the first stage's calibration.
        generator: a seeded CPU generator for the noise.

    Returns:
        (N, 1, H, W) :func:`add_scan_noise` of :func:`clear_background`.
    """
    return add_scan_noise(
        clear_background(images, texture.background_floor), texture.sigma, generator
    )
