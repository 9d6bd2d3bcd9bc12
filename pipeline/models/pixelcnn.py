"""Gated PixelCNN over VQ code grids, conditioned on the slice position z.

van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders":

- a vertical stack sees every row above (and, inside the stack, the current row); its
  pre-activations are shifted down one row before they feed the horizontal stack, so the
  horizontal stack at (r, c) sees all rows < r through it and no blind spot is left;
- a horizontal stack sees the current row to the left; the first layer is masked type 'A'
  (excludes the current position), later layers type 'B' (include it; it is causal already);
- gated units ``tanh(a) * sigmoid(b)``; residual connections on the horizontal stack
  (except the first layer, whose input is the current code itself);
- a conditional bias added to both stacks' pre-activations in every layer: a 1x1
  convolution of a (B, C, h, w) map of the z embedding (the shared
  :class:`~pipeline.models.conditioning.Conditioner`) combined with each position's coordinates
  (:class:`PositionAndZ`), since convolutions alone cannot tell the centre of a slice from
  its edge (the spatial-conditioning form ``V * s`` of the paper);
- code features tied to the VQ-VAE's codebook (:class:`CodeTable`), at the input (code ->
  feature) and at the output (logit = feature . table[k] + b_k), so that what is learnt about
  one code carries over to codes with similar codebook vectors.

The target is the input itself; correctness comes from causality: the logits at raster
position i depend only on codes at positions < i.

Every layer is split into :meth:`GatedLayer.vertical`,
:meth:`GatedLayer.vertical_to_horizontal` and :meth:`GatedLayer.horizontal`, which work on
already padded windows; :meth:`GatedLayer.forward` pads the whole grid and calls them. The
incremental sampler in :mod:`pipeline.inference.autoregressive` calls the first two on one row at a
time and :meth:`GatedLayer.horizontal_step` (the same weights as matrix products) on one
position at a time; tests check that its logits equal the full forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import ConditioningConfig, PriorConfig
from pipeline.core.errors import InputError
from pipeline.models.conditioning import Conditioner, Schema

#: Code length of the random codebook a prior without a VQ-VAE is tied to.
RANDOM_CODE_DIM = 8


def pointwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Apply a 1x1 convolution to per-position feature vectors.

    Args:
        conv: a 1x1 ``nn.Conv2d``.
        x: (B, C_in) features.

    Returns:
        (B, C_out), equal to ``conv(x[:, :, None, None])[:, :, 0, 0]``.
    """
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def gate(x: torch.Tensor) -> torch.Tensor:
    """Gated activation ``tanh(a) * sigmoid(b)`` over the two channel halves of ``x``.

    Args:
        x: (B, 2C, ...) pre-activations.

    Returns:
        (B, C, ...) gated output.
    """
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def grid_features(shape: tuple[int, int], n_freqs: int, device: torch.device) -> torch.Tensor:
    """Fourier features of every grid position's fractional coordinates.

    Args:
        shape: (h, w) of the code grid.
        n_freqs: F, frequencies ``pi * 2**k`` (k < F) per axis; coordinates are
            ``row / (h - 1)`` and ``col / (w - 1)`` in [0, 1], so any grid size works.
        device: where to build them.

    Returns:
        (4F, h, w) ``[sin, cos]`` of each frequency times each coordinate.
    """
    rows, cols = (torch.linspace(0, 1, n, device=device) for n in shape)
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # (2, h, w)
    freqs = torch.pi * 2.0 ** torch.arange(n_freqs, device=device)
    args = coords[:, None] * freqs[None, :, None, None]  # (2, F, h, w)
    return torch.cat([args.sin(), args.cos()]).flatten(0, 1)


class PositionAndZ(nn.Module):
    """The conditioning map: which slice level, and where in the grid, for every position.

    ``SiLU(W_p pos(r, c) + W_z e(z))`` followed by a 1x1 convolution, so position and level
    interact (the ventricles sit at the centre of mid-level slices only).

    Args:
        cond_dim: width of the z embedding e(z).
        channels: C, width of the map.
        n_freqs: Fourier frequencies per axis (:func:`grid_features`).
    """

    def __init__(self, cond_dim: int, channels: int, n_freqs: int = 4) -> None:
        super().__init__()
        self.n_freqs = n_freqs
        self.position = nn.Conv2d(4 * n_freqs, channels, 1)
        self.level = nn.Linear(cond_dim, channels)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, emb: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """Conditioning map of a batch.

        Args:
            emb: (B, cond_dim) z embedding.
            shape: (h, w) of the code grid.

        Returns:
            (B, C, h, w) map.
        """
        pos = self.position(grid_features(shape, self.n_freqs, emb.device)[None])
        return self.mix(F.silu(pos + self.level(emb)[:, :, None, None]))


class CodeTable(nn.Module):
    """A feature vector for every code: an MLP of its codebook vector plus a free offset.

    With 1024 codes and a few hundred training grids most codes occur too rarely for a
    free embedding to be learnt alone; through the MLP, codes whose codebook vectors are
    close (similar patches) start with close features and share what is learnt. The
    per-code offset (zero at initialisation) keeps the table as expressive as a free one.

    Args:
        codebook: (K, D) VQ codebook, K >= 2; standardised (zero mean, unit variance per
            dimension) and kept as a buffer, so it is saved with the prior.
        channels: C, feature width.
    """

    def __init__(self, codebook: torch.Tensor, channels: int) -> None:
        super().__init__()
        codebook = codebook.detach().float()
        std = codebook.std(dim=0).clamp_min(1e-6)
        self.register_buffer("codebook", (codebook - codebook.mean(dim=0)) / std)
        self.mlp = nn.Sequential(
            nn.Linear(codebook.shape[1], channels), nn.SiLU(), nn.Linear(channels, channels)
        )
        self.offset = nn.Parameter(torch.zeros(len(codebook), channels))

    def forward(self) -> torch.Tensor:
        """(K, C) features of all codes."""
        return self.mlp(self.codebook) + self.offset


class GatedLayer(nn.Module):
    """One gated layer with a vertical and a horizontal stack.

    Geometry for kernel size k: the vertical convolution has kernel (k//2 + 1, k) over the
    rows ``r - k//2 .. r``; the horizontal one covers the columns ``c - k//2 .. c`` for type
    'B' and ``c - k//2 .. c - 1`` for type 'A'. Type 'A' is the masked kernel of the paper
    with the masked (always zero) column left out, so no weight is wasted or re-masked.

    Args:
        channels: C, width of both stacks.
        kernel_size: k, odd, >= 3.
        cond_channels: width of the conditioning map (:class:`PositionAndZ`).
        mask_type: ``"A"`` for the first layer (excludes the current position), else ``"B"``.
        dropout: dropout probability on the horizontal stack's output in training (0: none).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        cond_channels: int,
        mask_type: str,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dropout = dropout
        if mask_type not in ("A", "B"):
            raise InputError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise InputError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        half = kernel_size // 2
        self.half = half
        self.residual = mask_type == "B"
        #: columns the horizontal kernel covers, ending at c (type B) or c - 1 (type A)
        self.h_width = half + 1 if mask_type == "B" else half
        self.v_conv = nn.Conv2d(channels, 2 * channels, (half + 1, kernel_size))
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, self.h_width))
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)
        self.cond = nn.Conv2d(cond_channels, 4 * channels, 1)

    def conditional_bias(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project the conditioning map to the two stacks' biases.

        Args:
            cond: (B, cond_channels, H, W) conditioning map.

        Returns:
            ``(bias_v, bias_h)``, each (B, 2C, H, W).
        """
        bias_v, bias_h = self.cond(cond).chunk(2, dim=1)
        return bias_v, bias_h

    def vertical(
        self, v_padded: torch.Tensor, bias_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vertical stack on a padded window.

        Args:
            v_padded: (B, C, R + k//2, W + 2*(k//2)) input rows, zero-padded k//2 rows on top
                and k//2 columns on each side.
            bias_v: (B, 2C, R, W) conditional bias of the R rows.

        Returns:
            ``(pre, out)``: pre-activations (B, 2C, R, W) and the gated output (B, C, R, W).
        """
        pre = self.v_conv(v_padded) + bias_v
        return pre, gate(pre)

    def vertical_to_horizontal(
        self, v_pre_above: torch.Tensor, bias_h: torch.Tensor
    ) -> torch.Tensor:
        """What the horizontal stack receives besides its own input: link and bias.

        Args:
            v_pre_above: (B, 2C, R, W) vertical pre-activations of the row above each
                position (zeros for the first row).
            bias_h: (B, 2C, R, W) conditional bias of the R rows.

        Returns:
            (B, 2C, R, W) term added to the horizontal pre-activations.
        """
        return self.v_to_h(v_pre_above) + bias_h

    def horizontal(
        self, h_padded: torch.Tensor, h_in: torch.Tensor, v_term: torch.Tensor
    ) -> torch.Tensor:
        """Horizontal stack on a padded window.

        Args:
            h_padded: (B, C, R, W + h_width - 1) input, zero-padded k//2 columns on the left
                (and, for type 'A', without the last column).
            h_in: (B, C, R, W) unpadded input (for the residual connection).
            v_term: (B, 2C, R, W) output of :meth:`vertical_to_horizontal`.

        Returns:
            (B, C, R, W) horizontal stack output.
        """
        pre = self.h_conv(h_padded) + v_term
        out = self.h_out(gate(pre))
        if self.dropout and self.training:  # no draw at all without dropout
            out = F.dropout(out, self.dropout)
        return h_in + out if self.residual else out

    def horizontal_step(
        self, window: torch.Tensor, h_in: torch.Tensor, v_term: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`horizontal` at a single position per sample, as matrix products.

        Same weights and result as :meth:`horizontal`; used by the incremental sampler,
        where convolutions with a 1-pixel output are several times slower than ``linear``.

        Args:
            window: (B, C, h_width) inputs at columns ``c - k//2 ..`` (zeros left of 0).
            h_in: (B, C) input at column c (for the residual connection).
            v_term: (B, 2C) output of :meth:`vertical_to_horizontal` at the position.

        Returns:
            (B, C) horizontal stack output at the position.
        """
        pre = F.linear(window.flatten(1), self.h_conv.weight.flatten(1), self.h_conv.bias)
        pre = pre + v_term
        out = pointwise(self.h_out, gate(pre))
        return h_in + out if self.residual else out

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both stacks on a whole grid.

        Args:
            v: (B, C, H, W) vertical stack input.
            h: (B, C, H, W) horizontal stack input.
            cond: (B, cond_channels, H, W) conditioning map.

        Returns:
            ``(v_out, h_out)``, each (B, C, H, W).
        """
        bias_v, bias_h = self.conditional_bias(cond)
        p = self.half
        v_pre, v_out = self.vertical(F.pad(v, (p, p, p, 0)), bias_v)
        v_term = self.vertical_to_horizontal(F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1], bias_h)
        h_padded = F.pad(h, (p, 0, 0, 0))[..., : h.shape[-1] + self.h_width - 1]
        h_out = self.horizontal(h_padded, h, v_term)
        return v_out, h_out


class GatedPixelCNN(nn.Module):
    """z- and covariate-conditioned gated PixelCNN prior over (h, w) grids of K code indices.

    Args:
        num_codes: K, the VQ codebook size.
        config: architecture (``channels``, ``n_layers``, ``kernel_size``).
        conditioning: z-embedding sizes (shared convention of all conditioned networks).
        codebook: (K, D) the VQ-VAE's codebook the code features are tied to
            (:class:`CodeTable`); zeros of the right shape when a saved prior is loaded
            (the state dict holds it); None draws a random one (priors without a VQ-VAE).
        schema: covariates conditioned on besides z (empty: z alone).

    Raises:
        ValueError: fewer than 2 codes, or a codebook with other than ``num_codes`` rows.
    """

    def __init__(
        self,
        num_codes: int,
        config: PriorConfig,
        conditioning: ConditioningConfig,
        codebook: torch.Tensor | None = None,
        schema: Schema = (),
    ) -> None:
        super().__init__()
        if num_codes < 2:
            raise InputError(f"num_codes must be >= 2, got {num_codes}")
        if codebook is None:
            codebook = torch.randn(num_codes, RANDOM_CODE_DIM)
        if codebook.ndim != 2 or len(codebook) != num_codes:
            raise InputError(f"codebook must be ({num_codes}, D), got {tuple(codebook.shape)}")
        self.num_codes = num_codes
        self.kernel_size = config.kernel_size
        self.channels = c = config.channels
        self.input_codes = CodeTable(codebook, c)
        self.output_codes = CodeTable(codebook, c)
        self.output_bias = nn.Parameter(torch.zeros(num_codes))
        self.z_embedding = Conditioner(conditioning, schema)
        self.condition = PositionAndZ(conditioning.dim, c)
        self.layers = nn.ModuleList(
            GatedLayer(c, config.kernel_size, c, "A" if i == 0 else "B", config.dropout)
            for i in range(config.n_layers + 1)
        )
        self.head_hidden = nn.Conv2d(c, c, 1)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits from the last horizontal stack output.

        Args:
            h: (B, C, H, W) features.

        Returns:
            (B, K, H, W) logits: the hidden features dotted with every code's output feature,
            stored channels-last (``permute(0, 2, 3, 1)`` gives contiguous (B, H, W, K)).
        """
        hidden = F.relu(self.head_hidden(F.relu(h)))
        logits = F.linear(hidden.permute(0, 2, 3, 1), self.output_codes(), self.output_bias)
        return logits.permute(0, 3, 1, 2)

    def head_step(self, h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """:meth:`head` at a single position per sample.

        Args:
            h: (B, C) features.
            table: (K, C) ``self.output_codes()``, computed once per sampling call.

        Returns:
            (B, K) logits.
        """
        hidden = F.relu(pointwise(self.head_hidden, F.relu(h)))
        return F.linear(hidden, table, self.output_bias)

    def forward(
        self, codes: torch.Tensor, z: torch.Tensor, covariates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of every code given the codes before it in raster order.

        Args:
            codes: (B, h, w) int64 code indices in [0, K).
            z: (B,) slice positions in [0, 1].
            covariates: optional (B, len(schema)) codes, NaN = unknown; None = all unknown.

        Returns:
            (B, K, h, w) logits; position (r, c) depends only on codes before it in raster
            order (rows above, and the current row to the left).
        """
        x = F.embedding(codes, self.input_codes()).permute(0, 3, 1, 2)
        cond = self.condition(
            self.z_embedding(z, covariates=covariates), (codes.shape[1], codes.shape[2])
        )
        v, h = x, x
        for layer in self.layers:
            v, h = layer(v, h, cond)
        return self.head(h)
