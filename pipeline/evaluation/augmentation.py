"""The augmentation study: does adding synthetic slices help a real downstream task?

For every task (:data:`~pipeline.core.config.StudyTask`), every arm trains the same network
(:class:`~pipeline.training.probes.SegmenterTask` for tissue segmentation,
:class:`~pipeline.training.probes.CovariateProbeTask` with one head for age regression or
CDR > 0 classification) for the same optimizer steps on the same seeds, through the one
training loop, and is scored on the real test subjects only (never seen by the generator or
the downstream network):

- segmentation: mean Dice over CSF, GM and WM of each test subject's slices;
- age: |mean prediction over a subject's slices - the subject's age| (years; lower is better);
- cdr: (p - y)^2, the Brier score of the subject's mean probability of CDR > 0 against its
  label (lower is better; subjects with an unknown CDR are not scored). Beside it, per seed,
  the subject-level ROC AUC and balanced accuracy (threshold 0.5), the figures a reader of a
  classification paper expects; the paired statistics use the per-subject Brier score, which
  is defined for every subject (an AUC is not).

Arms (:func:`study_arms`), per fraction of the training subjects (the low-data regimes; the
generator is the one the pipeline trained on all of them: the "pretrained generator, small
labelled set" setting): real only, and real + synthetic at each ratio; then synthetic only
(as many synthetic slices as real ones: train on synthetic, test on real), conventional
augmentation (MONAI flips, small affine, bias field, contrast) and conventional + synthetic
at the best ratio; for ``cdr``, class rebalancing (all real slices plus synthetic slices of
the under-represented CDR class only, generated at that class through the covariate
conditioning, until the classes have as many slices). Each arm's baseline is real only at
its own fraction; the real-only arms of the smaller fractions are compared with the full set.

Statistics (:mod:`pipeline.metrics.paired`): per arm the table of paired differences
(seeds x test subjects) from its baseline, a two-level bootstrap CI and p-value, and Holm's
correction across the arms of a task. The conclusion line is computed from the table.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch.utils.data import Dataset

from pipeline.core.config import Params, StudyConfig, StudyTask, TrainConfig
from pipeline.core.errors import InputError
from pipeline.core.figures import figure_image
from pipeline.core.labels import label_value
from pipeline.data.augment import AugmentedDataset
from pipeline.data.datasets import EvalData, SliceDataset
from pipeline.data.manifests import MANIFEST, read_manifest
from pipeline.metrics.paired import holm, paired_bootstrap
from pipeline.training.concurrency import WorkerPool, pool_workers
from pipeline.training.loop import fit
from pipeline.training.probes import (
    CovariateLabels,
    CovariateProbeTask,
    LabelledSlices,
    SegmenterTask,
    dice_per_class,
    predict_covariates,
    predict_tissue,
)

logger = logging.getLogger(__name__)

#: How each task's score reads (for the report): unit, and whether higher is better.
TASK_SCORES: dict[str, tuple[str, bool]] = {
    "segmentation": ("mean Dice (CSF, GM, WM) per test subject", True),
    "age": ("age MAE per test subject (years)", False),
    "cdr": ("Brier score of CDR > 0 per test subject", False),
}


@dataclass(frozen=True)
class Arm:
    """One training set of the study.

    Attributes:
        name: shown in tables and figures, e.g. ``"50% real + 1x synthetic"``.
        fraction: fraction of the training subjects whose real slices are used.
        ratio: synthetic slices per real slice (0: none).
        synthetic_only: no real slices; as many synthetic slices as the real set has.
        conventional: MONAI flips, small affine, bias field and contrast on every item.
        rebalance: add synthetic slices of the under-represented CDR class only, until both
            classes have as many slices (the ``cdr`` task).
        baseline: the arm it is compared with (None for the reference arm).
    """

    name: str
    fraction: float = 1.0
    ratio: float = 0.0
    synthetic_only: bool = False
    conventional: bool = False
    rebalance: bool = False
    baseline: str | None = None


def _real_name(fraction: float) -> str:
    return "real" if fraction == 1.0 else f"{fraction:.0%} real"


#: The class-rebalancing arm of the ``cdr`` task.
REBALANCED = "real + synthetic minority class"


def study_arms(cfg: StudyConfig, task: StudyTask, best_ratio: float | None = None) -> list[Arm]:
    """The arms of ``cfg`` for ``task``, baselines first.

    Args:
        cfg: the study settings.
        task: the downstream task (class rebalancing is an arm of ``cdr`` only).
        best_ratio: the ratio whose arm scored best at the full set; adds
            "conventional + synthetic" at it (None: that arm is not planned yet).
    """
    arms: list[Arm] = []
    for fraction in sorted(cfg.fractions, reverse=True):
        real = _real_name(fraction)
        arms.append(Arm(real, fraction, baseline=None if fraction == 1.0 else "real"))
        arms += [Arm(f"{real} + {r:g}x synthetic", fraction, r, baseline=real) for r in cfg.ratios]
    if cfg.synthetic_only:
        arms.append(Arm("synthetic only", synthetic_only=True, baseline="real"))
    if cfg.rebalance and task == "cdr":
        arms.append(Arm(REBALANCED, rebalance=True, baseline="real"))
    if cfg.conventional:
        arms.append(Arm("conventional", conventional=True, baseline="real"))
        if best_ratio is not None:
            arms.append(
                Arm(
                    f"conventional + {best_ratio:g}x synthetic",
                    ratio=best_ratio,
                    conventional=True,
                    baseline="real",
                )
            )
    return arms


def subject_subset(manifest: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Row indices of the slices of a seeded ``fraction`` of the subjects (at least one).

    The subsets are nested: the 25 % subjects are among the 50 % ones.
    """
    subjects = np.asarray(sorted(manifest["subject"].astype(str).unique()))
    order = np.random.default_rng(seed).permutation(len(subjects))
    keep = set(subjects[order[: max(1, round(fraction * len(subjects)))]])
    return np.flatnonzero(manifest["subject"].astype(str).isin(keep).to_numpy())


class Conventional(Dataset):
    """Conventional augmentation of image (and tissue) items, MONAI dictionary transforms:
    left-right flip, small rotation and scaling (tissue nearest-neighbour), bias field and
    contrast on the image. Seeded, so an arm's items are the same for the same seed.

    Args:
        data: items with ``image`` (1, H, W) and optionally ``tissue`` (H, W).
        seed: seeds the transforms' random state.
    """

    def __init__(self, data: Dataset, seed: int) -> None:
        from monai.transforms import (
            Compose,
            RandAdjustContrastd,
            RandAffined,
            RandBiasFieldd,
            RandFlipd,
        )

        self.data = data
        spatial = ["image", "tissue"]
        self.spatial = Compose(
            [
                RandFlipd(spatial, prob=0.5, spatial_axis=1, allow_missing_keys=True),
                RandAffined(
                    spatial,
                    prob=0.5,
                    rotate_range=0.1,
                    scale_range=0.05,
                    mode=("bilinear", "nearest"),
                    padding_mode="zeros",
                    allow_missing_keys=True,
                ),
                RandBiasFieldd("image", prob=0.3, coeff_range=(0.0, 0.1)),
                RandAdjustContrastd("image", prob=0.3, gamma=(0.8, 1.25)),
            ]
        ).set_random_state(seed)

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from monai.data import get_track_meta, set_track_meta

        item = dict(self.data[index])
        if "tissue" in item:
            item["tissue"] = item["tissue"][None].float()
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors: 2 ms an item instead of 5 (no MetaTensor)
        try:
            out = self.spatial(item)
        finally:
            set_track_meta(tracking)
        out["image"] = torch.as_tensor(out["image"]).float().clamp(0, 1)
        if "tissue" in out:
            out["tissue"] = torch.as_tensor(out["tissue"])[0].round().long()
        return out


@dataclass
class StudyData:
    """What every arm draws from.

    Attributes:
        train: the real training split.
        test: the real test split (the only scoring data).
        test_subjects: (N,) subject id of each test slice.
        test_labels: the test slices' covariate targets (age in years, CDR > 0; NaN unknown).
        synthetic_dir: the synthetic pool (a ``generate`` folder).
    """

    train: SliceDataset
    test: EvalData
    test_subjects: np.ndarray
    test_labels: CovariateLabels
    synthetic_dir: Path


@dataclass(frozen=True)
class Scored:
    """One trained network's scores on the real test subjects.

    Attributes:
        per_subject: (n_scored_subjects,) the task's score per test subject, sorted by id.
        summary: split-level figures beside it (``cdr``: subject-level ``auc`` and
            ``balanced_accuracy``); empty for the other tasks.
    """

    per_subject: np.ndarray
    summary: dict[str, float]


def _synthetic_rows(data: StudyData) -> list[dict[str, str]]:
    return [r for r in read_manifest(data.synthetic_dir / MANIFEST) if r["type"] == "slice"]


def task_problem(task: StudyTask, data: StudyData) -> str | None:
    """Why ``task`` cannot run on ``data`` (one line), or None."""
    slices = _synthetic_rows(data)
    if task == "segmentation":
        if not data.train.has_tissue or data.test.tissue is None:
            return "segmentation: the prepared splits have no tissue.npy (no segmentations)"
        if not all(r["mask_file"] for r in slices):
            return f"segmentation: {data.synthetic_dir} has slices without masks (--masks)"
        return None
    target = data.test_labels.target(task)
    known = target[~np.isnan(target)]
    if task == "age" and known.size == 0:
        return "age: the test split has no known ages"
    if task == "cdr":
        if np.unique(known).size < 2:
            return "cdr: the test split needs subjects with CDR 0 and with CDR > 0"
        train = CovariateLabels.from_manifest(data.train.manifest).cdr_positive
        if np.unique(train[~np.isnan(train)]).size < 2:
            return "cdr: the training split needs subjects with CDR 0 and with CDR > 0"
    if not any(r[task] for r in slices):
        label = {"age": "an age", "cdr": "a CDR"}[task]
        return f"{task}: no slice in {data.synthetic_dir} was generated with {label}"
    return None


def _cdr_positive(row: Mapping[str, str]) -> bool:
    return bool(row["cdr"]) and label_value("cdr", row["cdr"]) > 0


def _cdr_negative(row: Mapping[str, str]) -> bool:
    return bool(row["cdr"]) and label_value("cdr", row["cdr"]) == 0


def rebalancing(data: StudyData, real: np.ndarray) -> tuple[str, int]:
    """The under-represented CDR class among the real slices ``real`` and how many synthetic
    slices of it balance the classes (at most as many as the pool holds).

    Returns:
        (``"CDR > 0"`` or ``"CDR 0"``, count).
    """
    positive = CovariateLabels.from_manifest(data.train.manifest).cdr_positive[real]
    n_pos, n_neg = int((positive == 1).sum()), int((positive == 0).sum())
    minority, accept = ("CDR > 0", _cdr_positive) if n_pos < n_neg else ("CDR 0", _cdr_negative)
    available = sum(accept(r) for r in _synthetic_rows(data))
    need = abs(n_neg - n_pos)
    if available < need:
        logger.warning(
            "augment_study: rebalancing needs %d synthetic %s slices, the pool has %d",
            need, minority, available,
        )  # fmt: skip
    return minority, min(need, available)


def training_set(arm: Arm, data: StudyData, task: StudyTask, seed: int, study_seed: int) -> Any:
    """The arm's training dataset (items with ``image`` and the task's target)."""
    real = subject_subset(data.train.manifest, arm.fraction, study_seed)
    # synthetic only: as many slices as the real arm has, or the whole pool if it is smaller
    count = (
        min(len(real), len(_synthetic_rows(data)))
        if arm.synthetic_only
        else round(arm.ratio * len(real))
    )
    accept = None
    if arm.rebalance:
        minority, count = rebalancing(data, real)
        accept = _cdr_positive if minority == "CDR > 0" else _cdr_negative
    mixed = AugmentedDataset(
        data.train,
        data.synthetic_dir,
        0.0,
        seed=seed,
        require_tissue=task == "segmentation",
        real_indices=[] if arm.synthetic_only else real,
        synthetic_count=count,
        preload=True,
        synthetic_filter=accept,
    )
    keys = ("image", "tissue") if task == "segmentation" else ("image", task)
    held = InMemory(mixed, keys)
    return Conventional(held, seed) if arm.conventional else held


class InMemory(Dataset):
    """The items of ``data`` with only ``keys``, read once and held as stacked tensors: an
    arm's training set is read hundreds of times, and building an item from its files and
    labels costs more than a training step of the study's small networks.

    Args:
        data: items are dicts of tensors (unknown covariates NaN: the training loop skips a
            batch holding any non-finite float, so only the task's keys are kept).
        keys: the keys kept.
    """

    def __init__(self, data: Dataset, keys: tuple[str, ...]) -> None:
        items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        self.tensors = {key: torch.stack([item[key] for item in items]) for key in keys}
        self.length = len(items)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: values[index] for key, values in self.tensors.items()}


def _covariate_targets(
    dataset: Dataset, head: str, age_mean: float, age_std: float
) -> LabelledSlices:
    """``dataset`` with the targets of the covariate network's one ``head`` (age or cdr)."""
    values = np.asarray([float(dataset[i][head]) for i in range(len(dataset))])  # type: ignore[arg-type]
    nan = np.full_like(values, np.nan)
    if head == "age":
        labels = CovariateLabels(values, nan, nan)
    else:
        labels = CovariateLabels(nan, np.where(np.isnan(values), np.nan, values > 0), nan)
    return LabelledSlices(dataset, labels, (head,), age_mean=age_mean, age_std=age_std)


def train_and_score(
    task: StudyTask,
    dataset: Dataset,
    data: StudyData,
    cfg: StudyConfig,
    *,
    seed: int,
    device: torch.device,
    run: Any,
    work_dir: Path,
) -> Scored:
    """Train the task's network on ``dataset`` and score it on each real test subject."""
    torch.manual_seed(seed)
    n_items = len(dataset)  # type: ignore[arg-type]
    if task == "segmentation":
        seg_task = SegmenterTask(cfg.segmenter, device)
        fit(seg_task, dataset, _fitting(cfg.segmenter.train, n_items), run=run,
            resume_dir=work_dir, seed=seed, device=device, progress=False)  # fmt: skip
        pred = predict_tissue(seg_task.modules["segmenter"], data.test.image)
        return Scored(
            _per_subject(
                data.test_subjects,
                lambda rows: dice_per_class(pred[rows], data.test.tissue[rows])["dice_mean"],  # type: ignore[index]
            ),
            {},
        )
    known = data.train.manifest["age"].dropna().astype(float)
    age_mean, age_std = float(known.mean()), float(known.std() or 1.0)
    net_task = CovariateProbeTask(
        cfg.covariate_net, (task,), age_mean=age_mean, age_std=age_std, device=device
    )
    fit(net_task, _covariate_targets(dataset, task, age_mean, age_std),
        _fitting(cfg.covariate_net.train, n_items), run=run, resume_dir=work_dir, seed=seed,
        device=device, progress=False)  # fmt: skip
    pred = predict_covariates(net_task.modules["probe"], data.test.image)[task].numpy()
    target = data.test_labels.target(task)
    scored = ~np.isnan(target)
    subject_pred = _per_subject(data.test_subjects, lambda rows: pred[rows].mean(), scored)
    subject_target = _per_subject(data.test_subjects, lambda rows: target[rows][0], scored)
    if task == "age":
        return Scored(np.abs(subject_pred - subject_target), {})
    return Scored(
        (subject_pred - subject_target) ** 2,
        {
            "auc": float(roc_auc_score(subject_target, subject_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(subject_target, subject_pred > 0.5)),
        },
    )


def _fitting(train: TrainConfig, n_items: int) -> TrainConfig:
    """``train`` with the batch no larger than a small (low-data) training set; every arm
    keeps the same number of optimizer steps."""
    return train.model_copy(update={"batch_size": min(train.batch_size, n_items)})


def _per_subject(
    subjects: np.ndarray, score: Callable[[np.ndarray], float], keep: np.ndarray | None = None
) -> np.ndarray:
    """``score(rows)`` of each subject's slice rows, in sorted subject order; only the
    subjects with a slice in ``keep`` (a (N,) bool mask; None = all)."""
    kept = subjects if keep is None else subjects[keep]
    return np.asarray([float(score(np.flatnonzero(subjects == s))) for s in sorted(set(kept))])


def effects(
    scores: Mapping[str, np.ndarray], arms: list[Arm], cfg: StudyConfig, higher_is_better: bool
) -> dict[str, dict[str, Any]]:
    """Each non-reference arm's paired effect against its baseline, with Holm flags.

    Args:
        scores: arm name → (seeds, subjects) scores.
        arms: the arms (with baselines).
        cfg: bootstrap and correction settings.
        higher_is_better: the score's direction (for ``helps``).

    Returns:
        arm name → :class:`~pipeline.metrics.paired.PairedEffect` fields plus
        ``baseline``, ``survives_holm`` and ``helps`` (significant and in the better
        direction; False when not significant).
    """
    out: dict[str, dict[str, Any]] = {}
    for arm in arms:
        if arm.baseline is None or arm.name not in scores:
            continue
        delta = scores[arm.name] - scores[arm.baseline]
        effect = paired_bootstrap(delta, n_boot=cfg.n_boot, confidence=cfg.confidence, seed=0)
        out[arm.name] = {"baseline": arm.baseline, **effect.as_dict()}
    survives = holm({name: e["p_value"] for name, e in out.items()}, cfg.alpha)
    for name, e in out.items():
        e["survives_holm"] = survives[name]
        better = e["mean"] > 0 if higher_is_better else e["mean"] < 0
        e["helps"] = bool(survives[name] and better)
    return out


def conclusion(task: StudyTask, task_effects: Mapping[str, Mapping[str, Any]], cfg: StudyConfig
               ) -> str:  # fmt: skip
    """The task's verdict line, computed from its effects table."""
    level = f"{cfg.confidence:.0%}"
    helped = [n for n, e in task_effects.items() if e["helps"]]
    hurt = [n for n, e in task_effects.items() if e["survives_holm"] and not e["helps"]]
    if not helped and not hurt:
        return (
            f"{task}: no arm differs from its real-only baseline at {level} after Holm "
            f"correction ({len(task_effects)} comparisons)."
        )
    parts = []
    if helped:
        parts.append(f"helps: {', '.join(helped)}")
    if hurt:
        parts.append(f"hurts: {', '.join(hurt)}")
    return f"{task}: {'; '.join(parts)} (Holm-corrected, {level} CIs in the table)."


def figure(results: Mapping[str, Any], cfg: StudyConfig) -> np.ndarray:
    """One column per task. Top: the score against the synthetic ratio, one line per data
    regime, with the paired CI of each point against its real-only baseline as a band.
    Bottom: every arm's paired difference from its baseline with its CI (a forest plot;
    red: survives Holm and hurts, green: survives and helps, grey: does not survive)."""
    tasks = list(results)
    fig = Figure(figsize=(5.5 * max(1, len(tasks)), 7.0), dpi=100)
    axes = fig.subplots(2, max(1, len(tasks)), squeeze=False)
    for top, bottom, task in zip(axes[0], axes[1], tasks, strict=False):
        res = results[task]
        if "skipped" in res:
            top.set_title(f"{task}: not run")
            top.text(0.02, 0.5, res["skipped"], wrap=True, fontsize=8, transform=top.transAxes)
            top.axis("off")
            bottom.axis("off")
            continue
        for fraction in sorted(cfg.fractions):
            real = _real_name(fraction)
            names = [real, *(f"{real} + {r:g}x synthetic" for r in cfg.ratios)]
            x = [0.0, *cfg.ratios]
            base = res["arms"][real]["mean"]
            y = [res["arms"][n]["mean"] for n in names]
            lows = [base] + [base + res["effects"][n]["low"] for n in names[1:]]
            highs = [base] + [base + res["effects"][n]["high"] for n in names[1:]]
            line = top.plot(x, y, marker="o", label=real)[0]
            top.fill_between(x, lows, highs, color=line.get_color(), alpha=0.2)
        top.set(xlabel="synthetic slices per real slice", ylabel=TASK_SCORES[task][0], title=task)
        top.legend(fontsize=8)
        _forest(bottom, res, cfg.confidence)
    fig.tight_layout()
    return figure_image(fig)


def _forest(ax: Any, res: Mapping[str, Any], confidence: float) -> None:
    """Each arm's paired difference from its baseline with its CI, on ``ax``."""
    names = list(res["effects"])[::-1]
    for y, name in enumerate(names):
        e = res["effects"][name]
        colour = ("tab:green" if e["helps"] else "tab:red") if e["survives_holm"] else "grey"
        ax.errorbar(e["mean"], y, xerr=[[e["mean"] - e["low"]], [e["high"] - e["mean"]]],
                    fmt="o", color=colour, capsize=3)  # fmt: skip
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_yticks(range(len(names)), [f"{n}\nvs {res['effects'][n]['baseline']}" for n in names],
                  fontsize=7)  # fmt: skip
    better = "higher" if res["higher_is_better"] else "lower"
    ax.set(xlabel=f"paired difference ({better} is better), {confidence:.0%} CI",
           title="each arm against its baseline")  # fmt: skip


#: Split-level figures that a task's arms carry per seed, shown beside its table.
SUMMARY_COLUMNS = {"auc": "AUC (subjects)", "balanced_accuracy": "balanced accuracy"}


def markdown(results: Mapping[str, Any], cfg: StudyConfig, stand_in: bool) -> str:
    """``reports/augmentation.md``: the conclusions first, then one table per task."""
    lines = ["# Augmentation study", ""]
    if stand_in:
        lines += [
            "Data: the synthetic stand-in cohort (not OASIS); these are stand-in figures.",
            "",
        ]
    lines += [f"- {res.get('conclusion', res.get('skipped'))}" for res in results.values()]
    if len(cfg.fractions) > 1:
        lines += [
            "",
            "The low-data arms train on a fraction of the training subjects; the generator is "
            "the one the pipeline trained on all of them (a pretrained generator, a small "
            "labelled set).",
        ]
    for task, res in results.items():
        if "skipped" in res:
            continue
        unit, higher = TASK_SCORES[task]
        extra = [k for k in SUMMARY_COLUMNS if k in res["arms"]["real"]]
        lines += [
            "",
            f"## {task}: {unit} ({'higher' if higher else 'lower'} is better), "
            f"{cfg.seeds} seeds x {res['n_subjects']} test subjects",
            "",
            "| arm | mean | vs | difference | CI | p | Holm |"
            + "".join(f" {SUMMARY_COLUMNS[k]} |" for k in extra),
            "|---|---|---|---|---|---|---|" + "---|" * len(extra),
        ]
        for name, arm in res["arms"].items():
            e = res["effects"].get(name)
            summary = "".join(f" {np.mean(arm[k]):.3g} |" for k in extra)
            if e is None:
                lines.append(f"| {name} | {arm['mean']:.4g} | — | — | — | — | reference |{summary}")
                continue
            lines.append(
                f"| {name} | {arm['mean']:.4g} | {e['baseline']} | {e['mean']:+.4g} | "
                f"[{e['low']:+.4g}, {e['high']:+.4g}] | {e['p_value']:.3g} | "
                f"{'survives' if e['survives_holm'] else '—'} |{summary}"
            )
        if REBALANCED in res["arms"]:
            lines += [
                "",
                f"{REBALANCED}: every real slice plus synthetic slices of the under-represented "
                "CDR class only, generated at that class, until both classes have as many.",
            ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Training:
    """One downstream training of the study.

    Attributes:
        task: the downstream task.
        arm: the arm whose training set it uses.
        seed: its seed (training set draw, initialisation, batch order).
    """

    task: StudyTask
    arm: Arm
    seed: int


def _train(
    job: Training, params: Params, data: StudyData, device: torch.device, work_dir: Path
) -> Scored:
    """Train and score one job (its checkpoints under ``work_dir``)."""
    return train_and_score(
        job.task,
        training_set(job.arm, data, job.task, job.seed, params.seed),
        data,
        params.study,
        seed=job.seed,
        device=device,
        run=QuietRun(),
        work_dir=work_dir / job.task / job.arm.name.replace(" ", "_") / str(job.seed),
    )


#: This process's study (set once per worker process by :func:`_init_worker`, not per job).
_WORKER: dict[str, Any] = {}


def _init_worker(params: Params, data: StudyData, device: torch.device, work_dir: Path) -> None:
    _WORKER.update(params=params, data=data, device=device, work_dir=work_dir)


def _train_in_worker(job: Training) -> Scored:
    w = _WORKER
    return _train(job, w["params"], w["data"], w["device"], w["work_dir"])


class Trainings:
    """Runs the study's downstream trainings, side by side on CPU cores.

    Small networks use two cores poorly (:mod:`pipeline.training.concurrency`), and the study
    trains many: with ``workers`` > 1 each training runs in one of ``workers`` processes of
    one thread each (:class:`~pipeline.training.concurrency.WorkerPool`, started once, each
    holding the study's data); with 1, one after the other in this process.

    Args:
        params: all parameters (``study``, ``seed``).
        data: the real splits and the synthetic pool.
        device: where the networks train (the CPU when ``workers`` > 1).
        work_dir: scratch folder for the trainings' checkpoints.
        workers: processes (see :func:`~pipeline.training.concurrency.pool_workers`).
    """

    def __init__(
        self, params: Params, data: StudyData, device: torch.device, work_dir: Path, workers: int
    ) -> None:
        self.params = params
        device = device if workers == 1 else torch.device("cpu")
        self.workers = WorkerPool(workers, _init_worker, (params, data, device, work_dir))

    def __enter__(self) -> Trainings:
        return self

    def __exit__(self, *_: object) -> None:
        self.workers.__exit__()

    def run(self, jobs: list[Training]) -> list[Scored]:
        """Each job's scores, in the order of ``jobs``."""
        return self.workers.map(_train_in_worker, jobs, desc="augment_study", unit="training")

    def arms(self, task: StudyTask, arms: list[Arm], done: dict[str, list[Scored]]) -> None:
        """Train and score every seed of the arms not yet in ``done`` (arm name → per-seed
        scores, in seed order), all at once."""
        todo = [a for a in arms if a.name not in done]
        seeds = [self.params.seed + s for s in range(self.params.study.seeds)]
        scored = iter(self.run([Training(task, arm, seed) for arm in todo for seed in seeds]))
        for arm in todo:
            done[arm.name] = [next(scored) for _ in seeds]
            mean = np.mean([s.per_subject for s in done[arm.name]])
            logger.info("augment_study: %s / %s: %.4g", task, arm.name, mean)


def _arm_result(arm: Arm, per_seed: list[Scored]) -> dict[str, Any]:
    """An arm's entry in the results: its settings, per-seed, per-subject scores, their
    mean, and each summary figure per seed."""
    scores = np.stack([s.per_subject for s in per_seed])
    settings = {k: v for k, v in asdict(arm).items() if k not in ("name", "baseline")}
    out: dict[str, Any] = {
        "settings": settings,
        "scores": scores.tolist(),
        "mean": float(scores.mean()),
    }
    for key in per_seed[0].summary:
        out[key] = [s.summary[key] for s in per_seed]
    return out


def run_study(
    params: Params, data: StudyData, *, device: torch.device, workers: int = 1
) -> dict[str, Any]:
    """Every task's arms, seeds, scores and effects.

    Args:
        params: all parameters (``study``, ``seed``).
        data: the real splits and the synthetic pool.
        device: where the downstream networks train.
        workers: processes for the trainings (:class:`Trainings`,
            :func:`~pipeline.training.concurrency.pool_workers`).

    Returns:
        task → ``{"arms": {name: {"settings": ..., "scores": [[...]], "mean": float, ...}},
        "effects": ..., "conclusion": str, "n_subjects": int, ...}`` or ``{"skipped":
        reason}``; a ``cdr`` arm also holds ``auc`` and ``balanced_accuracy`` per seed.
    """
    cfg = params.study
    results: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        Trainings(params, data, device, Path(tmp), workers) as trainings,
    ):
        for task in cfg.tasks:
            problem = task_problem(task, data)
            if problem:
                logger.warning("augment_study: %s", problem)
                results[task] = {"skipped": problem}
                continue
            higher = TASK_SCORES[task][1]
            arms = study_arms(cfg, task)
            done: dict[str, list[Scored]] = {}
            trainings.arms(task, arms, done)
            if cfg.conventional and cfg.ratios:
                sign = 1 if higher else -1
                ratio_arms = {r: done[f"real + {r:g}x synthetic"] for r in cfg.ratios}
                mean = {r: np.mean([s.per_subject for s in arm]) for r, arm in ratio_arms.items()}
                arms = study_arms(cfg, task, max(cfg.ratios, key=lambda r: sign * mean[r]))
                trainings.arms(task, arms, done)
            table = {a.name: _arm_result(a, done[a.name]) for a in arms}
            scores = {name: np.asarray(arm["scores"]) for name, arm in table.items()}
            task_effects = effects(scores, arms, cfg, higher)
            results[task] = {
                "score": TASK_SCORES[task][0],
                "higher_is_better": higher,
                "arms": table,
                "effects": task_effects,
                "conclusion": conclusion(task, task_effects, cfg),
                "n_subjects": int(scores["real"].shape[1]),
            }
    return results


def pool_counts(n_rows: int, pool_ratio: float, seed: int) -> np.ndarray:
    """How many pool slices each training slice gets: ``ceil(pool_ratio * n_rows)`` in all,
    ``floor(pool_ratio)`` each and one more for a seeded random subset of the rows (so
    0.5 draws one slice at half the training slices, 2 two at every one).

    Args:
        n_rows: training slices.
        pool_ratio: pool size per training slice (> 0).
        seed: picks the rows that get the extra slice.

    Returns:
        (n_rows,) int counts (some 0 where ``pool_ratio`` < 1).
    """
    total = math.ceil(pool_ratio * n_rows)
    counts = np.full(n_rows, total // n_rows)
    extra = np.random.default_rng(seed).permutation(n_rows)[: total % n_rows]
    counts[extra] += 1
    return counts


def generate_pool(params: Params, model: Path, out_dir: Path, device: torch.device) -> Path:
    """A synthetic pool matched to the training slices: ``pool_ratio`` slices per training
    slice (:func:`pool_counts`), each at its training slice's z and covariates (those the
    generator conditions on), with masks when the generator makes them; written by
    ``generate`` (a spec file) into ``out_dir``.

    Returns:
        ``out_dir``.
    """
    from pipeline.inference.generate import generate
    from pipeline.inference.sampling import load_generator

    train = SliceDataset(Path(params.data.prepared_dir) / "train")
    gm = load_generator(model, device)
    columns = [c.name for c in gm.schema]
    spec = train.manifest[["z_index", *columns]].rename(columns={"z_index": "z"})
    spec.insert(1, "count", pool_counts(len(spec), params.study.pool_ratio, params.seed))
    spec = spec[spec["count"] > 0]
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "pool_spec.csv"
    spec.to_csv(spec_path, index=False)
    generate(
        model,
        seed=params.seed,
        out_dir=out_dir,
        spec=spec_path,
        masks=gm.tissue_labels,
        overwrite=True,
        device=device,
    )
    return out_dir


def pairs_figure(data: StudyData, n: int = 6) -> np.ndarray:
    """A few real training pairs (image, tissue) beside synthetic ones from the pool, at full
    size: rows real image, real tissue, synthetic image, synthetic mask (labels as grey)."""
    from pipeline.core.figures import grid

    real_idx = np.linspace(0, len(data.train) - 1, n).round().astype(int)
    pool = AugmentedDataset(
        data.train, data.synthetic_dir, 0.0, real_indices=[], synthetic_count=n, seed=0
    )
    real = [data.train[int(i)] for i in real_idx]
    fake = [pool[i] for i in range(len(pool))]
    rows = [torch.stack([r["image"] for r in real])]
    if data.train.has_tissue:
        rows.append(torch.stack([r["tissue"][None].float() / 3 for r in real]))
    rows.append(torch.stack([f["image"] for f in fake]))
    if pool.has_tissue:
        rows.append(torch.stack([f["tissue"][None].float() / 3 for f in fake]))
    return grid(torch.cat(rows), ncol=n)


@dataclass(frozen=True)
class StudyPaths:
    """Outputs of the ``augment_study`` stage.

    Attributes:
        json: ``reports/augmentation.json`` (every arm's per-seed, per-subject scores, the
            paired effects, CIs and Holm flags, the conclusions).
        markdown: ``reports/augmentation.md`` (the conclusions and tables).
        figure: ``reports/augmentation.png`` (score against ratio per data regime).
        pairs: ``reports/augmentation_pairs.png`` (real and synthetic training pairs).
        pool: where a generated synthetic pool is written (``data/study_pool``).
    """

    json: Path
    markdown: Path
    figure: Path
    pairs: Path
    pool: Path

    @classmethod
    def standard(cls, root: str | Path = ".") -> StudyPaths:
        """The standard layout under ``root``."""
        reports = Path(root) / "reports"
        return cls(
            reports / "augmentation.json",
            reports / "augmentation.md",
            reports / "augmentation.png",
            reports / "augmentation_pairs.png",
            Path(root) / "data" / "study_pool",
        )


def augment_study(
    params: Params,
    *,
    device: torch.device,
    run: Any,
    paths: StudyPaths,
    synthetic_dir: str | Path | None = None,
    model: str | Path | None = None,
    stand_in: bool = False,
) -> dict[str, Any]:
    """The whole study: the synthetic pool, every task's arms, the reports.

    Args:
        params: all parameters (``study``, ``seed``, ``data.prepared_dir``).
        device: where downstream networks train (and the pool is generated).
        run: the stage's tracking run (arm scores are logged as ``<task>/<arm>/mean``).
        paths: outputs.
        synthetic_dir: a ``generate`` folder to use (default ``study.synthetic_dir``; null:
            generate a matched pool with ``model``).
        model: the generator file (default ``models/<study.generator>.pt``).
        stand_in: the data is the demo stand-in (said in the reports).

    Returns:
        The content of ``reports/augmentation.json``.
    """
    from pipeline.core.figures import save_png
    from pipeline.core.io import write_json, write_text

    cfg = params.study
    prepared = Path(params.data.prepared_dir)
    source = synthetic_dir or cfg.synthetic_dir
    if source is None:
        generator = Path(model) if model else Path("models") / f"{cfg.generator}.pt"
        source = generate_pool(params, generator, paths.pool, device)
    if not (Path(source) / MANIFEST).is_file():
        raise InputError(
            f"{source} has no {MANIFEST}: give a folder written by `braingen generate` "
            "(with --masks for segmentation, an --age for age regression)"
        )
    train = SliceDataset(prepared / "train")
    test_set = SliceDataset(prepared / "test")
    data = StudyData(
        train,
        EvalData.from_dataset(test_set),
        test_set.manifest["subject"].astype(str).to_numpy(),
        CovariateLabels.from_manifest(test_set.manifest),
        Path(source),
    )
    # the folder's files and slice size, checked once here (one line) rather than in every
    # training: a slice of another size or a missing file would stop both tasks
    AugmentedDataset(train, source, 0.0, synthetic_count=0)
    workers = pool_workers(device)
    results = run_study(params, data, device=device, workers=workers)
    report = {
        "synthetic_dir": str(source),
        "seeds": cfg.seeds,
        "training_processes": workers,
        "tasks": results,
    }
    write_json(paths.json, report)
    write_text(paths.markdown, markdown(results, cfg, stand_in))
    plot = figure(results, cfg)
    save_png(plot, paths.figure)
    save_png(pairs_figure(data), paths.pairs)
    log_arms(run, results)
    for res in results.values():
        logger.info("%s", res.get("conclusion", res.get("skipped")))
    run.log_artifact(paths.markdown, "reports")
    run.log_image(plot, f"reports/{paths.figure.name}")
    return report


def metric_name(arm: str) -> str:
    """An arm's name as an MLflow metric name (letters, digits, ``_-. :/`` only):
    ``"50% real + 1x synthetic"`` → ``"50pct_real_plus_1x_synthetic"``."""
    words = arm.replace("%", "pct").replace("+", "plus").split()
    return re.sub(r"[^A-Za-z0-9_\-.]", "_", "_".join(words))


def log_arms(run: Any, results: Mapping[str, Any]) -> None:
    """One MLflow child run per (task, arm) under the stage run: the arm's settings as
    params; its mean score, per-seed means, summary figures and paired effect as metrics.
    The stage run keeps ``<task>/<arm>/mean`` too, for comparing repros at a glance."""
    for task, res in results.items():
        for name, arm in res.get("arms", {}).items():
            run.log_metrics({f"{task}/{metric_name(name)}/mean": arm["mean"]})
            metrics = {"mean": arm["mean"]}
            metrics |= {f"seed_{i}": float(np.mean(s)) for i, s in enumerate(arm["scores"])}
            metrics |= {k: float(np.mean(arm[k])) for k in SUMMARY_COLUMNS if k in arm}
            effect = res["effects"].get(name)
            if effect is not None:
                metrics |= {f"delta_{k}": effect[k] for k in ("mean", "low", "high", "p_value")}
                metrics["survives_holm"] = float(effect["survives_holm"])
            params = {"task": task, "arm": name, **arm["settings"]}
            with run.child(f"{task}: {name}", params=params, tags={"study_task": task}) as child:
                child.log_metrics(metrics)


class QuietRun:
    """A tracking stand-in for the many small downstream trainings (their losses are not
    worth a run each); the stage run records each arm's scores instead."""

    run_name = "augment_study"

    def log_metrics(self, *_: Any, **__: Any) -> None:
        """Dropped."""

    @contextmanager
    def child(self, *_: Any, **__: Any) -> Iterator[QuietRun]:
        """No child run: itself."""
        yield self

    def log_image(self, *_: Any, **__: Any) -> None:
        """Dropped."""
