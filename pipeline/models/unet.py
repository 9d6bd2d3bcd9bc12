"""The z-conditioned denoising UNet of the latent diffusion model (wraps MONAI).

The condition (z and the covariates, embedded by one
:class:`~pipeline.models.conditioning.Conditioner`) reaches the network:

- added to the timestep embedding, so every residual block is modulated by it (the strong
  path; cross-attention alone conditioned too weakly on a small training budget);
- with ``ldm.cross_attention`` on, also as the single context token of MONAI's
  cross-attention transformer blocks. Attention to one token is the same vector at every
  pixel, a per-block bias; off (the demo), the attention levels are plain self-attention
  blocks, 1.6-1.7x faster per CPU training step.

MONAI's ``DiffusionModelUNet.forward`` adds ``class_embedding(class_labels)`` to the time
embedding. The wrapper replaces that lookup table with a learned projection of the z
embedding and passes the embedding as ``class_labels``, so MONAI's forward is reused as it
is, without a copy and without hooks holding state.

MONAI's residual block has no dropout. With ``ldm.dropout`` > 0 the wrapper registers a
forward pre-hook on each block's second convolution that drops its input in training (where
Ho et al. 2020 put it); the hook holds only the probability, and the parameter names, so the
model files, stay MONAI's.

Attention runs through torch's ``scaled_dot_product_attention``. On the CPU its fused
(flash) kernel is slower than the plain math for these short sequences (16-256 tokens): the
backward pass of one training step took 0.06 s of 0.34 s. So the forward pass picks the math
backend on the CPU and leaves torch's choice (flash) on CUDA.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.core.config import ConditioningConfig, LDMConfig
from pipeline.core.errors import InputError
from pipeline.models.conditioning import Conditioner, Schema


class ZConditionedUNet(nn.Module):
    """Noise (or velocity) predictor ``f(x_t, t, z, covariates)`` with a null condition for
    guidance.

    Args:
        config: UNet widths, attention levels, heads and normalisation groups.
        conditioning: embedding sizes; its ``dim`` is also the cross-attention width.
        latent_channels: channels C of the diffused latent (input and output).
        schema: covariates conditioned on besides z (empty: z alone). The attribute keeps
            the name ``z_embed`` so z-only model files from before covariates load.

    With ``config.self_condition`` the network's input is (B, 2C, h, w): the noisy latent and
    an estimate of the clean latent (zeros where there is none), and :attr:`self_condition`
    is True, which the samplers read (``pipeline.inference.diffusion``).
    """

    def __init__(
        self,
        config: LDMConfig,
        conditioning: ConditioningConfig,
        latent_channels: int,
        schema: Schema = (),
    ) -> None:
        super().__init__()
        if latent_channels < 1:
            raise InputError(f"latent_channels must be >= 1, got {latent_channels}")
        self.z_embed = Conditioner(conditioning, schema, null_token=True)
        self.self_condition = config.self_condition
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=latent_channels * (2 if config.self_condition else 1),
            out_channels=latent_channels,
            channels=config.channels,
            attention_levels=config.attention_levels,
            num_res_blocks=config.num_res_blocks,
            num_head_channels=config.num_head_channels,
            norm_num_groups=config.norm_groups,
            with_conditioning=config.cross_attention,
            cross_attention_dim=conditioning.dim if config.cross_attention else None,
            num_class_embeds=1,  # enables the additive path; the table is replaced below
            use_flash_attention=True,  # torch scaled_dot_product_attention
        )
        self.cross_attention = config.cross_attention
        if config.dropout > 0:
            for block in self.unet.modules():
                if isinstance(block, DiffusionUNetResnetBlock):
                    block.conv2.register_forward_pre_hook(partial(_drop_input, p=config.dropout))
        time_dim = self.unet.time_embed[-1].out_features
        self.unet.class_embedding = nn.Sequential(nn.SiLU(), nn.Linear(conditioning.dim, time_dim))

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        drop_mask: torch.Tensor | None = None,
        covariates: torch.Tensor | None = None,
        x0_estimate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise (or velocity) of a noisy latent.

        Args:
            x: (B, C, h, w) noisy latents.
            t: (B,) integer timesteps in [0, T).
            z: (B,) slice positions in [0, 1] (fractional allowed).
            drop_mask: optional (B,) bool; True replaces the whole condition by the learned
                null condition (condition dropout in training, the unconditional half of
                guidance).
            covariates: optional (B, len(schema)) codes, NaN = unknown; None = all unknown.
            x0_estimate: optional (B, C, h, w) estimate of the clean latent for a
                self-conditioned network (None = zeros); a network without
                self-conditioning must not be given one.

        Returns:
            (B, C, h, w) model output (epsilon or v, as trained).
        """
        if self.self_condition:
            x = torch.cat([x, torch.zeros_like(x) if x0_estimate is None else x0_estimate], 1)
        elif x0_estimate is not None:
            raise InputError("x0_estimate given to a UNet without ldm.self_condition")
        emb = self.z_embed(z, drop_mask, covariates).to(x.dtype)
        context = emb[:, None, :] if self.cross_attention else None
        math = sdpa_kernel(SDPBackend.MATH) if x.device.type == "cpu" else nullcontext()
        with math:
            return self.unet(x, t, context=context, class_labels=emb)


def _drop_input(
    module: nn.Module, args: tuple[torch.Tensor, ...], p: float
) -> tuple[torch.Tensor, ...]:
    """Forward pre-hook: dropout with probability ``p`` on a module's (B, C, h, w) input,
    in training mode only."""
    return (F.dropout(args[0], p, module.training), *args[1:])
