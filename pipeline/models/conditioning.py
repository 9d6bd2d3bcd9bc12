"""The one place z-index conditioning lives.

z is the normalised axial slice position in [0, 1] (``z_index / (K - 1)``, the conversion
:func:`z_from_index` / :func:`index_from_z` does and nothing else does). Fractional
values are valid and interpolate between slice levels. Every conditioned network
(autoencoder, discriminator, PixelCNN prior, diffusion UNet) owns a :class:`ZEmbedding`
and consumes its ``(B, dim)`` output in its own way (added bias, FiLM, context token).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pipeline.core.config import ConditioningConfig
from pipeline.core.errors import InputError


def z_from_index(index: Any, n_slices: int) -> Any:
    """Slice level(s) → z: ``index / (K - 1)``.

    Args:
        index: slice level(s) 0..K-1 (int, float, numpy array or tensor).
        n_slices: K >= 2, the number of levels.

    Returns:
        z in [0, 1], of the type of ``index`` (an int becomes a float).
    """
    return index / (n_slices - 1)


def index_from_z(z: Any, n_slices: int) -> Any:
    """z → slice level(s) in slice units: ``z * (K - 1)`` (fractional for fractional z).

    Also turns a z *error* into an error in slice units.

    Args:
        z: positions in [0, 1] (float, numpy array or tensor).
        n_slices: K >= 2, the number of levels.
    """
    return z * (n_slices - 1)


def check_z(z: torch.Tensor | float | list[float], *, name: str = "z") -> torch.Tensor:
    """Validate z values at a user-facing boundary and return them as a float tensor.

    Args:
        z: slice positions, a scalar, list or tensor of any shape, each in [0, 1].
        name: argument name used in the error message.

    Returns:
        ``torch.float32`` tensor with the same values (flattened to 1-D for scalars/lists).

    Raises:
        ValueError: a value is outside [0, 1] or not finite, naming the first bad value.
    """
    t = torch.as_tensor(z, dtype=torch.float32)
    if t.ndim == 0:
        t = t.reshape(1)
    bad = ~torch.isfinite(t) | (t < 0) | (t > 1)
    if bool(bad.any()):
        value = t[bad].flatten()[0].item()
        raise InputError(f"{name} must lie in [0, 1] (slice index / (K-1)); got {value!r}")
    return t


def sinusoidal_embedding(z: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer-style sinusoidal features of a continuous position.

    z is scaled by 1000 first so that the [0, 1] range spans many periods of the fastest
    sinusoids (the same convention diffusion models use for timesteps).

    Args:
        z: positions, shape (B,), values in [0, 1].
        dim: number of features (even).
        max_period: longest period, in units of ``1000 * z``.

    Returns:
        (B, dim) tensor: ``[cos(1000 z f_i), sin(1000 z f_i)]`` for geometric frequencies f_i.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=z.device) / half
    )
    args = 1000.0 * z.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ZEmbedding(nn.Module):
    """z ∈ [0, 1] → sinusoidal features → two-layer MLP → (B, dim).

    Args:
        config: embedding sizes (``sinusoidal_dim``, ``dim``, ``max_period``).
        null_token: also learn a "no condition" embedding, used for classifier-free
            guidance; select it per sample with ``drop_mask``.
    """

    def __init__(self, config: ConditioningConfig, *, null_token: bool = False) -> None:
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(
            nn.Linear(config.sinusoidal_dim, config.dim),
            nn.SiLU(),
            nn.Linear(config.dim, config.dim),
        )
        self.null = nn.Parameter(torch.zeros(config.dim)) if null_token else None

    @property
    def dim(self) -> int:
        """Width of the embedding each network receives."""
        return self.config.dim

    def forward(self, z: torch.Tensor, drop_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embed slice positions.

        Args:
            z: (B,) positions in [0, 1] (fractional allowed).
            drop_mask: optional (B,) bool; where True the learned null embedding replaces
                the embedding of z (requires ``null_token=True``).

        Returns:
            (B, dim) embedding.
        """
        emb = self.mlp(sinusoidal_embedding(z, self.config.sinusoidal_dim, self.config.max_period))
        if drop_mask is not None:
            if self.null is None:
                raise InputError("drop_mask given but this ZEmbedding has no null token")
            emb = torch.where(drop_mask[:, None], self.null.to(emb.dtype)[None, :], emb)
        return emb
