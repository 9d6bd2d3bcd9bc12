"""Are a generator's labels obeyed? The label probes read covariates and tissue off its slices.

For a covariate-conditioned generator, ``n`` real test slices spread over z (every one by
default) are taken with their own labels (z, age, sex, CDR) and the generator is asked for
one slice per test slice at the same z and covariates (*matched*; ``evaluate`` passes the
slices it generated for its realism figures, which are exactly these). The covariate probe
(:mod:`pipeline.training.probes`, trained on real training slices only) then reads age,
CDR > 0 and sex off

* the real test slices: the floor a perfect generator would reach;
* the matched synthetic slices, scored against the covariates they were asked for;
* the *shuffled* control: slices generated at the same z with the covariates permuted
  across slices, scored against the unshuffled labels. A generator that ignores its
  covariates scores the same on matched and shuffled; one that obeys them is clearly
  worse on shuffled (near the constant baseline).

Masks: the tissue segmenter's labels on each generated image against the mask generated
with it (Dice per class), beside the same Dice on the real test slices against their true
tissue maps.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from pipeline.core.figures import figure_image, grid
from pipeline.core.labels import covariate_codes
from pipeline.data.datasets import EvalData
from pipeline.inference.sampling import GeneratorModel, Samples, sample_slices
from pipeline.models.probes import CovariateProbe
from pipeline.training.probes import (
    CovariateLabels,
    constant_covariate_scores,
    dice_per_class,
    predict_covariates,
    predict_tissue,
    score_covariates,
)

logger = logging.getLogger(__name__)

#: Seed offset of the shuffled control's sampling and permutation.
SHUFFLE_SEED_OFFSET = 104729


def _scores(probe: CovariateProbe, images: torch.Tensor, labels: CovariateLabels) -> dict:
    return score_covariates(probe, images, labels.age, labels.cdr_positive, labels.sex_male)


def label_fidelity(
    generator: GeneratorModel,
    test: EvalData,
    test_manifest: pd.DataFrame,
    *,
    probe: CovariateProbe | None,
    segmenter: nn.Module | None,
    n: int | None,
    seed: int,
    train_labels: CovariateLabels | None = None,
    matched: Samples | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Probe scores of real, matched and shuffled slices, and mask agreement.

    Args:
        generator: a loaded generator (its covariate schema decides what is conditioned).
        test: the real test split.
        test_manifest: its manifest (row i ↔ slice i; ``age``, ``sex``, ``cdr`` columns).
        probe: the covariate probe, or None (no covariate scores).
        segmenter: the tissue segmenter, or None (no mask scores).
        n: test slices used (spread over z; None or more than the split: every one).
        seed: sampling seed (the shuffled control uses ``seed + SHUFFLE_SEED_OFFSET``).
        train_labels: the training slices' labels, for ``chance`` (the training median age
            read for every slice); None leaves ``chance`` out.
        matched: the generator's slices at every test slice's own z and covariates (row i
            for test slice i; with ``tissue`` where it makes masks), already made; None
            samples the ``n`` needed here.

    Returns:
        The report and its figures: ``pairs`` (:func:`pairs_figure` of the matched
        slices) and, with an age or CDR probe head, ``covariates``
        (:func:`covariates_figure`). The report:
        ``covariates`` (the conditioned names), ``n``; with a probe and covariates:
        ``real``, ``matched``, ``shuffled`` (each :func:`score_covariates`' report) and
        ``chance`` (with ``train_labels``: what a probe that ignores the image scores on
        them, :func:`~pipeline.training.probes.constant_covariate_scores`);
        with masks: ``mask_dice`` (segmenter on generated images vs generated masks) and
        ``real_mask_dice`` (segmenter on real test slices vs their tissue maps); ``skipped``
        names what could not be measured and why.
    """
    schema = generator.schema
    idx = test.spread_over_z(len(test.z) if n is None else n)
    rows = test_manifest.iloc[idx.numpy()].reset_index(drop=True)
    labels = CovariateLabels.from_manifest(rows)
    z = test.z[idx]
    report: dict[str, Any] = {"covariates": [c.name for c in schema], "n": len(idx)}
    skipped: dict[str, str] = {}
    figures: dict[str, np.ndarray] = {}
    masks = generator.tissue_labels and segmenter is not None and test.tissue is not None
    codes = torch.from_numpy(covariate_codes(rows, schema)) if schema else None
    if matched is None:
        matched = sample_slices(generator, z, seed, covariates=codes, masks=masks)
    else:
        if len(matched.images) != len(test.z) or (masks and matched.tissue is None):
            raise ValueError(
                f"matched must hold one slice per test slice ({len(test.z)})"
                + (" with its mask" if masks else "")
                + f", got {len(matched.images)}"
            )
        tissue = None if matched.tissue is None else matched.tissue[idx]
        matched = Samples(matched.images[idx], matched.z[idx], codes, tissue)
    if probe is None or not schema:
        skipped["covariates"] = (
            "no covariate probe (run train_probes)" if probe is None
            else "the generator conditions on no covariate"
        )  # fmt: skip
    else:
        rng = np.random.default_rng(seed + SHUFFLE_SEED_OFFSET)
        perm = torch.from_numpy(rng.permutation(len(idx)))
        shuffled = sample_slices(
            generator,
            z,
            seed + SHUFFLE_SEED_OFFSET,
            covariates=codes[perm],  # type: ignore[index]
        )
        if train_labels is not None:
            report["chance"] = constant_covariate_scores(train_labels, labels)
        report["real"] = _scores(probe, test.image[idx], labels)
        report["matched"] = _scores(probe, matched.images, labels)
        report["shuffled"] = _scores(probe, shuffled.images, labels)
        if {"age", "cdr"} & set(probe.heads):
            readings = {
                name: {h: v.numpy() for h, v in predict_covariates(probe, images).items()}
                for name, images in (
                    ("real slices", test.image[idx]),
                    ("matched synthetic", matched.images),
                    ("shuffled control", shuffled.images),
                )
            }
            z_index = test.z_index[idx].numpy()
            figures["covariates"] = covariates_figure(labels, z_index, readings)
    if masks:
        seg_fake = predict_tissue(segmenter, matched.images)  # type: ignore[arg-type]
        seg_real = predict_tissue(segmenter, test.image[idx])  # type: ignore[arg-type]
        report["mask_dice"] = dice_per_class(seg_fake, matched.tissue)  # type: ignore[arg-type]
        report["real_mask_dice"] = dice_per_class(seg_real, test.tissue[idx])  # type: ignore[index]
    else:
        skipped["masks"] = (
            "the generator's autoencoder makes no masks" if not generator.tissue_labels
            else "no segmenter (run train_probes) or no tissue labels in the test split"
        )  # fmt: skip
    report["skipped"] = skipped
    figures["pairs"] = pairs_figure(test, idx, matched.images, matched.tissue)
    return report, figures


def covariates_figure(
    labels: CovariateLabels, z_index: np.ndarray, readings: dict[str, dict[str, np.ndarray]]
) -> np.ndarray:
    """What the covariate probe reads off each set of slices (real test slices, matched
    synthetic, shuffled control, whose images were generated for other covariates, so a
    model that obeys them scatters there), against the covariates asked for.

    Rows: age read against age asked (one panel per set, with the MAE; when the probe has an
    age head); P(CDR > 0) by the CDR class asked (one panel per set; when it has a CDR
    head); last, the age reading's absolute error per z level, one line per set.

    Args:
        labels: the covariates asked for (the real slices' own), one row per slice.
        z_index: (n,) each slice's z level.
        readings: set name → head (``age`` years, ``cdr`` probability) → (n,) readings.
    """
    heads = [h for h in ("age", "cdr") if all(h in r for r in readings.values())]
    n_sets = len(readings)
    fig = Figure(figsize=(4 * n_sets, 3.2 * (len(heads) + ("age" in heads))), dpi=100)
    axes = fig.subplots(len(heads) + ("age" in heads), n_sets, squeeze=False)
    age, cdr = labels.age, labels.cdr_positive
    for row, head in enumerate(heads):
        for ax, (name, reading) in zip(axes[row], readings.items(), strict=True):
            if head == "age":
                known = ~np.isnan(age)
                lo, hi = float(np.nanmin(age)), float(np.nanmax(age))
                ax.scatter(age[known], reading["age"][known], s=6, alpha=0.5)
                ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1)
                mae = float(np.abs(reading["age"][known] - age[known]).mean())
                ax.set(xlabel="age asked for (years)", ylabel="probe reading (years)",
                       title=f"{name}: MAE {mae:.1f} y")  # fmt: skip
            else:
                groups = [reading["cdr"][cdr == c] for c in (0.0, 1.0)]
                ax.boxplot(groups, tick_labels=["CDR 0", "CDR > 0"], showfliers=False)
                for x, g in enumerate(groups, start=1):
                    jitter = np.random.default_rng(x).uniform(-0.15, 0.15, len(g))
                    ax.scatter(x + jitter, g, s=5, alpha=0.4)
                ax.set(ylim=(0, 1), ylabel="probe P(CDR > 0)", title=f"{name}: CDR asked")
    if "age" in heads:
        ax = axes[-1][0]
        known = ~np.isnan(age)
        levels = np.unique(z_index[known])
        for name, reading in readings.items():
            error = np.abs(reading["age"] - age)
            ax.plot(levels, [error[known & (z_index == z)].mean() for z in levels], label=name)
        ax.set(xlabel="z level", ylabel="|age read - asked| (years)", title="age error per z")
        ax.legend(fontsize=7)
        for ax in axes[-1][1:]:
            ax.axis("off")
    fig.tight_layout()
    return figure_image(fig)


#: Columns (test slices, evenly over z) of :func:`pairs_figure`.
FIGURE_COLUMNS = 8


def pairs_figure(
    test: EvalData,
    idx: torch.Tensor,
    images: torch.Tensor,
    tissue: torch.Tensor | None,
    columns: int = FIGURE_COLUMNS,
) -> np.ndarray:
    """Real slices with their tissue maps above generated slices (same z and covariates)
    with their generated masks, at full size: one column per test slice.

    Args:
        test: the real test split.
        idx: (n,) the test slices the generator matched.
        images: (n, 1, H, W) the matched synthetic slices.
        tissue: (n, H, W) their generated masks, or None (that row is left out).
        columns: test slices shown, evenly over ``idx``.

    Returns:
        (H', W') array in [0, 1]: rows real, real tissue (if any), synthetic, synthetic mask
        (if any); tissue labels 0..3 shown as grey levels 0, 1/3, 2/3, 1.
    """
    picks = torch.linspace(0, len(idx) - 1, min(columns, len(idx))).round().long()
    rows = [test.image[idx[picks]]]
    if test.tissue is not None:
        rows.append(test.tissue[idx[picks]][:, None].float() / 3)
    rows.append(images[picks])
    if tissue is not None:
        rows.append(tissue[picks][:, None].float() / 3)
    return grid(torch.cat(rows), ncol=len(picks))


def fidelity_summary(report: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of :func:`label_fidelity` as flat ``{key: value}`` metrics:
    ``{real,matched,shuffled}_{age_mae,cdr_auc,sex_auc}`` and ``mask_dice``,
    ``real_mask_dice`` (mean over CSF, GM, WM)."""
    flat: dict[str, float] = {}
    for arm in ("real", "matched", "shuffled"):
        for key in ("age_mae", "cdr_auc", "sex_auc"):
            if key in report.get(arm, {}):
                flat[f"{arm}_{key}"] = float(report[arm][key])
    for key in ("mask_dice", "real_mask_dice"):
        if key in report:
            flat[key] = float(report[key]["dice_mean"])
    return flat
