"""The ``prepare`` stage's library: raw folder → per-split slice arrays, manifest, report.

Outputs, under ``prepared_dir``::

    {train,val,test}/slices.npy     float16 (N, 1, S, S), intensities in [0, 1]
    {train,val,test}/masks.npy      uint8 (N, 1, S, S) brain masks in {0, 1}
    {train,val,test}/manifest.csv   one row per slice (see MANIFEST_COLUMNS), row i ↔ item i

and under ``report_dir``: ``prepare_report.json`` (counts, subjects and skipped files) and
``prepare_preview.png`` (train split, rows subjects, columns z). Every file is written to a
temporary name and renamed. The manifests are the commit marker: all old manifests are
removed before the first array is written and the new ones are written after every split's
arrays, so a killed run leaves each split either without a manifest (refused by
:class:`~pipeline.data.datasets.SliceDataset`) or complete, and never mixes two runs.

Bad input never raises: each bad file becomes one ``{"file", "reason"}`` entry of the
report. :class:`~data_prep.errors.PrepareError` is raised only when nothing usable is left
or, with ``strict``, at the first bad file; the report is written before raising.
"""

from __future__ import annotations

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
    scan_folder,
)
from data_prep.readers.png_slices import load_case
from data_prep.split import split_subjects
from data_prep.volume import (
    SliceSet,
    finish_slices,
    intensity_window,
    load_mask,
    load_volume,
    threshold_mask,
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
REPORT_NAME = "prepare_report.json"
PREVIEW_NAME = "prepare_preview.png"


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
        warnings: files used after a fix (NaN voxels zeroed, mask replaced).
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
        return result
    if volume.n_nonfinite:
        result.warnings.append(Skip(case.image, f"{volume.n_nonfinite} NaN/inf voxels set to 0"))
    mask = None
    if case.mask is not None:
        try:
            mask = load_mask(case.root / case.mask, volume.data.shape)
            result.mask_source = "segmentation"
        except BadInputError as err:
            result.warnings.append(Skip(case.mask, f"{err.reason}; threshold mask used instead"))
    try:
        result.slices = volume_slices(
            volume,
            threshold_mask(volume.data) if mask is None else mask,
            n_slices=cfg.n_slices,
            image_size=cfg.image_size,
            percentiles=cfg.percentiles,
        )
    except BadInputError as err:
        result.skipped.append(Skip(case.image, err.reason))
        return result
    result.sources = (case.image,) * cfg.n_slices
    return result


def _process_png(case: PngCase, cfg: PrepareConfig) -> CaseResult:
    result = CaseResult(case.subject, case.session, case.split, case.n_slices)
    stack = load_case(case)
    result.skipped.extend(stack.skipped)
    if not stack.slices:
        return result
    masks = stack.masks
    if masks is None:
        masks = threshold_mask(stack.images)
        if any(s.seg is not None for s in case.slices):
            result.warnings.append(
                Skip(
                    case.slices[0].image,
                    "segmentation missing or unreadable for some "
                    "slices of the case; threshold mask used",
                )
            )
    else:
        result.mask_source = "segmentation"
    try:
        if not masks.any():
            raise BadInputError("all slices of the case are blank")
        window = intensity_window(stack.images, masks, cfg.percentiles)
    except BadInputError as err:
        result.skipped.append(Skip(case.slices[0].image, err.reason))
        return result
    images, out_masks = finish_slices(stack.images, masks, window, cfg.image_size)
    result.slices = SliceSet(
        images=images,
        masks=out_masks,
        z_index=np.array([s.z_index for s in stack.slices], dtype=np.int64),
        z_mm=np.full(len(stack.slices), np.nan),
    )
    result.sources = tuple(s.image for s in stack.slices)
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
        """Flat counts for tracking: ``slices_train``, ``subjects_val``, ..., ``skipped``."""
        out = {
            f"{kind}_{split}": float(counts[kind])
            for split, counts in self.report["counts"].items()
            for kind in ("slices", "volumes", "subjects")
        }
        out["skipped"] = float(len(self.report["skipped"]))
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

    Args:
        raw_dir: OASIS-1 discs, BIDS tree, NIfTI folder or PNG release.
        prepared_dir: output folder (one sub-folder per split).
        cfg: slicing, split ratios, worker count, strictness.
        fmt: reader (``auto``, ``oasis1``, ``bids``, ``nifti``, ``png``).
        seed: seed of the subject-level split.
        report_dir: where ``prepare_report.json`` and ``prepare_preview.png`` go.

    Returns:
        The report, the preview and their paths.

    Raises:
        PrepareError: nothing usable is left, or ``cfg.strict`` and a file was bad. The
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
    }
    report_path = report_dir / REPORT_NAME
    scan = scan_folder(raw_dir, fmt)
    report["format"] = scan.format
    issues = _Issues(skipped=list(scan.skipped))
    try:
        results = _convert_all(scan, cfg, issues)
        if not results:
            first = f"; first: {issues.skipped[0].line()}" if issues.skipped else ""
            raise PrepareError(
                f"no usable input in {raw_dir} ({len(issues.skipped)} files skipped{first}); "
                f"see {report_path}"
            )
    except PrepareError as err:
        report.update(error=str(err), **issues.entries())
        logger.error("%s", err)
        write_json(report_path, report)
        raise
    for skip in issues.skipped:
        logger.warning("skipped %s", skip.line())
    splits, report["split_from"] = _assign_splits(results, scan.format, cfg, seed)

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
        written[split] = _write_split(prepared_dir / split, members, split, cfg.image_size)
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
        **issues.entries(),
    )
    write_json(report_path, report)
    return PrepareResult(report, preview, report_path, preview_path)


@dataclass
class _Issues:
    """Files skipped and files used after a fix, collected over the whole run."""

    skipped: list[Skip] = field(default_factory=list)
    warnings: list[Skip] = field(default_factory=list)

    def entries(self) -> dict[str, list[dict[str, str]]]:
        """Report entries: ``{"skipped": [{"file", "reason"}, ...], "warnings": [...]}``."""
        return {
            name: [{"file": s.file, "reason": s.reason} for s in skips]
            for name, skips in (("skipped", self.skipped), ("warnings", self.warnings))
        }


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
    by_subject = split_subjects((r.subject for r in results), cfg.split, seed)
    splits = {(r.subject, r.session): by_subject[r.subject] for r in results}
    return splits, f"seeded subject-level split {cfg.split.model_dump()}"


def _write_split(
    folder: Path, members: list[CaseResult], split: str, image_size: int
) -> tuple[np.ndarray, pd.DataFrame]:
    """Write one split's arrays; return (images (N, 1, S, S), manifest) (written later)."""
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
    return images, manifest
