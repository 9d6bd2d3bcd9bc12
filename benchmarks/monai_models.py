"""MONAI's generative models in their tutorial settings, scaled to our parameter counts.

Tutorial settings (MONAI GenerativeModels 2D tutorials, MedNIST 64x64):

- ``2d_vqvae_tutorial``: ``VQVAE(channels=(256, 256), num_res_channels=256,
  num_res_layers=2, downsample (2, 4, 1, 1), upsample (2, 4, 1, 1, 0))``, L1 + quantisation
  loss, Adam 1e-4;
- ``2d_autoencoderkl_tutorial``: ``AutoencoderKL(channels=(128, 128, 256),
  num_res_blocks=2, no attention)`` + ``PatchDiscriminator(channels=64, num_layers_d=3)``,
  L1 + 0.001 perceptual + 1e-6 KL + 0.01 least-squares adversarial, Adam 1e-4 / 5e-4;
- ``2d_ldm_tutorial``: ``DiffusionModelUNet`` trained through ``LatentDiffusionInferer``
  (the first stage encodes every batch), Adam 2.5e-5;
- ``2d_vqvae_transformer_tutorial``: ``DecoderOnlyTransformer(attn_layers_dim=96,
  attn_layers_depth=12, attn_layers_heads=8)`` sampled by ``VQVAETransformerInferer``.

The widths are scaled (keeping the tutorials' ratios between levels) so each MONAI network has
about the parameters of ours; the number of downsamplings, code book and latent shape follow
ours, so latents and code grids have the same shape. The perceptual term uses our LPIPS module
(MONAI's ``PerceptualLoss`` downloads the same AlexNet weights, unavailable offline).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import (
    VQVAE,
    AutoencoderKL,
    DecoderOnlyTransformer,
    DiffusionModelUNet,
    PatchDiscriminator,
)
from torch import nn

from benchmarks.measure import n_params
from pipeline.core.config import LDMConfig

#: Loss weights and learning rates of the AutoencoderKL tutorial.
PERCEPTUAL_WEIGHT, KL_WEIGHT, ADV_WEIGHT = 1e-3, 1e-6, 1e-2
LR_G, LR_D, LR_LDM = 1e-4, 5e-4, 2.5e-5
#: Depth and heads of the transformer tutorial (its width is scaled).
TRANSFORMER_DEPTH, TRANSFORMER_HEADS = 12, 8


def closest_width(
    build: Callable[[int], nn.Module], target: int, widths: Iterable[int]
) -> tuple[int, nn.Module]:
    """The width whose network has the parameter count nearest to ``target`` (log scale).

    Args:
        build: width -> freshly built network; its size must grow with the width.
        target: parameter count to match.
        widths: candidate widths in increasing order (the search stops past 2x ``target``).

    Returns:
        ``(width, network)``.
    """
    best: tuple[float, int, nn.Module] | None = None
    for width in widths:
        net = build(width)
        size = n_params(net)
        gap = abs(math.log(size / target))
        if best is None or gap < best[0]:
            best = (gap, width, net)
        if size > 2 * target:
            break
    if best is None:
        raise ValueError("no candidate widths given")
    return best[1], best[2]


def vqvae(width: int, levels: int, num_codes: int, code_dim: int) -> VQVAE:
    """The VQ-VAE tutorial network at ``width`` channels with ``levels`` downsamplings."""
    return VQVAE(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(width,) * levels,
        num_res_channels=width,
        num_res_layers=2,
        downsample_parameters=((2, 4, 1, 1),) * levels,
        upsample_parameters=((2, 4, 1, 1, 0),) * levels,
        num_embeddings=num_codes,
        embedding_dim=code_dim,
    )


def autoencoder_kl(width: int, levels: int, latent_channels: int) -> AutoencoderKL:
    """The AutoencoderKL tutorial network: widths ``(w, ..., w, 2w)`` over ``levels + 1`` levels."""
    channels = (width,) * levels + (2 * width,)
    return AutoencoderKL(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=channels,
        latent_channels=latent_channels,
        num_res_blocks=2,
        norm_num_groups=math.gcd(width, 32),
        attention_levels=(False,) * len(channels),
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def patch_discriminator(width: int, n_layers: int) -> PatchDiscriminator:
    """The tutorial's PatchGAN (batch norm) at ``width`` channels and ``n_layers`` layers."""
    return PatchDiscriminator(
        spatial_dims=2, channels=width, num_layers_d=n_layers, in_channels=1, out_channels=1
    )


def diffusion_unet(cfg: LDMConfig, latent_channels: int, context_dim: int) -> DiffusionModelUNet:
    """MONAI's UNet in our LDM's size, conditioned by cross-attention on a context token."""
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        channels=cfg.channels,
        attention_levels=cfg.attention_levels,
        num_res_blocks=cfg.num_res_blocks,
        num_head_channels=cfg.num_head_channels,
        norm_num_groups=cfg.norm_groups,
        with_conditioning=True,
        cross_attention_dim=context_dim,
        use_flash_attention=True,
    )


def transformer(width: int, num_codes: int, n_positions: int) -> DecoderOnlyTransformer:
    """The transformer tutorial's prior at ``width``, conditioned by cross-attention."""
    return DecoderOnlyTransformer(
        num_tokens=num_codes + 1,
        max_seq_len=n_positions + 1,
        attn_layers_dim=width,
        attn_layers_depth=TRANSFORMER_DEPTH,
        attn_layers_heads=TRANSFORMER_HEADS,
        with_cross_attention=True,
        use_flash_attention=True,
    )


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The tutorial's KL term: summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2)) - 1).sum(dim=(1, 2, 3))
    return kl.mean()


class VQVAEStep:
    """One tutorial training step of MONAI's VQ-VAE: L1 + quantisation loss, Adam.

    Args:
        model: the VQ-VAE (on its device).
    """

    def __init__(self, model: VQVAE) -> None:
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=LR_G)

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        """Train on ``x`` (B, 1, H, W) in [0, 1]; returns the losses."""
        recon, q_loss = self.model(images=x)
        loss = F.l1_loss(recon.float(), x.float()) + q_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.item()}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode reconstruction of (B, 1, H, W) slices."""
        return self.model(images=x)[0]


class AutoencoderKLStep:
    """One tutorial training step of MONAI's AutoencoderKL, with its PatchGAN when ``adversarial``.

    Args:
        model: the autoencoder.
        disc: the PatchGAN discriminator.
        perceptual: ``(x, y) -> (B,)`` LPIPS module.
        adversarial: train with the adversarial terms (after the tutorial's warm-up).
    """

    def __init__(
        self,
        model: AutoencoderKL,
        disc: PatchDiscriminator,
        perceptual: nn.Module,
        adversarial: bool = False,
    ) -> None:
        self.model, self.disc, self.perceptual = model, disc, perceptual
        self.adversarial = adversarial
        self.opt_g = torch.optim.Adam(model.parameters(), lr=LR_G)
        self.opt_d = torch.optim.Adam(disc.parameters(), lr=LR_D)
        self.adv_loss = PatchAdversarialLoss(criterion="least_squares")

    def __call__(self, x: torch.Tensor) -> dict[str, Any]:
        """Train on ``x`` (B, 1, H, W) in [0, 1]; returns the losses."""
        recon, mu, sigma = self.model(x)
        loss_g = (
            F.l1_loss(recon.float(), x.float())
            + KL_WEIGHT * kl_loss(mu, sigma)
            + PERCEPTUAL_WEIGHT * self.perceptual(recon.float(), x.float()).mean()
        )
        if self.adversarial:
            fake = self.disc(recon.contiguous().float())[-1]
            loss_g = loss_g + ADV_WEIGHT * self.adv_loss(
                fake, target_is_real=True, for_discriminator=False
            )
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        logs = {"loss_g": loss_g.item()}
        if self.adversarial:
            fake = self.disc(recon.contiguous().detach())[-1]
            real = self.disc(x.contiguous().detach())[-1]
            loss_d = (
                ADV_WEIGHT
                * 0.5
                * (
                    self.adv_loss(fake, target_is_real=False, for_discriminator=True)
                    + self.adv_loss(real, target_is_real=True, for_discriminator=True)
                )
            )
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
            logs["loss_d"] = loss_d.item()
        return logs

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode reconstruction (posterior mean) of (B, 1, H, W) slices."""
        return self.model.reconstruct(x)
