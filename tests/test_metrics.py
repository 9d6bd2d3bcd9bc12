"""Evaluation metrics on small synthetic 64x64 slices made here."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from pipeline.metrics import quality as metrics

SIZE = 64


def _blobs(n: int, seed: int) -> np.ndarray:
    """Smooth random blobs (n, 1, 64, 64) rescaled to [0, 1] per image."""
    noise = np.random.default_rng(seed).random((n, 1, SIZE, SIZE))
    x = gaussian_filter(noise, sigma=(0, 0, 4, 4))
    lo, hi = x.min(axis=(2, 3), keepdims=True), x.max(axis=(2, 3), keepdims=True)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def _blur(x: np.ndarray) -> np.ndarray:
    return gaussian_filter(x, sigma=(0, 0, 1.5, 1.5)).astype(np.float32)


def _disk_mask(n: int, radius: float = 22.0) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    disk = (yy**2 + xx**2 <= radius**2).astype(np.float32)
    return np.broadcast_to(disk, (n, 1, SIZE, SIZE)).copy()


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    return _blobs(160, seed=0)


@pytest.fixture(scope="module")
def real_feats(real: np.ndarray) -> np.ndarray:
    return metrics.alex_features(real, batch_size=64)


@pytest.fixture(scope="module")
def blur_feats(real: np.ndarray) -> np.ndarray:
    return metrics.alex_features(_blur(real), batch_size=64)


def test_alex_features_shape_and_determinism(real: np.ndarray, real_feats: np.ndarray) -> None:
    assert real_feats.shape == (160, 256) and real_feats.dtype == np.float64
    again = metrics.alex_features(real[:8], batch_size=64)
    np.testing.assert_array_equal(again, metrics.alex_features(real[:8], batch_size=64))
    np.testing.assert_allclose(
        metrics.alex_features(real[:8], batch_size=3), again, rtol=1e-4, atol=1e-6
    )


def test_identical_sets(real_feats: np.ndarray, blur_feats: np.ndarray) -> None:
    assert metrics.fd_alex(real_feats, real_feats) == pytest.approx(0.0, abs=1e-6)
    assert metrics.precision_recall(real_feats, real_feats) == (1.0, 1.0)
    # Subsets as large as the sets: both are the full set. The unbiased MMD^2 estimate of a
    # set against itself is slightly negative (matching pairs enter only the cross term).
    kid_same, _ = metrics.kid(real_feats, real_feats, num_subsets=2, subset_size=1000)
    kid_blur, _ = metrics.kid(real_feats, blur_feats, num_subsets=2, subset_size=1000)
    assert -0.3 * kid_blur < kid_same <= 0.0


def test_blurred_set_scores_worse(real_feats: np.ndarray, blur_feats: np.ndarray) -> None:
    blurred = metrics.fd_alex(real_feats, blur_feats)
    assert blurred > 0.5 and blurred > metrics.fd_alex(real_feats, real_feats)


def test_frechet_distance_of_known_gaussians() -> None:
    # N(0, 1) vs N(1, 4): 1 + 1 + 4 - 2 * sqrt(1 * 4) = 2.
    assert metrics.frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == (
        pytest.approx(2.0)
    )
    with pytest.raises(ValueError, match="sigma2"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


def test_precision_recall_of_disjoint_sets() -> None:
    a = np.random.default_rng(0).normal(size=(50, 8))
    assert metrics.precision_recall(a, a + 100.0) == (0.0, 0.0)


def test_kid_is_deterministic_under_seed(real_feats: np.ndarray, blur_feats: np.ndarray) -> None:
    first = metrics.kid(real_feats, blur_feats, num_subsets=5, subset_size=50, seed=3)
    assert first == metrics.kid(real_feats, blur_feats, num_subsets=5, subset_size=50, seed=3)


def test_ssim_and_psnr_of_identical_images(real: np.ndarray) -> None:
    x = real[:4]
    np.testing.assert_allclose(metrics.ssim(x, x).numpy(), 1.0, atol=1e-5)
    np.testing.assert_allclose(metrics.psnr(x, x).numpy(), 100.0)
    noisy = np.clip(x + 0.1 * np.random.default_rng(1).normal(size=x.shape), 0, 1)
    assert (metrics.ssim(x, noisy) < 0.9).all()
    assert (metrics.psnr(x, noisy) < 30).all()


def test_ssim_brain_ignores_black_background() -> None:
    mask = _disk_mask(4)
    real = 0.6 * mask
    noise = np.random.default_rng(2).normal(scale=0.15, size=real.shape)
    recon = np.clip(real + noise * mask, 0, 1).astype(np.float32)
    whole = metrics.ssim(real, recon)
    brain = metrics.ssim_brain(real, recon, mask)
    assert (brain < whole - 0.2).all()
    empty = metrics.ssim_brain(real, recon, np.zeros_like(mask))
    assert torch.isnan(empty).all()


def test_ms_ssim_diversity(real: np.ndarray) -> None:
    same = np.repeat(real[:1], 6, axis=0)
    assert metrics.ms_ssim_diversity(same) == pytest.approx(1.0, abs=1e-5)
    noise = np.random.default_rng(3).random((6, 1, SIZE, SIZE)).astype(np.float32)
    assert metrics.ms_ssim_diversity(noise) < 0.2
    sampled = metrics.ms_ssim_diversity(real[:20], num_pairs=20, seed=1)
    assert sampled == metrics.ms_ssim_diversity(real[:20], num_pairs=20, seed=1)
    assert metrics.ms_ssim_settings(SIZE, SIZE)[0] == 7
    assert len(metrics.ms_ssim_settings(SIZE, SIZE)[1]) == 4


def test_intensity_distance_per_z(real: np.ndarray) -> None:
    z = np.arange(len(real)) % 4
    per_z, mean = metrics.intensity_distance_per_z(real, z, real, z)
    assert set(per_z) == {0, 1, 2, 3}
    assert mean == 0.0
    darker = (real * 0.8).astype(np.float32)
    per_z, mean = metrics.intensity_distance_per_z(real, z, darker[:20], z[:20])
    assert mean > 0.05
    blank = np.zeros_like(real[:4])
    per_z, _ = metrics.intensity_distance_per_z(real, z, blank, z[:4])
    assert all(v > 0.3 for v in per_z.values())


def test_reconstruction_metrics(real: np.ndarray) -> None:
    x, mask = real[:12], _disk_mask(12)
    z = np.array([3] * 6 + [7] * 6)
    out = metrics.reconstruction_metrics(x, x, mask, z)
    assert out["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert out["ssim_brain"] == pytest.approx(1.0, abs=1e-5)
    assert out["psnr"] == pytest.approx(100.0)
    assert out["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert set(out["per_z"]) == {3, 7}
    assert set(out["per_z"][3]) == {"ssim", "ssim_brain", "psnr", "lpips"}
    blurred = metrics.reconstruction_metrics(x, _blur(x), mask, z)
    assert blurred["lpips"] > 1e-3 and blurred["psnr"] < 100.0
    assert all(math.isfinite(v) for v in blurred["per_z"][7].values())


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: metrics.ssim(x, x[:, :, :32]), "fake must have the same shape"),
        (lambda x: metrics.psnr(x[:, 0], x[:, 0]), r"real must have shape \(N, 1, H, W\)"),
        (lambda x: metrics.ssim(x, x + 2.0), r"fake must hold finite intensities in \[0, 1\]"),
        (lambda x: metrics.ssim_brain(x, x, x[:2]), "mask must have the same shape"),
        (lambda x: metrics.reconstruction_metrics(x, x, x, [0]), "z_index must be integers"),
        (lambda x: metrics.ms_ssim_diversity(x[:1]), "at least 2"),
        (lambda x: metrics.fd_alex(np.zeros((4, 3)), np.zeros((4, 2))), "feature dimension"),
    ],
)
def test_invalid_inputs_name_the_argument(
    real: np.ndarray, call: Callable[[torch.Tensor], object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        call(torch.from_numpy(real[:4]))
