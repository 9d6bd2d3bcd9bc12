"""How LDM quality grows with training time: the demo recipe trained for several budgets.

Each budget is a separate run of the demo's LDM recipe (its own learning-rate schedule, the
same seed) on the committed latents, for the given number of optimizer steps, scored as
:mod:`benchmarks.ldm_ablation` scores an arm (``evaluate``'s fd_alex, precision/recall and
z-probe MAE; the realism judge raw and blurred). The x axis is the measured training time on
this machine, so the curve tells a user planning a longer run what the minutes buy, and
whether the demo's budget or the recipe limits its samples.

Usage::

    python -m benchmarks.ldm_scaling [--steps 640,1280,2560] [--out reports] [--work scaling]

Needs what ``benchmarks.ldm_ablation`` needs (``dvc repro`` outputs). Writes
``<out>/ldm_scaling.{json,md,png}``; model files go to ``<work>``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from benchmarks.ldm_ablation import arm_params, score_model, scoring_context, train_arm
from pipeline.core.config import load_params
from pipeline.core.device import resolve_device
from pipeline.core.figures import figure_image, save_png
from pipeline.core.io import write_json, write_text
from pipeline.evaluation.evaluate import real_figures

#: Figures on the y axes, with the real-data reference drawn beside each where there is one.
PANELS = (
    ("fd_alex", "fd_alex (lower is better)"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("zprobe_mae", "z-probe MAE (levels)"),
    ("c2st_blur", "judge AUC, blurred (0.5: cannot tell)"),
)


def curve_figure(rows: list[dict[str, Any]], reference: dict[str, float]) -> np.ndarray:
    """One panel per figure of :data:`PANELS` against training minutes; dashed: real data.

    Args:
        rows: one dict per budget with ``train_minutes`` and the PANELS keys.
        reference: real-data value per key (two halves of the test split), where known.
    """
    fig = Figure(figsize=(4 * len(PANELS), 3.2), dpi=100)
    minutes = [r["train_minutes"] for r in rows]
    for ax, (key, label) in zip(fig.subplots(1, len(PANELS)), PANELS, strict=True):
        ax.plot(minutes, [r[key] for r in rows], marker="o")
        if key in reference:
            ax.axhline(reference[key], color="grey", linestyle="--", label="real test halves")
            ax.legend(fontsize=7)
        ax.set(xlabel="LDM training time (min, this machine)", title=label)
    fig.tight_layout()
    return figure_image(fig)


def main() -> None:
    """Train and score the LDM at each budget; write the table, the JSON and the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="640,1280,2560")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--work", type=Path, default=Path("scaling"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    budgets = sorted(int(s) for s in args.steps.split(","))

    params = load_params()
    device = resolve_device(args.device)
    ctx = scoring_context(params, device)
    scoring = {k: v for k, v in ctx["scoring"].items() if k != "real_features"}
    real_report, _ = real_figures(ctx["real"], **scoring)
    halves = real_report["split_halves"] or {}
    reference = {k: halves[k] for k in ("fd_alex", "precision", "recall") if k in halves}
    reference |= {"zprobe_mae": real_report["zprobe_mae"], "c2st_blur": 0.5}
    rows: list[dict[str, Any]] = []
    for steps in budgets:
        model, seconds = train_arm(arm_params(params, {}, steps), str(steps), args.work, device)
        row = {"steps": steps, "train_minutes": seconds / 60, "threads": torch.get_num_threads()}
        rows.append(row | score_model(model, ctx))
        print(rows[-1], flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(
        args.out / "ldm_scaling.json",
        {"seed": params.seed, "reference": reference, "budgets": rows},
    )
    save_png(curve_figure(rows, reference), args.out / "ldm_scaling.png")
    keys = ["steps", "train_minutes", *(k for k, _ in PANELS)]
    lines = [
        "# LDM quality against training time (demo recipe, stand-in cohort, this machine)",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
        *(
            "| " + " | ".join(f"{r[k]:.3g}" if k != "steps" else str(r[k]) for k in keys) + " |"
            for r in rows
        ),
        "| real test halves | | "
        + " | ".join(f"{reference[k]:.3g}" if k in reference else "" for k, _ in PANELS)
        + " |",
    ]
    write_text(args.out / "ldm_scaling.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
