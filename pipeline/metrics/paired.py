"""Paired comparisons of an arm against a baseline: bootstrap confidence intervals and Holm.

An augmentation study scores every arm on the same seeds and the same test subjects as the
real-only baseline, so each arm's effect is a table of paired differences ``delta[seed,
subject]``. :func:`paired_bootstrap` resamples seeds and subjects (a two-level bootstrap: both
are sources of variation a user's repeat would see) and gives the mean difference, its
percentile CI and a two-sided bootstrap p-value. :func:`holm` corrects those p-values across
arms (Holm 1979, step-down; it controls the family-wise error rate without assuming
independence).

Written here rather than taken from a library: ``scipy.stats.bootstrap`` resamples one axis of
independent observations, not the two crossed axes of a paired (seed x subject) table, and
Holm's procedure is in ``statsmodels`` only, which braingen does not otherwise need.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pipeline.core.errors import InputError


@dataclass(frozen=True)
class PairedEffect:
    """An arm's paired difference from the baseline.

    Attributes:
        mean: mean of ``delta`` over seeds and subjects (arm minus baseline).
        low: lower end of the percentile CI.
        high: upper end.
        p_value: two-sided bootstrap p-value of "no difference": twice the smaller tail
            of the bootstrap means at zero, each counted as (k + 1) / (n_boot + 1), at most
            1 (so at least 2 / (n_boot + 1)).
        n_seeds: seeds in the table.
        n_subjects: test subjects in the table.
    """

    mean: float
    low: float
    high: float
    p_value: float
    n_seeds: int
    n_subjects: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def paired_bootstrap(
    delta: np.ndarray, *, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> PairedEffect:
    """Bootstrap CI and p-value of the mean paired difference.

    Args:
        delta: (seeds, subjects) arm score minus baseline score, per seed and test subject.
        n_boot: bootstrap resamples.
        confidence: CI level in (0, 1).
        seed: seeds the resampling.

    Returns:
        The :class:`PairedEffect`. An all-zero table gives mean 0, CI [0, 0] and p = 1.

    Raises:
        InputError: not a 2-D table with at least one seed and one subject, non-finite
            values, or a confidence outside (0, 1).
    """
    delta = np.asarray(delta, dtype=np.float64)
    if delta.ndim != 2 or 0 in delta.shape:
        raise InputError(f"delta must be a (seeds, subjects) table, got shape {delta.shape}")
    if not np.isfinite(delta).all():
        raise InputError("delta holds NaN or inf; score every seed and subject")
    if not 0 < confidence < 1:
        raise InputError(f"confidence must lie in (0, 1), got {confidence}")
    n_seeds, n_subjects = delta.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    subjects = rng.integers(0, n_subjects, size=(n_boot, n_subjects))
    # mean over the resampled (seed, subject) grid of each bootstrap draw
    means = np.einsum("bt,bt->b", _counts(seeds, n_seeds) @ delta, _counts(subjects, n_subjects))
    means /= n_seeds * n_subjects
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    # (k + 1) / (n + 1) per tail (Davison & Hinkley 1997): never 0 from a finite bootstrap,
    # so a difference no draw crossed reads p < 2 / n_boot, not p = 0
    tails = (np.sum(means <= 0) + 1) / (n_boot + 1), (np.sum(means >= 0) + 1) / (n_boot + 1)
    p_value = min(1.0, 2 * min(tails))
    return PairedEffect(
        float(delta.mean()), float(low), float(high), float(p_value), n_seeds, n_subjects
    )


def _counts(draws: np.ndarray, n: int) -> np.ndarray:
    """(B, n) how often each index occurs in each bootstrap draw of (B, n) indices."""
    counts = np.zeros((len(draws), n))
    np.add.at(counts, (np.arange(len(draws))[:, None], draws), 1.0)
    return counts


def holm(p_values: Mapping[str, float], alpha: float = 0.05) -> dict[str, bool]:
    """Holm's step-down correction: which hypotheses are rejected at family-wise ``alpha``.

    Sorted ascending, p_(i) is compared with ``alpha / (m - i)`` (i from 0); the first
    p-value above its threshold stops the procedure and it and every larger p-value are
    kept.

    Args:
        p_values: name → p-value in [0, 1].
        alpha: family-wise error rate.

    Returns:
        name → True where the difference survives the correction.
    """
    order = sorted(p_values, key=lambda name: p_values[name])
    m = len(order)
    survives = dict.fromkeys(p_values, False)
    for i, name in enumerate(order):
        if p_values[name] > alpha / (m - i):
            break
        survives[name] = True
    return survives
