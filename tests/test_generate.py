"""Synthetic-slice files: z parsing, determinism, manifest, overwrite and path safety, NIfTI,
atomic writes and concurrent writers into one folder."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from support import save_tiny_ldm

from pipeline.core.identity import file_sha256
from pipeline.data.manifests import MANIFEST_COLUMNS, read_manifest
from pipeline.data.slice_files import OutputExistsError, check_token, publish, read_slice
from pipeline.inference.generate import generate, output_spacing

pytestmark = pytest.mark.usefixtures("one_thread")


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "I;16"
        return np.asarray(img)


# --- generate ---------------------------------------------------------------------------


def test_generate_is_deterministic_per_seed_and_level(tiny_generators, tmp_path) -> None:
    model = tiny_generators["ldm"]
    a = generate(model, "0:3", 2, 5, tmp_path / "a", progress=False, device="cpu")
    b = generate(model, "0:3", 2, 5, tmp_path / "b", progress=False, device="cpu")
    assert [p.name for p in a.files] == [p.name for p in b.files]
    for pa, pb in zip(a.files, b.files, strict=True):
        np.testing.assert_array_equal(_png(pa), _png(pb))
    # one level alone gives the same slices as inside the full request
    c = generate(model, "2", 2, 5, tmp_path / "c", progress=False, device="cpu")
    np.testing.assert_array_equal(_png(c.files[1]), _png(tmp_path / "a" / c.files[1].name))
    d = generate(model, "2", 2, 6, tmp_path / "d", progress=False, device="cpu")
    assert not np.array_equal(_png(d.files[0]), _png(c.files[0]))


def test_manifest_lists_every_file_with_its_provenance(tiny_generators, tmp_path) -> None:
    model = tiny_generators["ldm"]
    result = generate(
        model,
        "1,0.5",
        3,
        7,
        tmp_path,
        steps=3,
        guidance=1.5,
        sampler="pndm",
        progress=False,
        device="cpu",
    )
    assert result.slices == 6 and len(result.files) == 6
    with (tmp_path / "manifest.csv").open(newline="") as fh:
        assert tuple(next(csv.reader(fh))) == MANIFEST_COLUMNS
    rows = read_manifest(result.manifest)
    assert [r["file"] for r in rows] == [p.name for p in result.files]
    sha = file_sha256(model)
    for row in rows:
        assert row["model"] == "ldm" and row["checkpoint_sha256"] == sha
        assert (row["seed"], row["sampler"], row["steps"], row["guidance"], row["type"]) == (
            "7",
            "pndm",
            "3",
            "1.5",
            "slice",
        )
        assert row["timestamp"].endswith("+00:00")
        assert (tmp_path / row["file"]).is_file()
    assert [(r["z_index"], float(r["z"]), r["sample"]) for r in rows[:4]] == [
        ("1", pytest.approx(1 / 3), "0"),
        ("1", pytest.approx(1 / 3), "1"),
        ("1", pytest.approx(1 / 3), "2"),
        ("1.5", 0.5, "0"),
    ]
    assert rows[0]["file"] == "ldm_s7_z001_0000.png" and rows[3]["file"] == "ldm_s7_f05000_0000.png"
    image = _png(tmp_path / rows[0]["file"])
    assert image.shape == (32, 32) and image.dtype == np.uint16
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_manifest_records_the_posterior_std_each_slice_was_decoded_with(
    tiny_generators, tmp_path
) -> None:
    model = save_tiny_ldm(tmp_path / "ldm.pt", tiny_generators["vaegan"], posterior_std=0.4)
    kwargs = {"progress": False, "device": "cpu"}
    drawn = generate(model, "1", 2, 3, tmp_path / "drawn", **kwargs)
    plain = generate(model, "1", 2, 3, tmp_path / "plain", texture=False, **kwargs)
    assert [float(r["posterior_std"]) for r in read_manifest(drawn.manifest)] == [0.4, 0.4]
    assert [float(r["posterior_std"]) for r in read_manifest(plain.manifest)] == [0.0, 0.0]
    assert [r["decode_noise"] for r in read_manifest(drawn.manifest)] == ["isotropic"] * 2
    assert read_manifest(plain.manifest)[0]["decode_noise"] == "none"
    curve = {"magnitude": [0.0, 1.0], "std": [0.6, 0.1]}
    by_magnitude = save_tiny_ldm(
        tmp_path / "ldm_curve.pt", tiny_generators["vaegan"], posterior_std=0.4, std_curve=curve
    )
    rows = read_manifest(generate(by_magnitude, "1", 1, 3, tmp_path / "curve", **kwargs).manifest)
    assert rows[0]["decode_noise"] == "by_magnitude" and float(rows[0]["posterior_std"]) == 0.4
    assert not np.array_equal(_png(drawn.files[0]), _png(plain.files[0]))
    pixelcnn = generate(tiny_generators["pixelcnn"], "1", 1, 3, tmp_path / "vq", **kwargs)
    assert float(read_manifest(pixelcnn.manifest)[0]["posterior_std"]) == 0.0
    assert read_manifest(pixelcnn.manifest)[0]["decode_noise"] == "none"


def test_pixelcnn_generates_and_refuses_ldm_only_settings(tiny_generators, tmp_path) -> None:
    model = tiny_generators["pixelcnn"]
    result = generate(model, "0,3", 1, 0, tmp_path, progress=False, device="cpu")
    rows = read_manifest(result.manifest)
    assert [r["file"] for r in rows] == ["pixelcnn_s0_z000_0000.png", "pixelcnn_s0_z003_0000.png"]
    assert rows[0]["steps"] == rows[0]["sampler"] == ""
    assert float(rows[0]["guidance"]) == 1.0  # covariate guidance: the model's default
    with pytest.raises(ValueError, match="steps"):
        generate(model, "0", 1, 0, tmp_path / "x", steps=3, progress=False, device="cpu")
    with pytest.raises(ValueError, match="sampler"):
        generate(model, "0", 1, 0, tmp_path / "x", sampler="ddim", progress=False, device="cpu")


def test_existing_output_is_refused_unless_overwrite(tiny_generators, tmp_path) -> None:
    model = tiny_generators["ldm"]
    first = generate(model, "0:1", 1, 0, tmp_path, progress=False, device="cpu")
    before = {p: p.stat().st_mtime_ns for p in first.files}
    with pytest.raises(OutputExistsError, match=r"already exists .*--overwrite"):
        generate(model, "0:2", 1, 0, tmp_path, progress=False, device="cpu")
    assert not (tmp_path / "ldm_s0_z002_0000.png").exists()  # nothing written at all
    assert {p: p.stat().st_mtime_ns for p in first.files} == before
    generate(model, "0:2", 1, 0, tmp_path, overwrite=True, progress=False, device="cpu")
    files = [r["file"] for r in read_manifest(tmp_path / "manifest.csv")]
    assert sorted(files) == [f"ldm_s0_z00{i}_0000.png" for i in range(3)]  # no duplicates


@pytest.mark.parametrize("prefix", ["../evil", "a/b", ".hidden", "x..y", "", "/abs", "a b"])
def test_prefix_cannot_escape_the_folder(tiny_generators, tmp_path, prefix) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="prefix must be"):
        generate(tiny_generators["ldm"], "0", 1, 0, out, prefix=prefix, progress=False)
    assert list(tmp_path.iterdir()) == []
    assert check_token("my-set_2", "prefix") == "my-set_2"


def test_bad_requests_fail_before_writing(tiny_generators, tmp_path) -> None:
    model = tiny_generators["ldm"]
    cases = [
        ({"z_levels": "0:9"}, r"outside 0\.\.3"),
        ({"fmt": "jpeg"}, "format must be one of"),
        ({"per_z": 0}, "per_z must be"),
        ({"seed": -1}, "seed must be"),
        ({"z_levels": "1", "volume": True}, "at least two z levels"),
    ]
    for kwargs, message in cases:
        args = {"z_levels": "0", "per_z": 1, "seed": 0, "progress": False, "device": "cpu"}
        with pytest.raises(ValueError, match=message):
            generate(model, out_dir=tmp_path / "out", **{**args, **kwargs})
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        generate(model, "0", 1, 0, tmp_path / "file", progress=False)


def test_nifti_slices_and_volumes_match_the_pngs(tiny_generators, tmp_path) -> None:
    result = generate(
        tiny_generators["ldm"],
        "2,0:1",
        2,
        0,
        tmp_path,
        "both",
        volume=True,
        progress=False,
        device="cpu",
    )
    rows = read_manifest(result.manifest)
    assert len(rows) == 3 * 2 * 2 + 2 and [r["type"] for r in rows[-2:]] == ["volume"] * 2
    png = read_slice(tmp_path / "ldm_s0_z001_0001.png")
    nii = nib.load(tmp_path / "ldm_s0_z001_0001.nii.gz")
    assert nii.shape == (32, 32, 1) and nii.header.get_zooms() == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(read_slice(tmp_path / "ldm_s0_z001_0001.nii.gz"), png, atol=1e-4)
    vol = nib.load(tmp_path / "ldm_s0_vol_0001.nii.gz").get_fdata()
    assert vol.shape == (32, 32, 3)  # levels stacked bottom (z=0) to top (z=2)
    for k in range(3):
        level = read_slice(tmp_path / f"ldm_s0_z00{k}_0001.nii.gz")
        np.testing.assert_allclose(np.rot90(vol[:, :, k]), level, atol=1e-6)


def test_output_spacing_comes_from_metadata_when_recorded() -> None:
    assert output_spacing({}) == (1.0, 1.0)
    assert output_spacing({"pixel_mm": 3.25, "slice_mm": 4.5}) == (3.25, 4.5)
    assert output_spacing({"data": {"pixel_mm": 2.0}}) == (2.0, 1.0)


def test_publish_never_leaves_a_half_written_file(tmp_path) -> None:
    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        publish(tmp_path / "x.png", broken, overwrite=False)
    assert list(tmp_path.iterdir()) == []
    publish(tmp_path / "x.png", lambda tmp: tmp.write_bytes(b"one"), overwrite=False)
    with pytest.raises(OutputExistsError):
        publish(tmp_path / "x.png", lambda tmp: tmp.write_bytes(b"two"), overwrite=False)
    assert (tmp_path / "x.png").read_bytes() == b"one" and len(list(tmp_path.iterdir())) == 1


def test_foreign_manifest_is_not_merged(tiny_generators, tmp_path) -> None:
    (tmp_path / "manifest.csv").write_text("subject,z\ns1,0.5\n")
    with pytest.raises(ValueError, match="not a braingen generate manifest"):
        generate(tiny_generators["ldm"], "0", 1, 0, tmp_path, progress=False, device="cpu")


def test_a_manifest_from_before_texture_and_novelty_keeps_growing(
    tiny_generators, tmp_path
) -> None:
    old_columns = MANIFEST_COLUMNS[:12]
    assert "texture_sigma" not in old_columns
    row = {c: "" for c in old_columns} | {"file": "old_s0_z000_0000.png", "type": "slice"}
    with (tmp_path / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow(row)
    generate(tiny_generators["ldm"], "0", 1, 0, tmp_path, progress=False, device="cpu")
    rows = read_manifest(tmp_path / "manifest.csv")
    assert rows[0]["file"] == "old_s0_z000_0000.png"
    assert rows[0]["texture_sigma"] == "" and len(rows) == 2
    assert tuple(rows[1]) == MANIFEST_COLUMNS


# --- concurrency ------------------------------------------------------------------------


def _concurrent(targets: list[dict]) -> list[BaseException | None]:
    errors: list[BaseException | None] = [None] * len(targets)
    barrier = threading.Barrier(len(targets))

    def work(i: int) -> None:
        barrier.wait()
        try:
            generate(**targets[i])
        except BaseException as err:  # collected for the assertion
            errors[i] = err

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_runs_into_one_folder_keep_every_file_and_row(tiny_generators, tmp_path) -> None:
    common = {
        "model_path": tiny_generators["ldm"],
        "z_levels": "0:3",
        "per_z": 2,
        "out_dir": tmp_path,
        "progress": False,
        "device": "cpu",
    }
    errors = _concurrent([{**common, "seed": s} for s in range(4)])
    assert errors == [None] * 4
    rows = read_manifest(tmp_path / "manifest.csv")
    files = sorted(r["file"] for r in rows)
    expected = sorted(
        f"ldm_s{s}_z00{k}_000{j}.png" for s in range(4) for k in range(4) for j in (0, 1)
    )
    assert files == expected  # every run's rows, exactly once
    on_disk = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png")
    assert on_disk == expected
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_concurrent_identical_runs_one_wins_the_other_refuses(tiny_generators, tmp_path) -> None:
    common = {
        "model_path": tiny_generators["ldm"],
        "z_levels": "0:3",
        "per_z": 1,
        "seed": 0,
        "out_dir": tmp_path,
        "progress": False,
        "device": "cpu",
    }
    errors = _concurrent([common, common])
    assert sorted(type(e).__name__ for e in errors) == ["NoneType", "OutputExistsError"]
    files = [r["file"] for r in read_manifest(tmp_path / "manifest.csv")]
    assert sorted(files) == [f"ldm_s0_z00{k}_0000.png" for k in range(4)]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~65 s
def test_two_cli_processes_write_into_one_folder(tiny_generators, tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.cli",
                "generate",
                "--checkpoint",
                str(tiny_generators["ldm"]),
                "--z",
                "0:3",
                "--per-z",
                "3",
                "--seed",
                str(seed),
                "--out",
                str(tmp_path),
                "--device",
                "cpu",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (0, 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    rows = read_manifest(tmp_path / "manifest.csv")
    assert len(rows) == len({r["file"] for r in rows}) == 2 * 4 * 3
    assert all((tmp_path / r["file"]).is_file() for r in rows)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~90 s
@pytest.mark.parametrize("kill_after_files", [1, 40])
def test_killed_generate_leaves_only_complete_files_and_a_rerun_finishes(
    tiny_generators, tmp_path, kill_after_files: int
) -> None:
    import signal
    import time

    cmd = [sys.executable, "-m", "pipeline.cli", "generate", "--checkpoint",
           str(tiny_generators["ldm"]), "--z", "0:3", "--per-z", "100", "--out",
           str(tmp_path), "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list(tmp_path.glob("ldm_*.png"))) >= kill_after_files:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "generate finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)

    # every file under a final name is complete; the manifest (written last) is absent
    finals = sorted(tmp_path.glob("ldm_*.png"))
    assert finals and not (tmp_path / "manifest.csv").exists()
    for path in finals:
        with Image.open(path) as image:
            image.load()  # a truncated PNG raises here
    assert all(p.name.startswith(".") for p in tmp_path.iterdir() if ".tmp" in p.name)

    rerun = subprocess.run([*cmd, "--overwrite"], env=env, capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    rows = read_manifest(tmp_path / "manifest.csv")
    assert len(rows) == len({r["file"] for r in rows}) == 4 * 100
    assert sorted(r["file"] for r in rows) == sorted(p.name for p in tmp_path.glob("ldm_*.png"))
