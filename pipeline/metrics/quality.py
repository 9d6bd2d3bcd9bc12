"""Evaluation metrics on batches of single-channel slices with intensities in [0, 1].

Images are ``(N, 1, H, W)`` tensors or numpy arrays. Reconstruction metrics (SSIM, brain-masked
SSIM, PSNR, LPIPS) compare pairs sample by sample; distribution metrics compare a real and a
generated set through AlexNet features of the LPIPS trunk (:func:`alex_features`):

- ``fd_alex``: Fréchet distance on those features. It is not FID (no Inception network) and
  must never be reported as FID.
- ``kid``: kernel inception distance computed on the same features (Bińkowski et al. 2018).
- improved precision / recall (Kynkäänniemi et al. 2019).

Everything is batched (2000 slices of 64x64 fit in CPU memory) and deterministic: random
subsets and pairs come from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics.regression import compute_ms_ssim, compute_ssim_and_cs
from scipy import linalg, stats

from pipeline.core.errors import InputError
from pipeline.metrics.perceptual import get_lpips

logger = logging.getLogger(__name__)

Images = torch.Tensor | np.ndarray
Labels = torch.Tensor | np.ndarray | Sequence[int]

SSIM_SIGMA = 1.5
# MS-SSIM scale weights of Wang et al. (2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# PSNR of identical images would be +inf; the MSE is floored so it tops out at 100 dB.
PSNR_MIN_MSE = 1e-10


def as_images(x: Images, name: str) -> torch.Tensor:
    """Validate a (N, 1, H, W) batch with finite intensities in [0, 1]; return float32 on CPU."""
    # np.array copies, so read-only memmaps are fine.
    t = (
        x.detach().cpu().float()
        if isinstance(x, torch.Tensor)
        else torch.from_numpy(np.array(x, dtype=np.float32))
    )
    if t.ndim != 4 or t.shape[1] != 1 or t.shape[0] == 0:
        raise InputError(f"{name} must have shape (N, 1, H, W) with N >= 1; got {tuple(t.shape)}")
    lo, hi = t.min().item(), t.max().item()
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0.0 or hi > 1.0:
        raise InputError(
            f"{name} must hold finite intensities in [0, 1]; got range [{lo:.4g}, {hi:.4g}] "
            "(clamp with .clamp(0, 1) first)"
        )
    return t


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise InputError(
            f"{name_b} must have the same shape as {name_a}; got {tuple(b.shape)} "
            f"and {tuple(a.shape)}"
        )


def _as_mask(mask: Images, like: torch.Tensor) -> torch.Tensor:
    """Validate a (N, 1, H, W) mask shaped like ``like``; return it as bool (nonzero = inside)."""
    t = mask.detach().cpu() if isinstance(mask, torch.Tensor) else torch.from_numpy(np.array(mask))
    _check_same_shape(like, t, "real", "mask")
    return t != 0


def _as_labels(z_index: Labels, n: int, name: str = "z_index") -> np.ndarray:
    """Validate integer labels of shape (N,)."""
    z = np.asarray(z_index.cpu() if isinstance(z_index, torch.Tensor) else z_index)
    if z.shape != (n,) or not np.issubdtype(z.dtype, np.integer):
        raise InputError(f"{name} must be integers of shape ({n},); got {z.dtype} {z.shape}")
    return z


def ssim_kernel_size(height: int, width: int) -> int:
    """Gaussian SSIM window fitted to the image: 11 (Wang et al.) from 64 px, else 7.

    Args:
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        Window side, 11 or 7.

    Raises:
        ValueError: the image is smaller than 7 px on a side.
    """
    side = min(height, width)
    if side < 7:
        raise InputError(f"images must be at least 7x7 for SSIM; got {height}x{width}")
    return 11 if side >= 64 else 7


def local_ssim(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Local SSIM map of two image batches, unchecked and differentiable.

    Gaussian window from :func:`ssim_kernel_size`, sigma 1.5, data range 1, valid
    convolution (the map is ``kernel_size - 1`` pixels smaller than the image per side).
    :func:`ssim_map` checks its inputs and batches; the training loss
    (:func:`pipeline.training.losses.ssim_loss`) calls this directly, since a reconstruction may
    leave [0, 1] during training.

    Args:
        real: (N, 1, H, W) reference images.
        fake: (N, 1, H, W) images to compare.

    Returns:
        (N, 1, H - k + 1, W - k + 1) local SSIM values.
    """
    k = ssim_kernel_size(*real.shape[-2:])
    return compute_ssim_and_cs(
        fake.float(),
        real.float(),
        spatial_dims=2,
        kernel_size=(k, k),
        kernel_sigma=(SSIM_SIGMA, SSIM_SIGMA),
        data_range=1.0,
    )[0]


def ssim_map(real: Images, fake: Images, *, batch_size: int = 256) -> torch.Tensor:
    """Local SSIM map (Gaussian window from :func:`ssim_kernel_size`, sigma 1.5, data range 1).

    MONAI computes it with a valid convolution, so the map is smaller than the image by
    ``kernel_size - 1`` pixels in each dimension.

    Args:
        real: reference images (N, 1, H, W), intensities in [0, 1].
        fake: images to compare (N, 1, H, W), intensities in [0, 1].
        batch_size: images per batch.

    Returns:
        (N, 1, H - k + 1, W - k + 1) local SSIM values in [-1, 1].

    Raises:
        ValueError: a shape or range is wrong.
    """
    real, fake = as_images(real, "real"), as_images(fake, "fake")
    _check_same_shape(real, fake, "real", "fake")
    return torch.cat(
        [
            local_ssim(r, f)
            for r, f in zip(real.split(batch_size), fake.split(batch_size), strict=True)
        ]
    )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of (N, 1, h, w) values over a centre-cropped (N, 1, H, W) mask."""
    dh, dw = (mask.shape[-2] - values.shape[-2]) // 2, (mask.shape[-1] - values.shape[-1]) // 2
    m = mask[..., dh : dh + values.shape[-2], dw : dw + values.shape[-1]].float()
    count = m.sum(dim=(1, 2, 3))
    total = (values * m).sum(dim=(1, 2, 3))
    return torch.where(count > 0, total / count.clamp_min(1), torch.nan)


def ssim(real: Images, fake: Images, *, batch_size: int = 256) -> torch.Tensor:
    """Whole-image SSIM per sample (mean of :func:`ssim_map`).

    A black background counts as perfectly reconstructed and pushes this figure up; see
    :func:`ssim_brain` for the brain-only value.

    Args:
        real: reference images (N, 1, H, W), intensities in [0, 1].
        fake: images to compare (N, 1, H, W), intensities in [0, 1].
        batch_size: images per batch.

    Returns:
        (N,) SSIM in [-1, 1]; 1 for identical images.
    """
    return ssim_map(real, fake, batch_size=batch_size).mean(dim=(1, 2, 3))


def ssim_brain(real: Images, fake: Images, mask: Images, *, batch_size: int = 256) -> torch.Tensor:
    """SSIM averaged over brain pixels only.

    The SSIM map (valid convolution) is aligned with the centre of the mask, so brain pixels
    within ``(kernel_size - 1) / 2`` of the image border are not counted.

    Args:
        real: reference images (N, 1, H, W), intensities in [0, 1].
        fake: images to compare (N, 1, H, W), intensities in [0, 1].
        mask: brain mask (N, 1, H, W), nonzero = brain.
        batch_size: images per batch.

    Returns:
        (N,) SSIM in [-1, 1]; NaN for a sample whose mask is empty.
    """
    real_t = as_images(real, "real")
    brain = _as_mask(mask, real_t)
    return _masked_mean(ssim_map(real_t, fake, batch_size=batch_size), brain)


def psnr(real: Images, fake: Images) -> torch.Tensor:
    """Peak signal-to-noise ratio per sample, data range 1.

    Identical images would give +inf; the MSE is floored at 1e-10 so the value tops out at
    100 dB and dataset means stay finite.

    Args:
        real: reference images (N, 1, H, W), intensities in [0, 1].
        fake: images to compare (N, 1, H, W), intensities in [0, 1].

    Returns:
        (N,) PSNR in dB, in [0, 100].
    """
    real, fake = as_images(real, "real"), as_images(fake, "fake")
    _check_same_shape(real, fake, "real", "fake")
    mse = (real - fake).pow(2).mean(dim=(1, 2, 3)).clamp_min(PSNR_MIN_MSE)
    return -10.0 * torch.log10(mse)


def lpips_distance(
    real: Images, fake: Images, *, device: torch.device | str = "cpu", batch_size: int = 64
) -> torch.Tensor:
    """LPIPS (AlexNet, v0.1) per sample, from the shared offline model (:func:`get_lpips`).

    Args:
        real: reference images (N, 1, H, W), intensities in [0, 1], H and W >= 32.
        fake: images to compare (N, 1, H, W), intensities in [0, 1].
        device: device to run the network on.
        batch_size: images per batch.

    Returns:
        (N,) distances >= 0 on the CPU; 0 for identical images.

    Raises:
        pipeline.metrics.perceptual.PerceptualWeightsError: the AlexNet weights are unavailable.
    """
    real, fake = as_images(real, "real"), as_images(fake, "fake")
    _check_same_shape(real, fake, "real", "fake")
    model = get_lpips(device)
    with torch.inference_mode():
        out = [
            model(r.to(device), f.to(device)).cpu()
            for r, f in zip(real.split(batch_size), fake.split(batch_size), strict=True)
        ]
    return torch.cat(out)


def ms_ssim_settings(height: int, width: int) -> tuple[int, tuple[float, ...]]:
    """MS-SSIM Gaussian window and scale weights fitted to the image size.

    The window is 7 px below 256 px (11 from there). The number of scales is the largest
    (at most 5) whose coarsest scale still holds ``kernel + 1`` pixels and that passes MONAI's
    size check; the first weights of Wang et al. are kept and renormalised to sum to 1.
    At 64x64 this gives a 7 px window and 4 scales (64, 32, 16, 8 px).

    Args:
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        (kernel_size, weights) for :func:`monai.metrics.regression.compute_ms_ssim`.

    Raises:
        ValueError: the image is too small for even two scales.
    """
    side = min(height, width)
    k = 11 if side >= 256 else 7
    for n in range(len(MS_SSIM_WEIGHTS), 1, -1):
        if side // 2 ** (n - 1) >= k + 1 and side // (n - 1) ** 2 > k - 1:
            w = MS_SSIM_WEIGHTS[:n]
            return k, tuple(v / sum(w) for v in w)
    raise InputError(f"images must be at least 16x16 for MS-SSIM; got {height}x{width}")


def ms_ssim_diversity(
    samples: Images, *, num_pairs: int = 1000, seed: int = 0, batch_size: int = 256
) -> float:
    """Mean pairwise MS-SSIM among generated samples; lower means more diverse.

    All pairs are used when there are at most ``num_pairs`` of them, otherwise ``num_pairs``
    random pairs of distinct samples (seeded).

    Args:
        samples: generated images (N, 1, H, W), intensities in [0, 1], N >= 2.
        num_pairs: maximum number of pairs to average over.
        seed: seed of the pair sampling.
        batch_size: pairs per batch.

    Returns:
        Mean MS-SSIM in [0, 1] (settings from :func:`ms_ssim_settings`); 1 when all samples
        are identical.

    Raises:
        ValueError: fewer than 2 samples, ``num_pairs < 1``, or a shape/range is wrong.
    """
    x = as_images(samples, "samples")
    n = x.shape[0]
    if n < 2:
        raise InputError(f"samples must hold at least 2 images; got {n}")
    if num_pairs < 1:
        raise InputError(f"num_pairs must be >= 1; got {num_pairs}")
    if n * (n - 1) // 2 <= num_pairs:
        i, j = torch.triu_indices(n, n, offset=1)
    else:
        rng = np.random.default_rng(seed)
        first = rng.integers(0, n, num_pairs)
        i = torch.from_numpy(first)
        j = torch.from_numpy((first + rng.integers(1, n, num_pairs)) % n)
    k, weights = ms_ssim_settings(*x.shape[-2:])
    values = [
        compute_ms_ssim(
            x[a],
            x[b],
            spatial_dims=2,
            data_range=1.0,
            kernel_size=k,
            kernel_sigma=SSIM_SIGMA,
            weights=weights,
        ).flatten()
        for a, b in zip(i.split(batch_size), j.split(batch_size), strict=True)
    ]
    return torch.cat(values).mean().item()


def alex_features(
    images: Images, *, device: torch.device | str = "cpu", batch_size: int = 128
) -> np.ndarray:
    """AlexNet features from the LPIPS trunk, for fd_alex, KID and precision/recall.

    The relu5 (conv5) activations, globally average-pooled: the AlexNet counterpart of the
    Inception pool3 features of FID. 256 dimensions keep the covariance estimable from a few
    hundred slices (concatenating all five layers gives 1152 dimensions, whose sample-size
    bias swamped the difference between a blurred set and an independent one in our checks).

    Args:
        images: images (N, 1, H, W), intensities in [0, 1], H and W >= 32.
        device: device to run the network on.
        batch_size: images per batch.

    Returns:
        (N, 256) float64 features, >= 0.

    Raises:
        pipeline.metrics.perceptual.PerceptualWeightsError: the AlexNet weights are unavailable.
    """
    x = as_images(images, "images")
    model = get_lpips(device)
    with torch.inference_mode():
        out = [
            model.trunk_features(batch.to(device))[-1].mean(dim=(2, 3)).cpu().double()
            for batch in x.split(batch_size)
        ]
    return torch.cat(out).numpy()


def _as_features(feats: np.ndarray, name: str, min_rows: int = 2) -> np.ndarray:
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < min_rows or not np.isfinite(f).all():
        raise InputError(
            f"{name} must be finite features of shape (N, D) with N >= {min_rows}; "
            f"got shape {f.shape}"
        )
    return f


def _check_same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise InputError(
            f"fake_feats must have the feature dimension of real_feats ({a.shape[1]}); "
            f"got {b.shape[1]}"
        )


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps: float = 1e-6
) -> float:
    """Fréchet distance between two Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))`` with ``scipy.linalg.sqrtm``.
    Guards: if ``sqrtm`` reports a singular product (common: some relu5 channels never fire)
    or returns non-finite values, ``eps * I`` is added to both covariances; an imaginary part
    from rounding is dropped (a large one is an error); tiny negative results from rounding
    are clipped to 0.

    Args:
        mu1: mean (D,).
        sigma1: covariance (D, D).
        mu2: mean (D,).
        sigma2: covariance (D, D).
        eps: diagonal offset used when the product is singular.

    Returns:
        Distance >= 0.

    Raises:
        ValueError: shapes disagree, or the square root has a large imaginary component.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    d = mu1.shape[0]
    for name, value, shape in (
        ("mu2", mu2, (d,)),
        ("sigma1", sigma1, (d, d)),
        ("sigma2", sigma2, (d, d)),
    ):
        if value.shape != shape:
            raise InputError(f"{name} must have shape {shape} to match mu1; got {value.shape}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", linalg.LinAlgWarning)
            covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            raise linalg.LinAlgWarning("non-finite square root")
    except linalg.LinAlgWarning as err:
        logger.debug("Fréchet distance: %s; adding %g to the covariance diagonals", err, eps)
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise InputError(f"covariance square root has imaginary component {imag:.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return max(float(value), 0.0)


def fd_alex(real_feats: np.ndarray, fake_feats: np.ndarray) -> float:
    """Fréchet distance between AlexNet feature sets (``fd_alex``; not FID).

    Args:
        real_feats: features of real slices (N_r, D) from :func:`alex_features`, N_r >= 2.
        fake_feats: features of generated slices (N_f, D), N_f >= 2.

    Returns:
        Distance >= 0; about 0 for identical sets. Its sample-size bias is large below about
        1000 samples per set (256-dimensional covariances), so compare values only between
        sets of equal size.
    """
    real = _as_features(real_feats, "real_feats")
    fake = _as_features(fake_feats, "fake_feats")
    _check_same_dim(real, fake)
    return frechet_distance(
        real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False)
    )


def kid(
    real_feats: np.ndarray,
    fake_feats: np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    coef0: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel inception distance on AlexNet features: unbiased MMD^2 over random subsets.

    Polynomial kernel ``k(x, y) = (x.y / D + coef0) ** degree`` (Bińkowski et al. 2018);
    subsets of ``min(subset_size, N_r, N_f)`` samples drawn without replacement (seeded).
    The kernel matrices are computed once, so memory grows as ``(N_r + N_f) ** 2`` float64
    (about 100 MB for 2000 + 2000 samples).

    Args:
        real_feats: features of real slices (N_r, D), N_r >= 2.
        fake_feats: features of generated slices (N_f, D), N_f >= 2.
        num_subsets: number of subsets averaged.
        subset_size: samples per subset.
        degree: polynomial degree.
        coef0: polynomial offset.
        seed: seed of the subset sampling.

    Returns:
        (mean, std) of the per-subset MMD^2; about 0 for sets from the same distribution.
        For identical sets it is slightly negative (a sample paired with itself enters only
        the cross term of the unbiased estimate).
    """
    real = _as_features(real_feats, "real_feats")
    fake = _as_features(fake_feats, "fake_feats")
    _check_same_dim(real, fake)
    if num_subsets < 1 or subset_size < 2:
        raise InputError(
            f"num_subsets must be >= 1 and subset_size >= 2; got {num_subsets}, {subset_size}"
        )
    m = min(subset_size, real.shape[0], fake.shape[0])
    dim = real.shape[1]

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / dim + coef0) ** degree

    k_ff, k_rr, k_fr = kernel(fake, fake), kernel(real, real), kernel(fake, real)
    # Subsets as 0/1 indicator rows: the sum over a kernel sub-block is v_a^T K v_b.
    rng = np.random.default_rng(seed)
    pick_f = np.zeros((num_subsets, fake.shape[0]))
    pick_r = np.zeros((num_subsets, real.shape[0]))
    for s in range(num_subsets):
        pick_f[s, rng.choice(fake.shape[0], m, replace=False)] = 1.0
        pick_r[s, rng.choice(real.shape[0], m, replace=False)] = 1.0
    within_f = ((pick_f @ k_ff) * pick_f).sum(1) - pick_f @ np.diag(k_ff)
    within_r = ((pick_r @ k_rr) * pick_r).sum(1) - pick_r @ np.diag(k_rr)
    cross = ((pick_f @ k_fr) * pick_r).sum(1)
    mmds = (within_f + within_r) / (m * (m - 1)) - 2.0 * cross / m**2
    return float(mmds.mean()), float(mmds.std())


def _knn_radii(feats: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row (the row itself excluded)."""
    return torch.cat(
        [
            torch.cdist(chunk, feats).kthvalue(k + 1, dim=1).values
            for chunk in feats.split(batch_size)
        ]
    )


def _inside_fraction(
    query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, batch_size: int
) -> float:
    """Fraction of query rows inside at least one ball (ref_i, radii_i)."""
    inside = [(torch.cdist(chunk, ref) <= radii).any(dim=1) for chunk in query.split(batch_size)]
    return torch.cat(inside).double().mean().item()


def precision_recall(
    real_feats: np.ndarray, fake_feats: np.ndarray, *, k: int = 3, batch_size: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) in feature space.

    Each set's manifold is the union of balls around its samples with radius the distance to
    the k-th nearest neighbour in the same set. Precision = fraction of generated samples
    inside the real manifold (fidelity); recall = fraction of real samples inside the
    generated manifold (coverage).

    Args:
        real_feats: features of real slices (N_r, D), N_r > k.
        fake_feats: features of generated slices (N_f, D), N_f > k.
        k: neighbour rank of the radii.
        batch_size: rows per distance block.

    Returns:
        (precision, recall), each in [0, 1]; (1, 1) for identical sets.
    """
    if k < 1:
        raise InputError(f"k must be >= 1; got {k}")
    real = torch.from_numpy(_as_features(real_feats, "real_feats", min_rows=k + 1))
    fake = torch.from_numpy(_as_features(fake_feats, "fake_feats", min_rows=k + 1))
    _check_same_dim(real.numpy(), fake.numpy())
    precision = _inside_fraction(fake, real, _knn_radii(real, k, batch_size), batch_size)
    recall = _inside_fraction(real, fake, _knn_radii(fake, k, batch_size), batch_size)
    return precision, recall


def distribution_metrics(
    real: Images,
    fake: Images,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """fd_alex, KID and precision/recall of a generated set, with features extracted once.

    Args:
        real: real slices (N_r, 1, H, W), intensities in [0, 1].
        fake: generated slices (N_f, 1, H, W), same H, W, intensities in [0, 1].
        device: device for feature extraction.
        batch_size: images per feature batch.
        k: neighbour rank for precision/recall.
        kid_subsets: KID subsets.
        kid_subset_size: KID subset size.
        seed: seed of the KID subsets.

    Returns:
        ``{"fd_alex", "kid_mean", "kid_std", "precision", "recall"}``.
    """
    return feature_metrics(
        alex_features(real, device=device, batch_size=batch_size),
        alex_features(fake, device=device, batch_size=batch_size),
        k=k,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        seed=seed,
    )


def feature_metrics(
    real_feats: np.ndarray,
    fake_feats: np.ndarray,
    *,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`distribution_metrics` on features already extracted with :func:`alex_features`.

    Lets a caller that scores several sets against the same real set extract its features
    once. Arguments and result as :func:`distribution_metrics`; features are (N, 256).
    """
    kid_mean, kid_std = kid(
        real_feats, fake_feats, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
    )
    precision, recall = precision_recall(real_feats, fake_feats, k=k)
    return {
        "fd_alex": fd_alex(real_feats, fake_feats),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
    }


def intensity_distance_per_z(
    real: Images,
    real_z: Labels,
    fake: Images,
    fake_z: Labels,
    *,
    threshold: float = 0.05,
    bins: int = 256,
) -> tuple[dict[int, float], float]:
    """Wasserstein-1 distance between foreground intensity histograms, per slice index.

    For every z_index present in both sets, the intensities of all real slices at that index
    are compared with those of the generated slices at that index, using pixels above
    ``threshold`` (the head, not the black background; generated slices have no mask). Each
    side becomes a normalised histogram of ``bins`` bins over [0, 1]; the distance is the
    Wasserstein-1 distance between them (exact up to the bin width 1 / ``bins``). A side with
    no pixel above the threshold counts as a point mass at 0, so blank generated slices are
    penalised by about the mean real foreground intensity.

    Args:
        real: real slices (N_r, 1, H, W), intensities in [0, 1].
        real_z: integer z_index of each real slice, shape (N_r,).
        fake: generated slices (N_f, 1, H, W), intensities in [0, 1].
        fake_z: integer z_index of each generated slice, shape (N_f,).
        threshold: foreground threshold, in [0, 1).
        bins: histogram bins over [0, 1].

    Returns:
        (per-z distances {z_index: distance in [0, 1]}, their mean).

    Raises:
        ValueError: shapes/ranges are wrong or no z_index is shared by both sets.
    """
    real_t, fake_t = as_images(real, "real"), as_images(fake, "fake")
    if not 0.0 <= threshold < 1.0:
        raise InputError(f"threshold must lie in [0, 1); got {threshold}")
    if bins < 2:
        raise InputError(f"bins must be >= 2; got {bins}")
    rz = _as_labels(real_z, real_t.shape[0], "real_z")
    fz = _as_labels(fake_z, fake_t.shape[0], "fake_z")
    shared = sorted(set(rz.tolist()) & set(fz.tolist()))
    if not shared:
        raise InputError("real_z and fake_z share no z_index; generate slices at the real levels")
    centres = (np.arange(bins) + 0.5) / bins

    def histogram(x: torch.Tensor) -> np.ndarray:
        counts = torch.histc(x[x > threshold], bins=bins, min=0.0, max=1.0).double().numpy()
        if counts.sum() == 0:
            counts[0] = 1.0
        return counts

    per_z = {
        z: float(
            stats.wasserstein_distance(
                centres,
                centres,
                u_weights=histogram(real_t[torch.from_numpy(rz == z)]),
                v_weights=histogram(fake_t[torch.from_numpy(fz == z)]),
            )
        )
        for z in shared
    }
    return per_z, float(np.mean(list(per_z.values())))


def _nanmean(values: torch.Tensor) -> float:
    finite = values[~values.isnan()]
    return finite.mean().item() if finite.numel() else math.nan


def reconstruction_metrics(
    real: Images,
    recon: Images,
    mask: Images,
    z_index: Labels,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> dict[str, Any]:
    """SSIM, brain SSIM, PSNR and LPIPS of reconstructions, overall and per z_index.

    Args:
        real: original slices (N, 1, H, W), intensities in [0, 1].
        recon: reconstructions (N, 1, H, W), intensities in [0, 1] (clamp decoder outputs).
        mask: brain masks (N, 1, H, W), nonzero = brain.
        z_index: integer slice index of each sample, shape (N,).
        device: device for LPIPS.
        batch_size: images per LPIPS batch.

    Returns:
        ``{"ssim", "ssim_brain", "psnr", "lpips"}`` means over samples (``ssim_brain`` over
        samples with a non-empty mask; NaN if none) plus ``"per_z"``:
        ``{z_index: {same four keys}}``.
    """
    real_t, recon_t = as_images(real, "real"), as_images(recon, "recon")
    _check_same_shape(real_t, recon_t, "real", "recon")
    brain = _as_mask(mask, real_t)
    z = _as_labels(z_index, real_t.shape[0])
    smap = ssim_map(real_t, recon_t)
    values = {
        "ssim": smap.mean(dim=(1, 2, 3)),
        "ssim_brain": _masked_mean(smap, brain),
        "psnr": psnr(real_t, recon_t),
        "lpips": lpips_distance(real_t, recon_t, device=device, batch_size=batch_size),
    }
    result: dict[str, Any] = {name: _nanmean(v) for name, v in values.items()}
    result["per_z"] = {
        int(level): {name: _nanmean(v[torch.from_numpy(z == level)]) for name, v in values.items()}
        for level in np.unique(z)
    }
    return result
