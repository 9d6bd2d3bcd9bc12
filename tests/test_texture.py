"""Texture: the noise estimator, the calibration, the Rician noise and the background floor on
known cases."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from support import save_tiny_ldm

from pipeline.core.errors import InputError
from pipeline.inference.sampling import load_generator, sample
from pipeline.inference.texture import (
    FOREGROUND,
    Texture,
    add_scan_noise,
    background_floor,
    clear_background,
    finish,
    missing_sigma,
    noise_sigma,
    rician_mean,
    rician_signal,
)


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


def test_rician_noise_keeps_the_mean_of_dark_foreground_above_the_noise_floor() -> None:
    brain = (disc() > 0).float()
    dark = add_scan_noise(0.1 * brain, 0.05, torch.Generator().manual_seed(2))[brain > 0]
    # |x + n| on the value itself would lift it: E = 0.05 * rician_mean(2) ~= 0.112
    assert float(dark.mean()) == pytest.approx(0.1, abs=0.002)
    # below the floor sigma * sqrt(pi/2) no signal can keep the mean: the floor is the least
    darker = add_scan_noise(0.03 * brain, 0.05, torch.Generator().manual_seed(2))[brain > 0]
    assert float(darker.mean()) == pytest.approx(0.05 * math.sqrt(math.pi / 2), rel=0.02)


def test_rician_signal_inverts_the_rician_mean() -> None:
    nu = torch.tensor([0.0, 0.5, 1.0, 3.0, 20.0, 100.0], dtype=torch.float64)
    assert float(rician_mean(torch.zeros(1, dtype=torch.float64))) == pytest.approx(
        math.sqrt(math.pi / 2)
    )
    assert float(rician_mean(nu)[-1]) == pytest.approx(100.0, rel=1e-4)  # no bias far above
    sigma = 0.02
    means = rician_mean(nu[1:]) * sigma
    torch.testing.assert_close(rician_signal(means, sigma), nu[1:] * sigma, atol=1e-6, rtol=1e-4)
    assert float(rician_signal(torch.tensor([0.01]), sigma)) == 0.0  # below the floor


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


def test_ldm_slices_are_decoded_as_posterior_samples_unless_texture_is_off(
    tiny_generators: dict[str, Path], tmp_path: Path, one_thread: None
) -> None:
    path = save_tiny_ldm(tmp_path / "ldm.pt", tiny_generators["vaegan"], posterior_std=0.4)
    gm = load_generator(path)
    assert gm.codec.posterior_std == 0.4
    drawn, _ = sample(gm, [0.5], 3, seed=4)
    plain, _ = sample(gm, [0.5], 3, seed=4, texture=False)
    # the same UNet and latents, decoded at the posterior mean (a file without posterior_std)
    mean_decoded, _ = sample(load_generator(tiny_generators["ldm"]), [0.5], 3, seed=4)
    assert torch.equal(plain, mean_decoded)
    assert not torch.allclose(drawn, plain)
    again, _ = sample(gm, [0.5], 3, seed=4)
    assert torch.equal(again, drawn)


def test_sdedit_decodes_its_edit_as_generate_does(
    tiny_generators: dict[str, Path], tmp_path: Path, one_thread: None
) -> None:
    from PIL import Image

    from pipeline.data.slice_files import read_slice
    from pipeline.inference.edit import sdedit_file

    image = tmp_path / "in.png"
    Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))).save(image)
    drawn_model = save_tiny_ldm(tmp_path / "ldm.pt", tiny_generators["vaegan"], posterior_std=0.4)
    outputs = {}
    for name, model in (("mean", tiny_generators["ldm"]), ("a", drawn_model), ("b", drawn_model)):
        out = sdedit_file(model, image, tmp_path / f"{name}.png", "0.5", seed=2, device="cpu")
        outputs[name] = read_slice(out)
    assert np.array_equal(outputs["a"], outputs["b"])
    assert not np.array_equal(outputs["a"], outputs["mean"])


def hazy(clean: torch.Tensor, level: float, seed: int = 0) -> torch.Tensor:
    """``clean`` with a decoder's background haze: uniform in [0, level] where it is 0."""
    haze = level * torch.rand(clean.shape, generator=torch.Generator().manual_seed(seed))
    return torch.where(clean > 0, clean, haze)


def test_background_floor_is_the_haze_a_decoder_leaves_where_real_slices_are_zero() -> None:
    clean = disc()
    assert background_floor(clean, hazy(clean, 0.04)) == pytest.approx(0.99 * 0.04, rel=0.02)
    assert background_floor(clean, hazy(clean, 0.04), quantile=0.5) == pytest.approx(0.02, rel=0.05)
    assert background_floor(clean, clean) == 0.0  # a clean background: nothing to clear
    assert background_floor(torch.ones(2, 1, 8, 8), torch.ones(2, 1, 8, 8)) == 0.0  # none


def test_clear_background_zeroes_the_haze_and_keeps_the_brain() -> None:
    clean = disc()
    recon = hazy(clean, 0.04)
    cleared = clear_background(recon, background_floor(clean, recon))
    brain = clean > 0
    assert torch.equal(cleared[brain], recon[brain])  # every brain pixel is above the floor
    assert float((cleared[~brain] == 0).float().mean()) == pytest.approx(0.99, abs=0.002)
    assert torch.equal(clear_background(recon, 0.0), recon)


def test_finish_clears_the_background_then_adds_noise_to_the_brain_only() -> None:
    clean = disc()
    recon = hazy(clean, 0.03)
    out = finish(recon, Texture(sigma=0.03, background_floor=0.031), torch.Generator())
    assert torch.equal(out[clean == 0], torch.zeros_like(out[clean == 0]))
    assert noise_sigma(out) == pytest.approx(0.03, rel=0.15)
    assert torch.equal(finish(recon, Texture(), torch.Generator()), recon)


def test_texture_metadata_round_trips_and_old_files_read_as_zero() -> None:
    texture = Texture(sigma=0.02, background_floor=0.03)
    assert Texture.from_meta(texture.as_meta()) == texture
    assert Texture.from_meta({}) == Texture() == (0.0, 0.0)
    assert Texture.from_meta({"texture_sigma": 0.02}) == Texture(0.02, 0.0)


def test_sample_clears_the_model_files_background_floor(
    tiny_generators: dict[str, Path], one_thread: None
) -> None:
    gm = load_generator(tiny_generators["ldm"])
    plain, _ = sample(gm, [0.5], 3, seed=4)
    floor = float(plain.median())  # an untrained model: about half its pixels fall below
    gm.metadata["background_floor"] = floor
    cleared, _ = sample(gm, [0.5], 3, seed=4)
    assert torch.equal(cleared[plain < floor], torch.zeros_like(cleared[plain < floor]))
    assert torch.equal(cleared[plain >= floor], plain[plain >= floor])
    untouched, _ = sample(gm, [0.5], 3, seed=4, texture=False)
    assert torch.equal(untouched, plain)
