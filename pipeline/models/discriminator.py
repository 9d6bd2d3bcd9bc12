"""z-conditioned PatchGAN discriminator (Isola et al. 2017) built on MONAI's PatchDiscriminator.

MONAI supplies the conv stack (strided 4x4 convs, normalisation, LeakyReLU); this module adds
the condition: after every conv block except the final logit conv, a per-channel bias
projected from the discriminator's own :class:`~pipeline.models.conditioning.Conditioner` is added.

The convolutions keep PyTorch's default initialisation, not MONAI's N(0, 0.02). With MONAI's,
the stem's response to a demo slice (std 0.017) is a quarter of the z bias added to it. Trained
alone for 600 steps at lr 2e-3 on real training slices against the demo VAE-GAN's
reconstructions (seeds 0-2), its hinge loss ends at 0.93-0.96 with real and fake logits within
0.02 of each other; with PyTorch's init at 0.38-0.75, gap 0.65-2.6 (stand-in cohort). Every
earlier VAE-GAN's adversarial term was therefore inert. In the decoder-only phase it went blind
again when that phase restarted the learning rates at their peak; the demo now leaves the
adversarial term out of that phase (``decoder_finetune.discriminator_lr``;
docs/realism_log.md, "The discriminator learned nothing").
"""

from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator
from torch import nn

from pipeline.core.config import ConditioningConfig, DiscriminatorConfig
from pipeline.models.conditioning import Conditioner


class ZPatchDiscriminator(nn.Module):
    """Patch logits of (B, 1, H, W) slices given their slice position z.

    Layer widths are ``channels * 2**i`` for the stem and the ``n_layers`` normalised blocks
    (GroupNorm); all but the last block halve the resolution, so a 64x64 input with
    ``n_layers=3`` gives 6x6 patch logits.

    Args:
        cfg: width, depth and GroupNorm groups.
        cond_cfg: z-embedding settings.
    """

    def __init__(self, cfg: DiscriminatorConfig, cond_cfg: ConditioningConfig) -> None:
        super().__init__()
        self.net = PatchDiscriminator(
            spatial_dims=2,
            channels=cfg.channels,
            in_channels=1,
            out_channels=1,
            num_layers_d=cfg.n_layers,
            norm=("GROUP", {"num_groups": cfg.norm_groups}),
        )
        for module in self.net.modules():  # undo MONAI's N(0, 0.02) init (module docstring)
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
        self.z_embed = Conditioner(cond_cfg)
        widths = [cfg.channels * 2**i for i in range(cfg.n_layers + 1)]
        self.z_bias = nn.ModuleList(nn.Linear(cond_cfg.dim, w) for w in widths)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Score every patch of ``x``.

        Args:
            x: (B, 1, H, W) slices, intensities in [0, 1].
            z: (B,) slice positions in [0, 1].

        Returns:
            (B, 1, h, w) logits (higher = more real).
        """
        emb = nn.functional.silu(self.z_embed(z))
        *blocks, final = self.net.children()
        h = x
        for block, bias in zip(blocks, self.z_bias, strict=True):
            h = block(h) + bias(emb)[:, :, None, None]
        return final(h)
