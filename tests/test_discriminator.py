"""The z-conditioned PatchGAN discriminator."""

from __future__ import annotations

import pytest
import torch
from support import TINY_COND

from pipeline.core.config import ConditioningConfig, DiscriminatorConfig
from pipeline.models.discriminator import ZPatchDiscriminator
from pipeline.training.losses import discriminator_loss


def _disc(n_layers: int = 2) -> ZPatchDiscriminator:
    torch.manual_seed(0)
    return ZPatchDiscriminator(
        DiscriminatorConfig(channels=8, n_layers=n_layers, norm_groups=4), TINY_COND
    )


@pytest.mark.parametrize(("n_layers", "size", "out"), [(1, 32, 14), (2, 32, 6), (3, 64, 6)])
def test_patch_logit_shapes(n_layers: int, size: int, out: int) -> None:
    d = _disc(n_layers)
    logits = d(torch.rand(3, 1, size, size), torch.rand(3))
    assert logits.shape == (3, 1, out, out)
    assert len(d.z_bias) == n_layers + 1  # a z bias after every conv block but the logit conv


def test_changing_z_changes_the_score() -> None:
    d = _disc().eval()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    low, high = d(x, torch.zeros(2)), d(x, torch.ones(2))
    assert (low - high).abs().mean() > 1e-3
    torch.testing.assert_close(d(x, torch.zeros(2)), low)


def test_discriminator_learns_real_from_fake() -> None:
    d = _disc()
    gen = torch.Generator().manual_seed(2)
    real = torch.rand(4, 1, 32, 32, generator=gen) * 0.5 + 0.5
    fake = torch.rand(4, 1, 32, 32, generator=gen) * 0.5
    z = torch.rand(4, generator=gen)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = discriminator_loss(d(real, z), d(fake, z))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stem_sees_the_slice_more_than_the_z_bias(seed: int) -> None:
    """At init the stem's response to a slice is well above the z bias added to it.

    Demo widths (16 channels, a 128-wide condition): 2.7-5.3x the bias here. MONAI's
    N(0, 0.02) conv init gave 0.5x, and that discriminator never learned the demo's
    reconstructions from real slices (hinge loss 1.00).
    """
    torch.manual_seed(seed)
    d = ZPatchDiscriminator(DiscriminatorConfig(channels=16, n_layers=2), ConditioningConfig())
    x = torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    z = torch.rand(8, generator=torch.Generator().manual_seed(4))
    stem = next(iter(d.net.children()))
    with torch.no_grad():
        response = stem(x).std()
        bias = d.z_bias[0](torch.nn.functional.silu(d.z_embed(z))).std()
    assert response > 2 * bias
