"""AugmentedDataset: real prepared slices mixed with a generated folder at a given ratio."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.errors import InputError
from pipeline.data.augment import AugmentedDataset
from pipeline.data.datasets import PreparedDataError, SliceDataset
from pipeline.inference.generate import generate


def _split(root: Path, n: int = 12, size: int = 32) -> Path:
    """A prepared split of ``n`` constant slices (value 0.25) at K = 4 levels."""
    root.mkdir(parents=True)
    np.save(root / "slices.npy", np.full((n, 1, size, size), 0.25, np.float16))
    z_index = np.arange(n) % 4
    pd.DataFrame({"z_index": z_index, "z": z_index / 3}).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.fixture(scope="module")
def synthetic(tiny_generators, tmp_path_factory) -> Path:
    """16 generated PNG slices (4 levels x 4) plus NIfTI files and 4 volumes to be ignored."""
    out = tmp_path_factory.mktemp("synthetic")
    generate(tiny_generators["ldm"], "0:3", 4, 0, out, "both", volume=True, progress=False)
    return out


def test_ratio_labels_and_items(tmp_path, synthetic) -> None:
    data = AugmentedDataset(_split(tmp_path / "train"), synthetic, synthetic_ratio=0.4, seed=0)
    assert len(data) == 12 + 8  # round(12 * 0.4 / 0.6) = 8 synthetic
    flags = [bool(data[i]["is_synthetic"]) for i in range(len(data))]
    assert flags == [False] * 12 + [True] * 8
    assert sum(flags) / len(flags) == pytest.approx(0.4)
    real, fake = data[0], data[12]
    assert real["image"].shape == fake["image"].shape == (1, 32, 32)
    assert real["image"].dtype == fake["image"].dtype == torch.float32
    assert float(real["image"].max()) == pytest.approx(0.25)
    assert 0 <= float(fake["image"].min()) <= float(fake["image"].max()) <= 1
    assert {round(float(data[i]["z"]), 4) for i in range(12, 20)} <= {0.0, 0.3333, 0.6667, 1.0}
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=20)))
    assert batch["image"].shape == (20, 1, 32, 32) and int(batch["is_synthetic"].sum()) == 8


def test_selection_is_seeded(tmp_path, synthetic) -> None:
    split = _split(tmp_path / "train")
    picks = [
        [p.name for p, _ in AugmentedDataset(split, synthetic, 0.25, seed=s).synthetic]
        for s in (0, 0, 1)
    ]
    assert picks[0] == picks[1] and picks[0] != picks[2] and len(picks[0]) == 4
    assert all(name.endswith(".png") for name in picks[0])
    only_real = AugmentedDataset(SliceDataset(split), synthetic, 0.0)
    assert len(only_real) == 12 and not bool(only_real[-1]["is_synthetic"])


def test_clear_errors(tmp_path, synthetic) -> None:
    split = _split(tmp_path / "train")
    with pytest.raises(ValueError, match=r"synthetic_ratio must be in \[0, 1\)"):
        AugmentedDataset(split, synthetic, 1.0)
    with pytest.raises(ValueError, match=r"needs 28 synthetic slices .* has 16"):
        AugmentedDataset(split, synthetic, 0.7)
    with pytest.raises(FileNotFoundError, match="braingen generate"):
        AugmentedDataset(split, tmp_path / "empty", 0.2)
    with pytest.raises(PreparedDataError):
        AugmentedDataset(tmp_path / "nosplit", synthetic, 0.2)
    with pytest.raises(ValueError, match=r"32x32 but the real slices .* are 64x64"):
        AugmentedDataset(_split(tmp_path / "big", size=64), synthetic, 0.2)
    with pytest.raises(IndexError):
        AugmentedDataset(split, synthetic, 0.2)[100]


def test_manifest_paths_must_be_plain_names(tmp_path, synthetic) -> None:
    evil = tmp_path / "evil"
    evil.mkdir()
    with (synthetic / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[0]["file"] = "../" + rows[0]["file"]
    with (evil / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match="not a plain file name"):
        AugmentedDataset(_split(tmp_path / "train"), evil, 0.2)
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "manifest.csv").write_bytes((synthetic / "manifest.csv").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"listed in .* but missing"):
        AugmentedDataset(_split(tmp_path / "train2"), missing, 0.2)


def test_folder_without_pngs_is_refused(tiny_generators, tmp_path) -> None:
    generate(tiny_generators["ldm"], "0", 1, 0, tmp_path / "nii", "nifti", progress=False)
    with pytest.raises(ValueError, match="lists no PNG slices; generate with --format png"):
        AugmentedDataset(_split(tmp_path / "train"), tmp_path / "nii", 0.2)


def _labelled_split(root: Path, n: int = 12, size: int = 32) -> Path:
    """:func:`_split` with covariates and tissue labels (label = column // 8 % 4)."""
    _split(root, n, size)
    manifest = pd.read_csv(root / "manifest.csv")
    manifest["age"] = [70.0] * (n - 1) + [None]
    manifest["sex"] = ["F", "M"] * (n // 2)
    manifest["cdr"] = 0.5
    manifest.to_csv(root / "manifest.csv", index=False)
    tissue = np.broadcast_to((np.arange(size) // 8 % 4).astype(np.uint8), (n, 1, size, size))
    np.save(root / "tissue.npy", np.ascontiguousarray(tissue))
    np.save(root / "masks.npy", (tissue > 0).astype(np.uint8))
    return root


def test_real_and_synthetic_items_carry_the_same_labels(labelled_generators, tmp_path) -> None:
    out = tmp_path / "syn"
    generate(
        labelled_generators["ldm"], "1", 4, 0, out, progress=False, device="cpu",
        covariates={"age": "80", "sex": "M"}, masks=True,
    )  # fmt: skip
    data = AugmentedDataset(_labelled_split(tmp_path / "train"), out, 0.25, require_tissue=True)
    real, last_real, fake = data[1], data[11], data[12]
    assert set(real) == set(fake)  # one format for both
    assert float(real["age"]) == 70 and float(real["sex"]) == 1 and float(real["cdr"]) == 0.5
    assert np.isnan(float(last_real["age"])) and np.isnan(float(real["mmse"]))
    assert float(fake["age"]) == 80 and float(fake["sex"]) == 1 and np.isnan(float(fake["cdr"]))
    assert real["tissue"].dtype == fake["tissue"].dtype == torch.int64
    assert fake["tissue"].shape == (32, 32) and set(fake["tissue"].unique().tolist()) <= {
        0,
        1,
        2,
        3,
    }
    torch.testing.assert_close(real["tissue"][0, :9], torch.tensor([0] * 8 + [1]))
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=16)))
    assert batch["tissue"].shape == (16, 32, 32) and batch["age"].shape == (16,)


def test_tissue_required_but_missing_is_one_line(labelled_generators, synthetic, tmp_path) -> None:
    with pytest.raises(InputError, match="has slices without masks"):
        AugmentedDataset(_labelled_split(tmp_path / "a"), synthetic, 0.25, require_tissue=True)
    with pytest.raises(InputError, match=r"has no tissue\.npy"):
        AugmentedDataset(_split(tmp_path / "b"), synthetic, 0.25, require_tissue=True)
    assert "tissue" not in AugmentedDataset(_split(tmp_path / "c"), synthetic, 0.25)[0]
