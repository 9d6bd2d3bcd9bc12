"""The first-stage codec: the stage-1 / stage-2 contract of every second stage.

One object owns how slices become what a second stage models and back, and the latent
``scale_factor`` (Rombach et al. 2022: latents are multiplied by 1 / std of the training
latents so the diffusion model sees unit variance), as MONAI's ``LatentDiffusionInferer``
does with ``encode_stage_2_inputs`` / ``decode_stage_2_outputs``. No other module applies
the scale factor.

What a second stage models:

- the LDM: the *scaled* latent :meth:`LatentCodec.encode_stage_2_inputs` returns, i.e.
  ``Autoencoder.encode_to_latent`` (the VAE-GAN's posterior mean; for a VQ-VAE the quantised
  latent, the one its decoder was trained on) times ``scale_factor``; or, with
  ``ldm.posterior_samples``, a fresh posterior sample around it at every training step
  (:meth:`LatentCodec.encode_stage_2_posterior` gives the mean and std), as Rombach et
  al.'s LDM trains;
- the PixelCNN: the VQ code grid :meth:`LatentCodec.encode_codes` returns.

What comes back: the VAE-GAN's decoder was trained on posterior *samples* (mean + std ·
noise), but an LDM trained on posterior means also samples means, which are off the decoder's
training distribution and decode without the one-pixel structure of real slices (issue 15).
Given a ``generator``, :meth:`LatentCodec.decode_stage_2_outputs` decodes a posterior sample
around the latent instead: Gaussian noise of ``posterior_std`` is added first (the
posterior's std in the scaled space: the RMS over every training latent element that the
``encode_latents`` stage records, times ``ldm.decode_posterior_std``). On the demo stand-in
this took the LDM's raw two-sample judge from 0.88 to 0.61 and fd_alex from 10.3 to 7.6 at
an unchanged pixel noise level (docs/realism_log.md, "Decoding a posterior sample, not the mean"; judged
by 600-step judges). A VQ-VAE's decoder sees the quantised latent itself, so its
``posterior_std`` is 0.

Where that noise goes: the VAE-GAN's posterior is far from isotropic. Its encoder writes a
sparse code: elements of large magnitude carry the slice and are tight (std about 0.12 in
scaled units where |mean| > 1), the rest sit near the prior (std about 0.85 where |mean| <
0.3). Noise of one RMS std everywhere puts four times too much of it on the elements that
carry the anatomy, and their decodes turn mottled at the 4-8 px scale of a latent pixel.
With a :class:`StdCurve` (the posterior's std as a function of the latent's magnitude,
fitted on the training latents by ``encode_latents``) the codec draws each element's noise
at the std the posterior has at that magnitude (``ldm.decode_noise: by_magnitude``;
docs/realism_log.md, "Decode noise where the posterior has it").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.errors import InputError
from pipeline.models.autoencoder import Autoencoder


@dataclass(frozen=True)
class StdCurve:
    """A posterior's std as a piecewise-linear function of the latent's magnitude.

    Written by hand: it is a lookup table (``numpy.interp``) with its fit and its JSON form.

    Attributes:
        magnitude: (K,) increasing knots of |latent|, scaled units.
        std: (K,) the posterior's std at each knot, scaled units, >= 0. Below the first knot
            and above the last the end values hold.
    """

    magnitude: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        knots, stds = np.asarray(self.magnitude, float), np.asarray(self.std, float)
        if knots.ndim != 1 or len(knots) == 0 or knots.shape != stds.shape:
            raise InputError(
                f"a std curve needs as many stds as knots (>= 1), got {len(knots)} and {len(stds)}"
            )
        if not (np.isfinite(knots).all() and np.isfinite(stds).all() and (stds >= 0).all()):
            raise InputError("a std curve's knots and stds must be finite, stds >= 0")
        if (np.diff(knots) <= 0).any():
            raise InputError("a std curve's knots must increase")

    @classmethod
    def fit(cls, latents: np.ndarray, stds: np.ndarray, knots: int = 32) -> StdCurve:
        """The RMS posterior std in each of ``knots`` equal-count bins of |latent|, placed at
        the bin's median magnitude.

        Args:
            latents: (N, C, h, w) posterior means, scaled units.
            stds: their posterior stds, the same shape and units.
            knots: number of bins (fewer where magnitudes repeat).

        Raises:
            InputError: shapes differ or there are no latents.
        """
        magnitude = np.abs(np.asarray(latents, np.float64)).ravel()
        std = np.asarray(stds, np.float64).ravel()
        if magnitude.shape != std.shape or magnitude.size == 0:
            raise InputError(f"latents and stds differ in size: {latents.shape}, {stds.shape}")
        order = np.argsort(magnitude, kind="stable")
        points = [
            (float(np.median(magnitude[part])), float(np.sqrt(np.mean(std[part] ** 2))))
            for part in np.array_split(order, min(knots, magnitude.size))
        ]
        kept = [p for i, p in enumerate(points) if i == 0 or p[0] > points[i - 1][0]]
        return cls(tuple(k for k, _ in kept), tuple(s for _, s in kept))

    def __call__(self, latent: torch.Tensor) -> torch.Tensor:
        """The std at each element of ``latent`` (any shape), on the CPU, float32."""
        magnitude = latent.detach().abs().float().cpu().numpy()
        return torch.from_numpy(np.interp(magnitude, self.magnitude, self.std).astype("f4"))

    def scaled(self, factor: float) -> StdCurve:
        """The same curve with every std times ``factor`` (``ldm.decode_posterior_std``)."""
        return StdCurve(self.magnitude, tuple(s * factor for s in self.std))

    def as_meta(self) -> dict[str, list[float]]:
        """JSON form (latents' ``meta.json``, the LDM file's metadata)."""
        return {"magnitude": list(self.magnitude), "std": list(self.std)}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Sequence[float]] | None) -> StdCurve | None:
        """Inverse of :meth:`as_meta`; None for None (files made before the curve)."""
        if meta is None:
            return None
        return cls(tuple(float(k) for k in meta["magnitude"]), tuple(float(s) for s in meta["std"]))


@dataclass
class LatentCodec:
    """A trained autoencoder with the scale factor of the latents a second stage sees.

    Args:
        autoencoder: the first stage, in eval mode.
        scale_factor: > 0; the factor stage-2 latents carry (1.0 before it is known).
        posterior_std: >= 0; the std of the noise a posterior-sample decode adds, in scaled
            latent units (0: decode the latent itself, as for a VQ-VAE or a model file made
            before it was calibrated). With ``std_curve`` it is the noise's RMS over the
            training latents, as recorded.
        std_curve: draw each element's noise at the std this curve gives for its magnitude
            (already times the decode factor) instead of ``posterior_std`` everywhere; None
            draws isotropic noise.

    Raises:
        InputError: a scale factor that is not a positive finite number, or a negative or
            non-finite ``posterior_std``.
    """

    autoencoder: Autoencoder
    scale_factor: float = 1.0
    posterior_std: float = 0.0
    std_curve: StdCurve | None = None

    def __post_init__(self) -> None:
        if not (self.scale_factor > 0 and self.scale_factor < float("inf")):
            raise InputError(f"scale_factor must be a positive number, got {self.scale_factor}")
        if not (0 <= self.posterior_std < float("inf")):
            raise InputError(f"posterior_std must be a number >= 0, got {self.posterior_std}")

    @staticmethod
    def fit_scale_factor(latents: torch.Tensor) -> float:
        """1 / std (population) of unscaled training latents (any shape).

        Raises:
            InputError: the latents are constant (the autoencoder is broken).
        """
        std = float(latents.double().std(correction=0))
        if not std > 0:
            raise InputError(f"the latents are constant (std {std}); retrain the autoencoder")
        return 1.0 / std

    def encode_latent(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (for :meth:`fit_scale_factor`): (B, 1, H, W), (B,) → (B, C, h, w)."""
        return self.autoencoder.encode_to_latent(x, z)

    def encode_stage_2_inputs(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Slices → the scaled latents a diffusion model is trained on.

        Args:
            x: (B, 1, H, W) intensities in [0, 1].
            z: (B,) slice positions in [0, 1].

        Returns:
            (B, C, H/f, W/f) latents times ``scale_factor``.
        """
        return self.encode_latent(x, z) * self.scale_factor

    def encode_stage_2_posterior(
        self, x: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slices → the posterior of the scaled latent: its mean (what
        :meth:`encode_stage_2_inputs` returns) and, for a VAE-GAN, its std, both times
        ``scale_factor``, so ``mean + std * noise`` is a posterior sample in the scaled space
        (what an LDM with ``ldm.posterior_samples`` trains on).

        Args:
            x: (B, 1, H, W) intensities in [0, 1].
            z: (B,) slice positions in [0, 1].

        Returns:
            ``(mean, std)``, each (B, C, H/f, W/f); ``std`` is None for a VQ-VAE (its decoder
            sees the quantised latent itself).
        """
        if self.autoencoder.quantizer is not None:
            return self.encode_stage_2_inputs(x, z), None
        mean, std = self.autoencoder.encode_posterior(x, z)
        return mean * self.scale_factor, std * self.scale_factor

    @property
    def decode_noise(self) -> str:
        """How a posterior-sample decode draws its noise: ``none``, ``isotropic`` or
        ``by_magnitude`` (recorded in ``generate``'s manifest and ``metrics.json``)."""
        if self.posterior_std == 0:
            return "none"
        return "isotropic" if self.std_curve is None else "by_magnitude"

    def sample_posterior(self, latent: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``latent + std * noise``, the noise drawn on the CPU from ``generator`` (so the draws
        do not depend on the device); std is ``std_curve(latent)`` element by element where
        there is a curve, else ``posterior_std``. (B, C, h, w) in, the same out; the latent
        itself where ``posterior_std`` is 0."""
        if self.posterior_std == 0:
            return latent
        noise = torch.randn(latent.shape, generator=generator)
        std: torch.Tensor | float = (
            self.posterior_std if self.std_curve is None else self.std_curve(latent)
        )
        return latent + (std * noise).to(latent.device, latent.dtype)

    def _stage_2_latent(
        self, latent: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The unscaled latent the decoder sees (a posterior sample when given a generator)."""
        drawn = latent if generator is None else self.sample_posterior(latent, generator)
        return drawn / self.scale_factor

    def decode_stage_2_outputs(
        self, latent: torch.Tensor, z: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents (a diffusion model's output) → slices.

        Args:
            latent: (B, C, h, w) latents in the scaled space.
            z: (B,) slice positions in [0, 1].
            generator: a seeded CPU generator: decode a posterior sample around ``latent``
                (:meth:`sample_posterior`, see the module docstring); None decodes ``latent``.

        Returns:
            (B, 1, H, W) intensities clamped to [0, 1].
        """
        decoded = self.autoencoder.decode_from_latent(self._stage_2_latent(latent, generator), z)
        return decoded.clamp(0, 1)

    def decode_stage_2_with_tissue(
        self, latent: torch.Tensor, z: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents → slices (as :meth:`decode_stage_2_outputs`, ``generator`` likewise)
        and their (B, H, W) int64 tissue labels from the decoder's tissue head (one decoder
        pass).

        Raises:
            InputError: the autoencoder has no tissue head.
        """
        image, labels = self.autoencoder.decode_with_tissue(
            self._stage_2_latent(latent, generator), z
        )
        return image.clamp(0, 1), labels

    def decode_codes_with_tissue(
        self, codes: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, h, w) VQ code indices → slices and (B, H, W) int64 tissue labels."""
        latent = self.autoencoder.quantizer.lookup(codes)  # type: ignore[union-attr]
        image, labels = self.autoencoder.decode_with_tissue(latent, z)
        return image.clamp(0, 1), labels

    def encode_codes(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Slices → (B, h, w) int64 VQ code indices (VQ-VAE only)."""
        return self.autoencoder.encode_to_indices(x, z)

    def decode_codes(self, codes: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, h, w) VQ code indices → (B, 1, H, W) slices clamped to [0, 1]."""
        return self.autoencoder.decode_indices(codes, z).clamp(0, 1)
