"""The first-stage codec: the stage-1 / stage-2 contract of every second stage.

One object owns how slices become what a second stage models and back, and the latent
``scale_factor`` (Rombach et al. 2022: latents are multiplied by 1 / std of the training
latents so the diffusion model sees unit variance), as MONAI's ``LatentDiffusionInferer``
does with ``encode_stage_2_inputs`` / ``decode_stage_2_outputs``. No other module applies
the scale factor.

What a second stage models:

- the LDM: the *scaled* latent :meth:`LatentCodec.encode_stage_2_inputs` returns, i.e.
  ``Autoencoder.encode_to_latent`` (the VAE-GAN's posterior mean; for a VQ-VAE the quantised
  latent, the one its decoder was trained on) times ``scale_factor``;
- the PixelCNN: the VQ code grid :meth:`LatentCodec.encode_codes` returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.core.errors import InputError
from pipeline.models.autoencoder import Autoencoder


@dataclass
class LatentCodec:
    """A trained autoencoder with the scale factor of the latents a second stage sees.

    Args:
        autoencoder: the first stage, in eval mode.
        scale_factor: > 0; the factor stage-2 latents carry (1.0 before it is known).

    Raises:
        InputError: a scale factor that is not a positive finite number.
    """

    autoencoder: Autoencoder
    scale_factor: float = 1.0

    def __post_init__(self) -> None:
        if not (self.scale_factor > 0 and self.scale_factor < float("inf")):
            raise InputError(f"scale_factor must be a positive number, got {self.scale_factor}")

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

    def decode_stage_2_outputs(self, latent: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (a diffusion model's output) → slices.

        Args:
            latent: (B, C, h, w) latents in the scaled space.
            z: (B,) slice positions in [0, 1].

        Returns:
            (B, 1, H, W) intensities clamped to [0, 1].
        """
        return self.autoencoder.decode_from_latent(latent / self.scale_factor, z).clamp(0, 1)

    def decode_stage_2_with_tissue(
        self, latent: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents → slices (as :meth:`decode_stage_2_outputs`) and their (B, H, W)
        int64 tissue labels from the decoder's tissue head (one decoder pass).

        Raises:
            InputError: the autoencoder has no tissue head.
        """
        image, labels = self.autoencoder.decode_with_tissue(latent / self.scale_factor, z)
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
