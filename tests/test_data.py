"""SliceDataset over prepared memmaps, and the seeded loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data.datasets import PreparedDataError, SliceDataset


def write_split(folder: Path, n: int = 10, size: int = 8, masks: bool = True) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(folder / "slices.npy", rng.random((n, 1, size, size)).astype(np.float16))
    if masks:
        np.save(folder / "masks.npy", (rng.random((n, 1, size, size)) > 0.5).astype(np.uint8))
    z_index = np.arange(n) % 5
    pd.DataFrame(
        {
            "subject": [f"s{i // 5}" for i in range(n)],
            "session": "",
            "z_index": z_index,
            "z": z_index / 4,
        }
    ).to_csv(folder / "manifest.csv", index=False)


def test_items(tmp_path: Path) -> None:
    write_split(tmp_path / "train")
    data = SliceDataset(tmp_path / "train")
    assert len(data) == 10 and data.image_size == 8 and data.has_masks
    item = data[7]
    assert set(item) == {"image", "z", "z_index", "mask"}
    assert item["image"].shape == (1, 8, 8) and item["image"].dtype == torch.float32
    assert item["image"].min() >= 0 and item["image"].max() <= 1
    assert item["z"].shape == () and item["z"].dtype == torch.float32 and item["z"] == 0.5
    assert item["z_index"].dtype == torch.int64 and item["z_index"] == 2
    assert item["mask"].dtype == torch.float32 and set(item["mask"].unique().tolist()) <= {0, 1}
    expected = np.load(tmp_path / "train" / "slices.npy")[7].astype(np.float32)
    np.testing.assert_array_equal(item["image"].numpy(), expected)


def test_without_masks(tmp_path: Path) -> None:
    write_split(tmp_path / "val", masks=False)
    data = SliceDataset(tmp_path / "val")
    assert "mask" not in data[0] and not data.has_masks


def test_missing_and_inconsistent(tmp_path: Path) -> None:
    with pytest.raises(PreparedDataError, match="run the prepare stage"):
        SliceDataset(tmp_path / "nothing")
    write_split(tmp_path / "bad")
    np.save(tmp_path / "bad" / "slices.npy", np.zeros((3, 1, 8, 8), np.float16))
    with pytest.raises(PreparedDataError, match=r"but .* has 10 rows"):
        SliceDataset(tmp_path / "bad")
    pd.DataFrame({"z": [0.0] * 3}).to_csv(tmp_path / "bad" / "manifest.csv", index=False)
    with pytest.raises(PreparedDataError, match="lacks columns"):
        SliceDataset(tmp_path / "bad")


def test_empty_split(tmp_path: Path) -> None:
    write_split(tmp_path / "val", n=0)
    with pytest.raises(PreparedDataError, match=r"the 'val' split has no slices"):
        SliceDataset(tmp_path / "val")
