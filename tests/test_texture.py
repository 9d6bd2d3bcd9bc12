"""Texture: the noise estimator, the calibration, the Rician noise, the residual texture and the
background floor on known cases."""

from __future__ import annotations

import json
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
    add_residual,
    add_scan_noise,
    background_floor,
    clear_background,
    finish,
    kernel_from_autocorrelation,
    masked_autocorrelation,
    missing_sigma,
    noise_sigma,
    residual_texture,
    rician_mean,
    rician_signal,
    soft_top,
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
    # a file with the residual texture draws it instead of the scan noise, below 1
    clean = disc()
    gm.metadata["texture_residual"] = residual_texture(coloured(clean, 0.03), clean).as_meta()
    residual, _ = sample(gm, [0.5], 3, seed=4)
    assert not torch.equal(residual, textured) and float(residual.max()) < 1.0
    assert torch.equal(residual[~foreground], plain[~foreground])


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
    assert Texture().is_identity and not Texture(sigma=0.03).is_identity


def test_texture_metadata_round_trips_and_old_files_read_as_zero() -> None:
    clean = disc()
    residual = residual_texture(coloured(clean, 0.03), clean)
    texture = Texture(sigma=0.02, background_floor=0.03, residual=residual)
    stored = json.loads(json.dumps(texture.as_meta()))  # what meta.json and model files hold
    assert Texture.from_meta(stored) == texture
    assert Texture.from_meta({}) == Texture() == (0.0, 0.0, None)
    assert Texture.from_meta({"texture_sigma": 0.02}) == Texture(0.02, 0.0)
    assert texture.summary() == {
        "texture_sigma": 0.02,
        "background_floor": 0.03,
        "texture_residual_std": pytest.approx(float(np.mean(residual.std))),
    }
    assert Texture().summary()["texture_residual_std"] == 0.0


#: A 3x3 box filter: white noise through it has autocorrelation 6/9, 3/9 and 0 at lags 1, 2, 3.
BOX = torch.full((3, 3), 1 / 3)


def coloured(clean: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    """``clean`` plus noise of std ``sigma`` coloured by :data:`BOX` on its foreground."""
    white = torch.randn(
        (clean.shape[0], 1, clean.shape[-2] + 2, clean.shape[-1] + 2),
        generator=torch.Generator().manual_seed(seed),
    )
    noise = torch.nn.functional.conv2d(white, BOX.view(1, 1, 3, 3))
    return torch.where(clean > 0, clean + sigma * noise, clean)


def interior(images: torch.Tensor) -> torch.Tensor:
    """Pixels 4 px or more inside the foreground (the disc's edge is not in the residual)."""
    fg = (images > 0).float()
    return torch.nn.functional.avg_pool2d(fg, 9, stride=1, padding=4) > 0.999


def test_masked_autocorrelation_measures_the_colour_inside_the_mask_only() -> None:
    clean = disc(16)
    residual = coloured(clean, 0.03) - clean
    acf = masked_autocorrelation(residual, interior(clean), radius=3)
    assert acf.shape == (7, 7) and float(acf[3, 3]) == 1.0
    for lag, expected in ((1, 6 / 9), (2, 3 / 9), (3, 0.0)):
        assert float(acf[3, 3 + lag]) == pytest.approx(expected, abs=0.03)
        assert float(acf[3 + lag, 3]) == pytest.approx(expected, abs=0.03)
    # white noise: nothing beyond lag 0; an empty mask: zeros, not a division by zero
    white = noisy(clean, 0.03) - clean
    assert float(masked_autocorrelation(white, interior(clean), 2)[2, 3]) == pytest.approx(
        0, abs=0.02
    )
    assert not masked_autocorrelation(white, torch.zeros_like(clean, dtype=torch.bool), 2).any()


def test_the_kernel_turns_white_noise_into_the_measured_autocorrelation() -> None:
    lags = torch.arange(-3, 4).abs()
    box_acf = (torch.clamp(3 - lags, min=0) / 3.0)[:, None] * (torch.clamp(3 - lags, min=0) / 3.0)
    kernel = kernel_from_autocorrelation(box_acf.double())
    assert kernel.shape == (7, 7)
    assert float(kernel.square().sum()) == pytest.approx(1.0, abs=1e-5)  # unit variance out
    self_conv = torch.nn.functional.conv2d(
        torch.nn.functional.pad(kernel.view(1, 1, 7, 7), (3, 3, 3, 3)), kernel.view(1, 1, 7, 7)
    )[0, 0]
    torch.testing.assert_close(self_conv.double(), box_acf.double(), atol=0.02, rtol=0)
    delta = torch.zeros(5, 5, dtype=torch.float64)
    delta[2, 2] = 1.0
    torch.testing.assert_close(kernel_from_autocorrelation(delta), delta.float(), atol=1e-6, rtol=0)


def test_residual_texture_redraws_the_level_and_colour_the_decoder_missed() -> None:
    clean = disc(16)
    residual = residual_texture(coloured(clean, 0.03), clean)
    assert residual is not None
    assert np.asarray(residual.kernel).shape == (9, 9)
    assert np.asarray(residual.std).shape == (5, 5) and len(residual.intensity_edges) == 4
    drawn = add_residual(clean, residual, torch.Generator().manual_seed(1))
    inside = interior(clean)
    assert float((drawn - clean)[inside].std()) == pytest.approx(0.03, rel=0.1)
    acf = masked_autocorrelation(drawn - clean, inside, radius=3)
    assert float(acf[3, 4]) == pytest.approx(6 / 9, abs=0.05)
    assert float(acf[3, 6]) == pytest.approx(0.0, abs=0.05)
    assert torch.equal(drawn[clean == 0], clean[clean == 0])  # the background stays 0
    again = add_residual(clean, residual, torch.Generator().manual_seed(1))
    assert torch.equal(drawn, again)
    assert not torch.equal(drawn, add_residual(clean, residual, torch.Generator().manual_seed(2)))


def test_the_residual_tables_follow_where_the_decoder_misses_and_what_it_darkens() -> None:
    clean = disc(16)
    dark = clean < 0.7  # the outer ring of the ramp: the decoder misses more there
    sigma = torch.where(dark, 0.06, 0.01)
    real = torch.where(clean > 0, clean + 0.02 + sigma * torch.randn(clean.shape), clean)
    residual = residual_texture(real, clean)
    std, mean = np.asarray(residual.std), np.asarray(residual.mean)
    populated = std > 0
    assert std[0][populated[0]].mean() > 3 * std[-1][populated[-1]].mean()  # by intensity
    assert mean[populated] == pytest.approx(0.02, abs=0.01)  # the decode is 0.02 too dark
    assert residual_texture(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16)) is None


def test_soft_top_keeps_finished_slices_below_one_and_the_rest_unchanged() -> None:
    x = torch.linspace(0, 1.2, 241)  # a decoded 1 plus the residual's largest draws
    y = soft_top(x)
    below = x <= 0.95
    assert torch.equal(y[below], x[below])
    assert float(y.max()) < 1.0 and bool((y[~below] > 0.95).all())
    assert bool((y.diff() > 0).all())  # increasing: intensities keep their order


def test_finish_draws_the_residual_texture_where_it_is_calibrated() -> None:
    clean = disc()
    residual = residual_texture(coloured(clean, 0.03), clean)
    recon = hazy(clean, 0.03).clamp(max=0.99) + 0.2 * (clean > 0)  # some pixels near 1
    texture = Texture(sigma=0.5, background_floor=0.031, residual=residual)
    out = finish(recon, texture, torch.Generator().manual_seed(3))
    assert torch.equal(out[clean == 0], torch.zeros_like(out[clean == 0]))
    assert float(out.max()) < 1.0  # soft top, not a clamp at 1
    # the residual texture, not the (here absurd) scan-noise sigma
    assert float((out - recon)[interior(clean)].std()) == pytest.approx(0.03, rel=0.2)


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
