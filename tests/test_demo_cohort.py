"""The synthetic stand-in cohort: OASIS-1 layout and format, atrophy, determinism."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_prep.demo_cohort import (
    CSV_COLUMNS,
    OASIS_SHAPE,
    SEX_SCALE,
    anatomy_scale,
    build_demo_cohort,
    cohort_sessions,
    save_template_maps,
    synthesise_session,
)
from data_prep.readers import scan_folder
from pipeline.core.config import DemoConfig

TINY = DemoConfig(n_subjects=3, n_discs=2, grid_scale=0.25, workers=1)


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "raw"
    build_demo_cohort(root, TINY, seed=0)
    return root


def test_layout_csv_and_labels(tiny: Path) -> None:
    disc1 = "oasis_cross-sectional_disc1/disc1"
    expected = {
        f"{disc1}/OAS1_0001_MR1/PROCESSED/MPRAGE/T88_111/"
        "OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc.img",
        f"{disc1}/OAS1_0001_MR1/FSL_SEG/OAS1_0001_MR1_mpr_n4_anon_111_t88_masked_gfc_fseg.hdr",
        f"{disc1}/OAS1_0002_MR2/PROCESSED/MPRAGE/T88_111/"
        "OAS1_0002_MR2_mpr_n6_anon_111_t88_masked_gfc.hdr",
        "oasis_cross-sectional_disc2/disc2/OAS1_0003_MR1/PROCESSED/MPRAGE/T88_111/"
        "OAS1_0003_MR1_mpr_n5_anon_111_t88_masked_gfc.img",
        "oasis_cross-sectional.csv",
        "README.txt",
    }
    names = set(files(tiny))
    assert expected <= names and len(names) == 4 * 4 + 2
    readme = (tiny / "README.txt").read_text()
    assert "STAND-IN" in readme and "NOT OASIS DATA" in readme and "MNI152" in readme
    table = pd.read_csv(tiny / "oasis_cross-sectional.csv")
    assert tuple(table.columns) == CSV_COLUMNS
    assert list(table["ID"]) == ["OAS1_0001_MR1", "OAS1_0002_MR1", "OAS1_0002_MR2", "OAS1_0003_MR1"]
    young = table[table["Age"] < 60]
    assert len(young) and young[["Educ", "SES", "MMSE", "CDR"]].isna().all().all()
    assert table["Delay"].notna().sum() == 1
    assert (table["eTIV"] * table["ASF"]).between(1745, 1765).all()


def test_the_oasis1_reader_takes_the_cohort(tiny: Path) -> None:
    scan = scan_folder(tiny)
    assert scan.format == "oasis1" and scan.skipped == []
    assert [(c.subject, c.session) for c in scan.cases] == [
        ("OAS1_0001", "MR1"),
        ("OAS1_0002", "MR1"),
        ("OAS1_0002", "MR2"),
        ("OAS1_0003", "MR1"),
    ]
    assert all(c.mask is not None for c in scan.cases)
    img = nib.load(tiny / scan.cases[0].image)
    assert img.shape == (44, 52, 44, 1) and img.get_data_dtype() == np.int16
    assert b"NOT OASIS" in img.header["descrip"].tobytes()
    seg = np.asarray(nib.load(tiny / scan.cases[0].mask).dataobj)
    assert set(np.unique(seg)) == {0, 1, 2, 3}


def test_deterministic_by_seed(tiny: Path, tmp_path: Path) -> None:
    build_demo_cohort(tmp_path / "again", TINY, seed=0)
    assert files(tmp_path / "again") == files(tiny)
    build_demo_cohort(tmp_path / "other", TINY, seed=1)
    assert files(tmp_path / "other") != files(tiny)


def test_rebuild_replaces_the_folder(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    build_demo_cohort(root, TINY, seed=0)
    build_demo_cohort(root, TINY.model_copy(update={"n_subjects": 2}), seed=0)
    assert not list(root.rglob("OAS1_0003_MR1"))
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no temporary folder left


def test_subjects_differ_and_age_and_dementia_show_apart(tmp_path: Path) -> None:
    save_template_maps(tmp_path / "maps", step=2)  # atrophy is sub-voxel on coarser grids
    maps = {p.stem: np.load(p) for p in (tmp_path / "maps").glob("*.npy")}
    shape = (88, 104, 88)
    first, second = cohort_sessions(2, 1, seed=0)[:2]
    a, _ = synthesise_session(first, maps, TINY, 0, shape)
    b, _ = synthesise_session(second, maps, TINY, 0, shape)
    assert np.mean(a != b) > 0.1
    out = {}
    for name, ageing, dementia in (("none", 0, 0), ("aged", 1, 0), ("demented", 0, 1)):
        subject = dataclasses.replace(first.subject, ageing=ageing, dementia=dementia)
        out[name] = synthesise_session(
            dataclasses.replace(first, subject=subject), maps, TINY, 0, shape
        )
    (_, none), (_, aged), (_, demented) = (out[k] for k in ("none", "aged", "demented"))
    # ventricles grow into white matter, the cortex thins from its grey outer surface
    assert (aged == 1).sum() > 1.3 * (none == 1).sum()  # more CSF
    assert (aged == 3).sum() < 0.95 * (none == 3).sum()  # ... where white matter was
    assert (aged == 2).sum() > 0.9 * (none == 2).sum()  # the cortex thins only a little
    assert (demented == 2).sum() < 0.85 * (none == 2).sum()  # thinner grey matter
    assert (demented == 3).sum() > 0.99 * (none == 3).sum()  # the ventricles stay
    wm = (none == 3) & (demented == 3)
    ratio = out["demented"][0][wm] / np.maximum(out["none"][0][wm], 1)
    assert np.quantile(ratio, 0.01) < 0.85 < 0.98 < np.median(ratio)  # periventricular WM darker


def test_male_anatomy_is_larger_and_the_segmentation_follows(tmp_path: Path) -> None:
    rng = [np.random.default_rng(3) for _ in range(2)]
    ratio = anatomy_scale("M", rng[0]) / anatomy_scale("F", rng[1])
    assert SEX_SCALE == 1.05
    np.testing.assert_allclose(ratio, SEX_SCALE)
    save_template_maps(tmp_path / "maps", step=4)
    maps = {p.stem: np.load(p) for p in (tmp_path / "maps").glob("*.npy")}
    session = cohort_sessions(2, 1, seed=0)[0]
    shape = (44, 52, 44)
    out = {}
    for sex in ("F", "M"):  # one subject, same age and atrophy, only the sex differs
        subject = dataclasses.replace(session.subject, sex=sex)
        image, seg = synthesise_session(
            dataclasses.replace(session, subject=subject), maps, TINY, 0, shape
        )
        assert set(np.unique(seg)) == {0, 1, 2, 3}
        assert np.mean((seg > 0) == (image > 0)) > 0.999  # labels cover the imaged brain
        out[sex] = seg
    volumes = {sex: (seg > 0).sum() for sex, seg in out.items()}
    assert 1.08 < volumes["M"] / volumes["F"] < 1.25  # 1.05 ** 3 = 1.16
    for label in (2, 3):  # grey and white matter both scale
        assert (out["M"] == label).sum() > (out["F"] == label).sum()


def test_rescan_shares_anatomy(tmp_path: Path) -> None:
    save_template_maps(tmp_path / "maps", step=4)
    maps = {p.stem: np.load(p) for p in (tmp_path / "maps").glob("*.npy")}
    sessions = cohort_sessions(3, 1, seed=0)
    mr1, mr2, other = sessions[1], sessions[2], sessions[3]
    assert (mr1.session, mr2.session) == ("MR1", "MR2") and mr1.subject == mr2.subject
    shape = (44, 52, 44)
    _, seg1 = synthesise_session(mr1, maps, TINY, 0, shape)
    _, seg2 = synthesise_session(mr2, maps, TINY, 0, shape)
    _, seg3 = synthesise_session(other, maps, TINY, 0, shape)
    assert np.mean(seg1 == seg2) > np.mean(seg1 == seg3)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~20 s
def test_real_layout_format_and_shape(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    build_demo_cohort(root, DemoConfig(n_subjects=2, n_discs=1, workers=2), seed=0)
    scan = scan_folder(root)
    assert len(scan.cases) == 3
    for case in scan.cases:
        for path, dtype in ((case.image, np.int16), (case.mask, np.uint8)):
            img = nib.load(root / path)
            assert isinstance(img, nib.AnalyzeImage) and img.get_data_dtype() == dtype
            assert img.shape == (*OASIS_SHAPE, 1)
            assert img.header.get_zooms()[:3] == (1.0, 1.0, 1.0)
            assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
        data = np.asarray(nib.load(root / case.image).dataobj)[..., 0]
        brain = data > 0
        assert 0.15 < brain.mean() < 0.45  # a brain, not an empty or full box
        assert not brain[[0, -1]].any() and not brain[:, [0, -1]].any()  # not cropped in-plane
        assert 900 < np.percentile(data[brain], 90) < 1300  # white matter near 1000
