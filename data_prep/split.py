"""Subject-level train/val/test split (a subject's sessions never straddle splits), stratified.

A plain random split of a small cohort can leave the test split without young subjects or
without demented ones (the 60-subject stand-in drew 8 old subjects and 1 young one), and then
no age or CDR figure on it means much. Subjects are therefore split within strata
(:func:`stratum`: CDR > 0, CDR 0 or unknown under 60, at 60 or over, no demographics), each
stratum contributing its share to every split (:func:`allocate`, proportional allocation
with largest-remainder rounding in both directions), members drawn in seeded random order.
scikit-learn's stratified splitters refuse strata smaller than the number of splits; this one
takes any sizes, and without demographics it is a plain seeded random split.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

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


def stratum(age: float | None, cdr: float | None) -> str:
    """The stratum of a subject for the split, from its age (years) and CDR (blank: None).

    ``cdr>0`` for a rating above 0 whatever the age; else ``age<60``, ``age60+`` or
    ``unknown`` (no age: the PNG release, a folder of NIfTI files without a table).
    """
    if cdr is not None and not math.isnan(cdr) and cdr > 0:
        return "cdr>0"
    if age is None or math.isnan(age):
        return "unknown"
    return "age<60" if age < 60 else "age60+"


def allocate(
    strata_sizes: Mapping[str, int], split_counts: Mapping[str, int], rng: np.random.Generator
) -> dict[str, dict[str, int]]:
    """Subjects of each stratum per split: proportional, whole, and adding up both ways.

    Each cell starts at ``floor(n_stratum * n_split / n)``; the subjects left over go one at a
    time to the cells with the largest remainders (ties in seeded random order), as long as
    both the stratum and the split still have room.

    Args:
        strata_sizes: {stratum: subjects}.
        split_counts: {split: subjects} (:func:`split_sizes`), summing to the same total.
        rng: breaks ties between equal remainders.

    Returns:
        {stratum: {split: subjects}}; each stratum's counts sum to its size, each split's to
        its count.
    """
    n = sum(strata_sizes.values())
    exact = {
        (h, s): size * split_counts[s] / n for h, size in strata_sizes.items() for s in split_counts
    }
    cells = {key: math.floor(value) for key, value in exact.items()}
    room_h = {h: size - sum(cells[h, s] for s in split_counts) for h, size in strata_sizes.items()}
    room_s = {
        s: count - sum(cells[h, s] for h in strata_sizes) for s, count in split_counts.items()
    }
    keys = list(exact)
    ties = dict(zip(keys, rng.permutation(len(keys)), strict=True))
    order = sorted(keys, key=lambda k: (cells[k] - exact[k], ties[k]))  # largest remainder first
    for h, s in order + order:  # the second pass places what the remainders' order could not
        if room_h[h] > 0 and room_s[s] > 0:
            cells[h, s] += 1
            room_h[h] -= 1
            room_s[s] -= 1
    return {h: {s: cells[h, s] for s in split_counts} for h in strata_sizes}


def split_subjects(
    subjects: Iterable[str],
    ratios: SplitConfig,
    seed: int,
    strata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Assign each subject to a split, stratified (module docstring).

    Args:
        subjects: subject ids (duplicates, e.g. one per session, are fine).
        ratios: split ratios.
        seed: the order in which each stratum's subjects take its places, and ties between
            equal remainders; the same ids, strata and seed always give the same split.
        strata: {subject: stratum} (:func:`stratum`); a subject absent from it (or no
            mapping) is in stratum ``unknown``.

    Returns:
        {subject: "train" | "val" | "test"}.
    """
    unique = sorted(set(subjects))
    of = {subject: (strata or {}).get(subject, "unknown") for subject in unique}
    rng = np.random.default_rng(seed)
    members: dict[str, list[str]] = {}
    for i in rng.permutation(len(unique)):
        members.setdefault(of[unique[i]], []).append(unique[i])
    sizes = {h: len(members[h]) for h in sorted(members)}
    counts = allocate(sizes, split_sizes(len(unique), ratios), rng)
    out = {}
    for h, per_split in counts.items():
        labels = [name for name, k in per_split.items() for _ in range(k)]
        out.update(zip(members[h], labels, strict=True))
    return out
