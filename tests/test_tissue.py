"""Tissue labels from ``prepare``: ``{split}/tissue.npy`` aligned with the slices and masks,
written only when every case has a CSF/GM/WM segmentation, and read by the datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage as ndi

from data_prep.prepare import TISSUE_NAME, prepare_dataset
from data_prep.readers.base import SPLITS
from data_prep.tissue import SLICE_STEPS, tissue_labels
from pipeline.core.config import PrepareConfig
from pipeline.data.datasets import TISSUE_CLASSES, EvalData, SliceDataset

CFG = PrepareConfig(n_slices=6, image_size=32, workers=1)
#: Stored intensity of labels 0..3 (background, CSF, GM, WM) in the volumes and PNGs written.
VOLUME_LEVELS = np.array([0.0, 300.0, 600.0, 1000.0])
PNG_LEVELS = np.array([0, 60, 120, 220], dtype=np.uint8)
RELEASE = {"train": (1, 2), "validate": (402,), "test": (441,)}


def run(raw: Path, out: Path, cfg: PrepareConfig = CFG) -> dict:
    """``prepare`` into ``out``; returns the report as written."""
    prepare_dataset(raw, out / "prepared", cfg, report_dir=out / "reports")
    return json.loads((out / "reports" / "prepare_report.json").read_text())


def tissue_volume(seed: int, shape: tuple[int, int, int] = (40, 48, 40)) -> np.ndarray:
    """(X, Y, Z) uint8 labels in RAS, asymmetric in every axis: an ellipsoid of grey matter,
    white matter in its left (low x) part, a CSF ball right-anterior-superior."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float64)
    centre = (np.array(shape) - 1) / 2
    radii = np.array(shape) * (0.38 + 0.03 * rng.random(3))
    r = np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
    labels = np.where(r < 1, 2, 0)
    labels[(r < 0.75) & (grid[0] < centre[0] + 2)] = 3
    ball = centre + np.array([5.0, 7.0, 3.0])
    labels[((grid - ball[:, None, None, None]) ** 2).sum(0) < 5.5**2] = 1
    return labels.astype(np.uint8)


def write_oasis(root: Path, write_analyze, n: int = 3, seg=lambda labels: labels) -> list[Path]:
    """An OASIS-1 disc of ``n`` sessions with FSL_SEG pairs ``seg(labels)``; returns the
    ``.hdr`` paths of the segmentations."""
    segs = []
    for s in range(1, n + 1):
        labels = tissue_volume(s)
        session = f"OAS1_{s:04d}_MR1"
        stem = f"{session}_mpr_n4_anon_111_t88_masked_gfc"
        folder = root / "disc1" / session
        write_analyze(folder / "PROCESSED/MPRAGE/T88_111" / f"{stem}.hdr", VOLUME_LEVELS[labels])
        segs.append(folder / "FSL_SEG" / f"{stem}_fseg.hdr")
        write_analyze(segs[-1], seg(labels))
    return segs


def tissue_slice(number: int, z: int, size: int = 32) -> np.ndarray:
    """(size, size) upright labels: a disc of grey matter, white matter in its left half,
    a CSF spot top right that grows with z."""
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
    labels = np.where(r2 < (size / 2.6) ** 2, 2, 0)
    labels[(r2 < (size / 3.6) ** 2) & (xx < size / 2 + number % 3)] = 3
    labels[(yy - size * 0.35) ** 2 + (xx - size * 0.62) ** 2 < (2.5 + z / 2) ** 2] = 1
    return labels.astype(np.uint8)


def write_release(root: Path, cases: dict = RELEASE, k: int = 5, grey: int = 85) -> None:
    """The PNG release layout with 4-class segmentations stored as ``label * grey``."""
    for split, numbers in cases.items():
        for number in numbers:
            for z in range(k):
                labels = tissue_slice(number, z)
                for kind, name, value in (
                    ("", "case", PNG_LEVELS[labels]),
                    ("seg_", "seg", (labels * grey).astype(np.uint8)),
                ):
                    folder = root / f"keras_png_slices_{kind}{split}"
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(value).save(folder / f"{name}_{number:03d}_slice_{z}.nii.png")


def read_arrays(out: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    folder = out / "prepared" / split
    return tuple(np.load(folder / f) for f in ("slices.npy", "masks.npy", TISSUE_NAME))  # type: ignore[return-value]


def assert_aligned(images: np.ndarray, masks: np.ndarray, tissue: np.ndarray) -> None:
    """tissue.npy has the layout of masks.npy, marks the same brain, and follows the image:
    away from class borders every pixel of a class has that class's intensity."""
    assert tissue.dtype == np.uint8 and tissue.shape == masks.shape == images.shape
    assert set(np.unique(tissue)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(tissue > 0, masks == 1)
    image = images[:, 0].astype(np.float32)
    levels = {}
    for label in (1, 2, 3):
        inner = ndi.binary_erosion(tissue[:, 0] == label, np.ones((1, 5, 5), bool))
        if inner.any():
            values = image[inner]
            levels[label] = float(np.median(values))
            assert np.abs(values - levels[label]).max() < 0.05, (label, values.min(), values.max())
    assert list(levels) == sorted(levels, key=levels.get)  # CSF darker than GM than WM


def test_tissue_labels_take_the_four_classes_only() -> None:
    volume = np.array([[0, 1], [2, 3]], dtype=np.float32)
    labels, why = tissue_labels(volume)
    assert why is None and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, volume)
    labels, _ = tissue_labels(volume * 85, SLICE_STEPS)
    np.testing.assert_array_equal(labels, volume)
    labels, _ = tissue_labels(volume * 21845, SLICE_STEPS)  # 16-bit grey levels
    np.testing.assert_array_equal(labels, volume)
    assert tissue_labels(volume * 85)[0] is None  # volumes store the labels themselves
    for values in ([0, 1], [0, 85], [0, 3], [0, 1, 2, 3, 4], [0, 0.5, 1, 2, 3]):
        labels, why = tissue_labels(np.array(values, dtype=np.float32), SLICE_STEPS)
        assert labels is None and why.startswith("segmentation values {")
    assert TISSUE_CLASSES == ("background", "CSF", "GM", "WM")


def test_oasis1_fsl_seg_gives_tissue_aligned_with_slices_and_masks(
    tmp_path: Path, write_analyze
) -> None:
    write_oasis(tmp_path / "raw", write_analyze)
    report = run(tmp_path / "raw", tmp_path / "out")
    assert report["tissue_labels"] == {"written": True, "reason": None}
    found = set()
    for split in SPLITS:
        images, masks, tissue = read_arrays(tmp_path / "out", split)
        assert tissue.shape == (CFG.n_slices, 1, 32, 32)
        assert_aligned(images, masks, tissue)
        found |= set(np.unique(tissue).tolist())
        data = SliceDataset(tmp_path / "out" / "prepared" / split)
        assert data.has_tissue and data.has_masks
        item = data[2]
        assert item["tissue"].dtype == torch.int64 and item["tissue"].shape == (32, 32)
        np.testing.assert_array_equal(item["tissue"].numpy(), tissue[2, 0])
        evaluation = EvalData.from_dataset(data)
        assert evaluation.tissue is not None and evaluation.tissue.dtype == torch.int64
        assert evaluation.tissue.shape == (len(data), 32, 32)
        assert torch.equal(evaluation.tissue > 0, evaluation.mask[:, 0] > 0)
    assert found == {0, 1, 2, 3}


def test_png_release_grey_levels_give_tissue_aligned_with_slices(tmp_path: Path) -> None:
    write_release(tmp_path / "raw")
    report = run(tmp_path / "raw", tmp_path / "out", PrepareConfig(n_slices=5, image_size=24))
    assert report["tissue_labels"] == {"written": True, "reason": None}
    for split in SPLITS:
        images, masks, tissue = read_arrays(tmp_path / "out", split)
        assert_aligned(images, masks, tissue)
        assert set(np.unique(tissue)) == {0, 1, 2, 3}
    # Upright as stored: CSF top right, white matter on the left.
    _, _, tissue = read_arrays(tmp_path / "out", "val")
    rows, cols = np.nonzero(tissue[4, 0] == 1)
    assert rows.mean() < 12 < cols.mean()
    assert np.nonzero(tissue[4, 0] == 3)[1].mean() < 12


def test_a_case_without_segmentation_means_no_tissue_and_stale_files_go(
    tmp_path: Path, write_analyze
) -> None:
    segs = write_oasis(tmp_path / "raw", write_analyze)
    out = tmp_path / "out"
    assert run(tmp_path / "raw", out)["tissue_labels"]["written"]
    for file in (segs[1], segs[1].with_suffix(".img")):
        file.unlink()
    report = run(tmp_path / "raw", out)
    assert report["status"] == "ok" and not report["tissue_labels"]["written"]
    reason = report["tissue_labels"]["reason"]
    assert reason.startswith("1 of 3 cases have no CSF/GM/WM tissue labels")
    assert "OAS1_0002 MR1: no tissue segmentation" in reason
    for split in SPLITS:
        folder = out / "prepared" / split
        assert not (folder / TISSUE_NAME).exists()  # the first run's file is gone
        assert (folder / "masks.npy").is_file() and (folder / "manifest.csv").is_file()
        data = SliceDataset(folder)
        assert not data.has_tissue and "tissue" not in data[0]
        assert EvalData.from_dataset(data).tissue is None


def test_threshold_masked_input_has_no_tissue(tmp_path: Path, phantom, write_nifti) -> None:
    for s in range(3):
        write_nifti(tmp_path / "raw" / f"s{s}.nii.gz", phantom(s))
    report = run(tmp_path / "raw", tmp_path / "out")
    assert not report["tissue_labels"]["written"]
    assert "brain mask from an intensity threshold" in report["tissue_labels"]["reason"]
    assert not list((tmp_path / "out" / "prepared").rglob(TISSUE_NAME))


def test_a_segmentation_that_is_not_four_classes_is_a_mask_only(
    tmp_path: Path, write_analyze
) -> None:
    write_oasis(tmp_path / "raw", write_analyze, seg=lambda labels: (labels > 0) * 1)
    report = run(tmp_path / "raw", tmp_path / "out")
    reason = report["tissue_labels"]["reason"]
    assert not report["tissue_labels"]["written"] and "3 of 3 cases" in reason
    assert "segmentation values {0, 1} are not the tissue classes 0/1/2/3" in reason
    assert not list((tmp_path / "out" / "prepared").rglob(TISSUE_NAME))
    assert np.load(tmp_path / "out" / "prepared" / "train" / "masks.npy").max() == 1


def test_png_release_with_two_level_segmentations_has_no_tissue(
    tmp_path: Path, write_png_release
) -> None:
    write_png_release(tmp_path / "raw", {"train": {1: 4}, "validate": {402: 4}, "test": {441: 4}})
    report = run(tmp_path / "raw", tmp_path / "out", PrepareConfig(n_slices=4, image_size=16))
    assert not report["tissue_labels"]["written"]
    assert (
        "segmentation values {0, 85} are not the tissue classes"
        in (report["tissue_labels"]["reason"])
    )


def test_png_release_case_with_a_missing_segmentation_has_no_tissue(tmp_path: Path) -> None:
    write_release(tmp_path / "raw")
    (tmp_path / "raw" / "keras_png_slices_seg_train" / "seg_002_slice_3.nii.png").unlink()
    report = run(tmp_path / "raw", tmp_path / "out", PrepareConfig(n_slices=5, image_size=24))
    assert report["status"] == "ok" and not report["tissue_labels"]["written"]
    assert "case_002: no tissue segmentation" in report["tissue_labels"]["reason"]
