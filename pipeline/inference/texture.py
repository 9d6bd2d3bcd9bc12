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
- :func:`residual_texture` models everything a first stage's mean decode misses, not only the
  scan noise: the residual ``real - reconstruction`` inside the brain, as a stationary Gaussian
  field with the residual's measured autocorrelation (lags up to ``RESIDUAL_RADIUS`` px; the
  filter :func:`kernel_from_autocorrelation` turns white noise into it), whose std and mean are
  looked up in a table over the decoded intensity and the local gradient (the decoder misses
  most at edges and in grey matter: 0.022 in flat white matter, 0.064 at dark edges on the
  demo VAE-GAN). :func:`add_residual` draws it on decoded slices. It replaces the scan noise
  where it is calibrated: the residual is coarser than scan noise (lag-1 autocorrelation 0.22,
  and a ring at 3-4 px where sulci are missed) and 2.2 times its std, and a judge reading the
  raw pixels told the VAE-GAN's reconstructions from real slices at AUC 0.900 with the scan
  noise (plus a posterior decode) and 0.731 with the residual texture (docs/realism_log.md,
  "A texture model of what the decoder misses"). Written here because no library models a
  decoder's residual; the autocorrelation is estimated over masked pairs of brain pixels,
  which an FFT of the whole slice cannot do.
- :func:`soft_top` keeps finished slices below 1: real slices are windowed at a percentile and
  almost never reach 1 (0.000 % of brain pixels >= 0.999 in the demo's training split), while
  noise clamped at 1 left 0.3-0.7 % there, a plateau a judge reads.
- :func:`finish` clears the background, then adds the residual texture (or, for a first stage
  calibrated before it, the scan noise): what ``generate`` writes.

The calibration (:class:`Texture`) is written by ``encode_latents`` into the latents'
``meta.json`` (``texture_sigma``, ``background_floor``, ``texture_residual``), copied into
each generator's model file and recorded per slice in the ``generate`` manifest
(``texture_sigma``, ``background_floor``, ``texture_residual_std``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
#: Largest lag (px) of the residual's autocorrelation; its filter is (2r+1, 2r+1).
RESIDUAL_RADIUS = 4
#: Quantile bins of the decoded intensity and of the gradient magnitude in the residual's table.
RESIDUAL_BINS = 5
#: Size of the periodic grid the residual's autocorrelation is factorised on (px).
_SPECTRUM_GRID = 64
#: Above this intensity :func:`soft_top` compresses values smoothly towards 1.
SOFT_TOP_KNEE = 0.95


def _table(rows: Any) -> tuple[tuple[float, ...], ...]:
    """A 2-D table (nested lists or a 2-D tensor) as a tuple of tuples of floats."""
    return tuple(tuple(float(v) for v in row) for row in rows)


class Residual(NamedTuple):
    """What a first stage's mean decode misses, as a texture model (:func:`residual_texture`).

    Attributes:
        kernel: (2r+1, 2r+1) filter: white noise of unit variance filtered by it has unit
            variance and the residual's autocorrelation up to lag r.
        intensity_edges: (bins-1,) inner edges of the decoded-intensity bins (intensity units).
        gradient_edges: (bins-1,) inner edges of the gradient-magnitude bins (intensity / px,
            :func:`gradient_magnitude`).
        std: (bins, bins) residual std per (intensity bin, gradient bin), intensity units.
        mean: (bins, bins) residual mean per bin: what the decode is too dark (> 0) by there.
    """

    kernel: tuple[tuple[float, ...], ...]
    intensity_edges: tuple[float, ...]
    gradient_edges: tuple[float, ...]
    std: tuple[tuple[float, ...], ...]
    mean: tuple[tuple[float, ...], ...]

    @classmethod
    def from_meta(cls, meta: dict[str, Any] | None) -> Residual | None:
        """The model stored by :meth:`as_meta` (None for None)."""
        if not meta:
            return None
        return cls(
            _table(meta["kernel"]),
            tuple(float(v) for v in meta["intensity_edges"]),
            tuple(float(v) for v in meta["gradient_edges"]),
            _table(meta["std"]),
            _table(meta["mean"]),
        )

    def as_meta(self) -> dict[str, Any]:
        """JSON-ready lists, the keys :meth:`from_meta` reads."""
        return {
            k: [list(r) if isinstance(r, tuple) else r for r in v]
            for k, v in self._asdict().items()
        }

    @property
    def mean_std(self) -> float:
        """The table's mean std (intensity units): one figure for the manifest."""
        return float(np.mean(self.std))


class Texture(NamedTuple):
    """How decoded slices are finished to look like real ones, calibrated on training slices.

    Attributes:
        sigma: scan-noise std the first stage removes (intensity units, >= 0).
        background_floor: decoded intensities below it are background and become 0 (>= 0).
        residual: the texture model of what the first stage misses (None: not calibrated,
            a file made before it was; the scan noise is added instead).
    """

    sigma: float = 0.0
    background_floor: float = 0.0
    residual: Residual | None = None

    @property
    def is_identity(self) -> bool:
        """True when :func:`finish` returns its input unchanged."""
        return not (self.sigma or self.background_floor or self.residual)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Texture:
        """The calibration stored in a latents ``meta.json`` or a model file's metadata
        (0 or None for a key a file made before it was calibrated lacks)."""
        return cls(
            float(meta.get("texture_sigma") or 0.0),
            float(meta.get("background_floor") or 0.0),
            Residual.from_meta(meta.get("texture_residual")),
        )

    def as_meta(self) -> dict[str, Any]:
        """The metadata keys :meth:`from_meta` reads."""
        return {
            "texture_sigma": self.sigma,
            "background_floor": self.background_floor,
            "texture_residual": None if self.residual is None else self.residual.as_meta(),
        }

    def summary(self) -> dict[str, float]:
        """Three figures per slice for the ``generate`` manifest and ``metrics.json``: the
        scan-noise sigma, the background floor and the residual texture's mean std (0 if none)."""
        return {
            "texture_sigma": self.sigma,
            "background_floor": self.background_floor,
            "texture_residual_std": 0.0 if self.residual is None else self.residual.mean_std,
        }


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


def gradient_magnitude(images: torch.Tensor) -> torch.Tensor:
    """Central-difference gradient magnitude, 0 on the border row and column.

    Args:
        images: (N, 1, H, W) slices.

    Returns:
        (N, 1, H, W) ``sqrt(dx^2 + dy^2)`` with ``dx = x[i, j+1] - x[i, j-1]`` (intensity per
        2 px).
    """
    dx = images[..., 1:-1, 2:] - images[..., 1:-1, :-2]
    dy = images[..., 2:, 1:-1] - images[..., :-2, 1:-1]
    return F.pad((dx**2 + dy**2).sqrt(), (1, 1, 1, 1))


def masked_autocorrelation(residual: torch.Tensor, mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Autocorrelation of ``residual`` over pairs of pixels both in ``mask``.

    Args:
        residual: (N, 1, H, W) residuals.
        mask: (N, 1, H, W) bool, the pixels that count.
        radius: largest lag in px (< H and W).

    Returns:
        (2r+1, 2r+1) float64, 1 at lag 0 (0 everywhere if the mask is empty or constant).
    """
    values = residual[mask].double()
    if values.numel() < 2 or float(values.var()) == 0:
        return torch.zeros(2 * radius + 1, 2 * radius + 1, dtype=torch.float64)
    centred = torch.where(mask, residual.double() - values.mean(), 0.0)
    h, w = residual.shape[-2:]
    out = torch.zeros(2 * radius + 1, 2 * radius + 1, dtype=torch.float64)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            ya, yb = slice(max(0, dy), h + min(0, dy)), slice(max(0, -dy), h + min(0, -dy))
            xa, xb = slice(max(0, dx), w + min(0, dx)), slice(max(0, -dx), w + min(0, -dx))
            pairs = mask[..., ya, xa] & mask[..., yb, xb]
            out[dy + radius, dx + radius] = (centred[..., ya, xa] * centred[..., yb, xb])[
                pairs
            ].mean()
    return out / out[radius, radius]


def kernel_from_autocorrelation(acf: torch.Tensor, grid: int = _SPECTRUM_GRID) -> torch.Tensor:
    """A zero-phase filter whose output on unit white noise has autocorrelation ``acf``.

    The autocorrelation is placed on a periodic ``grid``, its spectrum (the power spectrum)
    clipped at 0 where the truncation made it negative, and the filter is the inverse
    transform of the spectrum's square root, cropped to the autocorrelation's size and scaled
    to unit energy (so the output has unit variance).

    Args:
        acf: (2r+1, 2r+1) autocorrelation, symmetric, 1 at the centre.
        grid: size of the periodic grid (> 2r+1).

    Returns:
        (2r+1, 2r+1) float32 kernel.
    """
    r = acf.shape[-1] // 2
    lags = torch.arange(-r, r + 1)
    periodic = torch.zeros(grid, grid, dtype=torch.float64)
    periodic[(lags % grid)[:, None], (lags % grid)[None, :]] = acf.double()
    power = torch.fft.fft2(periodic).real.clamp(min=0)
    kernel = torch.fft.fftshift(torch.fft.ifft2(power.sqrt()).real)
    c = grid // 2
    kernel = kernel[c - r : c + r + 1, c - r : c + r + 1]
    return (kernel / kernel.square().sum().sqrt()).float()


def _bins(
    images: torch.Tensor,
    intensity_edges: Sequence[float] | torch.Tensor,
    gradient_edges: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """(N, 1, H, W) long: each pixel's flat index into the (bins, bins) tables of a
    :class:`Residual` with these inner bin edges (row: intensity, column: gradient)."""
    intensity = torch.as_tensor(intensity_edges, dtype=images.dtype, device=images.device)
    gradient = torch.as_tensor(gradient_edges, dtype=images.dtype, device=images.device)
    row = torch.bucketize(images.contiguous(), intensity)
    col = torch.bucketize(gradient_magnitude(images).contiguous(), gradient)
    return row * (len(intensity) + 1) + col


def residual_texture(
    real: torch.Tensor,
    reconstructed: torch.Tensor,
    *,
    bins: int = RESIDUAL_BINS,
    radius: int = RESIDUAL_RADIUS,
) -> Residual | None:
    """Calibrate the texture model of what a first stage misses (:class:`Residual`).

    Args:
        real: (N, 1, H, W) real training slices in [0, 1], background 0, H, W > 2r+1.
        reconstructed: (N, 1, H, W) their mean-decoded reconstructions, clamped to [0, 1].
        bins: quantile bins of the decoded intensity and of the gradient magnitude.
        radius: largest lag of the autocorrelation (px).

    Returns:
        The model over the interior brain pixels (foreground with a foreground 3x3
        neighbourhood); None with fewer than ``bins * bins * 10`` of them.
    """
    inside = F.pad(_interior(real), (1, 1, 1, 1))
    if int(inside.sum()) < bins * bins * 10:
        return None
    residual = (real - reconstructed).float()
    kernel = kernel_from_autocorrelation(masked_autocorrelation(residual, inside, radius))
    intensity, gradient = reconstructed[inside].float(), gradient_magnitude(reconstructed)[inside]
    # quantile edges from at most _QUANTILE_PIXELS evenly spaced pixels (torch.quantile's limit)
    step = max(1, intensity.numel() // _QUANTILE_PIXELS)
    inner = torch.linspace(0, 1, bins + 1, dtype=torch.float32)[1:-1]
    intensity_edges = torch.quantile(intensity[::step], inner)
    gradient_edges = torch.quantile(gradient[::step].float(), inner)
    flat = _bins(reconstructed.float(), intensity_edges, gradient_edges)[inside]
    values = residual[inside].double()
    count = torch.bincount(flat, minlength=bins * bins).double().clamp(min=1)
    mean = torch.bincount(flat, values, minlength=bins * bins) / count
    std = (
        (torch.bincount(flat, values.square(), minlength=bins * bins) / count - mean**2)
        .clamp(min=0)
        .sqrt()
    )
    return Residual(
        _table(kernel),
        tuple(float(v) for v in intensity_edges),
        tuple(float(v) for v in gradient_edges),
        _table(std.view(bins, bins)),
        _table(mean.view(bins, bins)),
    )


def soft_top(images: torch.Tensor, knee: float = SOFT_TOP_KNEE) -> torch.Tensor:
    """Values above ``knee`` compressed smoothly below 1: ``knee + (1 - knee) tanh((x - knee) /
    (1 - knee))`` (slope 1 at the knee, so the map is continuous and increasing); others kept.

    Args:
        images: a tensor of intensities.
        knee: in (0, 1).

    Returns:
        Same shape; below 1 for every input below ``1 + 7 (1 - knee)`` (1.35 at the default;
        float32 rounds the tanh to 1 beyond), which noise on a decoded slice never reaches.
    """
    top = knee + (1 - knee) * torch.tanh((images - knee) / (1 - knee))
    return torch.where(images > knee, top, images)


def add_residual(
    images: torch.Tensor, residual: Residual, generator: torch.Generator
) -> torch.Tensor:
    """The residual texture drawn on the foreground of decoded slices.

    Args:
        images: (N, 1, H, W) mean-decoded slices in [0, 1], background cleared.
        residual: :func:`residual_texture` of the first stage that decoded them.
        generator: a seeded CPU generator (the draws do not depend on the device).

    Returns:
        (N, 1, H, W): where ``x > FOREGROUND``, :func:`soft_top` of ``max(x + mean[b] + std[b]
        * (kernel * w), 0)`` with ``b`` each pixel's (intensity, gradient) bin and ``w`` white
        noise; ``x`` elsewhere.
    """
    kernel = torch.tensor(residual.kernel)
    r = kernel.shape[-1] // 2
    n, _, h, w = images.shape
    white = torch.randn((n, 1, h + 2 * r, w + 2 * r), generator=generator)
    field = F.conv2d(white, kernel.view(1, 1, *kernel.shape)).to(images.device, images.dtype)
    index = _bins(images, residual.intensity_edges, residual.gradient_edges)
    std = torch.tensor(residual.std, dtype=images.dtype, device=images.device).flatten()[index]
    mean = torch.tensor(residual.mean, dtype=images.dtype, device=images.device).flatten()[index]
    textured = soft_top((images + mean + std * field).clamp(min=0))
    return torch.where(images > FOREGROUND, textured, images)


def finish(images: torch.Tensor, texture: Texture, generator: torch.Generator) -> torch.Tensor:
    """Decoded slices as ``generate`` writes them: background cleared, then the residual
    texture added (the scan noise where the first stage has no residual calibration).

    Args:
        images: (N, 1, H, W) decoded slices in [0, 1].
        texture: the first stage's calibration.
        generator: a seeded CPU generator for the noise.

    Returns:
        (N, 1, H, W) :func:`add_residual` (or :func:`add_scan_noise`) of
        :func:`clear_background`.
    """
    cleared = clear_background(images, texture.background_floor)
    if texture.residual is not None:
        return add_residual(cleared, texture.residual, generator)
    return add_scan_noise(cleared, texture.sigma, generator)
