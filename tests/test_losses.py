"""Loss terms: cyclical KL schedule, Gaussian KL, GAN losses, VQGAN adaptive weight."""

from __future__ import annotations

import pytest
import torch

from pipeline.metrics.quality import ssim
from pipeline.models.autoencoder import gaussian_kl
from pipeline.training.losses import (
    adaptive_weight,
    discriminator_loss,
    generator_loss,
    kl_weight,
    ssim_loss,
)


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 0.0),
        (5, 0.4),
        (12, 0.96),
        (13, 1.0),
        (24, 1.0),
        (25, 0.0),
        (30, 0.4),
        (99, 1.0),
        (100, 1.0),
        (500, 1.0),
    ],
)
def test_kl_weight_cyclical_schedule(step: int, expected: float) -> None:
    # 100 steps, 4 cycles of 25 steps, ramp over the first half of each cycle.
    w = kl_weight(step, 100, cycles=4, ramp_ratio=0.5, max_weight=2.0)
    assert w == pytest.approx(2.0 * expected)


def test_kl_weight_single_cycle_full_ramp() -> None:
    weights = [kl_weight(s, 10, cycles=1, ramp_ratio=1.0, max_weight=1.0) for s in range(10)]
    assert weights == pytest.approx([s / 10 for s in range(10)])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(ramp_ratio=0.0),
        dict(ramp_ratio=1.5),
        dict(cycles=0),
        dict(total_steps=0),
        dict(step=-1),
    ],
)
def test_kl_weight_rejects_bad_arguments(kwargs: dict) -> None:
    args = dict(step=0, total_steps=10, cycles=2, ramp_ratio=0.5, max_weight=1.0) | kwargs
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        kl_weight(args.pop("step"), args.pop("total_steps"), **args)


def test_gaussian_kl_matches_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 3, 4, 4, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    post = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(post, prior).mean()
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected)
    assert gaussian_kl(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)).item() == 0.0


def test_hinge_and_lsq_losses() -> None:
    real, fake = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)
    assert discriminator_loss(real, fake, "hinge").item() == 0.0
    assert discriminator_loss(-real, -fake, "hinge").item() == pytest.approx(3.0)
    assert discriminator_loss(torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3), "lsq").item() == 0.0
    assert generator_loss(real, "hinge").item() == pytest.approx(-2.0)
    assert generator_loss(torch.ones(1, 1, 2, 2), "lsq").item() == 0.0
    with pytest.raises(ValueError, match="hinge"):
        generator_loss(real, "wasserstein")  # type: ignore[arg-type]


def test_adaptive_weight_is_gradient_norm_ratio() -> None:
    last = torch.nn.Parameter(torch.ones(3, 2))
    rec = 2.0 * last.sum()
    adv = 0.5 * last.sum()
    w = adaptive_weight(rec, adv, last)
    assert w.item() == pytest.approx(4.0, rel=1e-3)
    assert not w.requires_grad
    (rec + w * adv).backward()  # the graph was retained for the real backward pass
    assert adaptive_weight(2.0 * last.sum(), 1e-9 * last.sum(), last, max_weight=7.0).item() == 7.0


def test_ssim_loss_is_one_minus_the_reported_ssim_and_differentiable() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 64, 64, generator=gen)
    y = (x + 0.1 * torch.randn(3, 1, 64, 64, generator=gen)).clamp(0, 1).requires_grad_()
    loss = ssim_loss(y, x)
    assert loss.item() == pytest.approx(1 - ssim(x, y.detach()).mean().item(), abs=1e-6)
    assert ssim_loss(x, x).item() == pytest.approx(0, abs=1e-6)
    loss.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
