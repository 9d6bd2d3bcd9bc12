"""Readers and format detection on files written in the real layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_prep.readers import PngCase, VolumeCase, detect_format, scan_folder
from data_prep.readers.base import FileIndex
from data_prep.readers.nifti import subject_session
from data_prep.readers.png_slices import load_case

T88 = Path("PROCESSED/MPRAGE/T88_111")
CSV = """ID,M/F,Hand,Age,Educ,SES,MMSE,CDR,eTIV,nWBV,ASF,Delay
OAS1_0001_MR1,F,R,74,2,3,29,0,1344,0.743,1.306,N/A
OAS1_0001_MR2,F,R,74,2,3,29,0,1344,0.743,1.306,12
OAS1_0002_MR1,M,R,23,,,,,1588,0.821,1.105,N/A
OAS1_0003_MR1,F,R,81,4,1,22,1,1230,0.701,1.427,N/A
"""


def write_oasis_session(
    write_analyze,
    root: Path,
    session: str,
    n: int,
    phantom,
    *,
    seg: bool = True,
    kind: str = "masked_gfc",
    seed: int = 0,
) -> None:
    volume = phantom(seed) * 1000
    stem = f"{session}_mpr_n{n}_anon_111_t88_{kind}"
    write_analyze(root / session / T88 / f"{stem}.hdr", volume)
    if seg:
        write_analyze(root / session / "FSL_SEG" / f"{stem}_fseg.hdr", (volume > 0) * 3)


@pytest.fixture
def oasis_tree(tmp_path: Path, phantom, write_analyze) -> Path:
    """Discs at three depths, an MR2 rescan, n3/n4/n5/n6 names, a gfc-only session."""
    root = tmp_path / "oasis"
    write_oasis_session(
        write_analyze, root / "oasis_cross-sectional_disc1" / "disc1", "OAS1_0001_MR1", 4, phantom
    )
    write_oasis_session(
        write_analyze,
        root / "oasis_cross-sectional_disc1" / "disc1",
        "OAS1_0001_MR2",
        3,
        phantom,
        seg=False,
        seed=1,
    )
    write_oasis_session(write_analyze, root / "disc2", "OAS1_0002_MR1", 5, phantom, seed=2)
    write_oasis_session(
        write_analyze,
        root / "downloads" / "x" / "disc3",
        "OAS1_0003_MR1",
        6,
        phantom,
        seed=3,
        kind="gfc",
    )
    (root / "oasis_cross-sectional.csv").write_text(CSV)
    return root


def test_oasis1_reader_finds_sessions_masks_and_demographics(oasis_tree: Path) -> None:
    scan = scan_folder(oasis_tree)
    assert scan.format == "oasis1"
    assert scan.skipped == []
    cases = {(c.subject, c.session): c for c in scan.cases}
    assert sorted(cases) == [
        ("OAS1_0001", "MR1"),
        ("OAS1_0001", "MR2"),
        ("OAS1_0002", "MR1"),
        ("OAS1_0003", "MR1"),
    ]
    assert all(isinstance(c, VolumeCase) for c in scan.cases)
    first = cases[("OAS1_0001", "MR1")]
    assert first.image.endswith("T88_111/OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc.img")
    assert first.mask is not None and first.mask.endswith("_masked_gfc_fseg.img")
    assert cases[("OAS1_0001", "MR2")].mask is None
    assert cases[("OAS1_0003", "MR1")].image.endswith("_t88_gfc.img")
    assert first.demographics["age"] == 74 and first.demographics["sex"] == "F"
    assert cases[("OAS1_0001", "MR2")].demographics["delay"] == 12
    young = cases[("OAS1_0002", "MR1")].demographics
    assert young["mmse"] is None and young["cdr"] is None and young["etiv"] == 1588
    assert cases[("OAS1_0003", "MR1")].demographics["cdr"] == 1


def test_oasis1_prefers_masked_image_and_reports_broken_pairs(
    oasis_tree: Path, phantom, write_analyze
) -> None:
    disc = oasis_tree / "disc2"
    write_oasis_session(write_analyze, disc, "OAS1_0002_MR1", 5, phantom, kind="gfc", seg=False)
    (disc / "OAS1_0005_MR1" / "RAW").mkdir(parents=True)
    header_only = disc / "OAS1_0006_MR1" / T88 / "OAS1_0006_MR1_mpr_n4_anon_111_t88_masked_gfc"
    write_oasis_session(write_analyze, disc, "OAS1_0006_MR1", 4, phantom, seg=False)
    header_only.with_suffix(".img").unlink()
    scan = scan_folder(oasis_tree)
    chosen = {(c.subject, c.session): c.image for c in scan.cases}
    assert chosen[("OAS1_0002", "MR1")].endswith("_masked_gfc.img")
    reasons = {Path(s.file).name: s.reason for s in scan.skipped}
    assert reasons["OAS1_0005_MR1"].startswith("session folder without a T88 image")
    assert reasons[header_only.name + ".hdr"].startswith("header-only")
    assert len(scan.skipped) == 2


def test_oasis1_missing_csv_gives_blank_demographics(oasis_tree: Path) -> None:
    (oasis_tree / "oasis_cross-sectional.csv").unlink()
    scan = scan_folder(oasis_tree)
    assert all(v is None for c in scan.cases for v in c.demographics.values())


def test_bids_reader(tmp_path: Path, phantom, write_nifti) -> None:
    root = tmp_path / "bids"
    volume = phantom()
    write_nifti(root / "sub-01/ses-01/anat/sub-01_ses-01_T1w.nii.gz", volume)
    write_nifti(root / "sub-01/ses-02/anat/sub-01_ses-02_run-01_T1w.nii.gz", volume)
    write_nifti(root / "sub-01/ses-02/anat/sub-01_ses-02_run-02_T1w.nii.gz", volume)
    write_nifti(root / "sub-02/anat/sub-02_T1w.nii.gz", volume)
    write_nifti(root / "sub-02/func/sub-02_task-rest_bold.nii.gz", volume)
    write_nifti(root / "derivatives/fs/sub-02/anat/sub-02_desc-brain_T1w.nii.gz", volume)
    table = "participant_id\tage\tsex\nsub-01\t71\tF\nsub-02\t30\tM\n"
    (root / "participants.tsv").write_text(table)
    scan = scan_folder(root)
    assert scan.format == "bids"
    keys = [(c.subject, c.session) for c in scan.cases]
    assert keys == [("sub-01", "ses-01"), ("sub-01", "ses-02"), ("sub-02", "")]
    assert scan.cases[0].demographics["age"] == 71 and scan.cases[2].demographics["sex"] == "M"
    assert scan.cases[1].image.endswith("run-01_T1w.nii.gz")
    assert [s.reason.split(";")[0] for s in scan.skipped] == ["duplicate session"]


def test_oasis3_download_layout_is_bids(tmp_path: Path, phantom, write_nifti) -> None:
    root = tmp_path / "oasis3"
    write_nifti(root / "OAS30001_MR_d0129/anat2/NIFTI/sub-OAS30001_ses-d0129_T1w.nii.gz", phantom())
    write_nifti(root / "OAS30001_MR_d2430/anat1/NIFTI/sub-OAS30001_ses-d2430_T1w.nii.gz", phantom())
    scan = scan_folder(root)
    assert scan.format == "bids"
    assert [(c.subject, c.session) for c in scan.cases] == [
        ("sub-OAS30001", "ses-d0129"),
        ("sub-OAS30001", "ses-d2430"),
    ]


def test_nifti_folder_reader(tmp_path: Path, phantom, write_nifti) -> None:
    root = tmp_path / "flat"
    write_nifti(root / "brain01.nii.gz", phantom())
    write_nifti(root / "brain02.nii", phantom(1))
    write_nifti(root / "brain02_brain_mask.nii.gz", (phantom(1) > 0).astype(np.uint8))
    write_nifti(root / "s03" / "visit2" / "t1.nii", phantom(2))
    (root / "notes.txt").write_text("not an image")
    scan = scan_folder(root)
    assert scan.format == "nifti"
    assert [(c.subject, c.session) for c in scan.cases] == [
        ("brain01", ""),
        ("brain02", ""),
        ("s03", "visit2/t1"),
    ]
    assert [(s.file, s.reason) for s in scan.skipped] == [
        ("brain02_brain_mask.nii.gz", "looks like a mask/segmentation, not an image")
    ]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a.nii.gz", ("a", "")),
        ("sub-7_ses-2_T1w.nii", ("sub-7", "ses-2")),
        ("sub-7/ses-3/anat/scan.nii.gz", ("sub-7", "ses-3")),
        ("p1/t1.nii.gz", ("p1", "t1")),
    ],
)
def test_subject_session_from_path(path: str, expected: tuple[str, str]) -> None:
    assert subject_session(Path(path)) == expected


def test_png_release_reader(tmp_path: Path, write_png_release) -> None:
    root = tmp_path / "keras_png_slices_data"
    write_png_release(root, {"train": {1: 6, 2: 6}, "validate": {402: 4}, "test": {441: 5}})
    (root / "keras_png_slices_train" / "Thumbs.db").write_bytes(b"x")
    (root / "keras_png_slices_seg_test" / "seg_441_slice_4.nii.png").unlink()
    scan = scan_folder(tmp_path)
    assert scan.format == "png"
    assert all(isinstance(c, PngCase) for c in scan.cases)
    summary = [(c.split, c.subject, c.n_slices, len(c.slices)) for c in scan.cases]
    assert summary == [
        ("test", "case_441", 5, 5),
        ("train", "case_001", 6, 6),
        ("train", "case_002", 6, 6),
        ("val", "case_402", 4, 4),
    ]
    assert [s.reason for s in scan.skipped] == [
        "unexpected file name (expected case_NNN_slice_K.nii.png)"
    ]
    stack = load_case(scan.cases[1])
    assert stack.images.shape == (6, 32, 32) and stack.masks is not None
    assert stack.labels is not None and set(np.unique(stack.labels)) == {0, 85}  # as stored
    np.testing.assert_array_equal(stack.masks, stack.labels > 0)
    missing = load_case(scan.cases[0])
    assert missing.masks is None and missing.labels is None  # one segmentation missing


def test_png_k_comes_from_the_largest_slice_index(tmp_path: Path, write_png_release) -> None:
    write_png_release(tmp_path, {"train": {7: 40}})
    for z in range(1, 39):
        (tmp_path / "keras_png_slices_train" / f"case_007_slice_{z}.nii.png").unlink()
    (case,) = scan_folder(tmp_path).cases
    assert case.n_slices == 40 and [s.z_index for s in case.slices] == [0, 39]


def test_detection_order_and_override(oasis_tree: Path, phantom, write_nifti) -> None:
    write_nifti(oasis_tree / "extra" / "other.nii.gz", phantom())
    assert detect_format(FileIndex.build(oasis_tree)) == "oasis1"
    assert "extra" in [c.subject for c in scan_folder(oasis_tree, "nifti").cases]
    bids = scan_folder(oasis_tree, "bids")
    assert bids.format == "unknown" and "bids: sub-*_T1w" in bids.skipped[0].reason
    with pytest.raises(ValueError, match=r"data\.format must be one of"):
        scan_folder(oasis_tree, "dicom")


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda p: p.mkdir(), "empty folder"),
        (lambda p: None, "data folder does not exist"),
        (lambda p: (p.mkdir(), (p / "a.txt").write_text("x")), "unknown folder"),
    ],
)
def test_empty_missing_and_unknown_folders(tmp_path: Path, setup, reason: str) -> None:
    folder = tmp_path / "data"
    setup(folder)
    scan = scan_folder(folder)
    assert scan.format == "unknown" and scan.cases == []
    assert len(scan.skipped) == 1 and scan.skipped[0].reason.startswith(reason)
    assert scan.skipped[0].file == str(folder)
