"""The prepare library: slicing, orientation, splits, determinism, bad input, the stage."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from support import RecordingRun

from data_prep.demo_cohort import build_demo_cohort
from data_prep.errors import PrepareError
from data_prep.intensity import threshold_mask
from data_prep.prepare import MANIFEST_COLUMNS, prepare_dataset
from data_prep.readers.base import SPLITS
from data_prep.split import allocate, split_sizes, split_subjects, stratum
from data_prep.volume import load_volume, volume_slices
from pipeline.core.config import DemoConfig, PrepareConfig, SplitConfig

SMALL = PrepareConfig(n_slices=5, image_size=24, workers=1)
OUTPUTS = ("slices.npy", "masks.npy", "tissue.npy", "manifest.csv")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny stand-in cohort (4 subjects + one MR2, quarter-resolution grid)."""
    root = tmp_path_factory.mktemp("demo") / "raw"
    build_demo_cohort(root, DemoConfig(n_subjects=4, grid_scale=0.25, workers=1), seed=0)
    return root


def nifti_folder(root: Path, phantom, write_nifti, n_subjects: int, sessions: int = 1) -> Path:
    for s in range(n_subjects):
        for v in range(sessions):
            write_nifti(root / f"s{s:02d}" / f"visit{v}.nii.gz", phantom(10 * s + v))
    return root


def run(raw: Path, out: Path, cfg: PrepareConfig = SMALL, **kwargs):
    return prepare_dataset(raw, out / "prepared", cfg, report_dir=out / "reports", **kwargs)


def read_split(out: Path, split: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    folder = out / "prepared" / split
    manifest = pd.read_csv(folder / "manifest.csv", keep_default_na=False, na_values=[""])
    return np.load(folder / "slices.npy"), np.load(folder / "masks.npy"), manifest


def test_demo_cohort_end_to_end(demo_root: Path, tmp_path: Path) -> None:
    result = run(demo_root, tmp_path)
    report = json.loads((tmp_path / "reports" / "prepare_report.json").read_text())
    assert report == result.report and report["status"] == "ok" and report["format"] == "oasis1"
    assert report["skipped"] == [] and report["total"]["volumes"] == 5
    assert report["tissue_labels"] == {"written": True, "reason": None}  # FSL_SEG 0/1/2/3
    assert (tmp_path / "reports" / "prepare_preview.png").stat().st_size > 0
    total = 0
    for split in SPLITS:
        images, masks, manifest = read_split(tmp_path, split)
        assert images.dtype == np.float16 and masks.dtype == np.uint8
        assert images.shape == masks.shape == (len(manifest), 1, 24, 24)
        tissue = np.load(tmp_path / "prepared" / split / "tissue.npy")
        assert tissue.dtype == np.uint8 and tissue.shape == masks.shape
        np.testing.assert_array_equal(tissue > 0, masks == 1)
        assert set(np.unique(tissue)) == {0, 1, 2, 3}
        assert images.min() >= 0 and images.max() <= 1
        assert list(manifest.columns) == list(MANIFEST_COLUMNS)
        assert (manifest["split"] == split).all()
        assert (manifest["mask_source"] == "segmentation").all()
        np.testing.assert_allclose(manifest["z"], manifest["z_index"] / 4)
        assert report["counts"][split]["slices"] == len(manifest)
        total += len(manifest)
    assert total == 5 * 5
    rows = pd.concat(read_split(tmp_path, s)[2] for s in SPLITS)
    mr2 = rows[(rows["subject"] == "OAS1_0002") & (rows["session"] == "MR2")]
    assert len(mr2) == 5 and mr2["delay"].notna().all()
    young = rows[rows["age"] < 60]
    assert young["mmse"].isna().all()
    assert set(rows.groupby(["subject", "session"])["z_index"].apply(tuple)) == {(0, 1, 2, 3, 4)}
    assert result.metrics()["slices_train"] == report["counts"]["train"]["slices"]


def test_slices_run_bottom_to_top_upright(tmp_path: Path, phantom, write_nifti) -> None:
    volume = phantom()  # bright marker at the left (low x), anterior (high y), upper part
    write_nifti(tmp_path / "p.nii", volume)
    loaded = load_volume(tmp_path / "p.nii")
    slices = volume_slices(
        loaded, threshold_mask(loaded.data), n_slices=40, image_size=48, percentiles=(0.5, 99.5)
    )
    assert np.all(np.diff(slices.z_mm) >= 0)  # z_index 0 is the bottom
    k = int(np.argmin(np.abs(slices.z_mm - 0.6 * volume.shape[2])))
    row, col = np.unravel_index(np.argmax(slices.images[k]), slices.images[k].shape)
    assert row < 24 and col < 24  # anterior at the top, the subject's left on the left


def test_orientation_las_ras_analyze_identical(
    tmp_path: Path, phantom, write_nifti, write_analyze
) -> None:
    volume = phantom()
    shift = -(np.array(volume.shape) - 1) / 2
    ras = np.eye(4)
    ras[:3, 3] = shift
    las = np.diag([-1.0, 1, 1, 1])
    las[:3, 3] = [-shift[0], shift[1], shift[2]]
    write_nifti(tmp_path / "ras.nii.gz", volume, ras)
    write_nifti(tmp_path / "las.nii.gz", np.ascontiguousarray(volume[::-1]), las)
    pir = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1.0]])  # P, I, R axes
    stored = np.ascontiguousarray(volume.transpose(1, 2, 0)[::-1, ::-1, :])
    write_nifti(tmp_path / "pir.nii.gz", stored, pir)
    write_analyze(tmp_path / "analyze.hdr", volume * 1000)
    outputs = []
    for name in ("ras.nii.gz", "las.nii.gz", "pir.nii.gz", "analyze.img"):
        loaded = load_volume(tmp_path / name)
        scale = 1000 if name.startswith("analyze") else 1
        np.testing.assert_allclose(loaded.data, np.round(volume * scale) if scale > 1 else volume)
        outputs.append(
            volume_slices(
                loaded,
                threshold_mask(loaded.data),
                n_slices=8,
                image_size=32,
                percentiles=(0.5, 99.5),
            )
        )
    for other in outputs[1:3]:
        np.testing.assert_array_equal(other.images, outputs[0].images)
        np.testing.assert_array_equal(other.masks, outputs[0].masks)
    np.testing.assert_allclose(outputs[3].images, outputs[0].images, atol=2e-3)


def test_k_and_image_size_honoured(tmp_path: Path, phantom, write_nifti) -> None:
    raw = nifti_folder(tmp_path / "raw", phantom, write_nifti, 3)
    cfg = PrepareConfig(n_slices=7, image_size=40, workers=1)
    run(raw, tmp_path, cfg)
    for split in SPLITS:
        images, masks, manifest = read_split(tmp_path, split)
        assert images.shape[1:] == masks.shape[1:] == (1, 40, 40)
        assert len(manifest) % 7 == 0 and (manifest["n_slices"] == 7).all()
        np.testing.assert_allclose(manifest["z"], manifest["z_index"] / 6)
    assert sum(len(read_split(tmp_path, s)[2]) for s in SPLITS) == 21


def test_no_subject_in_two_splits(tmp_path: Path, phantom, write_nifti) -> None:
    raw = nifti_folder(tmp_path / "raw", phantom, write_nifti, 8, sessions=2)
    result = run(raw, tmp_path, PrepareConfig(n_slices=3, image_size=16, workers=1))
    subjects = {s: set(read_split(tmp_path, s)[2]["subject"]) for s in SPLITS}
    assert all(subjects[s] for s in SPLITS)
    assert not (
        subjects["train"] & subjects["val"]
        or subjects["train"] & subjects["test"]
        or subjects["val"] & subjects["test"]
    )
    assert sum(len(v) for v in subjects.values()) == 8
    for split in SPLITS:
        manifest = read_split(tmp_path, split)[2]
        assert (manifest.groupby("subject")["session"].nunique() == 2).all()
        assert sorted(subjects[split]) == result.report["subjects"][split]


def test_split_sizes_and_seeding() -> None:
    ratios = SplitConfig()
    assert split_sizes(24, ratios) == {"train": 17, "val": 4, "test": 3}
    assert split_sizes(3, ratios) == {"train": 1, "val": 1, "test": 1}
    assert split_sizes(2, ratios) == {"train": 1, "val": 0, "test": 1}
    ids = [f"s{i}" for i in range(20)]
    first = split_subjects(ids, ratios, seed=3)
    assert first == split_subjects(list(reversed(ids)) + ids, ratios, seed=3)
    assert first != split_subjects(ids, ratios, seed=4)


def test_split_is_stratified_by_age_band_and_cdr() -> None:
    ratios = SplitConfig()
    ids = [f"s{i:02d}" for i in range(31)]
    kinds = ["age<60"] * 12 + ["age60+"] * 10 + ["cdr>0"] * 8 + ["unknown"]
    strata = dict(zip(ids, kinds, strict=True))
    sizes = split_sizes(len(ids), ratios)
    for seed in range(20):
        split = split_subjects(ids, ratios, seed, strata)
        assert {k: sum(v == k for v in split.values()) for k in sizes} == sizes
        for kind, n in (("age<60", 12), ("age60+", 10), ("cdr>0", 8)):
            members = [split[s] for s in ids if strata[s] == kind]
            for name in ("test", "train"):
                assert abs(members.count(name) - n * sizes[name] / len(ids)) < 1, (seed, kind)
    assert split_subjects(ids, ratios, 0, strata) != split_subjects(ids, ratios, 1, strata)


def test_allocation_is_proportional_and_adds_up_both_ways() -> None:
    strata = {"a": 12, "b": 10, "c": 8, "d": 1}
    splits = {"train": 21, "val": 5, "test": 5}
    for seed in range(10):
        cells = allocate(strata, splits, np.random.default_rng(seed))
        assert {h: sum(c.values()) for h, c in cells.items()} == strata
        assert {s: sum(c[s] for c in cells.values()) for s in splits} == splits
        for h, size in strata.items():
            for s, count in splits.items():
                assert abs(cells[h][s] - size * count / 31) < 1, (seed, h, s)


@pytest.mark.parametrize(
    ("age", "cdr", "expected"),
    [
        (30.0, None, "age<60"),
        (75.0, 0.0, "age60+"),
        (75.0, 0.5, "cdr>0"),
        (None, None, "unknown"),
        (float("nan"), float("nan"), "unknown"),
        (59.0, float("nan"), "age<60"),
    ],
)
def test_stratum(age: float | None, cdr: float | None, expected: str) -> None:
    assert stratum(age, cdr) == expected


def test_same_seed_same_bytes_any_worker_count(demo_root: Path, tmp_path: Path) -> None:
    def snapshot() -> dict[str, bytes]:
        files = [tmp_path / "prepared" / s / f for s in SPLITS for f in OUTPUTS]
        files += [tmp_path / "reports" / n for n in ("prepare_report.json", "prepare_preview.png")]
        return {str(p): p.read_bytes() for p in files}

    run(demo_root, tmp_path, seed=5)
    first = snapshot()
    run(demo_root, tmp_path, PrepareConfig(n_slices=5, image_size=24, workers=2), seed=5)
    assert snapshot() == first
    run(demo_root, tmp_path, seed=6)
    assert snapshot() != first


def test_png_release_end_to_end(tmp_path: Path, write_png_release) -> None:
    raw = tmp_path / "keras_png_slices_data"
    write_png_release(raw, {"train": {1: 6, 2: 6}, "validate": {402: 4}, "test": {441: 5}})
    result = run(raw, tmp_path, PrepareConfig(n_slices=5, image_size=16, workers=1))
    assert result.report["format"] == "png"
    counts = {s: result.report["counts"][s]["slices"] for s in SPLITS}
    assert counts == {"train": 12, "val": 4, "test": 5}
    images, masks, manifest = read_split(tmp_path, "val")
    assert images.shape == (4, 1, 16, 16) and masks.max() == 1
    np.testing.assert_allclose(manifest["z"], manifest["z_index"] / 3)
    assert manifest["z_mm"].isna().all() and (manifest["mask_source"] == "segmentation").all()
    # Upright as stored: the brighter lower half of each disc stays at the bottom.
    assert images[0, 0, 12:].mean() > images[0, 0, :4].mean()


def _nifti_header_bytes(shape: tuple[int, ...], dtype=np.float32) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    return header.binaryblock + b"\x00" * 4


def write_bad_inputs(root: Path, phantom, write_nifti) -> dict[str, str]:
    """One file per kind of bad input; returns file → expected start of the reason."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "unreadable.nii.gz").write_bytes(b"this is not a volume" * 10)
    good = nib.Nifti1Image(phantom(7), np.eye(4))
    nib.save(good, root / "truncated.nii")
    blob = (root / "truncated.nii").read_bytes()
    (root / "truncated.nii").write_bytes(blob[: len(blob) // 2])
    (root / "headeronly.nii").write_bytes(blob[:352])
    (root / "truncgz.nii.gz").write_bytes(gzip.compress(blob)[: len(blob) // 20])
    (root / "huge.nii").write_bytes(_nifti_header_bytes((2000, 2000, 2000)) + b"\x00" * 64)
    write_nifti(root / "flat2d.nii.gz", phantom(8)[:, :, 20])
    write_nifti(root / "series4d.nii.gz", np.stack([phantom(9)] * 3, axis=-1))
    write_nifti(root / "zeros.nii.gz", np.zeros((40, 48, 40), np.float32))
    write_nifti(root / "nans.nii.gz", np.full((40, 48, 40), np.nan, np.float32))
    return {
        "unreadable.nii.gz": "unreadable",
        "truncated.nii": "truncated:",
        "headeronly.nii": "header only",
        "truncgz.nii.gz": "corrupt or truncated data",
        "huge.nii": "header dims 2000x2000x2000 imply 8000000000 voxels",
        "flat2d.nii.gz": "2D image",
        "series4d.nii.gz": "true 4D volume",
        "zeros.nii.gz": "all-zero volume",
        "nans.nii.gz": "all voxels are NaN/inf",
    }


def test_every_bad_input_is_reported_and_the_rest_kept(
    tmp_path: Path, phantom, write_nifti
) -> None:
    raw = nifti_folder(tmp_path / "raw", phantom, write_nifti, 3)
    expected = write_bad_inputs(raw, phantom, write_nifti)
    partly_nan = phantom(11)
    partly_nan[0, 0, 0] = np.nan
    write_nifti(raw / "somenan.nii.gz", partly_nan)
    result = run(raw, tmp_path)
    reasons = {s["file"]: s["reason"] for s in result.report["skipped"]}
    assert set(reasons) == set(expected)
    for name, start in expected.items():
        assert reasons[name].startswith(start), (name, reasons[name])
    assert result.report["warnings"] == [
        {"file": "somenan.nii.gz", "reason": "1 NaN/inf voxels set to 0"}
    ]
    assert result.report["total"]["volumes"] == 4 and result.report["total"]["slices"] == 20


def test_bad_oasis_files_are_reported(demo_root: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(demo_root, raw)
    images = sorted(raw.rglob("*_t88_masked_gfc.img"))
    images[0].write_bytes(images[0].read_bytes()[:1000])
    images[1].unlink()
    result = run(raw, tmp_path)
    reasons = {Path(s["file"]).name: s["reason"] for s in result.report["skipped"]}
    assert reasons[images[0].name].startswith("truncated: 1000 bytes")
    assert reasons[images[1].with_suffix(".hdr").name].startswith("header-only")
    assert result.report["total"]["volumes"] == 3


@pytest.mark.parametrize("kind", ["empty", "unknown", "all_bad"])
def test_nothing_usable_fails_with_one_clear_message(
    tmp_path: Path, phantom, write_nifti, kind: str
) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    if kind == "unknown":
        (raw / "readme.md").write_text("hello")
    if kind == "all_bad":
        write_bad_inputs(raw, phantom, write_nifti)
    with pytest.raises(PrepareError, match="no usable input") as err:
        run(raw, tmp_path)
    assert "\n" not in str(err.value)
    report = json.loads((tmp_path / "reports" / "prepare_report.json").read_text())
    assert report["status"] == "failed" and report["skipped"]


def test_strict_fails_at_the_first_bad_file(tmp_path: Path, phantom, write_nifti) -> None:
    raw = nifti_folder(tmp_path / "raw", phantom, write_nifti, 2)
    write_nifti(raw / "zeros.nii.gz", np.zeros((40, 48, 40), np.float32))
    strict = PrepareConfig(n_slices=5, image_size=24, workers=1, strict=True)
    with pytest.raises(PrepareError, match=r"strict mode: zeros\.nii\.gz: all-zero volume"):
        run(raw, tmp_path, strict)


@pytest.fixture
def prepare_runs(monkeypatch: pytest.MonkeyPatch) -> list[RecordingRun]:
    """The tracking runs ``stages.prepare`` opens from now on (recorded, not sent to MLflow)."""
    import stages.prepare

    runs: list[RecordingRun] = []

    def open_run(stage: str, params: dict, *, run_name: str | None = None, **_) -> RecordingRun:
        runs.append(RecordingRun(run_name or stage, params))
        return runs[-1]

    monkeypatch.setattr(stages.prepare, "StageRun", open_run)
    return runs


@pytest.fixture
def stage_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prepare_runs) -> Path:
    (tmp_path / "raw").mkdir()
    (tmp_path / "params.yaml").write_text(
        "data: {raw_dir: raw, prepared_dir: prepared}\n"
        "prepare: {n_slices: 4, image_size: 16, workers: 1}\n"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage_exits_with_one_line(stage_project: Path, capsys: pytest.CaptureFixture) -> None:
    from pipeline.core.stage import main
    from stages.prepare import run as stage_run

    with pytest.raises(SystemExit) as exit_info:
        main(stage_run)
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: no usable input in raw") and "empty folder" in last
    report = json.loads((stage_project / "reports" / "prepare_report.json").read_text())
    assert report["skipped"] == [{"file": "raw", "reason": "empty folder: no files found"}]


def test_stage_logs_counts_report_and_preview(
    stage_project: Path, prepare_runs: list[RecordingRun], phantom, write_nifti
) -> None:
    from stages.prepare import run as stage_run

    nifti_folder(stage_project / "raw", phantom, write_nifti, 3)
    stage_run()
    (run,) = prepare_runs
    assert run.run_name == "prepare" and run.params["prepare"]["n_slices"] == 4
    assert sum(run.last(f"slices_{s}") for s in SPLITS) == 12
    report = json.loads((stage_project / "reports" / "prepare_report.json").read_text())
    assert run.dicts["prepare/prepare_report.json"] == report and report["status"] == "ok"
    assert run.images["prepare/prepare_preview.png"].ndim == 2
    assert (stage_project / "reports" / "prepare_preview.png").is_file()


def test_full_disk_during_prepare_ends_in_one_line_and_keeps_nothing_half_written(
    stage_project: Path,
    phantom,
    write_nifti,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    import numpy as np

    from pipeline.core.stage import main
    from stages.prepare import run as stage_run

    nifti_folder(stage_project / "raw", phantom, write_nifti, 3)
    real_save = np.save

    def save_until_full(file, arr, *args, **kwargs):
        if "slices" in str(file) and "val" in str(file):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", save_until_full)
    with pytest.raises(SystemExit) as exit_info:
        main(stage_run)
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: No space left on device writing ") and "re-run" in last
    # no split is published without its manifest, and no manifest without its arrays
    for split in ("train", "val", "test"):
        folder = stage_project / "prepared" / split
        if (folder / "manifest.csv").exists():
            assert (folder / "slices.npy").exists()
    assert not (stage_project / "prepared" / "val" / "manifest.csv").exists()
