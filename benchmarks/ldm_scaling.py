"""How LDM quality grows with training time: the demo recipe trained for several budgets.

Each budget is a separate run of the demo's LDM recipe (its own learning-rate schedule, the
same seed) on the committed latents, for the given number of optimizer steps, scored as
:mod:`benchmarks.ldm_ablation` scores an arm (``evaluate``'s fd_alex, precision/recall and
z-probe MAE; the realism judge raw and blurred) and by ``evaluate``'s label probes (CDR > 0
AUC and age MAE read off slices made at every test slice's own z and covariates,
:func:`pipeline.evaluation.label_fidelity.label_fidelity`). The x axis is the measured
training time on this machine, so the curve tells a user planning a longer run what the
minutes buy, and whether the demo's budget or the recipe limits its samples and its labels.

Usage::

    python -m benchmarks.ldm_scaling [--steps 800,1600,3200,6400] [--out reports] [--work scaling]

Needs what ``benchmarks.ldm_ablation`` needs (``dvc repro`` outputs), and
``models/covariate_probe.pt`` (``train_probes``). Writes
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
from pipeline.evaluation.label_fidelity import label_fidelity
from pipeline.inference.sampling import load_generator
from pipeline.models.files import load_covariate_probe
from pipeline.models.probes import CovariateProbe
from pipeline.training.probes import CovariateLabels, score_covariates

#: Figures on the y axes, with the real-data reference drawn beside each where there is one.
PANELS = (
    ("fd_alex", "fd_alex (lower is better)"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("zprobe_mae", "z-probe MAE (levels)"),
    ("c2st_blur", "judge AUC, blurred (0.5: cannot tell)"),
    ("cdr_auc", "CDR > 0 AUC of matched slices (probe)"),
    ("age_mae", "age MAE of matched slices (probe, years)"),
)
#: Label figures kept from :func:`label_fidelity`'s report: (arm, key) -> row key.
LABELS = {
    ("matched", "cdr_auc"): "cdr_auc",
    ("shuffled", "cdr_auc"): "cdr_auc_shuffled",
    ("matched", "age_mae"): "age_mae",
    ("shuffled", "age_mae"): "age_mae_shuffled",
}


def label_scores(model: Path, ctx: dict[str, Any], probe: CovariateProbe) -> dict[str, float]:
    """What the covariate probe reads off the model's slices, as ``evaluate`` measures it: one
    slice per test slice at its z and covariates (matched) and with the covariates shuffled
    across slices (the control), sampled with ``evaluate``'s label seed.

    Returns:
        :data:`LABELS`' row keys -> value (the real slices' floors are in the reference).
    """
    report, _ = label_fidelity(
        load_generator(model, ctx["device"]),
        ctx["real"],
        ctx["test_manifest"],
        probe=probe,
        segmenter=None,
        n=None,
        seed=ctx["seed"] + 2,
    )
    return {name: float(report[arm][key]) for (arm, key), name in LABELS.items()}


def curve_figure(rows: list[dict[str, Any]], reference: dict[str, float]) -> np.ndarray:
    """One panel per figure of :data:`PANELS` against training minutes; dashed: real data.

    Args:
        rows: one dict per budget with ``train_minutes`` and the PANELS keys.
        reference: real-data value per key (two halves of the test split for fd_alex and
            precision/recall, the whole split for the probes), where known.
    """
    fig = Figure(figsize=(4 * len(PANELS), 3.2), dpi=100)
    minutes = [r["train_minutes"] for r in rows]
    for ax, (key, label) in zip(fig.subplots(1, len(PANELS)), PANELS, strict=True):
        ax.plot(minutes, [r[key] for r in rows], marker="o")
        if key in reference:
            ax.axhline(reference[key], color="grey", linestyle="--", label="real test slices")
            ax.legend(fontsize=7)
        ax.set(xlabel="LDM training time (min, this machine)", title=label)
    fig.tight_layout()
    return figure_image(fig)


def main() -> None:
    """Train and score the LDM at each budget; write the table, the JSON and the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="800,1600,3200,6400")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--work", type=Path, default=Path("scaling"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    budgets = sorted(int(s) for s in args.steps.split(","))

    params = load_params()
    device = resolve_device(args.device)
    ctx = scoring_context(params, device)
    real_report, _ = real_figures(ctx["real"], **ctx["measuring"])
    halves = real_report["split_halves"] or {}
    reference = {k: halves[k] for k in ("fd_alex", "precision", "recall") if k in halves}
    reference |= {"zprobe_mae": real_report["zprobe_mae"], "c2st_blur": 0.5}
    covariate_probe, _ = load_covariate_probe(Path("models/covariate_probe.pt"), device)
    labels = CovariateLabels.from_manifest(ctx["test_manifest"])
    real_labels = score_covariates(
        covariate_probe, ctx["real"].image, labels.age, labels.cdr_positive, labels.sex_male
    )
    reference |= {"cdr_auc": real_labels["cdr_auc"], "age_mae": real_labels["age_mae"]}
    rows: list[dict[str, Any]] = []
    for steps in budgets:
        model, seconds = train_arm(arm_params(params, {}, steps), str(steps), args.work, device)
        row = {"steps": steps, "train_minutes": seconds / 60, "threads": torch.get_num_threads()}
        rows.append(row | score_model(model, ctx) | label_scores(model, ctx, covariate_probe))
        print(rows[-1], flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(
        args.out / "ldm_scaling.json",
        {"seed": params.seed, "reference": reference, "budgets": rows},
    )
    save_png(curve_figure(rows, reference), args.out / "ldm_scaling.png")
    figures = [*(k for k, _ in PANELS), "cdr_auc_shuffled", "age_mae_shuffled"]
    keys = ["steps", "train_minutes", *figures]
    lines = [
        "# LDM quality against training time (demo recipe, stand-in cohort, this machine)",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
        *(
            "| " + " | ".join(f"{r[k]:.3g}" if k != "steps" else str(r[k]) for k in keys) + " |"
            for r in rows
        ),
        "| real test slices (halves) | | "
        + " | ".join(f"{reference[k]:.3g}" if k in reference else "" for k in figures)
        + " |",
    ]
    write_text(args.out / "ldm_scaling.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
