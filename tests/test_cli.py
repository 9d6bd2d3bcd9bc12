"""The ``braingen`` command: help texts, generate/sdedit/inpaint, and one-line user errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data.manifests import read_manifest
from pipeline.data.slice_files import read_slice

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def project(tiny_generators, tmp_path, monkeypatch) -> Path:
    """A working directory with models/ldm.pt and models/pixelcnn.pt."""
    (tmp_path / "models").mkdir()
    for name in ("ldm", "pixelcnn"):
        shutil.copy(tiny_generators[name], tmp_path / "models" / f"{name}.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def user_slice(tmp_path) -> Path:
    """An 8-bit 40x48 PNG 'slice' of the user's (not the model's 32x32 size)."""
    yy, xx = np.mgrid[:40, :48]
    disc = ((yy - 20) ** 2 + (xx - 24) ** 2 < 15**2) * (120 + 2 * xx)
    path = tmp_path / "mine.png"
    Image.fromarray(disc.astype(np.uint8)).save(path)
    return path


def _error_line(result) -> str:
    """The command failed with exit code 1 and exactly one 'error:' line, no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["generate", "sdedit", "inpaint"]),
        (
            ["generate"],
            ["--z", "--per-z", "--seed", "--steps", "--guidance", "--format", "--volume"],
        ),
        (["sdedit"], ["--strength", "--z", "--out", "--checkpoint"]),
        (["inpaint"], ["--mask", "--z", "--out", "--model"]),
    ],
)
def test_help_works_on_every_command(args, expected) -> None:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for word in expected:
        assert word in result.output


def test_generate_writes_files_and_manifest(project) -> None:
    result = runner.invoke(
        app, ["generate", "--model", "ldm", "--z", "0:3", "--per-z", "2", "--seed", "3",
              "--out", "syn", "--format", "both", "--volume", "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "wrote 8 slices (18 files)" in result.stdout
    rows = read_manifest(project / "syn" / "manifest.csv")
    assert len(rows) == 18 and {r["seed"] for r in rows} == {"3"}
    again = runner.invoke(app, ["generate", "--checkpoint", "models/pixelcnn.pt", "--z", "0.5",
                                "--per-z", "1", "--out", "syn", "--device", "cpu"])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert (project / "syn" / "pixelcnn_s0_f05000_0000.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gan"], "unknown model 'gan'"),
        (["--checkpoint", "nowhere/ldm.pt"], "nowhere/ldm.pt not found"),
        (["--model", "ldm", "--checkpoint", "models/ldm.pt"], "not both"),
        (["--z", "0:9"], r"slice index 9 is outside 0..3"),
        (["--z", "1.5"], r"must lie in [0, 1]"),
        (["--format", "jpeg"], "--format must be one of png, nifti, both"),
        (["--device", "tpu"], "--device must be one of"),
        (["--prefix", "../up"], "prefix must be"),
        (["--per-z", "0"], "per_z must be"),
        (["--model", "pixelcnn", "--steps", "20"], "steps=20 does not apply"),
    ],
)
def test_generate_user_errors_are_one_line(project, args, message) -> None:
    result = runner.invoke(app, ["generate", "--out", "syn", "--device", "cpu", *args])
    assert message in _error_line(result)


def test_missing_default_model_and_existing_output_are_one_line(tmp_path, project) -> None:
    (project / "models" / "ldm.pt").unlink()
    assert "models/ldm.pt not found" in _error_line(runner.invoke(app, ["generate", "--z", "0"]))
    args = ["generate", "--model", "pixelcnn", "--z", "0", "--per-z", "1", "--out", "syn"]
    assert runner.invoke(app, args).exit_code == 0
    assert "already exists" in _error_line(runner.invoke(app, args))
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


def test_sdedit_writes_a_png_at_the_model_size(project, user_slice) -> None:
    args = ["sdedit", str(user_slice), "--z", "2", "--strength", "0.6", "--out", "out/e.png"]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    edited = read_slice(project / "out" / "e.png")
    assert edited.shape == (32, 32) and 0 <= edited.min() <= edited.max() <= 1
    assert "already exists" in _error_line(runner.invoke(app, args))


def test_inpaint_keeps_pixels_outside_the_mask(project, user_slice) -> None:
    mask = np.zeros((40, 48), np.uint8)
    mask[10:20, 12:30] = 255
    Image.fromarray(mask).save(project / "mask.png")
    args = ["inpaint", str(user_slice), "--mask", "mask.png", "--z", "0.5", "--out", "i.png"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--seed", "1"])
    assert result.exit_code == 0, result.output
    out = read_slice(project / "i.png")
    from data_prep.volume import square_resize

    resized = np.clip(square_resize(read_slice(user_slice)[None], 32, nearest=False)[0], 0, 1)
    keep = square_resize(mask[None].astype(np.float32), 32, nearest=True)[0] < 0.5
    np.testing.assert_allclose(out[keep], resized[keep], atol=1e-4)


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["sdedit", "mine.png", "--z", "1", "--out", "e.png", "--model", "pixelcnn"],
         "need the latent diffusion model"),
        (["sdedit", "mine.png", "--z", "1", "--out", "e.png", "--strength", "1.5"],
         "strength must be in [0, 1]"),
        (["sdedit", "mine.png", "--z", "0:2", "--out", "e.png"], "exactly one slice position"),
        (["sdedit", "mine.png", "--z", "7", "--out", "e.png"], "outside 0..3"),
        (["sdedit", "nofile.png", "--z", "1", "--out", "e.png"], "nofile.png: no such file"),
        (["sdedit", "mine.png", "--z", "1", "--out", "e.jpg"], "must be a .png file"),
        (["inpaint", "mine.png", "--mask", "mine.png", "--z", "1", "--out", "i.png",
          "--checkpoint", "models/missing.pt"], "models/missing.pt not found"),
        (["inpaint", "mine.png", "--mask", "empty.png", "--z", "1", "--out", "i.png"],
         "the mask is empty"),
        (["inpaint", "mine.png", "--mask", "small.png", "--z", "1", "--out", "i.png"],
         "they must match"),
    ],
)  # fmt: skip
def test_edit_user_errors_are_one_line(project, user_slice, command, message) -> None:
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(project / "empty.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(project / "small.png")
    result = runner.invoke(app, [*command, "--device", "cpu"])
    assert message in _error_line(result)
