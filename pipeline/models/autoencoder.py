"""z-conditioned first-stage autoencoder: VQ-VAE (EMA codebook) or VAE-GAN (Gaussian latent).

Encoder and decoder are stacks of residual blocks (GroupNorm + SiLU) with a self-attention
block in the middle (MONAI's ``SpatialAttentionBlock``, torch's scaled-dot-product attention),
MONAI's strided-conv downsampling and nearest-neighbour + conv upsampling. The decoder
changes width before upsampling (1x1 conv at the low resolution), so its convs at the full
resolution run at the narrowest width ``channels[0]``, which keeps CPU training cheap. One
:class:`~pipeline.models.conditioning.Conditioner` (z alone) per autoencoder feeds every
residual block of both encoder and decoder through FiLM (a per-channel scale and shift after
the second GroupNorm).

With ``tissue_weight > 0`` the decoder has a second head on its last features (with the
gradient stopped, so the head never changes the image): tissue logits (background, CSF,
GM, WM). Every decoded latent, a generated one included, then comes
with a tissue map aligned pixel for pixel with its image
(:meth:`Autoencoder.decode_with_tissue`).

The named stage-1 interface used by later stages: :meth:`Autoencoder.encode_to_latent`,
:meth:`Autoencoder.decode_from_latent`, and for the VQ-VAE :meth:`Autoencoder.pre_quant`,
:meth:`Autoencoder.encode_to_indices` and :meth:`Autoencoder.decode_indices`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import SpatialAttentionBlock, Upsample
from monai.networks.nets.autoencoderkl import AEKLDownsample
from torch import nn

from pipeline.core import distributed
from pipeline.core.config import (
    KINDS,
    AutoencoderConfig,
    AutoencoderKind,
    ConditioningConfig,
    VQConfig,
)
from pipeline.core.errors import InputError
from pipeline.core.labels import TISSUE_CLASSES
from pipeline.models.conditioning import Conditioner

# Posterior log-variances are clamped to this range for numerical safety (as in LDM).
LOGVAR_RANGE = (-30.0, 20.0)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over every latent element.

    The mean (not the sum) over latent elements keeps the weight independent of the latent
    size; it is comparable with the per-pixel mean of the L1 loss.

    Args:
        mean: (B, C, h, w) posterior means.
        logvar: (B, C, h, w) posterior log-variances.

    Returns:
        Scalar tensor, >= 0.
    """
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


class ZResBlock(nn.Module):
    """Residual block conditioned on a z-embedding through FiLM.

    ``GroupNorm → SiLU → conv3x3 → GroupNorm → FiLM(emb) → SiLU → conv3x3`` plus a (1x1 conv)
    shortcut. FiLM comes after the normalisation so the condition is not normalised away
    (MONAI's ``DiffusionUNetResnetBlock`` adds its embedding before the GroupNorm).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        emb_dim: width of the z-embedding.
        norm_groups: GroupNorm groups (divides both channel counts).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=1e-6)
        self.film = nn.Linear(emb_dim, 2 * out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: (B, in_channels, H, W) features.
            emb: (B, emb_dim) z-embedding.

        Returns:
            (B, out_channels, H, W) features.
        """
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1.0 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.shortcut(x) + h


class _MidBlock(nn.Module):
    """ZResBlock → (self-attention) → ZResBlock at the lowest resolution."""

    def __init__(self, channels: int, emb_dim: int, norm_groups: int, attention: bool) -> None:
        super().__init__()
        self.res1 = ZResBlock(channels, channels, emb_dim, norm_groups)
        self.attn: nn.Module = (
            SpatialAttentionBlock(
                spatial_dims=2,
                num_channels=channels,
                norm_num_groups=norm_groups,
                use_flash_attention=True,
            )
            if attention
            else nn.Identity()
        )
        self.res2 = ZResBlock(channels, channels, emb_dim, norm_groups)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) features and (B, emb_dim) embedding → (B, C, h, w)."""
        return self.res2(self.attn(self.res1(x, emb)), emb)


def _upsample(in_channels: int, out_channels: int) -> nn.Module:
    """x2 upsampling to the next level's width (MONAI's ``Upsample``).

    A 1x1 conv (only if the width changes) at the low resolution, nearest-neighbour
    interpolation, then a 3x3 conv at the high resolution.
    """
    return Upsample(
        spatial_dims=2,
        mode="nontrainable",
        in_channels=in_channels,
        out_channels=out_channels,
        interp_mode="nearest",
        scale_factor=2.0,
        post_conv=nn.Conv2d(out_channels, out_channels, 3, padding=1),
        align_corners=None,
    )


def _out_layer(in_channels: int, out_channels: int, norm_groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.GroupNorm(norm_groups, in_channels, eps=1e-6),
        nn.SiLU(),
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
    )


class Encoder(nn.Module):
    """Image (B, 1, H, W) → features (B, out_channels, H/f, W/f), f = 2**(len(channels)-1).

    Args:
        cfg: architecture (channels, residual blocks per level, attention, GroupNorm groups).
        emb_dim: width of the z-embedding.
        out_channels: channels of the output (code_dim, or 2 x latent channels).
    """

    def __init__(self, cfg: AutoencoderConfig, emb_dim: int, out_channels: int) -> None:
        super().__init__()
        channels, groups = cfg.channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(1, channels[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        widths = (channels[0], *channels)
        for level, ch in enumerate(channels):
            self.levels.append(
                nn.ModuleList(
                    ZResBlock(widths[level] if j == 0 else ch, ch, emb_dim, groups)
                    for j in range(cfg.num_res_blocks)
                )
            )
            is_last = level == len(channels) - 1
            self.downs.append(nn.Identity() if is_last else AEKLDownsample(2, ch))
        self.mid = _MidBlock(channels[-1], emb_dim, groups, cfg.attention)
        self.out = _out_layer(channels[-1], out_channels, groups)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Encode.

        Args:
            x: (B, 1, H, W) slices.
            emb: (B, emb_dim) z-embedding.

        Returns:
            (B, out_channels, H/f, W/f).
        """
        h = self.conv_in(x)
        for blocks, down in zip(self.levels, self.downs, strict=True):
            for block in blocks:
                h = block(h, emb)
            h = down(h)
        return self.out(self.mid(h, emb))


class Decoder(nn.Module):
    """Latent (B, in_channels, h, w) → image (B, 1, h*f, w*f), through
    ``cfg.output_activation`` (none, or a ReLU that can draw exact zeros), and, with
    ``cfg.tissue_weight > 0``, tissue logits (B, 4, h*f, w*f) from the same last features (so
    image and tissue map agree pixel for pixel).

    Args:
        cfg: architecture (channels are used in reverse order).
        emb_dim: width of the z-embedding.
        in_channels: latent channels.
    """

    def __init__(self, cfg: AutoencoderConfig, emb_dim: int, in_channels: int) -> None:
        super().__init__()
        channels, groups = tuple(reversed(cfg.channels)), cfg.norm_groups
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.mid = _MidBlock(channels[0], emb_dim, groups, cfg.attention)
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        for level, ch in enumerate(channels):
            self.levels.append(
                nn.ModuleList(ZResBlock(ch, ch, emb_dim, groups) for _ in range(cfg.num_res_blocks))
            )
            is_last = level == len(channels) - 1
            self.ups.append(nn.Identity() if is_last else _upsample(ch, channels[level + 1]))
        self.out = _out_layer(channels[-1], 1, groups)
        self.relu_output = cfg.output_activation == "relu"
        self.tissue = (
            _out_layer(channels[-1], len(TISSUE_CLASSES), groups) if cfg.tissue_weight > 0 else None
        )

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the output conv (where the VQGAN adaptive weight is measured)."""
        return self.out[-1].weight

    def features(self, latent: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The last feature map, (B, channels[0], h*f, w*f), both heads read."""
        h = self.mid(self.conv_in(latent), emb)
        for blocks, up in zip(self.levels, self.ups, strict=True):
            for block in blocks:
                h = block(h, emb)
            h = up(h)
        return h

    def forward(self, latent: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Decode the image.

        Args:
            latent: (B, in_channels, h, w).
            emb: (B, emb_dim) z-embedding.

        Returns:
            (B, 1, h*f, w*f), roughly [0, 1] after training (>= 0 with a ReLU output).
        """
        return self._image(self.features(latent, emb))

    def _image(self, h: torch.Tensor) -> torch.Tensor:
        """The image head on the last features, through the output activation."""
        image = self.out(h)
        return F.relu(image) if self.relu_output else image

    def with_tissue(
        self, latent: torch.Tensor, emb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image and tissue logits from one pass (logits None without a tissue head)."""
        h = self.features(latent, emb)
        # The head reads the features without training them: trained jointly, its
        # cross-entropy cost the VAE-GAN its texture (reconstruction judge, 1-px blur, on the
        # stand-in: 0.98 joint, 0.52 with the gradient stopped; head Dice 0.82 → 0.72).
        return self._image(h), None if self.tissue is None else self.tissue(h.detach())


@dataclass
class Quantized:
    """Output of :class:`EMAVectorQuantizer`.

    Attributes:
        latent: (B, d, h, w) quantised latent with straight-through gradients.
        indices: (B, h, w) int64 code indices.
        commitment: scalar β-weighted commitment loss.
        perplexity: scalar, exp(entropy) of the batch's code usage (1 ... K).
        codes_used: scalar, fraction of the K codes used by the batch.
    """

    latent: torch.Tensor
    indices: torch.Tensor
    commitment: torch.Tensor
    perplexity: torch.Tensor
    codes_used: torch.Tensor


class EMAVectorQuantizer(nn.Module):
    """Codebook of K vectors of length d, learned by EMA k-means (van den Oord 2017, Razavi 2019).

    In training mode each forward pass (1) assigns every input vector to its nearest code,
    (2) updates the EMA cluster sizes and sums and re-derives the codebook (Laplace
    smoothing), (3) restarts every code whose EMA cluster size is below
    ``dead_code_threshold`` (a code must serve that many vectors per step on average; 0
    disables restarts) from a random vector of the current batch of encoder outputs.
    All statistics start at zero, so the first training step initialises the whole codebook
    from encoder outputs. Codebook and statistics are buffers (no gradients; MONAI's
    ``EMAQuantizer`` has no dead-code restart).

    Under torchrun the batch statistics are summed over the ranks (as MONAI's ``ddp_sync``
    does) and restarted codes come from rank 0's batch, so every rank keeps the same codebook
    and it follows the global batch, as in a one-process run.

    Args:
        cfg: codebook size, code length, EMA decay, commitment β, dead-code threshold.
    """

    codebook: torch.Tensor
    cluster_size: torch.Tensor
    embed_sum: torch.Tensor

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.num_codes, self.code_dim = cfg.num_codes, cfg.code_dim
        self.decay, self.commitment = cfg.decay, cfg.commitment
        self.dead_code_threshold = cfg.dead_code_threshold
        self.eps = 1e-5
        codebook = torch.randn(cfg.num_codes, cfg.code_dim) / math.sqrt(cfg.code_dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.zeros(cfg.num_codes))
        self.register_buffer("embed_sum", torch.zeros(cfg.num_codes, cfg.code_dim))

    @staticmethod
    def _flatten(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for every position.

        Args:
            x: (B, d, h, w) continuous latent.

        Returns:
            (B, h, w) int64 indices in [0, K).
        """
        flat = self._flatten(x.float())
        dist = torch.cdist(flat, self.codebook)
        return dist.argmin(dim=1).view(x.shape[0], *x.shape[2:])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``indices``.

        Args:
            indices: (B, h, w) int64 in [0, K).

        Returns:
            (B, d, h, w) quantised latent.
        """
        if indices.min() < 0 or indices.max() >= self.num_codes:
            raise InputError(
                f"code indices must lie in [0, {self.num_codes}); "
                f"got range [{int(indices.min())}, {int(indices.max())}]"
            )
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        """EMA k-means step on ``flat`` (N, d) assigned to ``indices`` (N,); restart dead codes.

        ``counts`` (K,) are the global batch's code counts (already summed over the ranks).
        """
        sums = distributed.sum_(torch.zeros_like(self.embed_sum).index_add_(0, indices, flat))
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed.clamp_min(self.eps)[:, None])

        dead = self.cluster_size < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead:
            picks = flat[torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)]
            distributed.broadcast_(picks)
            self.codebook[dead] = picks
            self.cluster_size[dead] = self.dead_code_threshold
            self.embed_sum[dead] = picks * self.dead_code_threshold

    def forward(self, x: torch.Tensor) -> Quantized:
        """Quantise ``x``; in training mode also update the codebook.

        Args:
            x: (B, d, h, w) continuous latent from the encoder.

        Returns:
            A :class:`Quantized` with the straight-through latent and usage statistics.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            indices = self.nearest(x)
            quantized = self.lookup(indices)
            counts = torch.bincount(indices.flatten(), minlength=self.num_codes).float()
            if self.training:
                distributed.sum_(counts)
                self._update(self._flatten(x.detach()), indices.flatten(), counts)
            commitment = self.commitment * F.mse_loss(x, quantized.detach())
            probs = counts / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            codes_used = (counts > 0).float().mean()
        latent = x + (quantized - x).detach()
        return Quantized(latent, indices, commitment, perplexity, codes_used)


@dataclass
class AutoencoderOutput:
    """What :meth:`Autoencoder.forward` returns.

    Attributes:
        recon: (B, 1, H, W) reconstruction, intensities roughly in [0, 1] (not clamped).
        latent: (B, C, h, w) latent the decoder saw (quantised, or a posterior sample/mean).
        vq_loss: commitment loss (vqvae) or None.
        kl: unweighted KL per latent element (vaegan) or None.
        perplexity: codebook perplexity of the batch (vqvae) or None.
        codes_used: fraction of codes used by the batch (vqvae) or None.
        tissue_logits: (B, 4, H, W) logits of the tissue head, or None.
        downscaled_recon: (B, 1, H/2, W/2) decode of the latent average-pooled by 2
            (``forward(..., downscaled=True)``, vaegan only), or None.
    """

    recon: torch.Tensor
    latent: torch.Tensor
    vq_loss: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    perplexity: torch.Tensor | None = None
    codes_used: torch.Tensor | None = None
    tissue_logits: torch.Tensor | None = None
    downscaled_recon: torch.Tensor | None = None


class Autoencoder(nn.Module):
    """z-conditioned autoencoder of (B, 1, H, W) slices, kind ``vqvae`` or ``vaegan``.

    Args:
        cfg: architecture, VQ and KL settings.
        cond_cfg: z-embedding settings.
        kind: ``vqvae`` (EMA vector quantiser, latent channels ``vq.code_dim``) or ``vaegan``
            (diagonal Gaussian, latent channels ``kl.latent_channels``).

    Raises:
        ValueError: unknown ``kind``.
    """

    def __init__(
        self, cfg: AutoencoderConfig, cond_cfg: ConditioningConfig, kind: AutoencoderKind
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise InputError(f"autoencoder kind must be one of {KINDS}; got {kind!r}")
        self.kind: AutoencoderKind = kind
        self.downsample_factor = 2 ** (len(cfg.channels) - 1)
        self.latent_channels = cfg.vq.code_dim if kind == "vqvae" else cfg.kl.latent_channels
        enc_out = self.latent_channels * (1 if kind == "vqvae" else 2)
        self.z_embed = Conditioner(cond_cfg)
        self.encoder = Encoder(cfg, cond_cfg.dim, enc_out)
        self.decoder = Decoder(cfg, cond_cfg.dim, self.latent_channels)
        self.quantizer = EMAVectorQuantizer(cfg.vq) if kind == "vqvae" else None

    def _check_input(self, x: torch.Tensor, z: torch.Tensor) -> None:
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != 1 or x.shape[-1] % f or x.shape[-2] % f:
            raise InputError(
                f"x must have shape (B, 1, H, W) with H and W multiples of {f}; "
                f"got {tuple(x.shape)}"
            )
        if z.shape != (x.shape[0],):
            raise InputError(f"z must have shape ({x.shape[0]},) matching x; got {tuple(z.shape)}")

    def _require_vq(self, method: str) -> EMAVectorQuantizer:
        if self.quantizer is None:
            raise InputError(f"{method} needs a vqvae autoencoder; this one is {self.kind!r}")
        return self.quantizer

    def _encode(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output and the z-embedding; x (B, 1, H, W), z (B,)."""
        self._check_input(x, z)
        emb = self.z_embed(z)
        return self.encoder(x, emb), emb

    def _posterior(self, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def pre_quant(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output before quantisation (vqvae only).

        Args:
            x: (B, 1, H, W) slices, intensities in [0, 1].
            z: (B,) slice positions in [0, 1].

        Returns:
            (B, code_dim, H/f, W/f).
        """
        self._require_vq("pre_quant")
        return self._encode(x, z)[0]

    def encode_to_indices(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Code indices of ``x`` (vqvae only); never updates the codebook.

        Args:
            x: (B, 1, H, W) slices, intensities in [0, 1].
            z: (B,) slice positions in [0, 1].

        Returns:
            (B, H/f, W/f) int64 indices in [0, num_codes).
        """
        return self._require_vq("encode_to_indices").nearest(self.pre_quant(x, z))

    def decode_indices(self, indices: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Decode code indices (vqvae only).

        Args:
            indices: (B, h, w) int64 in [0, num_codes).
            z: (B,) slice positions in [0, 1].

        Returns:
            (B, 1, h*f, w*f) images, roughly in [0, 1] (not clamped).
        """
        latent = self._require_vq("decode_indices").lookup(indices)
        return self.decode_from_latent(latent, z)

    def encode_to_latent(
        self, x: torch.Tensor, z: torch.Tensor, *, sample: bool = False
    ) -> torch.Tensor:
        """The latent a second stage models; never updates the codebook.

        Args:
            x: (B, 1, H, W) slices, intensities in [0, 1].
            z: (B,) slice positions in [0, 1].
            sample: vaegan only: draw from the posterior instead of taking its mean.

        Returns:
            (B, C, H/f, W/f): the quantised latent (vqvae) or the posterior mean/sample (vaegan).
        """
        if self.quantizer is not None:
            h, _ = self._encode(x, z)
            return self.quantizer.lookup(self.quantizer.nearest(h))
        mean, std = self.encode_posterior(x, z)
        return mean + torch.randn_like(mean) * std if sample else mean

    def encode_posterior(
        self, x: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The diagonal Gaussian posterior q(latent | x, z) (vaegan only).

        Args:
            x: (B, 1, H, W) slices, intensities in [0, 1].
            z: (B,) slice positions in [0, 1].

        Returns:
            ``(mean, std)``, each (B, C, H/f, W/f), unscaled latent units.
        """
        if self.quantizer is not None:
            raise InputError(f"encode_posterior needs a vaegan autoencoder; this one is {self.kind!r}")
        mean, logvar = self._posterior(self._encode(x, z)[0])
        return mean, (0.5 * logvar).exp()

    def decode_from_latent(self, latent: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Decode a latent.

        Args:
            latent: (B, C, h, w) latent (unscaled).
            z: (B,) slice positions in [0, 1].

        Returns:
            (B, 1, h*f, w*f) images, roughly in [0, 1] (not clamped).
        """
        if latent.ndim != 4 or latent.shape[1] != self.latent_channels:
            raise InputError(
                f"latent must have shape (B, {self.latent_channels}, h, w); "
                f"got {tuple(latent.shape)}"
            )
        return self.decoder(latent, self.z_embed(z))

    @property
    def has_tissue_head(self) -> bool:
        """True when the decoder also predicts a tissue map (``tissue_weight > 0``)."""
        return self.decoder.tissue is not None

    def decode_with_tissue(
        self, latent: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a latent to an image and its tissue labels in one pass.

        Args:
            latent: (B, C, h, w) latent (unscaled).
            z: (B,) slice positions in [0, 1].

        Returns:
            ``(images, labels)``: (B, 1, h*f, w*f) as :meth:`decode_from_latent`, and
            (B, h*f, w*f) int64 labels 0 background, 1 CSF, 2 GM, 3 WM (argmax of the head).

        Raises:
            InputError: the autoencoder has no tissue head.
        """
        if not self.has_tissue_head:
            raise InputError(
                "this autoencoder has no tissue head (trained with tissue_weight 0 or on a "
                "cohort without tissue segmentations), so it cannot make masks"
            )
        image, logits = self.decoder.with_tissue(latent, self.z_embed(z))
        return image, logits.argmax(dim=1)  # type: ignore[union-attr]

    def forward(
        self,
        x: torch.Tensor,
        z: torch.Tensor,
        *,
        sample: bool | None = None,
        downscaled: bool = False,
    ) -> AutoencoderOutput:
        """Reconstruct ``x``; in training mode the VQ codebook is updated.

        Args:
            x: (B, 1, H, W) slices, intensities in [0, 1].
            z: (B,) slice positions in [0, 1].
            sample: vaegan only: decode a posterior sample (default: in training mode).
            downscaled: vaegan only: also decode the latent average-pooled by 2 (the
                scale-equivariance term's input, ``autoencoder.scale_equivariance``), in the
                same forward so a DDP wrapper sees one pass.

        Returns:
            An :class:`AutoencoderOutput`.

        Raises:
            InputError: ``downscaled`` for a vqvae (a pooled code is no code).
        """
        if downscaled and self.quantizer is not None:
            raise InputError("downscaled decoding is for the vaegan kind, not vqvae")
        h, emb = self._encode(x, z)
        if self.quantizer is not None:
            q = self.quantizer(h)
            recon, tissue = self.decoder.with_tissue(q.latent, emb)
            return AutoencoderOutput(
                recon=recon,
                latent=q.latent,
                vq_loss=q.commitment,
                perplexity=q.perplexity,
                codes_used=q.codes_used,
                tissue_logits=tissue,
            )
        mean, logvar = self._posterior(h)
        draw = self.training if sample is None else sample
        latent = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if draw else mean
        recon, tissue = self.decoder.with_tissue(latent, emb)
        small = self.decoder(F.avg_pool2d(latent, 2), emb) if downscaled else None
        return AutoencoderOutput(
            recon=recon,
            latent=latent,
            kl=gaussian_kl(mean, logvar),
            tissue_logits=tissue,
            downscaled_recon=small,
        )
