"""How LDM quality grows with training time: the demo recipe trained for several budgets.

Each budget is a separate run of the demo's LDM recipe (its own learning-rate schedule, the
same training seed) on the committed latents, for the given number of optimizer steps
(:func:`benchmarks.ldm_ablation.train_arm`), scored exactly as ``evaluate`` scores the demo LDM
over several sampling seeds (:func:`benchmarks.scoring.score_seeds`: slices at the test slices'
own z and covariates, fd_alex, precision / recall, the z-probe, the raw and blurred judges,
the copy-like fraction and the label probes, each seed judged against the report's bars). The
x axis is the measured training time on this machine, so the curve tells a user planning a
longer run what the minutes buy, and whether the demo's budget or its recipe limits the
samples. A strip of samples per budget under real test slices of the same levels
(``ldm_scaling_samples.png``, full size) shows what the figures cannot.

Nothing is lost when a run is killed: the report is rewritten after every budget, and a
budget already trained in ``<work>`` with the same settings is scored without training again.

Usage::

    python -m benchmarks.ldm_scaling [--steps 1200,2400,4800,9600] [--seeds 0,1,2]
                                     [--out reports] [--work scaling]

Needs what ``benchmarks.ldm_ablation`` needs (``dvc repro`` outputs). Writes
``<out>/ldm_scaling.{json,md,png}`` and ``<out>/ldm_scaling_samples.png``; model files go to
``<work>``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from benchmarks.ldm_ablation import arm_params, figure, figure_levels, score_arm, train_arm
from benchmarks.scoring import Scoring, bar_lines, curve_figure, scoring, scoring_arguments, table
from pipeline.core.errors import InputError
from pipeline.core.figures import save_png
from pipeline.core.io import write_json, write_text
from pipeline.core.stage import main as run_command
from pipeline.inference.sampling import load_generator, sample

#: Panels of the curve: (column of :data:`pipeline.evaluation.seeds.COLUMNS`, title).
PANELS = (
    ("fd_alex", "fd_alex (lower is better)"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("z-probe MAE", "z-probe MAE (levels)"),
    ("judge blurred", "judge AUC, blurred (anatomy)"),
    ("judge raw", "judge AUC, raw (texture)"),
    ("CDR AUC", "CDR > 0 AUC (probe)"),
    ("copy-like", "copy-like fraction"),
)


def budget_name(steps: int, minutes: float) -> str:
    """A budget's row name: ``2400 steps (8.1 min)``."""
    return f"{steps} steps ({minutes:.1f} min)"


def markdown(rows: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], threads: int) -> str:
    """The report: what was run, then the table (one row per budget)."""
    heading = [
        "# LDM quality against training time (demo recipe; stand-in cohort where the data is "
        "the demo's)",
        "",
        "Each budget trains the demo's LDM recipe afresh for that many steps (same training "
        f"seed, {threads} torch threads, this machine's minutes) and is scored as `evaluate` "
        f"scores the LDM over sampling seeds {', '.join(map(str, seeds))}: the mean, with the "
        "range in brackets (`benchmarks/ldm_scaling.py`). Samples beside real slices: "
        "`ldm_scaling_samples.png`.",
        "",
    ]
    return "\n".join(heading + table(rows, first="budget")) + "\n"


def write_report(
    out: Path, rows: dict[str, dict[str, Any]], shown: dict[str, torch.Tensor], run: Scoring
) -> None:
    """Write ``<out>/ldm_scaling.{json,md,png}`` and the samples figure (after every budget)."""
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    write_json(out / "ldm_scaling.json", {"seeds": run.seeds, "threads": threads, "budgets": rows})
    write_text(out / "ldm_scaling.md", markdown(rows, run.seeds, threads))
    curve = curve_figure(
        [r["train_minutes"] for r in rows.values()],
        [r["summary"] for r in rows.values()],
        PANELS,
        xlabel="LDM training time (min, this machine)",
        bars=bar_lines(run.metrics, "ldm"),
    )
    save_png(curve, out / "ldm_scaling.png")
    save_png(figure(shown, run.ctx.real, run.ctx.n_slices), out / "ldm_scaling_samples.png")


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Train and score the LDM at each budget; write the table, the JSON and the figures."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ldm_scaling")
    parser.add_argument("--steps", default="1200,2400,4800,9600", help="budgets (comma list)")
    parser.add_argument("--work", type=Path, default=Path("scaling"))
    scoring_arguments(parser, seeds="0,1,2")
    args = parser.parse_args(argv)
    try:
        budgets = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    except ValueError:
        raise InputError(f"--steps must be whole numbers, got {args.steps!r}") from None
    if not budgets or budgets[0] < 1:
        raise InputError(f"--steps must be positive whole numbers, got {args.steps!r}")

    run = scoring(args)
    levels = figure_levels(run.ctx.n_slices)
    rows: dict[str, dict[str, Any]] = {}
    shown: dict[str, torch.Tensor] = {}
    for steps in budgets:
        arm = arm_params(run.params, {}, steps)
        model, seconds = train_arm(arm, str(steps), args.work, run.ctx.device)
        generator = load_generator(model, run.ctx.device)
        name = budget_name(steps, seconds / 60)
        rows[name] = {"steps": steps, "train_minutes": seconds / 60} | score_arm(generator, run)
        shown[f"{steps} steps"], _ = sample(generator, levels, 2, run.params.seed)
        write_report(args.out, rows, shown, run)
        Console().print(name, rows[name]["summary"]["figures"])
    return rows


if __name__ == "__main__":
    run_command(main)
