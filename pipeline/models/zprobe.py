"""A small CNN that predicts a slice's normalised axial position z from its pixels, and the
conv trunk it shares with the covariate probe (:mod:`pipeline.models.probes`)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.errors import InputError


def conv_trunk(channels: tuple[int, ...]) -> nn.Sequential:
    """The conv stack of the probes: per width, a stride-2 3x3 conv, GroupNorm and SiLU.

    Args:
        channels: widths of the conv layers; each layer halves the resolution.

    Returns:
        A module mapping (B, 1, H, W) slices to (B, channels[-1], H / 2^L, W / 2^L) features
        (L = ``len(channels)``, sizes rounded up).

    Raises:
        InputError: ``channels`` is empty or holds a width below 1.
    """
    if not channels or min(channels) < 1:
        raise InputError(f"channels must name at least one layer of width >= 1, got {channels}")
    layers: list[nn.Module] = []
    c_in = 1
    for c_out in channels:
        layers += [
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
            nn.GroupNorm(min(8, c_out), c_out),
            nn.SiLU(),
        ]
        c_in = c_out
    return nn.Sequential(*layers)


class ZProbe(nn.Module):
    """Strided conv stack → global average → z.

    Args:
        channels: widths of the conv layers; each layer halves the resolution.

    The output is a sigmoid, so predictions lie in [0, 1] like z itself.
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.features = conv_trunk(channels)
        self.head = nn.Linear(channels[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict z.

        Args:
            x: (B, 1, H, W) slices, intensities in [0, 1].

        Returns:
            (B,) predicted z in [0, 1].
        """
        h = self.features(x).mean(dim=(2, 3))
        return torch.sigmoid(self.head(h)).squeeze(-1)
