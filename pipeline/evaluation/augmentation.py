"""The augmentation study: does adding synthetic slices help a real downstream task?

For every task (:data:`~pipeline.core.config.StudyTask`), every arm trains the same network
(:class:`~pipeline.training.probes.SegmenterTask` for tissue segmentation,
:class:`~pipeline.training.probes.CovariateProbeTask` with an age head for age regression)
for the same optimizer steps on the same seeds, through the one training loop, and is scored
on the real test subjects only (never seen by the generator or the downstream network):

- segmentation: mean Dice over CSF, GM and WM of each test subject's slices;
- age: |mean prediction over a subject's slices - the subject's age| (years; lower is better).

Arms (:func:`study_arms`), per fraction of the training subjects (the low-data regimes; the
generator is the one the pipeline trained on all of them: the "pretrained generator, small
labelled set" setting): real only, and real + synthetic at each ratio; then synthetic only
(as many synthetic slices as real ones: train on synthetic, test on real), conventional
augmentation (MONAI flips, small affine, bias field, contrast) and conventional + synthetic
at the best ratio. Each arm's baseline is real only at its own fraction; the real-only
arms of the smaller fractions are compared with the full set.

Statistics (:mod:`pipeline.metrics.paired`): per arm the table of paired differences
(seeds x test subjects) from its baseline, a two-level bootstrap CI and p-value, and Holm's
correction across the arms of a task. The conclusion line is computed from the table.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import Dataset

from pipeline.core.config import Params, StudyConfig, StudyTask, TrainConfig
from pipeline.core.errors import InputError
from pipeline.core.figures import figure_image
from pipeline.data.augment import AugmentedDataset
from pipeline.data.datasets import EvalData, SliceDataset
from pipeline.data.manifests import MANIFEST, read_manifest
from pipeline.metrics.paired import holm, paired_bootstrap
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
        baseline: the arm it is compared with (None for the reference arm).
    """

    name: str
    fraction: float = 1.0
    ratio: float = 0.0
    synthetic_only: bool = False
    conventional: bool = False
    baseline: str | None = None


def _real_name(fraction: float) -> str:
    return "real" if fraction == 1.0 else f"{fraction:.0%} real"


def study_arms(cfg: StudyConfig, best_ratio: float | None = None) -> list[Arm]:
    """The arms of ``cfg``, baselines first.

    Args:
        cfg: the study settings.
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
        test_ages: (N,) age of each test slice's subject in years (NaN unknown).
        synthetic_dir: the synthetic pool (a ``generate`` folder).
    """

    train: SliceDataset
    test: EvalData
    test_subjects: np.ndarray
    test_ages: np.ndarray
    synthetic_dir: Path


def task_problem(task: StudyTask, data: StudyData) -> str | None:
    """Why ``task`` cannot run on ``data`` (one line), or None."""
    rows = read_manifest(data.synthetic_dir / MANIFEST)
    slices = [r for r in rows if r["type"] == "slice"]
    if task == "segmentation":
        if not data.train.has_tissue or data.test.tissue is None:
            return "segmentation: the prepared splits have no tissue.npy (no segmentations)"
        if not all(r["mask_file"] for r in slices):
            return f"segmentation: {data.synthetic_dir} has slices without masks (--masks)"
    if task == "age":
        if np.isnan(data.test_ages).all():
            return "age: the test split has no known ages"
        if not any(r["age"] for r in slices):
            return f"age: no slice in {data.synthetic_dir} was generated with an age"
    return None


def training_set(arm: Arm, data: StudyData, task: StudyTask, seed: int, study_seed: int) -> Any:
    """The arm's training dataset (items with ``image`` and the task's target)."""
    real = subject_subset(data.train.manifest, arm.fraction, study_seed)
    count = len(real) if arm.synthetic_only else round(arm.ratio * len(real))
    mixed = AugmentedDataset(
        data.train,
        data.synthetic_dir,
        0.0,
        seed=seed,
        require_tissue=task == "segmentation",
        real_indices=[] if arm.synthetic_only else real,
        synthetic_count=count,
        preload=True,
    )
    keys = ("image", "tissue") if task == "segmentation" else ("image", "age")
    selected = Selected(mixed, keys)
    return Conventional(selected, seed) if arm.conventional else selected


class Selected(Dataset):
    """The items of ``data`` with only ``keys`` (the training loop skips a batch holding
    any non-finite float, and unknown covariates are NaN).

    Args:
        data: items are dicts of tensors.
        keys: the keys kept.
    """

    def __init__(self, data: Dataset, keys: tuple[str, ...]) -> None:
        self.data, self.keys = data, keys

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.data[index]
        return {key: item[key] for key in self.keys}


def _age_targets(dataset: Dataset, age_mean: float, age_std: float) -> LabelledSlices:
    ages = np.asarray([float(dataset[i]["age"]) for i in range(len(dataset))])  # type: ignore[arg-type]
    nan = np.full_like(ages, np.nan)
    return LabelledSlices(
        dataset, CovariateLabels(ages, nan, nan), ("age",), age_mean=age_mean, age_std=age_std
    )


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
) -> np.ndarray:
    """Train the task's network on ``dataset``; its score on each test subject.

    Returns:
        (n_test_subjects,) scores in sorted subject order.
    """
    torch.manual_seed(seed)
    net: nn.Module
    n_items = len(dataset)  # type: ignore[arg-type]
    if task == "segmentation":
        seg_task = SegmenterTask(cfg.segmenter, device)
        fit(seg_task, dataset, _fitting(cfg.segmenter.train, n_items), run=run,
            resume_dir=work_dir, seed=seed, device=device, progress=False)  # fmt: skip
        net = seg_task.modules["segmenter"]
        pred = predict_tissue(net, data.test.image)
        return _per_subject(
            data.test_subjects,
            lambda rows: dice_per_class(pred[rows], data.test.tissue[rows])["dice_mean"],  # type: ignore[index]
        )
    known = data.train.manifest["age"].dropna().astype(float)
    age_mean, age_std = float(known.mean()), float(known.std() or 1.0)
    age_task = CovariateProbeTask(
        cfg.regressor, ("age",), age_mean=age_mean, age_std=age_std, device=device
    )
    fit(age_task, _age_targets(dataset, age_mean, age_std),
        _fitting(cfg.regressor.train, n_items), run=run, resume_dir=work_dir, seed=seed,
        device=device, progress=False)  # fmt: skip
    ages = predict_covariates(age_task.modules["probe"], data.test.image)["age"].numpy()
    return _per_subject(
        data.test_subjects, lambda rows: abs(ages[rows].mean() - data.test_ages[rows][0])
    )


def _fitting(train: TrainConfig, n_items: int) -> TrainConfig:
    """``train`` with the batch no larger than a small (low-data) training set; every arm
    keeps the same number of optimizer steps."""
    return train.model_copy(update={"batch_size": min(train.batch_size, n_items)})


def _per_subject(subjects: np.ndarray, score: Callable[[np.ndarray], float]) -> np.ndarray:
    return np.asarray([float(score(np.flatnonzero(subjects == s))) for s in sorted(set(subjects))])


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
    """Per task: the score against the synthetic ratio, one line per data regime, with the
    paired CI of each point against its real-only baseline as a band."""
    tasks = list(results)
    fig = Figure(figsize=(5 * max(1, len(tasks)), 3.6), dpi=100)
    axes = fig.subplots(1, max(1, len(tasks)), squeeze=False)[0]
    for ax, task in zip(axes, tasks, strict=False):
        res = results[task]
        if "skipped" in res:
            ax.set_title(f"{task}: not run")
            ax.text(0.02, 0.5, res["skipped"], wrap=True, fontsize=8, transform=ax.transAxes)
            continue
        for fraction in sorted(cfg.fractions):
            real = _real_name(fraction)
            names = [real, *(f"{real} + {r:g}x synthetic" for r in cfg.ratios)]
            x = [0.0, *cfg.ratios]
            base = res["arms"][real]["mean"]
            y = [res["arms"][n]["mean"] for n in names]
            lows = [base] + [base + res["effects"][n]["low"] for n in names[1:]]
            highs = [base] + [base + res["effects"][n]["high"] for n in names[1:]]
            line = ax.plot(x, y, marker="o", label=real)[0]
            ax.fill_between(x, lows, highs, color=line.get_color(), alpha=0.2)
        ax.set(xlabel="synthetic slices per real slice", ylabel=TASK_SCORES[task][0], title=task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_image(fig)


def markdown(results: Mapping[str, Any], cfg: StudyConfig, stand_in: bool) -> str:
    """``reports/augmentation.md``: the conclusions first, then one table per task."""
    lines = ["# Augmentation study", ""]
    if stand_in:
        lines += [
            "Data: the synthetic stand-in cohort (not OASIS); these are stand-in figures.",
            "",
        ]
    lines += [f"- {res.get('conclusion', res.get('skipped'))}" for res in results.values()]
    for task, res in results.items():
        if "skipped" in res:
            continue
        unit, higher = TASK_SCORES[task]
        lines += [
            "",
            f"## {task}: {unit} ({'higher' if higher else 'lower'} is better), "
            f"{cfg.seeds} seeds x {res['n_subjects']} test subjects",
            "",
            "| arm | mean | vs | difference | CI | p | Holm |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, arm in res["arms"].items():
            e = res["effects"].get(name)
            if e is None:
                lines.append(f"| {name} | {arm['mean']:.4g} | — | — | — | — | reference |")
                continue
            lines.append(
                f"| {name} | {arm['mean']:.4g} | {e['baseline']} | {e['mean']:+.4g} | "
                f"[{e['low']:+.4g}, {e['high']:+.4g}] | {e['p_value']:.3g} | "
                f"{'survives' if e['survives_holm'] else '—'} |"
            )
    return "\n".join(lines) + "\n"


def _arm_scores(
    task: StudyTask,
    arm: Arm,
    *,
    params: Params,
    data: StudyData,
    device: torch.device,
    run: Any,
    work_dir: Path,
) -> np.ndarray:
    """(seeds, test subjects) scores of one arm: seed ``params.seed + s`` for s < seeds."""
    cfg = params.study
    per_seed = [
        train_and_score(
            task,
            training_set(arm, data, task, params.seed + s, params.seed),
            data,
            cfg,
            seed=params.seed + s,
            device=device,
            run=run,
            work_dir=work_dir / task / arm.name.replace(" ", "_") / str(s),
        )
        for s in range(cfg.seeds)
    ]
    return np.stack(per_seed)


def run_study(
    params: Params,
    data: StudyData,
    *,
    device: torch.device,
    run: Any,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Every task's arms, seeds, scores and effects.

    Args:
        params: all parameters (``study``, ``seed``).
        data: the real splits and the synthetic pool.
        device: where the downstream networks train.
        run: tracking run for the per-arm losses (a quiet stand-in is fine).
        progress: called with a line per finished (task, arm).

    Returns:
        task → ``{"arms": {name: {"scores": [[...]], "mean": float}}, "effects": ...,
        "conclusion": str, "n_subjects": int}`` or ``{"skipped": reason}``.
    """
    cfg = params.study
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in cfg.tasks:
            problem = task_problem(task, data)
            if problem:
                logger.warning("augment_study: %s", problem)
                results[task] = {"skipped": problem}
                continue
            scores: dict[str, np.ndarray] = {}
            higher = TASK_SCORES[task][1]
            common = {"params": params, "data": data, "device": device, "run": run}
            arms = study_arms(cfg)
            for arm in arms:
                scores[arm.name] = _arm_scores(task, arm, **common, work_dir=Path(tmp))
                progress(f"{task} / {arm.name}: {scores[arm.name].mean():.4g}")
            if cfg.conventional and cfg.ratios:
                sign = 1 if higher else -1
                best = max(
                    cfg.ratios, key=lambda r: sign * scores[f"real + {r:g}x synthetic"].mean()
                )
                arms = study_arms(cfg, best)
                scores[arms[-1].name] = _arm_scores(task, arms[-1], **common, work_dir=Path(tmp))
                progress(f"{task} / {arms[-1].name}: {scores[arms[-1].name].mean():.4g}")
            task_effects = effects(scores, arms, cfg, higher)
            results[task] = {
                "arms": {
                    a.name: {
                        "scores": scores[a.name].tolist(),
                        "mean": float(scores[a.name].mean()),
                    }
                    for a in arms
                },
                "effects": task_effects,
                "conclusion": conclusion(task, task_effects, cfg),
                "n_subjects": int(next(iter(scores.values())).shape[1]),
            }
    return results


def generate_pool(params: Params, model: Path, out_dir: Path, device: torch.device) -> Path:
    """A synthetic pool matched to the training slices: ``ceil(pool_ratio)`` slices at each
    training slice's z and covariates (those the generator conditions on), with masks when
    the generator makes them; written by ``generate`` (a spec file) into ``out_dir``.

    Returns:
        ``out_dir``.
    """
    from pipeline.inference.generate import generate
    from pipeline.inference.sampling import load_generator

    train = SliceDataset(Path(params.data.prepared_dir) / "train")
    gm = load_generator(model, device)
    columns = [c.name for c in gm.schema]
    spec = train.manifest[["z_index", *columns]].rename(columns={"z_index": "z"})
    spec.insert(1, "count", math.ceil(params.study.pool_ratio))
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
    ages = CovariateLabels.from_manifest(test_set.manifest).age
    data = StudyData(
        train,
        EvalData.from_dataset(test_set),
        test_set.manifest["subject"].astype(str).to_numpy(),
        ages,
        Path(source),
    )
    results = run_study(params, data, device=device, run=QuietRun(), progress=logger.info)
    report = {"synthetic_dir": str(source), "seeds": cfg.seeds, "tasks": results}
    write_json(paths.json, report)
    write_text(paths.markdown, markdown(results, cfg, stand_in))
    plot = figure(results, cfg)
    save_png(plot, paths.figure)
    save_png(pairs_figure(data), paths.pairs)
    for task, res in results.items():
        for name, arm in res.get("arms", {}).items():
            run.log_metrics({f"{task}/{name.replace(' ', '_')}/mean": arm["mean"]})
        if "conclusion" in res:
            logger.info("%s", res["conclusion"])
    run.log_artifact(paths.markdown, "reports")
    run.log_image(plot, f"reports/{paths.figure.name}")
    return report


class QuietRun:
    """A tracking stand-in for the many small downstream trainings (their losses are not
    worth a run each); the stage run records each arm's scores instead."""

    run_name = "augment_study"

    def log_metrics(self, *_: Any, **__: Any) -> None:
        """Dropped."""

    def log_image(self, *_: Any, **__: Any) -> None:
        """Dropped."""
