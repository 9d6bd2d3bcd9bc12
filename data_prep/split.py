"""Subject-level train/val/test split (a subject's sessions never straddle splits)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from data_prep.readers.base import SPLITS
from pipeline.core.config import SplitConfig


def split_sizes(n_subjects: int, ratios: SplitConfig) -> dict[str, int]:
    """Number of subjects per split: largest-remainder rounding of ``n * ratio``.

    Every split with a positive ratio gets at least one subject when there are enough
    subjects (taken from the largest split; test is served before val).

    Args:
        n_subjects: number of distinct subjects.
        ratios: split ratios (normalised to sum to one).

    Returns:
        {split: count}, counts summing to ``n_subjects``.
    """
    weights = np.array([getattr(ratios, s) for s in SPLITS], dtype=np.float64)
    exact = n_subjects * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n_subjects - counts.sum()]:
        counts[i] += 1
    for i in np.flatnonzero((weights > 0) & (counts == 0))[::-1]:
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[i] += 1
    return dict(zip(SPLITS, counts.tolist(), strict=True))


def split_subjects(subjects: Iterable[str], ratios: SplitConfig, seed: int) -> dict[str, str]:
    """Assign each subject to a split by a seeded permutation of the sorted subject ids.

    Args:
        subjects: subject ids (duplicates, e.g. one per session, are fine).
        ratios: split ratios.
        seed: permutation seed; the same ids and seed always give the same split.

    Returns:
        {subject: "train" | "val" | "test"}.
    """
    unique = sorted(set(subjects))
    order = np.random.default_rng(seed).permutation(len(unique))
    names = np.repeat(SPLITS, list(split_sizes(len(unique), ratios).values()))
    return {unique[i]: str(name) for i, name in zip(order, names, strict=True)}
