"""Training and use of the label probes: the judges of covariate and tissue-mask conditioning.

Two networks, trained on real training slices only (:mod:`pipeline.models.probes`):

- the covariate probe reads age (years), CDR > 0 and sex off a slice; its loss is L1 on the
  normalised age plus BCE on CDR > 0 and on sex, each averaged over the slices whose label
  is known (a blank manifest cell is unknown: OASIS leaves CDR blank for young subjects,
  which is not CDR 0);
- the tissue segmenter labels every pixel background / CSF / GM / WM (Dice + cross-entropy).

The scoring functions (:func:`score_covariates`, :func:`predict_tissue`,
:func:`dice_per_class`) take any images: real test slices give the floor, generated slices
with the covariates or masks they were asked for give the figure to compare with it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.core import distributed
from pipeline.core.config import CovariateProbeConfig, Params, SegmenterConfig
from pipeline.core.errors import InputError
from pipeline.core.figures import figure_image, save_png
from pipeline.core.io import write_json
from pipeline.core.labels import TISSUE_CLASSES, Covariate, covariate_codes
from pipeline.core.stage import StagePaths
from pipeline.core.tracking import StageRun, flatten
from pipeline.data.datasets import EVAL_BATCH, EvalData, SliceDataset
from pipeline.models.files import save_model
from pipeline.models.probes import COVARIATE_HEADS, CovariateProbe, tissue_segmenter
from pipeline.training.loop import Optimization, TrainingTask, adamw, finish_resume, fit

logger = logging.getLogger(__name__)

#: How the probes read the manifest (the shared label vocabulary): age in years, CDR as a
#: number (> 0: impaired), sex coded F = 0, M = 1; anything else is unknown (NaN).
_COLUMNS = (
    Covariate("age", "continuous", 0.0, 150.0),
    Covariate("cdr", "continuous", 0.0, 3.0),
    Covariate("sex", "categorical", categories=("F", "M")),
)


# ------------------------------------------------------------------ labels


@dataclass(frozen=True)
class CovariateLabels:
    """The covariate targets of a split, one entry per slice; NaN where unknown.

    Attributes:
        age: (N,) float years.
        cdr_positive: (N,) float 1 where CDR > 0, 0 where CDR = 0.
        sex_male: (N,) float 1 for M, 0 for F.
        subject: (N,) subject ids (object array), or None when the manifest has none.
    """

    age: np.ndarray
    cdr_positive: np.ndarray
    sex_male: np.ndarray
    subject: np.ndarray | None = None

    @classmethod
    def from_manifest(cls, manifest: pd.DataFrame) -> CovariateLabels:
        """Read a prepared manifest's ``age``, ``cdr``, ``sex`` (and ``subject``) columns.

        A missing column, a blank cell or an unreadable value is unknown.
        """
        codes = covariate_codes(manifest, _COLUMNS).astype(np.float64)
        cdr = np.where(np.isnan(codes[:, 1]), np.nan, (codes[:, 1] > 0).astype(np.float64))
        subject = manifest["subject"].to_numpy(dtype=object) if "subject" in manifest else None
        return cls(age=codes[:, 0], cdr_positive=cdr, sex_male=codes[:, 2], subject=subject)

    def target(self, head: str) -> np.ndarray:
        """The (N,) target array of a head of :data:`COVARIATE_HEADS`."""
        return {"age": self.age, "cdr": self.cdr_positive, "sex": self.sex_male}[head]

    def heads(self) -> tuple[tuple[str, ...], dict[str, str]]:
        """The heads these labels can train, and why each other head cannot.

        Age needs one known age; CDR and sex need both classes among the known labels.

        Returns:
            (heads in :data:`COVARIATE_HEADS` order, ``{missing head: reason}``).
        """
        heads, missing = [], {}
        for head in COVARIATE_HEADS:
            known = self.target(head)[~np.isnan(self.target(head))]
            if head == "age" and known.size == 0:
                missing[head] = "no slice has a known age"
            elif head != "age" and np.unique(known).size < 2:
                missing[head] = _one_class_reason(known)
            else:
                heads.append(head)
        return tuple(heads), missing


def _one_class_reason(known: np.ndarray) -> str:
    if known.size == 0:
        return "no slice has a known label"
    return f"only one class ({known[0]:g}) among the {known.size} known labels"


class LabelledSlices(Dataset):
    """Slices with the targets of the covariate probe's heads.

    Items: ``image`` (1, H, W) in [0, 1] and, per head, ``<head>`` (float32 scalar: the
    normalised age, or 0/1 for CDR > 0 and male sex; 0 where unknown) and ``<head>_known``
    (bool scalar). Unknown targets are filled, not NaN: the training loop skips batches
    holding non-finite floats.

    Args:
        slices: a dataset whose items hold ``image`` (e.g. a :class:`SliceDataset`).
        labels: its labels, row i for item i.
        heads: the heads to supply targets for.
        age_mean: years subtracted from the age target.
        age_std: years the age target is divided by (> 0).
    """

    def __init__(
        self,
        slices: Dataset,
        labels: CovariateLabels,
        heads: tuple[str, ...],
        *,
        age_mean: float = 0.0,
        age_std: float = 1.0,
    ) -> None:
        if len(labels.age) != len(slices):  # type: ignore[arg-type]
            raise InputError(
                f"labels has {len(labels.age)} rows but slices has {len(slices)} items"  # type: ignore[arg-type]
            )
        self.slices = slices
        self.targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for head in heads:
            raw = labels.target(head)
            value = (raw - age_mean) / age_std if head == "age" else raw
            known = ~np.isnan(value)
            filled = np.where(known, value, 0.0).astype(np.float32)
            self.targets[head] = (torch.from_numpy(filled), torch.from_numpy(known))

    def __len__(self) -> int:
        return len(self.slices)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"image": self.slices[index]["image"]}
        for head, (value, known) in self.targets.items():
            item[head], item[f"{head}_known"] = value[index], known[index]
        return item


# ------------------------------------------------------------------ tasks


def covariate_loss(
    outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 on the normalised age + BCE on CDR > 0 + BCE on sex, each over known labels only.

    Args:
        outputs: the probe's ``{head: (B,)}`` outputs.
        batch: ``<head>`` (B,) targets and ``<head>_known`` (B,) bool for every head.

    Returns:
        (the summed loss, ``{"l1_age" | "bce_cdr" | "bce_sex": value}``). A head with no
        known label in the batch contributes 0 (and still takes part in the graph).
    """
    total = torch.zeros((), device=next(iter(outputs.values())).device)
    parts: dict[str, float] = {}
    for head, pred in outputs.items():
        pred, target, known = pred.float(), batch[head].float(), batch[f"{head}_known"]
        if head == "age":
            per, name = F.l1_loss(pred, target, reduction="none"), "l1_age"
        else:
            per = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
            name = f"bce_{head}"
        loss = torch.where(known, per, 0.0).sum() / known.sum().clamp(min=1)
        total = total + loss
        parts[name] = loss.item()
    return total, parts


class CovariateProbeTask(TrainingTask):
    """The covariate probe and its masked loss (:func:`covariate_loss`).

    Args:
        cfg: probe architecture and training settings.
        heads: the heads to train (:meth:`CovariateLabels.heads`).
        age_mean: mean training age in years.
        age_std: standard deviation of the training ages in years.
        device: where the probe lives.
    """

    ema_module = None

    def __init__(
        self,
        cfg: CovariateProbeConfig,
        heads: tuple[str, ...],
        *,
        age_mean: float,
        age_std: float,
        device: torch.device,
    ) -> None:
        probe = CovariateProbe(cfg.channels, heads, age_mean=age_mean, age_std=age_std)
        self.modules = {"probe": probe.to(device)}
        self.optimizers = {"probe": adamw(probe.parameters(), cfg.train.lr, cfg.train.weight_decay)}

    def train_step(
        self, batch: dict[str, torch.Tensor], step: int, optim: Optimization
    ) -> dict[str, float]:
        loss, parts = covariate_loss(self.net("probe")(batch["image"]), batch)
        optim.step("probe", loss)
        return {"loss": loss.item(), **parts}


class SegmenterTask(TrainingTask):
    """The tissue segmenter trained with Dice + cross-entropy (MONAI ``DiceCELoss``).

    Batches need ``image`` (B, 1, H, W) in [0, 1] and ``tissue`` (B, H, W) int64 labels.

    Args:
        cfg: segmenter architecture and training settings.
        device: where the segmenter lives.
    """

    ema_module = None

    def __init__(self, cfg: SegmenterConfig, device: torch.device) -> None:
        from monai.losses import DiceCELoss

        segmenter = tissue_segmenter(cfg).to(device)
        self.modules = {"segmenter": segmenter}
        self.optimizers = {
            "segmenter": adamw(segmenter.parameters(), cfg.train.lr, cfg.train.weight_decay)
        }
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def train_step(
        self, batch: dict[str, torch.Tensor], step: int, optim: Optimization
    ) -> dict[str, float]:
        logits = self.net("segmenter")(batch["image"]).float()
        loss = self.loss(logits, batch["tissue"][:, None])
        optim.step("segmenter", loss)
        return {"dice_ce": loss.item()}


# ------------------------------------------------------------------ scoring


@torch.no_grad()
def _forward_batched(net: nn.Module, images: torch.Tensor, batch_size: int) -> Iterator[Any]:
    """``net`` (put in eval mode) over ``images`` in chunks, on the net's device."""
    net.eval()
    device = next(net.parameters()).device
    for chunk in images.split(batch_size):
        yield net(chunk.to(device).float())


def predict_covariates(
    probe: CovariateProbe, images: torch.Tensor, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """The probe's readings of a stack of slices.

    Args:
        probe: trained covariate probe.
        images: (N, 1, H, W) intensities in [0, 1], on any device.
        batch_size: slices per forward.

    Returns:
        Per head of the probe, (N,) float32 on the CPU: ``age`` in years, ``cdr`` the
        probability of CDR > 0, ``sex`` the probability of male.
    """
    outs = [
        {head: probe.age_years(v) if head == "age" else v.sigmoid() for head, v in out.items()}
        for out in _forward_batched(probe, images, batch_size)
    ]
    return {
        head: torch.cat([o[head].float().cpu() for o in outs]) if outs else torch.empty(0)
        for head in probe.heads
    }


def _labels_array(name: str, values: np.ndarray | None, n: int) -> np.ndarray:
    """``values`` as (n,) float64 (None → all unknown); ValueError naming ``name`` otherwise."""
    if values is None:
        return np.full(n, np.nan)
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.shape != (n,):
        raise ValueError(f"{name} must hold one value per image ({n}), got shape {array.shape}")
    return array


def _auc(labels: np.ndarray, scores: np.ndarray) -> tuple[float | None, str | None]:
    """ROC AUC of ``scores`` against {0, 1} ``labels``, or (None, reason) with one class."""
    if np.unique(labels).size < 2:
        return None, _one_class_reason(labels)
    return float(roc_auc_score(labels, scores)), None


def _subject_means(
    subjects: np.ndarray, labels: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean score per (subject, label): (labels, mean scores) of each group."""
    frame = pd.DataFrame({"subject": subjects, "label": labels, "score": scores})
    grouped = frame.groupby(["subject", "label"], sort=True)["score"].mean().reset_index()
    return grouped["label"].to_numpy(), grouped["score"].to_numpy()


def score_covariates(
    probe: CovariateProbe,
    images: torch.Tensor,
    age: np.ndarray | None,
    cdr_positive: np.ndarray | None,
    sex_male: np.ndarray | None,
    subjects: np.ndarray | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """How well the probe reads the given covariates off ``images``.

    Args:
        probe: trained covariate probe.
        images: (N, 1, H, W) intensities in [0, 1] (real test slices for the floor, or
            generated slices).
        age: (N,) years, NaN unknown (None: all unknown).
        cdr_positive: (N,) 1 for CDR > 0, 0 for CDR = 0, NaN unknown.
        sex_male: (N,) 1 male, 0 female, NaN unknown.
        subjects: (N,) subject ids; adds ``cdr_auc_subject`` (AUC of the mean probability
            per subject) and ``sex_auc_subject``.
        batch_size: slices per forward.

    Returns:
        ``n_images``; ``age_mae`` (years) and ``age_n``; ``cdr_auc`` (slice-level ROC AUC),
        ``cdr_n``, ``cdr_n_positive`` (and ``cdr_auc_subject``, ``cdr_n_subjects``);
        the same for ``sex`` (``sex_n_positive`` counts males); ``skipped``:
        ``{metric: reason}`` for each metric left out (no such head, no known label, one
        class only).

    Raises:
        ValueError: ``images`` is not (N, 1, H, W), or a label array is not (N,).
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W), got shape {tuple(images.shape)}")
    n = len(images)
    targets = {
        "age": _labels_array("age", age, n),
        "cdr": _labels_array("cdr_positive", cdr_positive, n),
        "sex": _labels_array("sex_male", sex_male, n),
    }
    subject_ids = None if subjects is None else np.asarray(subjects, dtype=object).reshape(-1)
    if subject_ids is not None and subject_ids.shape != (n,):
        raise ValueError(f"subjects must hold one id per image ({n}), got {subject_ids.shape}")
    pred = predict_covariates(probe, images, batch_size)
    report: dict[str, Any] = {"n_images": n}
    skipped: dict[str, str] = {}
    for head, target in targets.items():
        metric = "age_mae" if head == "age" else f"{head}_auc"
        known = ~np.isnan(target)
        report[f"{head}_n"] = int(known.sum())
        if head not in pred:
            skipped[metric] = f"the probe has no {head} head (its training split lacked it)"
            continue
        if not known.any():
            skipped[metric] = f"no image has a known {head} label"
            continue
        scores = pred[head].double().numpy()[known]
        if head == "age":
            report[metric] = float(np.abs(scores - target[known]).mean())
            continue
        report[f"{head}_n_positive"] = int(target[known].sum())
        report[metric], why = _auc(target[known], scores)
        if why:
            del report[metric]
            skipped[metric] = why
        if subject_ids is not None and why is None:
            labels, means = _subject_means(subject_ids[known], target[known], scores)
            report[f"{head}_n_subjects"] = len(labels)
            auc, why = _auc(labels, means)
            if why:
                skipped[f"{metric}_subject"] = why
            else:
                report[f"{metric}_subject"] = auc
    report["skipped"] = skipped
    return report


def constant_covariate_scores(train: CovariateLabels, test: CovariateLabels) -> dict[str, float]:
    """The scores of a probe that ignores the image, on ``test``'s known labels.

    Returns:
        ``age_mae``: mean |training median age - age| in years (when both have ages);
        ``cdr_auc`` and ``sex_auc``: 0.5 (a constant score ranks nothing).
    """
    scores = {"cdr_auc": 0.5, "sex_auc": 0.5}
    train_age, test_age = train.age[~np.isnan(train.age)], test.age[~np.isnan(test.age)]
    if train_age.size and test_age.size:
        scores["age_mae"] = float(np.abs(np.median(train_age) - test_age).mean())
    return scores


def predict_tissue(
    segmenter: nn.Module, images: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """Tissue labels of a stack of slices.

    Args:
        segmenter: trained :func:`~pipeline.models.probes.tissue_segmenter`.
        images: (N, 1, H, W) intensities in [0, 1], on any device.
        batch_size: slices per forward.

    Returns:
        (N, H, W) int64 labels 0..3 (background, CSF, GM, WM), on the CPU.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W), got shape {tuple(images.shape)}")
    out = [logits.argmax(1).cpu() for logits in _forward_batched(segmenter, images, batch_size)]
    return torch.cat(out) if out else torch.empty((0, *images.shape[2:]), dtype=torch.int64)


def dice_per_class(
    pred: torch.Tensor, target: torch.Tensor, n_classes: int = len(TISSUE_CLASSES)
) -> dict[str, float]:
    """Dice of each foreground class, pooled over every pixel of the stack.

    Args:
        pred: (N, H, W) integer labels in [0, n_classes).
        target: the true labels, same shape.
        n_classes: number of classes, background (0) included.

    Returns:
        ``dice_<class>`` for classes 1.. (``dice_csf``, ``dice_gm``, ``dice_wm`` for the
        tissue classes) and ``dice_mean`` over them; background is ignored. A class absent
        from both scores 1, absent from the target only 0.

    Raises:
        ValueError: shapes differ, or a label lies outside [0, n_classes).
    """
    from monai.metrics import compute_dice

    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    for name, labels in (("pred", pred), ("target", target)):
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < n_classes:
            raise ValueError(f"{name} labels must lie in [0, {n_classes}), got {labels.unique()}")

    def one_hot(labels: torch.Tensor) -> torch.Tensor:  # (1, C, N*H*W)
        return F.one_hot(labels.long().reshape(-1), n_classes).T[None].float()

    scores = compute_dice(
        one_hot(pred), one_hot(target), include_background=False, ignore_empty=False
    )
    names = [
        TISSUE_CLASSES[c].lower() if n_classes == len(TISSUE_CLASSES) else f"class{c}"
        for c in range(1, n_classes)
    ]
    dice = {f"dice_{name}": float(s) for name, s in zip(names, scores[0], strict=True)}
    return dice | {"dice_mean": float(scores[0].mean())}


def majority_tissue(dataset: Dataset) -> torch.Tensor:
    """The most frequent label of each pixel over a dataset's ``tissue`` maps (an atlas).

    Args:
        dataset: items with ``tissue`` (H, W) int64 labels.

    Returns:
        (H, W) int64 labels: what a segmenter that ignores the image would predict.
    """
    counts: torch.Tensor | None = None
    for batch in DataLoader(dataset, batch_size=EVAL_BATCH, shuffle=False):
        hits = F.one_hot(batch["tissue"], len(TISSUE_CLASSES)).sum(0)  # (H, W, C)
        counts = hits if counts is None else counts + hits
    if counts is None:
        raise InputError("majority_tissue needs a non-empty dataset")
    return counts.argmax(-1)


# ------------------------------------------------------------------ the stage


@dataclass(frozen=True)
class ProbePaths:
    """The files of the ``train_probes`` stage.

    Attributes:
        covariate_probe: ``models/covariate_probe.pt``.
        segmenter: ``models/segmenter.pt``.
        report: ``reports/probes.json`` (a DVC metric).
        figure: ``reports/probes.png`` (a DVC plot).
        resume_dir: ``checkpoints/probes``; each network resumes from its own sub-folder.
    """

    covariate_probe: Path
    segmenter: Path
    report: Path
    figure: Path
    resume_dir: Path

    @classmethod
    def standard(cls, root: str | Path = ".") -> ProbePaths:
        """The standard layout under ``root`` (:meth:`StagePaths.standard`'s folders)."""
        base = StagePaths.standard("covariate_probe", "probes", "probes.png", root=root)
        segmenter = base.model.with_name("segmenter.pt")
        return cls(base.model, segmenter, base.report, base.grid, base.resume_dir)


class _PrefixedRun:
    """A view of a run that prefixes metric names: two fits log into one stage run."""

    def __init__(self, run: StageRun, prefix: str) -> None:
        self.run, self.prefix = run, prefix
        self.run_name = f"{run.run_name}/{prefix}"

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.log_metrics({f"{self.prefix}/{k}": v for k, v in metrics.items()}, step=step)


def _numbers(report: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested report, as dotted metric names."""
    return {
        k: float(v)
        for k, v in flatten(report, prefix).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _fit_covariate_probe(
    params: Params,
    train: SliceDataset,
    val: EvalData,
    val_labels: CovariateLabels,
    *,
    run: StageRun,
    device: torch.device,
    loop: dict[str, Any],
) -> tuple[CovariateProbe, dict[str, Any]]:
    """Train the covariate probe on ``train``; returns (probe, model-file metadata).

    ``loop``: the remaining keyword arguments of :func:`fit` (resume_dir, seed, device,
    config_for_hash, progress)."""
    cfg = params.probes.covariate
    labels = CovariateLabels.from_manifest(train.manifest)
    heads, missing = labels.heads()
    known_age = labels.age[~np.isnan(labels.age)]
    age_mean = float(known_age.mean()) if known_age.size else 0.0
    age_std = float(known_age.std()) if known_age.size > 1 and known_age.std() > 0 else 1.0
    meta = {
        "heads": list(heads),
        "missing_heads": missing,
        "age_mean": age_mean,
        "age_std": age_std,
        "n_train": len(train),
    }
    torch.manual_seed(params.seed)
    task = CovariateProbeTask(cfg, heads, age_mean=age_mean, age_std=age_std, device=device)
    probe: CovariateProbe = task.modules["probe"]  # type: ignore[assignment]
    if not heads:
        logger.warning("covariate probe not trained: the training split has no usable labels")
        return probe, meta

    def evaluate(step: int, _ema: nn.Module | None) -> dict[str, float]:
        scores = score_covariates(
            probe, val.image, val_labels.age, val_labels.cdr_positive, val_labels.sex_male
        )
        return _numbers(scores, "val_")

    data = LabelledSlices(train, labels, heads, age_mean=age_mean, age_std=age_std)
    fit(task, data, cfg.train, run=_PrefixedRun(run, "covariate"), evaluate=evaluate, **loop)  # type: ignore[arg-type]
    return probe, meta


def _fit_segmenter(
    params: Params,
    train: SliceDataset,
    val: EvalData,
    *,
    run: StageRun,
    device: torch.device,
    loop: dict[str, Any],
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the segmenter on ``train``'s tissue maps; returns (segmenter, metadata);
    ``loop`` as in :func:`_fit_covariate_probe`."""
    cfg = params.probes.segmenter
    torch.manual_seed(params.seed)
    task = SegmenterTask(cfg, device)
    segmenter = task.modules["segmenter"]
    meta = {"classes": list(TISSUE_CLASSES), "trained": train.has_tissue}
    if not train.has_tissue:
        logger.warning("segmenter not trained: the training split has no tissue.npy")
        return segmenter, meta

    def evaluate(step: int, _ema: nn.Module | None) -> dict[str, float]:
        if val.tissue is None:
            return {}
        return _numbers(dice_per_class(predict_tissue(segmenter, val.image), val.tissue), "val_")

    fit(task, train, cfg.train, run=_PrefixedRun(run, "segmenter"), evaluate=evaluate, **loop)  # type: ignore[arg-type]
    return segmenter, meta


def train_probes(
    params: Params,
    *,
    run: StageRun,
    device: torch.device,
    paths: ProbePaths,
    identity: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """Train both label probes on the real training slices; measure their floors on test.

    Args:
        params: all parameters (probes, data, seed).
        run: the stage's tracking run.
        device: training device.
        paths: the two model files; ``reports/probes.json`` with, per probe, the ``test``
            scores (the floors) and the ``baseline`` of a predictor that ignores the image;
            ``reports/probes.png`` (predicted against true age, a test slice with its true
            and predicted tissue map).
        identity: the run's :func:`~pipeline.core.identity.stage_identity` (resume hash).
        progress: show a progress bar.

    Returns:
        The report: ``covariate`` {``heads``, ``missing_heads``, ``test``
        (:func:`score_covariates`), ``baseline`` (:func:`constant_covariate_scores`)} and
        ``segmenter`` {``trained``, ``test`` (:func:`dice_per_class`), ``baseline`` (the
        training split's per-pixel majority label)}; a part that could not be measured
        holds ``skipped`` with the reason.
    """
    prepared = Path(params.data.prepared_dir)
    train = SliceDataset(prepared / "train")
    val_set, test_set = SliceDataset(prepared / "val"), SliceDataset(prepared / "test")
    val, test = EvalData.from_dataset(val_set), EvalData.from_dataset(test_set)
    val_labels = CovariateLabels.from_manifest(val_set.manifest)
    test_labels = CovariateLabels.from_manifest(test_set.manifest)
    loop = {"seed": params.seed, "device": device, "config_for_hash": identity}
    loop["progress"] = progress
    probe, probe_meta = _fit_covariate_probe(
        params, train, val, val_labels, run=run, device=device,
        loop=loop | {"resume_dir": paths.resume_dir / "covariate"},
    )  # fmt: skip
    segmenter, seg_meta = _fit_segmenter(
        params, train, val, run=run, device=device,
        loop=loop | {"resume_dir": paths.resume_dir / "segmenter"},
    )  # fmt: skip
    if not distributed.is_main():  # under torchrun rank 0 alone exports and reports
        return {}
    save_model(paths.covariate_probe, "covariate_probe", probe, params.probes.covariate, probe_meta)
    save_model(paths.segmenter, "segmenter", segmenter, params.probes.segmenter, seg_meta)

    train_labels = CovariateLabels.from_manifest(train.manifest)
    covariate: dict[str, Any] = {
        "heads": probe_meta["heads"],
        "missing_heads": probe_meta["missing_heads"],
        "test": score_covariates(
            probe,
            test.image,
            test_labels.age,
            test_labels.cdr_positive,
            test_labels.sex_male,
            test_labels.subject,
        ),
        "baseline": constant_covariate_scores(train_labels, test_labels),
    }
    pred_tissue = predict_tissue(segmenter, test.image)
    segment: dict[str, Any] = {"trained": seg_meta["trained"]}
    if not seg_meta["trained"]:
        segment["skipped"] = "the training split has no tissue labels (tissue.npy)"
    elif test.tissue is None:
        segment["skipped"] = "the test split has no tissue labels (tissue.npy)"
    else:
        segment["test"] = dice_per_class(pred_tissue, test.tissue)
        atlas = majority_tissue(train).expand_as(test.tissue)
        segment["baseline"] = dice_per_class(atlas, test.tissue)
    report = {
        "covariate": covariate,
        "segmenter": segment,
        "n_train": len(train),
        "n_test": len(test.image),
    }
    write_json(paths.report, report)

    ages = predict_covariates(probe, test.image).get("age")
    figure = probes_figure(
        test, test_labels.age, ages, pred_tissue if seg_meta["trained"] else None
    )
    save_png(figure, paths.figure)
    run.log_image(figure, f"reports/{paths.figure.name}")
    run.log_metrics(_numbers(report))
    for sub in ("covariate", "segmenter"):
        finish_resume(paths.resume_dir / sub)
    return report


def probes_figure(
    test: EvalData,
    true_age: np.ndarray,
    pred_age: torch.Tensor | None,
    pred_tissue: torch.Tensor | None,
) -> np.ndarray:
    """Predicted against true age, and one test slice with its true and predicted tissue.

    Args:
        test: the test split (the slice with the largest brain mask is shown).
        true_age: (N,) years, NaN unknown.
        pred_age: (N,) predicted years, or None (no age head).
        pred_tissue: (N, H, W) predicted labels, or None (no trained segmenter).

    Returns:
        (H, W, 3) uint8 image.
    """
    fig = Figure(figsize=(13, 3.4), dpi=100)
    axes = fig.subplots(1, 4)
    known = ~np.isnan(true_age)
    if pred_age is not None and known.any():
        axes[0].scatter(true_age[known], pred_age.numpy()[known], s=6, alpha=0.5)
        lo, hi = float(np.nanmin(true_age)), float(np.nanmax(true_age))
        axes[0].plot([lo, hi], [lo, hi], color="grey", linewidth=1)
    else:
        axes[0].text(0.5, 0.5, "no age head or no known age", ha="center", va="center")
    axes[0].set(xlabel="true age (years)", ylabel="predicted age (years)", title="age, test split")
    i = int(test.mask.flatten(1).sum(1).argmax())
    panels = [
        (test.image[i, 0], "test slice", "gray", 1),
        (test.tissue[i] if test.tissue is not None else None, "true tissue", "viridis", 3),
        (pred_tissue[i] if pred_tissue is not None else None, "predicted tissue", "viridis", 3),
    ]
    for ax, (image, title, cmap, vmax) in zip(axes[1:], panels, strict=True):
        if image is None:
            ax.text(0.5, 0.5, "not available", ha="center", va="center")
        else:
            ax.imshow(image.numpy(), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set(title=title, xticks=[], yticks=[])
    fig.suptitle("label probes: 0 background, 1 CSF, 2 GM, 3 WM", fontsize=9)
    fig.tight_layout()
    return figure_image(fig)
