"""Scoring a generator over sampling seeds as ``evaluate`` does: the one home for the benchmarks
that compare models, sampling settings or starts.

``benchmarks.sampling_sweep`` (settings of one model), ``benchmarks.real_start`` (sampling
started from real latents), ``benchmarks.ldm_ablation`` (one recipe change per arm) and
``benchmarks.ldm_scaling`` (training budgets) all score each of their rows here: every
sampling seed through :func:`pipeline.evaluation.evaluate.score_generator` (the slices,
novelty check and label probes of ``evaluate``), the judges of
:func:`~pipeline.evaluation.evaluate.generator_judges`, trained as ``evaluate`` trains them
and read on every seed's slices, each seed judged against the report's bars
(:func:`pipeline.evaluation.seeds.seed_row`), the seeds summarised as mean and range. So a row of
any of their tables reads on the same scale as ``reports/metrics.json`` and its bars, and at
a model's defaults the mean of seeds ``params.seed`` ... ``params.seed +
evaluate.sampling_seeds - 1`` equals ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from tqdm import tqdm

from pipeline.core.config import Params, load_params
from pipeline.core.device import resolve_device
from pipeline.core.errors import InputError
from pipeline.core.figures import figure_image
from pipeline.evaluation.evaluate import (
    EvalContext,
    EvaluatePaths,
    generator_judges,
    run_judges,
    score_generator,
)
from pipeline.evaluation.seeds import COLUMNS, seed_row, summarise
from pipeline.evaluation.verdicts import BARS, threshold
from pipeline.inference.sampling import GeneratorModel


@dataclass
class Scoring:
    """What scoring a generator as ``evaluate`` does needs, from the command line.

    Attributes:
        params: the parameters (``--params``).
        ctx: the scoring context on the chosen device.
        metrics: ``reports/metrics.json`` (the bars' real references).
        seeds: the sampling seeds.
        models: the model folder.
    """

    params: Params
    ctx: EvalContext
    metrics: dict[str, Any]
    seeds: list[int]
    models: Path


def scoring_arguments(parser: argparse.ArgumentParser, seeds: str) -> None:
    """Add ``--seeds`` (default ``seeds``), ``--params``, ``--metrics``, ``--out``, ``--device``."""
    parser.add_argument("--seeds", default=seeds, help="sampling seeds (comma list)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--device", default="auto")


def scoring(args: argparse.Namespace) -> Scoring:
    """Load the parameters, the report and the scoring context :func:`scoring_arguments` name.

    Raises:
        InputError: no ``reports/metrics.json`` (``dvc repro`` has not run).
    """
    params = load_params(args.params)
    if not args.metrics.is_file():
        raise InputError(f"{args.metrics} not found: run `dvc repro` (its evaluate stage) first")
    paths = EvaluatePaths.standard(params.data.prepared_dir)
    return Scoring(
        params,
        EvalContext.build(params, paths, resolve_device(args.device)),
        json.loads(args.metrics.read_text()),
        [int(s) for s in args.seeds.split(",") if s.strip()],
        paths.models,
    )


def score_seeds(
    model: str,
    generator: GeneratorModel,
    seeds: Sequence[int],
    *,
    ctx: EvalContext,
    metrics: Mapping[str, Any],
    bar: tqdm | None = None,
) -> dict[str, Any]:
    """Score one generator on every seed as ``evaluate`` does, judges included.

    Args:
        model: ``ldm`` or ``pixelcnn`` (which bars apply).
        generator: the loaded generator, at the settings to score.
        seeds: sampling seeds.
        ctx: the scoring context (:class:`EvalContext`).
        metrics: ``reports/metrics.json`` (the bars' real references).
        bar: a progress bar advanced once per seed.

    Returns:
        ``{seeds: {seed: seed_row}, summary: summarise(rows)}``.
    """
    scores = []
    for seed in seeds:
        scores.append(score_generator(model, generator, ctx, seed))
        if bar is not None:
            bar.update()
    jobs = generator_judges(model, generator, ctx, scores)
    for job, results in zip(jobs, run_judges(jobs, ctx.device), strict=True):
        for scored, result in zip(scores, results, strict=True):
            scored.section.setdefault("c2st", {})[job.variant] = result.as_dict()
    sections = [scored.section for scored in scores]
    rows = {seed: seed_row(s, metrics, model) for seed, s in zip(seeds, sections, strict=True)}
    return {"seeds": rows, "summary": summarise(list(rows.values()))}


def table(results: Mapping[str, Mapping[str, Any]], first: str = "setting") -> list[str]:
    """Lines of the table (one row per entry of ``results``: means over seeds, ranges in
    brackets; ``first`` heads the name column), then the bars each entry fell short of and
    on how many seeds."""
    lines = [
        f"| {first} | seeds meeting every bar | "
        + " | ".join(column for column, _, _ in COLUMNS)
        + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for name, result in results.items():
        summary = result["summary"]
        cells = []
        for column, _, digits in COLUMNS:
            figure = summary["figures"].get(column)
            cells.append(
                "—"
                if figure is None
                else f"{figure['mean']:.{digits}f} ({figure['min']:.{digits}f}–"
                f"{figure['max']:.{digits}f})"
            )
        lines.append(
            f"| {name} | {summary['all_bars_met']} of {summary['n_seeds']} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", "Bars short, with the number of seeds:", ""]
    for name, result in results.items():
        short = result["summary"]["short"]
        listed = "; ".join(f"{row['bar']} ({row['seeds']})" for row in short) or "none"
        lines.append(f"- **{name}**: {listed}")
    return lines


#: The most panels :func:`curve_figure` puts side by side.
PANELS_PER_ROW = 4


def bar_lines(metrics: Mapping[str, Any], model: str) -> dict[str, float]:
    """Where each :data:`~pipeline.evaluation.seeds.COLUMNS` column's bar lies for ``model``:
    the first bar on that figure (a later one is a control's, e.g. CDR obeyed against the
    shuffled slices), a ratio bar scaled by its reference in ``metrics``.

    Returns:
        column -> the figure at which the bar flips; columns without a bar are left out.
    """
    keys = {key: column for column, key, _ in COLUMNS}
    lines: dict[str, float] = {}
    seen: set[str] = set()
    for bar in BARS[model]:
        column = keys.get(bar.figure)
        if column is None or column in seen:  # a later bar on the figure is a control's
            continue
        seen.add(column)
        line = threshold(bar, metrics, model)
        if line is not None:
            lines[column] = line
    return lines


def curve_figure(
    x: Sequence[float],
    summaries: Sequence[Mapping[str, Any]],
    panels: Sequence[tuple[str, str]],
    *,
    xlabel: str,
    bars: Mapping[str, float],
) -> np.ndarray:
    """One panel per column: the mean over seeds against ``x``, the seeds' range as error
    bars, and the bar (dashed) where the column has one.

    Args:
        x: one position per row (e.g. a start timestep, training minutes).
        summaries: each row's :func:`~pipeline.evaluation.seeds.summarise` result.
        panels: (column of :data:`~pipeline.evaluation.seeds.COLUMNS`, panel title) pairs.
        xlabel: the x axis's label.
        bars: column -> bar (:func:`bar_lines`).

    Returns:
        (H, W, 3) uint8 image: panels 400 x 320 px, at most :data:`PANELS_PER_ROW` a row.
    """
    ncols = min(len(panels), PANELS_PER_ROW)
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4 * ncols, 3.2 * nrows), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    for ax, (column, title) in zip(axes, panels, strict=False):
        figures = [s["figures"].get(column) for s in summaries]
        if any(f is None for f in figures):  # e.g. no covariate probe: nothing to draw
            ax.set(title=f"{title} (not measured)")
            continue
        mean = np.array([f["mean"] for f in figures])
        spread = np.array(
            [
                [m - f["min"] for m, f in zip(mean, figures, strict=True)],
                [f["max"] - m for m, f in zip(mean, figures, strict=True)],
            ]
        )
        ax.errorbar(list(x), mean, yerr=spread, marker="o", capsize=3)
        if column in bars:
            ax.axhline(bars[column], color="grey", linestyle="--", label="bar")
            ax.legend(fontsize=7)
        ax.set(xlabel=xlabel, title=title)
    fig.tight_layout()
    return figure_image(fig)
