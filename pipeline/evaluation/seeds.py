"""A generator judged over several sampling seeds: each seed's verdicts, their summary, and
the section of the seeds' mean.

One sampling seed's figures move by more than several bars' margins: on the demo stand-in
the PixelCNN's fd_alex reads 10.2-12.1 over five seeds against a bar of 12.0, and the LDM's
CDR probe 0.66-0.79 against 0.756, so a verdict on one seed can flip on the next. ``evaluate``
therefore scores ``evaluate.sampling_seeds`` seeds, judges their mean (:func:`mean_section`)
and records how many seeds met every bar (:func:`summarise`); ``benchmarks/scoring.py`` uses
the same functions for the benchmarks (sampling settings, starts, recipe arms, budgets).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.evaluation.verdicts import lookup, model_verdicts

#: Figures summarised over seeds: (column, dotted key in the generator's section, digits).
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("fd_alex", "fd_alex", 2),
    ("precision", "precision", 3),
    ("recall", "recall", 3),
    ("z-probe MAE", "zprobe_mae", 3),
    ("judge raw", "c2st.raw.auc", 3),
    ("judge blurred", "c2st.blur.auc", 3),
    ("CDR AUC", "labels.matched.cdr_auc", 3),
    ("age MAE", "labels.matched.age_mae", 1),
    ("copy-like", "novelty.copy_like_fraction", 3),
)


def seed_row(section: Mapping[str, Any], metrics: Mapping[str, Any], model: str) -> dict[str, Any]:
    """One seed's figures (:data:`COLUMNS`) and its verdicts against the report's bars.

    Args:
        section: the generator's section as ``evaluate`` writes it (with ``c2st``).
        metrics: ``reports/metrics.json``: the real references of the bars.
        model: ``ldm`` or ``pixelcnn``.

    Returns:
        ``{figures: {column: value or None}, passed: [bar labels], short: [bar labels]}``;
        bars that cannot be judged (a missing figure, a probe at chance) are in neither.
    """
    verdicts = model_verdicts({**metrics, model: section}, model)
    return {
        "figures": {column: lookup(section, key) for column, key, _ in COLUMNS},
        "passed": [v.label for v in verdicts if v.passed is True],
        "short": [v.label for v in verdicts if v.passed is False],
    }


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and range of each figure over seeds, and how often each bar was short.

    Args:
        rows: :func:`seed_row` results, one per seed.

    Returns:
        ``{n_seeds, figures: {column: {mean, min, max}}, judged: bars judged on every seed,
        all_bars_met: seeds meeting every judged bar, short: [{bar, seeds}]}``: ``short``
        lists each bar short on some seed and on how many, most often first (a list, not a
        mapping keyed by bar label: a label is no valid MLflow metric name).
    """
    figures = {}
    for column, _, _ in COLUMNS:
        values = [r["figures"][column] for r in rows if r["figures"][column] is not None]
        if values:
            figures[column] = {
                "mean": statistics.fmean(values),
                "min": min(values),
                "max": max(values),
            }
    short: dict[str, int] = {}
    for row in rows:
        for label in row["short"]:
            short[label] = short.get(label, 0) + 1
    return {
        "n_seeds": len(rows),
        "figures": figures,
        "judged": min((len(r["passed"]) + len(r["short"]) for r in rows), default=0),
        "all_bars_met": sum(not r["short"] for r in rows),
        "short": [
            {"bar": label, "seeds": count}
            for label, count in sorted(short.items(), key=lambda item: -item[1])
        ],
    }


def mean_section(sections: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The first section with every float figure replaced by its mean over ``sections``.

    Floats are the figures (fd_alex, AUCs, fractions, MAEs); integers (counts, seeds),
    strings, booleans and lists (curves) are the first section's, and a key missing from any
    section keeps the first's value. NaN stays NaN.

    Args:
        sections: one generator's sections, one per sampling seed (at least one).
    """
    first = sections[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        values = [s.get(key) for s in sections]
        if isinstance(value, Mapping) and all(isinstance(v, Mapping) for v in values):
            out[key] = mean_section(values)  # type: ignore[arg-type]
        elif isinstance(value, float) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            out[key] = statistics.fmean(values)  # type: ignore[arg-type]
        else:
            out[key] = value
    return out
