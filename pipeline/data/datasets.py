"""Datasets over the prepared slices (``prepare`` stage outputs) and a seeded loader.

A split folder holds ``slices.npy`` (float16, (N, 1, H, W) in [0, 1]), optionally
``masks.npy`` (uint8, (N, 1, H, W) brain masks in {0, 1}), optionally ``tissue.npy``
(uint8, (N, 1, H, W) tissue labels 0..3 named by :data:`TISSUE_CLASSES`, aligned pixel for
pixel with the slices; ``prepare`` writes it only when every case has a tissue
segmentation), and ``manifest.csv`` (row i describes item i). The arrays are memory-mapped
and opened lazily in each process, so DataLoader workers share the page cache instead of
copying the data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.core.errors import InputError

logger = logging.getLogger(__name__)

EVAL_BATCH = 64
"""Slices per forward when a whole split is evaluated."""

TISSUE_CLASSES: tuple[str, ...] = ("background", "CSF", "GM", "WM")
"""Names of the tissue labels 0..3 of ``tissue.npy`` (FSL FAST order)."""


class PreparedDataError(InputError):
    """A prepared split is missing or inconsistent; the message names the file and the fix."""


def empty_split_message(split_dir: Path | None) -> str:
    """One line for a stage given a split without slices: which split, and the fix."""
    where = f"{split_dir}: the {split_dir.name!r} split" if split_dir else "the split"
    return (
        f"{where} has no slices; every stage needs slices in train, val and test: add "
        "subjects (or the PNG release's folder) and re-run prepare (`dvc repro prepare`)"
    )


class SliceDataset(Dataset):
    """Axial slices of one split with their z position.

    Items are dicts:

    * ``image``: (1, H, W) float32 intensities in [0, 1];
    * ``z``: float32 scalar tensor, z = z_index / (K - 1) in [0, 1];
    * ``z_index``: int64 scalar tensor, slice index 0..K-1 (bottom to top of the brain);
    * ``mask``: (1, H, W) float32 brain mask in {0, 1}, only if ``masks.npy`` exists;
    * ``tissue``: (H, W) int64 tissue labels in 0..3 (:data:`TISSUE_CLASSES`: background,
      CSF, GM, WM), only if ``tissue.npy`` exists (:attr:`has_tissue`).

    Args:
        split_dir: e.g. ``data/prepared/train``.

    Raises:
        PreparedDataError: ``slices.npy`` or ``manifest.csv`` is missing, the manifest lacks
            ``z``/``z_index``, the lengths (or the masks' or tissue labels' shape) disagree,
            or the split has no slices (every stage needs train, val and test).
    """

    def __init__(self, split_dir: str | Path) -> None:
        self.split_dir = Path(split_dir)
        self._slices_path = self.split_dir / "slices.npy"
        self._masks_path = self.split_dir / "masks.npy"
        self._tissue_path = self.split_dir / "tissue.npy"
        manifest_path = self.split_dir / "manifest.csv"
        for path in (self._slices_path, manifest_path):
            if not path.is_file():
                raise PreparedDataError(
                    f"{path} not found; run the prepare stage first (`dvc repro prepare`)"
                )
        self.manifest = pd.read_csv(manifest_path, keep_default_na=False, na_values=[""])
        missing = {"z", "z_index"} - set(self.manifest.columns)
        if missing:
            raise PreparedDataError(
                f"{manifest_path} lacks columns {sorted(missing)}; re-run the prepare stage"
            )
        self.has_masks = self._masks_path.is_file()
        self.has_tissue = self._tissue_path.is_file()
        slices = np.load(self._slices_path, mmap_mode="r")
        if slices.ndim != 4 or slices.shape[1] != 1 or len(slices) != len(self.manifest):
            raise PreparedDataError(
                f"{self._slices_path} has shape {slices.shape} but {manifest_path} has "
                f"{len(self.manifest)} rows; expected (N, 1, H, W) with N = rows. "
                "Re-run the prepare stage."
            )
        for present, path in (
            (self.has_masks, self._masks_path),
            (self.has_tissue, self._tissue_path),
        ):
            if present and np.load(path, mmap_mode="r").shape != slices.shape:
                raise PreparedDataError(
                    f"{path} shape differs from {self._slices_path} {slices.shape}; "
                    "re-run the prepare stage"
                )
        if len(slices) == 0:
            raise PreparedDataError(empty_split_message(self.split_dir))
        self.image_size = int(slices.shape[-1])
        self.z = self.manifest["z"].to_numpy(dtype=np.float32)
        self.z_index = self.manifest["z_index"].to_numpy(dtype=np.int64)
        self._slices: np.ndarray | None = None
        self._masks: np.ndarray | None = None
        self._tissue: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.manifest)

    def __getstate__(self) -> dict[str, object]:
        # Memory maps are reopened in each worker rather than pickled (which copies them).
        return {**self.__dict__, "_slices": None, "_masks": None, "_tissue": None}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._slices is None:
            self._slices = np.load(self._slices_path, mmap_mode="r")
            if self.has_masks:
                self._masks = np.load(self._masks_path, mmap_mode="r")
            if self.has_tissue:
                self._tissue = np.load(self._tissue_path, mmap_mode="r")
        item = {
            "image": torch.from_numpy(np.asarray(self._slices[index], dtype=np.float32)),
            "z": torch.tensor(self.z[index]),
            "z_index": torch.tensor(self.z_index[index]),
        }
        if self._masks is not None:
            item["mask"] = torch.from_numpy(np.asarray(self._masks[index], dtype=np.float32))
        if self._tissue is not None:
            item["tissue"] = torch.from_numpy(np.asarray(self._tissue[index, 0], dtype=np.int64))
        return item


@dataclass
class EvalData:
    """A whole split held in memory for evaluation.

    Attributes:
        image: (N, 1, H, W) intensities in [0, 1].
        mask: (N, 1, H, W) brain masks (1 inside).
        z: (N,) positions in [0, 1].
        z_index: (N,) int64 slice indices.
        tissue: (N, H, W) int64 tissue labels in 0..3 (:data:`TISSUE_CLASSES`), or None when
            the split has no ``tissue.npy``.
    """

    image: torch.Tensor
    mask: torch.Tensor
    z: torch.Tensor
    z_index: torch.Tensor
    tissue: torch.Tensor | None = None

    @classmethod
    def from_dataset(cls, dataset: Dataset) -> EvalData:
        """Collect every item of a :class:`~pipeline.data.SliceDataset`-like dataset.

        Items without a ``mask`` use the non-zero foreground of the (skull-stripped) image;
        ``tissue`` is filled only when every item has one.

        Raises:
            PreparedDataError: the dataset is empty.
        """
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise PreparedDataError(empty_split_message(getattr(dataset, "split_dir", None)))
        batches = list(DataLoader(dataset, batch_size=EVAL_BATCH, shuffle=False))
        if "mask" not in batches[0]:
            logger.warning("split has no brain masks; ssim_brain uses the non-zero foreground")
            for batch in batches:
                batch["mask"] = (batch["image"] > 0).float()
        keys = ("image", "mask", "z", "z_index")
        tissue = (
            torch.cat([batch["tissue"] for batch in batches])
            if all("tissue" in batch for batch in batches)
            else None
        )
        return cls(**{k: torch.cat([batch[k] for batch in batches]) for k in keys}, tissue=tissue)

    def spread_over_z(self, n: int) -> torch.Tensor:
        """Indices of samples spread evenly over the sorted z values.

        Args:
            n: number of samples wanted (fewer if the split is smaller).

        Returns:
            (n,) int64 indices in increasing z order.
        """
        order = torch.argsort(self.z, stable=True)
        picks = torch.linspace(0, len(order) - 1, min(n, len(order))).round().long()
        return order[picks]
