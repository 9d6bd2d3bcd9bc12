"""Novelty check: is a generated slice a near copy of a training slice?

Every slice gets its nearest training slice (at any z level) by four similarities, each 1
for identical images:

- ``pixel_corr``: Pearson correlation of the pixels of the whole image (background
  included); blind to brightness and contrast changes. A constant image has no correlation
  with anything and scores 0. Reported (it is the memorisation measure of Akbar et al., below)
  but **not used to flag**: averaging raises it. A slice that is the mean of many training
  slices, or a blurred held-out slice, correlates with its nearest training slice more than
  sharp held-out slices do, because it sits near all of them at once (measured on the demo
  stand-in cohort: per-level means of the training slices exceed the held-out slices' 0.99
  quantile in 34 % of cases, held-out slices blurred by 1.5 px in 13 %; neither is a copy).
- ``pixel_relative``: ``1 - d1 / d2`` with ``d = 1 - pixel_corr`` to the nearest and the
  second-nearest training slice: how much nearer the nearest one is than the next. A copy sits
  on one training slice (d1 = 0: 1); an average or a blurred slice sits near many at once
  (d1 close to d2: near 0). This is the nearest-neighbour distance ratio of Yoon et al. (2023,
  "Diffusion probabilistic models generalize when they fail to memorize") and Gu et al. (2023,
  "On memorization in diffusion models"), who call a sample memorised when ``d1 / d2 < 1/3``;
  here its threshold comes from the held-out slices like every measure's. On the demo stand-in,
  training slices with scan noise (std 0.03), blurred by 1 px or shifted by 1 px exceed the
  held-out slices' 0.99 quantile in 100 %, 99.5 % and 63 % of cases, per-level means in none.
  With one training slice there is no second: d2 is taken as 1 (``pixel_corr`` itself).
- ``ssim``: whole-image SSIM (:func:`pipeline.metrics.quality.ssim`); local structure,
  luminance and contrast.
- ``alex_cos``: cosine similarity of the pooled AlexNet relu5 features
  (:func:`pipeline.metrics.quality.alex_features`); tolerant of shifts by a few pixels.

**Reference.** A similarity means nothing alone: a real slice of another subject at the same
level is also close to some training slice. Real held-out slices (the model never saw them)
go through the same search; per measure, the threshold is the ``quantile`` (e.g. 0.99) of
their similarities (:func:`thresholds`).

**Rule.** A sample is *copy-like* when it exceeds the threshold on **any** measure of
:data:`RULE_MEASURES` (:func:`copy_like`; every measure but ``pixel_corr``): each measure is
blind to some copies (a copy shifted by two pixels keeps its AlexNet features but loses pixel
correlation; a copy with other contrast keeps its correlation), so requiring all three would
let such copies pass. The price is false alarms: up to ``3 * (1 - quantile)`` of real held-out
slices are copy-like by the same rule, reported as ``reference_copy_like_fraction`` by
:func:`novelty_summary`.

**Cost.** Pixel correlation and feature cosine over all N x M (sample, training) pairs as
chunked matrix products (N x M x (H*W + 256) multiply-adds), AlexNet on the N samples (and on
the M training slices unless their features are given), and SSIM only against each sample's
``candidates`` best training slices by pixel correlation: N x candidates SSIM maps instead of
N x M. That is an approximation (the SSIM nearest neighbour may lie outside the candidates)
and exact when ``candidates >= M``.

Correlation against every training image is the memorisation measure of Akbar, Wang and
Eklund (2025), "Beware of diffusion models for synthesizing medical images — a comparison
with GANs in terms of memorizing brain MRI and chest x-ray images", Mach. Learn.: Sci.
Technol. 6 (doi:10.1088/2632-2153/ad9a3a): diffusion models copied training slices more
often than GANs, most of all on small sets of 2D slices cut from 3D volumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from pipeline.core.errors import InputError
from pipeline.core.figures import figure_image
from pipeline.metrics.quality import alex_features, as_images, ssim

Images = torch.Tensor | np.ndarray

#: The similarity measures, in report order.
MEASURES: tuple[str, ...] = ("pixel_corr", "pixel_relative", "ssim", "alex_cos")
#: The measures whose thresholds flag a copy (``pixel_corr`` is reported only: see above).
RULE_MEASURES: tuple[str, ...] = ("pixel_relative", "ssim", "alex_cos")
#: Samples per chunk of the all-pairs products and of the SSIM candidates (bounds memory).
CHUNK = 256
#: Norms below this count as zero (a constant image, an all-zero feature vector).
_EPS = 1e-8


@dataclass
class NearestTraining:
    """Each slice's most similar training slice, per measure.

    Attributes:
        similarity: measure (:data:`MEASURES`) → (N,) float64 highest similarity to any
            training slice, in [-1, 1] (1 = identical).
        index: measure → (N,) int64 row in ``train`` of that training slice.
    """

    similarity: dict[str, np.ndarray]
    index: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.similarity[MEASURES[0]])

    def put(self, at: np.ndarray, other: NearestTraining) -> None:
        """Overwrite rows ``at`` in place with ``other``'s rows (e.g. re-sampled slices).

        Args:
            at: (n,) int row indices of ``self``.
            other: n rows, in the order of ``at``.
        """
        for measure in MEASURES:
            self.similarity[measure][at] = other.similarity[measure]
            self.index[measure][at] = other.index[measure]


def _unit_rows(x: torch.Tensor, *, centre: bool) -> torch.Tensor:
    """Rows of (N, ...) flattened to (N, D), optionally centred, scaled to norm 1 (or 0)."""
    flat = x.flatten(1)
    if centre:
        flat = flat - flat.mean(dim=1, keepdim=True)
    norm = flat.norm(dim=1, keepdim=True)
    return torch.where(norm > _EPS, flat / norm.clamp_min(_EPS), 0.0)


def _relative(top: torch.Tensor) -> torch.Tensor:
    """``pixel_relative`` from each row's highest pixel correlations, best first: (n, >= 1)
    → (n,) ``1 - d1 / d2`` with ``d = 1 - corr`` (d2 = 1 where there is one column)."""
    distance = (1.0 - top[:, :2]).clamp_min(0.0)
    d2 = distance[:, 1] if distance.shape[1] > 1 else torch.ones_like(distance[:, 0])
    return 1.0 - distance[:, 0] / d2.clamp_min(_EPS)


def nearest_training(
    images: Images,
    train: Images,
    *,
    device: torch.device | str = "cpu",
    candidates: int = 16,
    train_features: np.ndarray | None = None,
) -> NearestTraining:
    """Find each image's nearest training slice by every measure of :data:`MEASURES`.

    Args:
        images: (N, 1, H, W) slices to check, intensities in [0, 1], H and W >= 32.
        train: (M, 1, H, W) training slices (every level), intensities in [0, 1].
        device: where the all-pairs products and AlexNet run.
        candidates: SSIM is computed against this many best training slices by pixel
            correlation (>= 1; exact when >= M).
        train_features: (M, 256) :func:`~pipeline.metrics.quality.alex_features` of
            ``train``, to reuse across calls; computed when None.

    Returns:
        A :class:`NearestTraining` with N rows.

    Raises:
        InputError: a shape or range is wrong, ``candidates < 1``, or ``train_features``
            does not have one row per training slice.
    """
    x, t = as_images(images, "images"), as_images(train, "train")
    if x.shape[1:] != t.shape[1:]:
        raise InputError(
            f"images {tuple(x.shape)} and train {tuple(t.shape)} must have the same slice size"
        )
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise InputError(f"candidates must be an integer >= 1; got {candidates!r}")
    if train_features is None:
        train_features = alex_features(t, device=device)
    if train_features.ndim != 2 or train_features.shape[0] != t.shape[0]:
        raise InputError(
            f"train_features must have shape ({t.shape[0]}, D), one row per training slice; "
            f"got {train_features.shape}"
        )
    similarity: dict[str, list[torch.Tensor]] = {m: [] for m in MEASURES}
    index: dict[str, list[torch.Tensor]] = {m: [] for m in MEASURES}

    def record(name: str, value: torch.Tensor, row: torch.Tensor) -> None:
        """Record (n,) similarities and the (n,) training rows they were found at."""
        similarity[name].append(value.double().cpu())
        index[name].append(row.cpu())

    def best(name: str, sim: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Record the row-wise maximum of (n, m) ``sim``; ``rows`` map its columns to train."""
        value, col = sim.max(dim=1)
        record(name, value, col if rows is None else rows.gather(1, col[:, None])[:, 0])

    train_pixels = _unit_rows(t, centre=True).to(device)
    k = min(candidates, t.shape[0])
    for chunk in x.split(CHUNK):
        corr = _unit_rows(chunk, centre=True).to(device) @ train_pixels.T
        # one sort serves the nearest slice, the second nearest and the SSIM candidates
        top = corr.topk(min(max(k, 2), corr.shape[1]), dim=1)
        record("pixel_corr", top.values[:, 0], top.indices[:, 0])
        record("pixel_relative", _relative(top.values), top.indices[:, 0])
        cand = top.indices[:, :k].cpu()  # (n, k)
        pairs = ssim(t[cand.flatten()], chunk.repeat_interleave(k, dim=0)).view(-1, k)
        best("ssim", pairs, cand)
    feats = torch.from_numpy(alex_features(x, device=device))
    train_feats = _unit_rows(torch.from_numpy(train_features), centre=False).to(device)
    for chunk in feats.split(CHUNK):
        best("alex_cos", _unit_rows(chunk, centre=False).to(device) @ train_feats.T)
    return NearestTraining(
        {m: torch.cat(v).numpy() for m, v in similarity.items()},
        {m: torch.cat(v).numpy().astype(np.int64) for m, v in index.items()},
    )


def thresholds(reference: NearestTraining, quantile: float) -> dict[str, float]:
    """Per measure, the ``quantile`` of the reference slices' nearest-training similarity.

    Args:
        reference: :func:`nearest_training` of real held-out slices.
        quantile: in (0, 1), e.g. 0.99.

    Returns:
        measure → threshold.

    Raises:
        InputError: ``quantile`` outside (0, 1).
    """
    if not 0.0 < quantile < 1.0:  # also rejects nan
        raise InputError(f"quantile must lie in (0, 1); got {quantile}")
    return {m: float(np.quantile(reference.similarity[m], quantile)) for m in MEASURES}


def copy_like(samples: NearestTraining, limits: dict[str, float]) -> np.ndarray:
    """Which samples exceed the threshold on ANY measure (see the module docstring).

    Args:
        samples: :func:`nearest_training` of the slices to judge.
        limits: measure → threshold, from :func:`thresholds`.

    Returns:
        (N,) bool, True = above the threshold on any measure of :data:`RULE_MEASURES`.
    """
    return np.any([samples.similarity[m] > limits[m] for m in RULE_MEASURES], axis=0)


def _fraction(flags: np.ndarray) -> float:
    return float(np.mean(flags))


def novelty_summary(
    samples: NearestTraining, reference: NearestTraining, quantile: float
) -> dict[str, Any]:
    """The novelty figures of a sample set against real held-out slices, JSON-ready.

    Args:
        samples: :func:`nearest_training` of the generated slices.
        reference: :func:`nearest_training` of real held-out slices (same training set).
        quantile: reference quantile that sets each threshold, in (0, 1).

    Returns:
        ``{measure: {median, p95, reference_median, reference_p95, threshold,
        copy_like_fraction}, copy_like_fraction, reference_copy_like_fraction, n_samples,
        n_reference, quantile}``. Per measure, ``copy_like_fraction`` is the fraction of
        samples above that measure's threshold; the top-level one applies the any-measure
        rule (:data:`RULE_MEASURES`), and ``reference_copy_like_fraction`` is the same rule's
        rate on the reference itself (its false-alarm rate, at most ``3 * (1 - quantile)``).
    """
    limits = thresholds(reference, quantile)
    out: dict[str, Any] = {}
    for m in MEASURES:
        s, r = samples.similarity[m], reference.similarity[m]
        out[m] = {
            "median": float(np.median(s)),
            "p95": float(np.quantile(s, 0.95)),
            "reference_median": float(np.median(r)),
            "reference_p95": float(np.quantile(r, 0.95)),
            "threshold": limits[m],
            "copy_like_fraction": _fraction(s > limits[m]),
        }
    return out | {
        "copy_like_fraction": _fraction(copy_like(samples, limits)),
        "reference_copy_like_fraction": _fraction(copy_like(reference, limits)),
        "n_samples": len(samples),
        "n_reference": len(reference),
        "quantile": quantile,
    }


def closest_pairs_figure(
    images: Images, train: Images, nearest: NearestTraining, k: int = 8
) -> np.ndarray:
    """The ``k`` samples most copy-like by ``pixel_relative``, each above its nearest training
    slice.

    Args:
        images: (N, 1, H, W) samples in [0, 1], the rows of ``nearest``.
        train: (M, 1, H, W) the training slices ``nearest`` indexes.
        nearest: :func:`nearest_training` of ``images``.
        k: pairs shown (>= 1; fewer when N < k).

    Returns:
        (H', W', 3) uint8 image: samples on the top row, their nearest training slices
        below, each pair titled with its pixel correlation ``r`` and ``d1/d2``
        (``1 - pixel_relative``; a copy is near 0, an unseen slice near 1).

    Raises:
        InputError: ``k < 1`` or a shape or range is wrong.
    """
    if k < 1:
        raise InputError(f"k must be >= 1; got {k}")
    x, t = as_images(images, "images"), as_images(train, "train")
    corr, rows = nearest.similarity["pixel_corr"], nearest.index["pixel_corr"]
    relative = nearest.similarity["pixel_relative"]
    order = np.argsort(-relative, kind="stable")[:k]
    fig = Figure(figsize=(1.6 * len(order), 3.6), dpi=100)
    axes = fig.subplots(2, len(order), squeeze=False)
    for col, i in enumerate(order):
        for ax, image, title in (
            (axes[0, col], x[i, 0], f"sample {i}"),
            (
                axes[1, col],
                t[rows[i], 0],
                f"train {rows[i]}\nr = {corr[i]:.3f}, d1/d2 = {1 - relative[i]:.2f}",
            ),
        ):
            ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    fig.tight_layout()
    return figure_image(fig)
