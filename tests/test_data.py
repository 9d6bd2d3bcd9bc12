"""SliceDataset over prepared memmaps, and the seeded loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.data.datasets import TISSUE_CLASSES, EvalData, PreparedDataError, SliceDataset


def write_split(
    folder: Path, n: int = 10, size: int = 8, masks: bool = True, tissue: bool = False
) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(folder / "slices.npy", rng.random((n, 1, size, size)).astype(np.float16))
    labels = rng.integers(0, len(TISSUE_CLASSES), (n, 1, size, size)).astype(np.uint8)
    if masks:
        np.save(folder / "masks.npy", (labels > 0).astype(np.uint8))
    if tissue:
        np.save(folder / "tissue.npy", labels)
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
    assert "tissue" not in data[0] and not data.has_tissue
    assert EvalData.from_dataset(data).tissue is None


def test_tissue_items_and_eval_data(tmp_path: Path) -> None:
    write_split(tmp_path / "train", tissue=True)
    data = SliceDataset(tmp_path / "train")
    assert data.has_tissue and set(data[3]) == {"image", "z", "z_index", "mask", "tissue"}
    tissue = data[3]["tissue"]
    assert tissue.shape == (8, 8) and tissue.dtype == torch.int64
    expected = np.load(tmp_path / "train" / "tissue.npy")
    np.testing.assert_array_equal(tissue.numpy(), expected[3, 0])
    evaluation = EvalData.from_dataset(data)
    assert evaluation.tissue is not None and evaluation.tissue.dtype == torch.int64
    assert evaluation.tissue.shape == (10, 8, 8)
    assert set(evaluation.tissue.unique().tolist()) == {0, 1, 2, 3}
    assert torch.equal(evaluation.tissue > 0, evaluation.mask[:, 0] > 0)
    positional = EvalData(evaluation.image, evaluation.mask, evaluation.z, evaluation.z_index)
    assert positional.tissue is None  # the other fields keep their places
    np.save(tmp_path / "train" / "tissue.npy", expected[:, :, :4])
    with pytest.raises(PreparedDataError, match=r"tissue\.npy shape differs"):
        SliceDataset(tmp_path / "train")


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
