"""The ``prepare`` stage's library: raw folder → per-split slice arrays, manifest, report.

Outputs, under ``prepared_dir``::

    {train,val,test}/slices.npy     float16 (N, 1, S, S), intensities in [0, 1]
    {train,val,test}/masks.npy      uint8 (N, 1, S, S) brain masks in {0, 1}
    {train,val,test}/tissue.npy     uint8 (N, 1, S, S) tissue labels 0 background, 1 CSF,
                                    2 GM, 3 WM (only when every case has them, see below)
    {train,val,test}/manifest.csv   one row per slice (see MANIFEST_COLUMNS), row i ↔ item i

and under ``report_dir``: ``prepare_report.json`` (counts, subjects, the fate of every file
found, the volumes that look skull-on, ``tissue_labels``) and ``prepare_preview.png``
(train split, rows subjects, columns z). Every file is written to a
temporary name and renamed. The manifests are the commit marker: all old manifests are
removed before the first array is written and the new ones are written after every split's
arrays, so a killed run leaves each split either without a manifest (refused by
:class:`~pipeline.data.datasets.SliceDataset`) or complete, and never mixes two runs.

Tissue labels come from the case's segmentation (OASIS-1 ``FSL_SEG`` 0/1/2/3, the PNG
release's ``seg_*`` grey levels 0/85/170/255, a volume mask file holding exactly 0..3; see
:mod:`data_prep.tissue`), sliced, oriented and resized (nearest neighbour) exactly like the
masks, so they align pixel for pixel with ``slices.npy`` and ``masks == (tissue > 0)``.
``tissue.npy`` is written for every split only when every kept case has tissue labels;
otherwise no split gets one (a previous run's is removed before the manifests are written)
and ``tissue_labels`` in the report, ``{"written": bool, "reason": str | None}``, says why.

Bad input never raises: each bad file becomes one ``{"file", "reason"}`` entry of the
report, and every other file found is either used or listed as ignored with the reason
(:mod:`data_prep.inventory`). :class:`~data_prep.errors.PrepareError` is raised when nothing
usable is left, when a split comes out empty (every later stage needs all three), with
``brain_extraction`` and no extractor installed, or, with ``strict``, at the first bad
file; the report is written before raising.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import closing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from data_prep.errors import BadInputError, PrepareError
from data_prep.intensity import intensity_window, threshold_mask
from data_prep.inventory import Inventory, not_an_input, take_inventory
from data_prep.parallel import ordered_map
from data_prep.preview import preview_grid
from data_prep.readers import (
    DEMOGRAPHICS,
    SPLITS,
    Case,
    PngCase,
    Scan,
    Skip,
    VolumeCase,
    layout,
    scan_folder,
)
from data_prep.readers.png_slices import load_case
from data_prep.skull import detect_skull, extract_brain, extraction_problem
from data_prep.split import split_subjects, stratum
from data_prep.tissue import SLICE_STEPS, tissue_labels
from data_prep.volume import (
    SliceSet,
    Volume,
    finish_labels,
    finish_slices,
    load_labels,
    load_volume,
    volume_slices,
)
from pipeline.core.config import PrepareConfig
from pipeline.core.io import atomic_write, write_json
from pipeline.core.tracking import to_uint8_image
from pipeline.models.conditioning import z_from_index

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS: tuple[str, ...] = (
    "subject",
    "session",
    "split",
    "z_index",
    "z",
    "z_mm",
    "n_slices",
    "source",
    "mask_source",
    *DEMOGRAPHICS,
)
MANIFEST_NAME = "manifest.csv"
TISSUE_NAME = "tissue.npy"
REPORT_NAME = "prepare_report.json"
PREVIEW_NAME = "prepare_preview.png"


#: ``CaseResult.tissue_problem`` of a case whose brain mask is an intensity threshold.
_NO_SEGMENTATION = "no tissue segmentation (brain mask from an intensity threshold)"


@dataclass
class CaseResult:
    """What one case produced (in a worker process).

    Attributes:
        subject: subject id.
        session: session id.
        split: the release's split (PNG) or None (assigned later by subject).
        n_slices: K, so z = z_index / (K - 1).
        slices: the slices, or None when the case was skipped.
        sources: per slice, the file it came from (relative to the data folder).
        mask_source: ``segmentation`` (FSL_SEG / PNG seg) or ``threshold``.
        demographics: the case's demographics.
        skipped: files left out, with reasons.
        warnings: files used after a fix (NaN voxels zeroed, mask replaced) or with a
            doubt (the volume looks skull-on).
        used: files the slices came from (image, its header, the mask or segmentations).
        ignored: files of the case not used, with the reason (e.g. the mask of a skipped
            image, the segmentations of a case that falls back to the threshold mask).
        skull_on: the volume looked skull-on (see :mod:`data_prep.skull`).
        brain_extracted: the skull was removed with ``prepare.brain_extraction``.
        tissue_problem: why the slices have no tissue labels (``slices.tissue`` is None);
            None when they have them.
    """

    subject: str
    session: str
    split: str | None
    n_slices: int
    slices: SliceSet | None = None
    sources: tuple[str, ...] = ()
    mask_source: str = "threshold"
    demographics: dict[str, Any] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    warnings: list[Skip] = field(default_factory=list)
    used: tuple[str, ...] = ()
    ignored: list[Skip] = field(default_factory=list)
    skull_on: bool = False
    brain_extracted: bool = False
    tissue_problem: str | None = _NO_SEGMENTATION


def process_case(case: Case, cfg: PrepareConfig) -> CaseResult:
    """Turn one case into slices; bad input is recorded in the result, never raised.

    Args:
        case: a volume or a PNG-release subject.
        cfg: slice count K, image size, percentiles.

    Returns:
        The result (``slices`` is None if the case was skipped).
    """
    if isinstance(case, PngCase):
        return _process_png(case, cfg)
    return _process_volume(case, cfg)


def _process_volume(case: VolumeCase, cfg: PrepareConfig) -> CaseResult:
    result = CaseResult(
        case.subject, case.session, None, cfg.n_slices, demographics=dict(case.demographics)
    )
    try:
        volume = load_volume(case.root / case.image)
    except BadInputError as err:
        result.skipped.append(Skip(case.image, err.reason))
        if case.mask is not None:
            result.ignored.append(Skip(case.mask, f"the mask of {case.image}, which was skipped"))
        return result
    if volume.n_nonfinite:
        result.warnings.append(Skip(case.image, f"{volume.n_nonfinite} NaN/inf voxels set to 0"))
    mask = tissue = None
    if case.mask is not None:
        try:
            stored = load_labels(case.root / case.mask, volume.data.shape)
        except BadInputError as err:
            result.skipped.append(Skip(case.mask, f"{err.reason}; threshold mask used instead"))
        else:
            mask = stored > 0
            tissue, why = tissue_labels(stored)
            result.mask_source = "segmentation"
            result.tissue_problem = None if why is None else f"{case.mask}: {why}"
            del stored
    try:
        volume, mask = _skull_check(case, volume, mask, cfg, result)
        if tissue is not None and mask is not None:  # brain extraction may trim the mask
            tissue = np.where(mask, tissue, np.uint8(0))
        result.slices = volume_slices(
            volume,
            threshold_mask(volume.data) if mask is None else mask,
            n_slices=cfg.n_slices,
            image_size=cfg.image_size,
            percentiles=cfg.percentiles,
            tissue=tissue,
        )
    except BadInputError as err:
        result.skipped.append(Skip(case.image, err.reason))
        if result.mask_source == "segmentation":
            result.ignored.append(Skip(case.mask, f"the mask of {case.image}, which was skipped"))
        return result
    result.sources = (case.image,) * cfg.n_slices
    result.used = (case.image, *([case.mask] if result.mask_source == "segmentation" else []))
    return result


def _skull_check(
    case: VolumeCase,
    volume: Volume,
    mask: np.ndarray | None,
    cfg: PrepareConfig,
    result: CaseResult,
) -> tuple[Volume, np.ndarray | None]:
    """Flag a skull-on volume; with ``cfg.brain_extraction``, strip it (ROBEX).

    Returns:
        The volume (brain only when stripped) and the brain mask to use (ROBEX's when
        stripped and the case has no segmentation).
    """
    check = detect_skull(volume.data, volume.zooms)
    if not check.skull_on:
        return volume, mask
    result.skull_on = True
    if not cfg.brain_extraction:
        result.warnings.append(Skip(case.image, check.reason()))
        logger.warning("%s %s", case.image, check.reason())
        return volume, mask
    brain = extract_brain(volume.data, volume.affine)
    result.brain_extracted = True
    stripped = dataclasses.replace(volume, data=np.where(brain, volume.data, np.float32(0)))
    return stripped, brain if mask is None else mask & brain


def _process_png(case: PngCase, cfg: PrepareConfig) -> CaseResult:
    result = CaseResult(case.subject, case.session, case.split, case.n_slices)
    stack = load_case(case)
    result.skipped.extend(stack.skipped)
    segs = [s.seg for s in stack.slices if s.seg is not None]
    if not stack.slices:
        return result
    masks = stack.masks
    if masks is None:
        masks = threshold_mask(stack.images)
        if any(s.seg is not None for s in case.slices):
            why = (
                "segmentation missing or unreadable for some slices of the case; "
                "threshold mask used"
            )
            result.warnings.append(Skip(case.slices[0].image, why))
            result.ignored.extend(Skip(seg, f"not used: {why}") for seg in segs)
    else:
        result.mask_source = "segmentation"
    tissue = None
    if stack.labels is not None:
        tissue, why = tissue_labels(stack.labels, SLICE_STEPS)
        result.tissue_problem = None if why is None else f"{case.subject}: {why}"
    try:
        if not masks.any():
            raise BadInputError("all slices of the case are blank")
        window = intensity_window(stack.images, masks, cfg.percentiles)
    except BadInputError as err:
        first = stack.slices[0].image
        result.skipped.append(Skip(first, err.reason))
        result.ignored.extend(
            Skip(file, f"part of {case.subject}, skipped: see {first}")
            for s in stack.slices
            for file in (s.image, s.seg)
            if file is not None and file != first
        )
        return result
    images, out_masks = finish_slices(stack.images, masks, window, cfg.image_size)
    result.slices = SliceSet(
        images=images,
        masks=out_masks,
        z_index=np.array([s.z_index for s in stack.slices], dtype=np.int64),
        z_mm=np.full(len(stack.slices), np.nan),
        tissue=None if tissue is None else finish_labels(tissue, cfg.image_size),
    )
    result.sources = tuple(s.image for s in stack.slices)
    result.used = (*result.sources, *(segs if result.mask_source == "segmentation" else []))
    return result


@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` wrote.

    Attributes:
        report: the content of ``prepare_report.json``.
        preview: (H, W) preview grid in [0, 1].
        report_path: where the report was written.
        preview_path: where the preview PNG was written.
    """

    report: dict[str, Any]
    preview: np.ndarray
    report_path: Path
    preview_path: Path

    def metrics(self) -> dict[str, float]:
        """Flat counts for tracking: ``slices_train``, ``subjects_val``, ..., ``skipped``,
        ``files_found`` / ``_used`` / ``_skipped`` / ``_ignored``, ``skull_on``."""
        out = {
            f"{kind}_{split}": float(counts[kind])
            for split, counts in self.report["counts"].items()
            for kind in ("slices", "volumes", "subjects")
        }
        out["skipped"] = float(len(self.report["skipped"]))
        out.update({f"files_{k}": float(v) for k, v in self.report["files"].items()})
        out["skull_on"] = float(len(self.report["skull_on"]))
        return out


def prepare_dataset(
    raw_dir: str | Path,
    prepared_dir: str | Path,
    cfg: PrepareConfig,
    *,
    fmt: str = "auto",
    seed: int = 0,
    report_dir: str | Path = "reports",
) -> PrepareResult:
    """Convert a raw data folder into per-split slice arrays, manifests and a report.

    The report accounts for every file found below ``raw_dir`` (``files``: found = used +
    skipped + ignored; ``skipped`` one entry per file, ``ignored`` grouped by reason), names
    the volumes that look skull-on (``skull_on``) and those stripped (``brain_extracted``),
    and whether ``tissue.npy`` was written (``tissue_labels``: ``{"written", "reason"}``).

    Args:
        raw_dir: OASIS-1 discs, BIDS tree, NIfTI folder or PNG release.
        prepared_dir: output folder (one sub-folder per split).
        cfg: slicing, split ratios, worker count, strictness, brain extraction.
        fmt: reader (``auto``, ``oasis1``, ``bids``, ``nifti``, ``png``).
        seed: seed of the subject-level split.
        report_dir: where ``prepare_report.json`` and ``prepare_preview.png`` go.

    Returns:
        The report, the preview and their paths.

    Raises:
        PrepareError: nothing usable is left, a split comes out empty, ``cfg.strict`` and a
            file was bad, or ``cfg.brain_extraction`` and no extractor is installed. The
            report is written first.
        ValueError: ``fmt`` is unknown.
    """
    raw_dir, prepared_dir, report_dir = Path(raw_dir), Path(prepared_dir), Path(report_dir)
    report: dict[str, Any] = {
        "status": "failed",
        "format_requested": fmt,
        "raw_dir": str(raw_dir),
        "prepared_dir": str(prepared_dir),
        "seed": seed,
        "n_slices": cfg.n_slices,
        "image_size": cfg.image_size,
        "percentiles": list(cfg.percentiles),
        "brain_extraction": cfg.brain_extraction,
    }
    report_path = report_dir / REPORT_NAME
    scan = scan_folder(raw_dir, fmt)
    report["format"] = scan.format
    issues = _Issues(skipped=list(scan.skipped), ignored=list(scan.ignored))
    results: list[CaseResult] = []
    try:
        problem = extraction_problem() if cfg.brain_extraction else None
        if problem is not None:
            raise PrepareError(problem)
        results = _convert_all(scan, cfg, issues)
        if not results:
            first = f"; first: {issues.skipped[0].line()}" if issues.skipped else ""
            raise PrepareError(
                f"no usable input in {raw_dir} ({len(issues.skipped)} files skipped{first}); "
                f"see {report_path}"
            )
        splits, report["split_from"] = _assign_splits(results, scan.format, cfg, seed)
        _check_splits(splits, scan.format, cfg, report_path)
    except PrepareError as err:
        report.update(
            error=str(err),
            tissue_labels={"written": False, "reason": "prepare failed: nothing written"},
            **_accounting(scan, results, issues),
        )
        logger.error("%s", err)
        write_json(report_path, report)
        raise
    for skip in issues.skipped:
        logger.warning("skipped %s", skip.line())

    tissue = _tissue_decision(results)
    if not tissue["written"]:
        logger.info("no tissue.npy: %s", tissue["reason"])
    counts: dict[str, dict[str, int]] = {}
    subjects: dict[str, list[str]] = {}
    written: dict[str, tuple[np.ndarray, pd.DataFrame]] = {}
    for split in SPLITS:  # from here on no split of the previous run is trusted
        (prepared_dir / split / MANIFEST_NAME).unlink(missing_ok=True)
    for split in SPLITS:
        members = sorted(
            (r for r in results if splits[(r.subject, r.session)] == split),
            key=lambda r: (r.subject, r.session),
        )
        written[split] = _write_split(
            prepared_dir / split, members, split, cfg.image_size, tissue=tissue["written"]
        )
        subjects[split] = sorted({r.subject for r in members})
        counts[split] = {
            "slices": len(written[split][1]),
            "volumes": len(members),
            "subjects": len(subjects[split]),
        }
        logger.info("%s: %d slices from %d volumes", split, counts[split]["slices"], len(members))
    for split in SPLITS:  # last: each manifest vouches for the arrays beside it
        manifest = written[split][1]
        atomic_write(
            prepared_dir / split / MANIFEST_NAME, lambda tmp, m=manifest: m.to_csv(tmp, index=False)
        )

    preview = preview_grid(*written["train"])
    preview_path = atomic_write(
        report_dir / PREVIEW_NAME,
        lambda tmp: Image.fromarray(to_uint8_image(preview)).save(tmp, format="PNG"),
    )
    report.update(
        status="ok",
        counts=counts,
        total={
            "slices": sum(c["slices"] for c in counts.values()),
            "volumes": len(results),
            "subjects": len({r.subject for r in results}),
            "skipped": len(issues.skipped),
        },
        subjects=subjects,
        tissue_labels=tissue,
        **_accounting(scan, results, issues),
    )
    write_json(report_path, report)
    return PrepareResult(report, preview, report_path, preview_path)


@dataclass
class _Issues:
    """Files skipped, used after a fix or ignored, collected over the whole run."""

    skipped: list[Skip] = field(default_factory=list)
    warnings: list[Skip] = field(default_factory=list)
    ignored: list[Skip] = field(default_factory=list)

    def entries(self) -> dict[str, list[dict[str, str]]]:
        """Report entries: ``{"skipped": [{"file", "reason"}, ...], "warnings": [...]}``."""
        return {
            name: [{"file": s.file, "reason": s.reason} for s in skips]
            for name, skips in (("skipped", self.skipped), ("warnings", self.warnings))
        }


def _accounting(scan: Scan, results: list[CaseResult], issues: _Issues) -> dict[str, Any]:
    """The report's account of every file found, and of the skull-on volumes.

    Returns:
        ``files`` (counts: found = used + skipped + ignored), ``skipped`` and ``warnings``
        (one entry per file), ``ignored`` (grouped by reason), ``skull_on`` and
        ``brain_extracted`` (image paths).
    """
    fmt_layout = layout(scan.format)
    inventory: Inventory = take_inventory(
        scan.found,
        used=[*scan.used, *(f for r in results for f in r.used)],
        skipped=issues.skipped,
        ignored=issues.ignored,
        default_reason=lambda file: not_an_input(file, scan.format, fmt_layout),
    )
    for line in (f"{g['count']} files ignored: {g['reason']}" for g in inventory.ignored_groups()):
        logger.info("%s", line)
    return {
        "files": inventory.counts(),
        **issues.entries(),
        "ignored": inventory.ignored_groups(),
        "skull_on": sorted(r.sources[0] for r in results if r.skull_on and r.sources),
        "brain_extracted": sorted(r.sources[0] for r in results if r.brain_extracted),
    }


def _tissue_decision(results: list[CaseResult]) -> dict[str, Any]:
    """Whether ``tissue.npy`` is written: only when every kept case has tissue labels.

    Returns:
        ``{"written": bool, "reason": str | None}`` (the report's ``tissue_labels``); the
        reason counts the cases without labels and names the first one and its problem.
    """
    lacking = [r for r in results if r.slices is None or r.slices.tissue is None]
    if not lacking:
        return {"written": True, "reason": None}
    first = lacking[0]
    name = f"{first.subject} {first.session}".strip()
    problem = first.tissue_problem or "no tissue labels"
    return {
        "written": False,
        "reason": (
            f"{len(lacking)} of {len(results)} cases have no CSF/GM/WM tissue labels "
            f"(first: {name}: {problem})"
        ),
    }


def _check_splits(
    splits: dict[tuple[str, str], str], fmt: str, cfg: PrepareConfig, report_path: Path
) -> None:
    """Refuse a split with no slices: every later stage needs train, val and test.

    Raises:
        PrepareError: one line naming the empty split, the consequence and the fix.
    """
    sizes = {split: sum(1 for s in splits.values() if s == split) for split in SPLITS}
    empty = [split for split in SPLITS if sizes[split] == 0]
    if not empty:
        return
    needs = {
        "train": "every model trains on it",
        "val": "the autoencoders and the z-probe are validated on it",
        "test": "evaluate and the test figures are computed on it",
    }
    if fmt == "png":
        folder = {"train": "train", "val": "validate", "test": "test"}[empty[0]]
        fix = (
            f"the release's keras_png_slices_{folder}/ folder is missing or has no usable "
            f"case (see {report_path}); add it"
        )
    else:
        n_subjects = len({subject for subject, _ in splits})
        fix = (
            f"{n_subjects} usable subjects split {cfg.split.model_dump()} leave it without "
            "a subject; add subjects (3 at least) or change prepare.split"
        )
    raise PrepareError(
        f"{' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty "
        f"({'; '.join(needs[s] for s in empty)}): {fix}"
    )


def _convert_all(scan: Scan, cfg: PrepareConfig, issues: _Issues) -> list[CaseResult]:
    """Process every case in the worker pool; returns the usable results, in scan order.

    Raises:
        PrepareError: ``cfg.strict`` and a file was skipped (at scan time or in a worker).
    """
    if cfg.strict and issues.skipped:
        raise PrepareError(f"strict mode: {issues.skipped[0].line()}")
    convert = partial(process_case, cfg=cfg)
    stream = ordered_map(convert, scan.cases, workers=cfg.workers, desc="prepare", unit="volume")
    results = []
    with closing(stream):
        for result in stream:
            issues.skipped.extend(result.skipped)
            issues.warnings.extend(result.warnings)
            issues.ignored.extend(result.ignored)
            if cfg.strict and result.skipped:
                raise PrepareError(f"strict mode: {result.skipped[0].line()}")
            if result.slices is not None:
                results.append(result)
    return results


def _assign_splits(
    results: list[CaseResult], fmt: str, cfg: PrepareConfig, seed: int
) -> tuple[dict[tuple[str, str], str], str]:
    """Split of each (subject, session), and how it was decided (for the report)."""
    if fmt == "png":
        splits = {(r.subject, r.session): str(r.split) for r in results}
        return splits, "the PNG release's own train/validate/test folders"
    strata = {  # a subject's first session decides (the sessions of OASIS-1 share age and CDR)
        r.subject: stratum(r.demographics.get("age"), r.demographics.get("cdr"))
        for r in sorted(results, key=lambda r: r.session, reverse=True)
    }
    by_subject = split_subjects((r.subject for r in results), cfg.split, seed, strata)
    splits = {(r.subject, r.session): by_subject[r.subject] for r in results}
    counts = {
        name: sum(v == name for v in strata.values()) for name in sorted(set(strata.values()))
    }
    return splits, (
        f"seeded subject-level split {cfg.split.model_dump()}, stratified by age band and "
        f"CDR > 0 (subjects per stratum: {counts})"
    )


def _write_split(
    folder: Path, members: list[CaseResult], split: str, image_size: int, *, tissue: bool
) -> tuple[np.ndarray, pd.DataFrame]:
    """Write one split's arrays; return (images (N, 1, S, S), manifest) (written later).

    With ``tissue`` the members' tissue labels go to ``tissue.npy`` (uint8 (N, 1, S, S));
    without, a ``tissue.npy`` left by an earlier run is removed.
    """
    shape = (0, 1, image_size, image_size)
    images = (
        np.concatenate([r.slices.images for r in members])[:, None]  # type: ignore[union-attr]
        if members
        else np.zeros(shape, np.float16)
    )
    masks = (
        np.concatenate([r.slices.masks for r in members])[:, None]  # type: ignore[union-attr]
        if members
        else np.zeros(shape, np.uint8)
    )
    rows = [
        {
            "subject": r.subject,
            "session": r.session,
            "split": split,
            "z_index": int(z_index),
            "z": z_from_index(z_index, r.n_slices),
            "z_mm": z_mm,
            "n_slices": r.n_slices,
            "source": source,
            "mask_source": r.mask_source,
            **{k: r.demographics.get(k) for k in DEMOGRAPHICS},
        }
        for r in members
        for z_index, z_mm, source in zip(
            r.slices.z_index,
            r.slices.z_mm,
            r.sources,
            strict=True,  # type: ignore[union-attr]
        )
    ]
    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    atomic_write(folder / "slices.npy", lambda tmp: np.save(tmp, images))
    atomic_write(folder / "masks.npy", lambda tmp: np.save(tmp, masks))
    if not tissue:
        (folder / TISSUE_NAME).unlink(missing_ok=True)
        return images, manifest
    labels = (
        np.concatenate([r.slices.tissue for r in members])[:, None]  # type: ignore[union-attr,misc]
        if members
        else np.zeros(shape, np.uint8)
    )
    atomic_write(folder / TISSUE_NAME, lambda tmp: np.save(tmp, labels))
    return images, manifest
