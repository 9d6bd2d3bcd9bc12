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
  background of skull-stripped slices untouched.
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


def add_scan_noise(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Rician noise of level ``sigma`` on the foreground of decoded slices.

    Args:
        images: (N, 1, H, W) decoded slices in [0, 1].
        sigma: Gaussian std of each channel of the complex signal (>= 0; 0 returns a copy).
        generator: a seeded CPU generator (the draws do not depend on the device).

    Returns:
        (N, 1, H, W) ``clamp(|x + sigma (n1 + i n2)|, 0, 1)`` where ``x > FOREGROUND``,
        ``x`` elsewhere.
    """
    if sigma < 0 or not math.isfinite(sigma):
        raise InputError(f"texture sigma must be a finite number >= 0; got {sigma}")
    if sigma == 0:
        return images.clone()
    noise = torch.randn((2, *images.shape), generator=generator).to(images.device, images.dtype)
    noisy = torch.sqrt((images + sigma * noise[0]) ** 2 + (sigma * noise[1]) ** 2).clamp(0, 1)
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
