"""The one place conditioning lives: the slice position z and the subject covariates.

z is the normalised axial slice position in [0, 1] (``z_index / (K - 1)``, the conversion
:func:`z_from_index` / :func:`index_from_z` does and nothing else does). Fractional
values are valid and interpolate between slice levels.

Covariates are subject labels (age, sex, CDR, ...) described by a *schema*
(:mod:`pipeline.core.labels`: how each is read, bounded and coded as one float per
slice, NaN = unknown).

Every conditioned network (autoencoder, discriminator, PixelCNN prior, diffusion UNet)
owns a :class:`Conditioner` and consumes its ``(B, dim)`` output in its own way (added
bias, FiLM, context token). The autoencoder and discriminator condition on z alone (empty
schema); the second stages on z and the schema's covariates. Each covariate has a learned
*unknown* embedding, used for blank manifest cells, for per-covariate condition dropout in
training and for covariates a request leaves out, so one model samples on any subset.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pipeline.core.config import ConditioningConfig
from pipeline.core.errors import InputError
from pipeline.core.labels import Schema

#: Sinusoidal features of a normalised continuous covariate.
COVARIATE_FEATURES = 16


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


def sinusoidal_embedding(
    z: torch.Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1000.0
) -> torch.Tensor:
    """Transformer-style sinusoidal features of a continuous position.

    z is scaled by ``scale`` (1000 for slice positions) first so that the [0, 1] range
    spans many periods of the fastest sinusoids (the same convention diffusion models use
    for timesteps).

    Args:
        z: positions, shape (B,), values in [0, 1].
        dim: number of features (even).
        max_period: longest period, in units of ``scale * z``.
        scale: multiplier of z before the sinusoids.

    Returns:
        (B, dim) tensor: ``[cos(1000 z f_i), sin(1000 z f_i)]`` for geometric frequencies f_i.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=z.device) / half
    )
    args = scale * z.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Conditioner(nn.Module):
    """z and covariates → one ``(B, dim)`` embedding that a network consumes.

    z: sinusoidal features → two-layer MLP. Each continuous covariate: normalised to [0, 1]
    by its schema range → sinusoidal features → linear; each categorical one: a table,
    cumulative for an ordered one (CDR: row k is the sum of the learned steps 0..k, so the
    CDR-1 and CDR-2 slices also train the step from CDR 0 to 0.5).
    Every covariate has a learned *unknown* embedding (its coded value is NaN, or it is
    dropped). The joint embedding is the sum: z's MLP output plus every covariate's.

    Args:
        config: embedding sizes (``sinusoidal_dim``, ``dim``, ``max_period``).
        schema: covariates conditioned on (empty: z alone, as the first stage).
        null_token: also learn a "no condition" embedding of z, used for classifier-free
            guidance; select it per sample with ``drop_mask`` (every covariate is then
            unknown too).
    """

    def __init__(
        self, config: ConditioningConfig, schema: Schema = (), *, null_token: bool = False
    ) -> None:
        super().__init__()
        self.config = config
        self.schema = tuple(schema)
        self.mlp = nn.Sequential(
            nn.Linear(config.sinusoidal_dim, config.dim),
            nn.SiLU(),
            nn.Linear(config.dim, config.dim),
        )
        self.null = nn.Parameter(torch.zeros(config.dim)) if null_token else None
        self.covariates = nn.ModuleList(
            nn.Embedding(len(c.categories), config.dim)
            if c.kind == "categorical"
            else nn.Linear(COVARIATE_FEATURES, config.dim)
            for c in self.schema
        )
        # Absent without covariates, so z-only model files from before covariates load as is.
        self.unknown = (
            nn.Parameter(torch.zeros(len(self.schema), config.dim)) if self.schema else None
        )
        low = [c.low if c.kind == "continuous" else 0.0 for c in self.schema]
        span = [max(c.high - c.low, 1e-6) if c.kind == "continuous" else 1.0 for c in self.schema]
        # Derived from the schema (stored in the metadata), so not part of the state dict.
        self.register_buffer("low", torch.tensor(low, dtype=torch.float32), persistent=False)
        self.register_buffer("span", torch.tensor(span, dtype=torch.float32), persistent=False)

    @property
    def dim(self) -> int:
        """Width of the embedding each network receives."""
        return self.config.dim

    def forward(
        self,
        z: torch.Tensor,
        drop_mask: torch.Tensor | None = None,
        covariates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embed slice positions and covariates.

        Args:
            z: (B,) positions in [0, 1] (fractional allowed).
            drop_mask: optional (B,) bool; where True the learned null embedding replaces
                z and every covariate is unknown (requires ``null_token=True``).
            covariates: optional (B, len(schema)) codes (:func:`covariate_codes`), NaN =
                unknown; None = every covariate unknown.

        Returns:
            (B, dim) embedding.
        """
        emb = self.mlp(sinusoidal_embedding(z, self.config.sinusoidal_dim, self.config.max_period))
        if drop_mask is not None:
            if self.null is None:
                raise InputError("drop_mask given but this Conditioner has no null token")
            emb = torch.where(drop_mask[:, None], self.null.to(emb.dtype)[None, :], emb)
        if self.unknown is None:
            return emb
        if covariates is None:
            covariates = torch.full((len(z), len(self.schema)), math.nan, device=z.device)
        covariates = covariates.to(z.device, torch.float32)
        if covariates.shape != (len(z), len(self.schema)):
            raise InputError(
                f"covariates must be ({len(z)}, {len(self.schema)}), got {tuple(covariates.shape)}"
            )
        unknown = torch.isnan(covariates)
        if drop_mask is not None:
            unknown = unknown | drop_mask[:, None]
        values = torch.nan_to_num(covariates)
        for j, (cov, layer) in enumerate(zip(self.schema, self.covariates, strict=True)):
            if cov.kind == "categorical":
                index = values[:, j].round().long().clamp(0, len(cov.categories) - 1)
                table = layer.weight.cumsum(dim=0) if cov.ordered else layer.weight
                part = table[index]
            else:
                unit = ((values[:, j] - self.low[j]) / self.span[j]).clamp(-0.5, 1.5)
                part = layer(sinusoidal_embedding(unit, COVARIATE_FEATURES, 64.0, scale=32.0))
            part = torch.where(unknown[:, j : j + 1], self.unknown[j].to(part.dtype), part)
            emb = emb + part.to(emb.dtype)
        return emb


def batch_covariates(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """A training batch's covariate codes with NaN where unknown, or None without covariates.

    Datasets hand covariates over as ``covariates`` (codes, 0 where unknown) and
    ``covariates_known`` (bool), because the training loop skips any batch holding a
    non-finite float; this puts the NaN the :class:`Conditioner` reads back.
    """
    if "covariates" not in batch:
        return None
    values, known = batch["covariates"], batch["covariates_known"]
    return torch.where(known, values, torch.full_like(values, math.nan))


def drop_covariates(
    covariates: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-covariate condition dropout for training: each code becomes unknown (NaN) with
    probability ``p``, independently.

    Args:
        covariates: (B, n) codes.
        p: dropout probability in [0, 1].

    Returns:
        (B, n) codes with dropped entries set to NaN (a new tensor).
    """
    if p <= 0 or covariates.numel() == 0:
        return covariates
    keep = torch.rand(covariates.shape, generator=generator, device=covariates.device) >= p
    return torch.where(keep, covariates, torch.full_like(covariates, math.nan))


def guide(outputs: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) of one doubled-batch forward pass.

    Args:
        outputs: (2B, ...) a network's outputs, rows ``[:B]`` with the condition given and
            rows ``[B:]`` the same inputs with it dropped (null z or unknown covariates).
        guidance: weight w; 1 gives the conditional rows, 0 the unconditional ones.

    Returns:
        (B, ...) ``u + w (c - u)``, c and u the conditional and unconditional rows.
    """
    cond, uncond = outputs.chunk(2)
    return uncond + guidance * (cond - uncond)
