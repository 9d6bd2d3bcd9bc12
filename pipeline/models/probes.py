"""Label probes: small networks that read covariates and tissue classes off a slice.

Trained on real training slices only (:mod:`pipeline.training.probes`), they judge whether
generated slices obey the covariates and masks they were asked for.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.config import SegmenterConfig
from pipeline.core.errors import InputError
from pipeline.core.labels import TISSUE_CLASSES
from pipeline.models.zprobe import conv_trunk

#: The covariate heads, in a fixed order: normalised age, the logit of CDR > 0 and the
#: logit of male sex.
COVARIATE_HEADS: tuple[str, ...] = ("age", "cdr", "sex")


class CovariateProbe(nn.Module):
    """The z-probe's conv trunk → global average → one linear head per covariate.

    Args:
        channels: widths of the strided conv layers (each halves the resolution).
        heads: a subset of :data:`COVARIATE_HEADS` (the labels the training split has);
            may be empty (a split without covariates: nothing to predict).
        age_mean: mean training age in years; the age head predicts
            ``(age - age_mean) / age_std``.
        age_std: standard deviation of the training ages in years (> 0).

    Raises:
        InputError: an unknown or repeated head, or ``age_std <= 0``.
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (16, 32, 64, 128),
        heads: tuple[str, ...] = COVARIATE_HEADS,
        *,
        age_mean: float = 0.0,
        age_std: float = 1.0,
    ) -> None:
        super().__init__()
        unknown = [h for h in heads if h not in COVARIATE_HEADS]
        if unknown or len(set(heads)) != len(heads):
            raise InputError(f"heads must be distinct names of {COVARIATE_HEADS}, got {heads}")
        if not age_std > 0:
            raise InputError(f"age_std must be > 0 years, got {age_std}")
        self.heads = tuple(h for h in COVARIATE_HEADS if h in heads)
        self.features = conv_trunk(channels)
        self.out = nn.ModuleDict({h: nn.Linear(channels[-1], 1) for h in self.heads})
        self.register_buffer("age_mean", torch.tensor(float(age_mean)))
        self.register_buffer("age_std", torch.tensor(float(age_std)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw head outputs.

        Args:
            x: (B, 1, H, W) slices, intensities in [0, 1].

        Returns:
            ``{head: (B,)}``: ``age`` normalised (see :meth:`age_years`), ``cdr`` and
            ``sex`` logits of CDR > 0 and of male sex.
        """
        h = self.features(x).mean(dim=(2, 3))
        return {name: head(h).squeeze(-1) for name, head in self.out.items()}

    def age_years(self, normalised: torch.Tensor) -> torch.Tensor:
        """De-normalise the age head's output: ``normalised * age_std + age_mean`` (years)."""
        return normalised * self.age_std + self.age_mean


def tissue_segmenter(cfg: SegmenterConfig) -> nn.Module:
    """MONAI's 2D ``BasicUNet`` mapping a slice to logits of the tissue classes.

    Args:
        cfg: the six ``BasicUNet`` widths.

    Returns:
        A module mapping (B, 1, H, W) intensities in [0, 1] to (B, 4, H, W) logits of
        :data:`~pipeline.core.labels.TISSUE_CLASSES` (background, CSF, GM, WM); H and W must
        be multiples of 16.
    """
    from monai.networks.nets import BasicUNet  # MONAI takes seconds to import

    return BasicUNet(
        spatial_dims=2, in_channels=1, out_channels=len(TISSUE_CLASSES), features=cfg.features
    )
