"""A small CNN that predicts a slice's normalised axial position z from its pixels."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.errors import InputError


class ZProbe(nn.Module):
    """Strided conv stack → global average → z.

    Args:
        channels: widths of the conv layers; each layer halves the resolution.

    The output is a sigmoid, so predictions lie in [0, 1] like z itself.
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        if not channels:
            raise InputError("channels must name at least one layer")
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in channels:
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                nn.GroupNorm(min(8, c_out), c_out),
                nn.SiLU(),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict z.

        Args:
            x: (B, 1, H, W) slices, intensities in [0, 1].

        Returns:
            (B,) predicted z in [0, 1].
        """
        h = self.features(x).mean(dim=(2, 3))
        return torch.sigmoid(self.head(h)).squeeze(-1)
