"""Scan-noise texture: the estimator, the calibration and the Rician noise on known cases."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.core.errors import InputError
from pipeline.inference.sampling import load_generator, sample
from pipeline.inference.texture import FOREGROUND, add_scan_noise, missing_sigma, noise_sigma


def disc(n: int = 8, size: int = 64, level: float = 0.6) -> torch.Tensor:
    """(n, 1, size, size) smooth bright discs (a radial ramp) on a zero background."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2).sqrt() / (size / 2)
    image = torch.where(r < 0.8, level + 0.2 * (1 - r), torch.zeros(()))
    return image.expand(n, 1, size, size).clone()


def noisy(clean: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(clean > 0, clean + sigma * noise, clean)


@pytest.mark.parametrize("sigma", [0.01, 0.03, 0.08])
def test_noise_sigma_recovers_gaussian_noise_inside_the_brain(sigma: float) -> None:
    assert noise_sigma(noisy(disc(), sigma)) == pytest.approx(sigma, rel=0.1)


def test_noise_sigma_ignores_smooth_structure_and_the_background() -> None:
    assert noise_sigma(disc()) < 0.002  # a smooth ramp and a sharp edge to zero: no noise
    assert noise_sigma(torch.zeros(2, 1, 16, 16)) == 0.0


def test_missing_sigma_is_the_noise_a_smoother_removed() -> None:
    clean = disc()
    assert missing_sigma(noisy(clean, 0.04), clean) == pytest.approx(0.04, rel=0.1)
    assert missing_sigma(clean, noisy(clean, 0.04)) == 0.0  # reconstructions noisier: nothing


def test_add_scan_noise_puts_the_calibrated_level_back_on_the_foreground_only() -> None:
    clean = disc()
    out = add_scan_noise(clean, 0.03, torch.Generator().manual_seed(1))
    assert torch.equal(out[clean == 0], clean[clean == 0])
    assert noise_sigma(out) == pytest.approx(0.03, rel=0.15)  # Rician ~ Gaussian at 0.6+
    assert out.min() >= 0 and out.max() <= 1
    again = add_scan_noise(clean, 0.03, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert torch.equal(add_scan_noise(clean, 0.0, torch.Generator()), clean)


def test_rician_noise_lifts_dark_foreground_as_magnitude_images_do() -> None:
    dark = 0.05 * (disc() > 0).float()
    out = add_scan_noise(dark, 0.05, torch.Generator().manual_seed(2))
    lifted = out[dark > 0].mean() - 0.05
    # E|x + n| for x = sigma: sigma * sqrt(pi/2) * L_{1/2}(-1/2) ~= 1.55 sigma -> +0.028
    assert 0.02 < float(lifted) < 0.035


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
def test_bad_sigma_is_one_clear_error(bad: float) -> None:
    with pytest.raises(InputError, match="texture sigma"):
        add_scan_noise(disc(1), bad, torch.Generator())


def test_noise_sigma_rejects_a_wrong_shape() -> None:
    with pytest.raises(InputError, match=r"\(N, 1, H>=3, W>=3\)"):
        noise_sigma(torch.zeros(4, 4))


def test_sample_adds_the_model_files_texture_and_can_leave_it_off(
    tiny_generators: dict[str, Path], one_thread: None
) -> None:
    gm = load_generator(tiny_generators["pixelcnn"])
    plain, _ = sample(gm, [0.5], 3, seed=4)
    gm.metadata["texture_sigma"] = 0.05
    textured, _ = sample(gm, [0.5], 3, seed=4)
    untouched, _ = sample(gm, [0.5], 3, seed=4, texture=False)
    assert torch.equal(untouched, plain)
    foreground = plain > FOREGROUND
    assert bool(foreground.any())
    assert not torch.equal(textured[foreground], plain[foreground])
    assert torch.equal(textured[~foreground], plain[~foreground])
    again, _ = sample(gm, [0.5], 3, seed=4)
    assert torch.equal(again, textured)
