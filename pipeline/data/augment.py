"""Real prepared slices mixed with generated ones, for a downstream training script.

Usage::

    from pipeline.data.augment import AugmentedDataset
    data = AugmentedDataset("data/prepared/train", "synthetic", synthetic_ratio=0.3, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)

Every real slice of the split is used once; synthetic PNG slices listed in the generated
folder's ``manifest.csv`` (written by ``braingen generate``) are drawn without replacement so
that they make up ``synthetic_ratio`` of the items. They are read by
:func:`data_prep.images.read_slice`, the reader of ``sdedit``/``inpaint``: braingen's own
16-bit PNGs come back as written, in [0, 1].

Real and synthetic items carry the same labels in one format: z, every covariate of
:data:`pipeline.core.labels.KNOWN_COVARIATES` (from the prepared manifest for real slices,
from the generate manifest for synthetic ones: the value it was generated with; NaN where
unknown or unconditioned) and, when both sides have them, the tissue labels (``tissue.npy``
for real slices, the ``mask_file`` written by ``generate --masks`` for synthetic ones).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data_prep.files import file_kind
from data_prep.images import read_slice
from pipeline.core.errors import InputError
from pipeline.core.labels import KNOWN_COVARIATES, label_value
from pipeline.data.datasets import SliceDataset
from pipeline.data.manifests import MANIFEST, read_manifest
from pipeline.data.slice_files import LABEL_PNG_STEP


class AugmentedDataset(Dataset):
    """Real slices of one split plus generated slices at a given synthetic ratio.

    Items are dicts:

    * ``image``: (1, H, W) float32 intensities in [0, 1];
    * ``z``: float32 scalar tensor, slice position in [0, 1];
    * ``is_synthetic``: bool scalar tensor;
    * one float32 scalar tensor per covariate name (``age`` in years, ``sex`` 1 = M,
      0 = F, ``cdr``, ``mmse``, ...): NaN where unknown or unconditioned;
    * ``tissue``: (H, W) int64 labels 0..3 (background, CSF, GM, WM), only when
      :attr:`has_tissue`.

    Items ``0 .. n_real-1`` are the real slices in split order, the rest the drawn synthetic
    slices (shuffle with the DataLoader).

    Args:
        real: a :class:`~pipeline.data.SliceDataset` or its split folder
            (e.g. ``data/prepared/train``).
        synthetic_dir: folder written by ``braingen generate`` (``manifest.csv`` + PNGs).
        synthetic_ratio: fraction of all items that are synthetic, in [0, 1):
            ``n_synthetic = round(n_real * r / (1 - r))``.
        seed: seeds which synthetic slices are drawn.
        require_tissue: refuse (one line) unless real and synthetic slices all have tissue
            labels (a segmentation task); otherwise items simply lack ``tissue``.
        real_indices: use only these real slices (e.g. a subset of the training subjects);
            None = all. ``n_real`` in the ratio is their number.
        synthetic_count: draw exactly this many synthetic slices instead of the ratio's
            number (e.g. a synthetic-only set with ``real_indices=[]``).
        preload: read the drawn synthetic slices (and masks) once, into memory, instead of
            from their files at every access (for many epochs over a small set).
        synthetic_filter: draw only from the generated slices whose manifest row (column →
            text) it accepts, e.g. one CDR class for class rebalancing; None = all.

    Raises:
        PreparedDataError: the real split is missing or inconsistent.
        FileNotFoundError: no ``manifest.csv`` in ``synthetic_dir`` or a listed PNG is missing.
        ValueError: ratio outside [0, 1), a manifest without PNG slices or with a file name
            that is not a plain name, fewer synthetic slices than the ratio needs, or
            synthetic slices whose size differs from the real ones.
    """

    def __init__(
        self,
        real: SliceDataset | str | Path,
        synthetic_dir: str | Path,
        synthetic_ratio: float,
        seed: int = 0,
        require_tissue: bool = False,
        real_indices: Sequence[int] | None = None,
        synthetic_count: int | None = None,
        preload: bool = False,
        synthetic_filter: Callable[[Mapping[str, str]], bool] | None = None,
    ) -> None:
        if not 0.0 <= synthetic_ratio < 1.0:
            raise InputError(f"synthetic_ratio must be in [0, 1), got {synthetic_ratio}")
        self.real = real if isinstance(real, SliceDataset) else SliceDataset(real)
        self.real_indices = (
            np.arange(len(self.real))
            if real_indices is None
            else np.asarray(real_indices, dtype=np.int64)
        )
        self.synthetic_dir = Path(synthetic_dir)
        pool = [
            (path, row)
            for path, row in self._synthetic_pool()
            if synthetic_filter is None or synthetic_filter(row)
        ]
        r, n_real = synthetic_ratio, len(self.real_indices)
        n_synthetic = round(n_real * r / (1.0 - r)) if synthetic_count is None else synthetic_count
        if n_synthetic > len(pool):
            raise InputError(
                f"synthetic_ratio={r} needs {n_synthetic} synthetic slices for {n_real} "
                f"real ones, but {self.synthetic_dir} has {len(pool)}; "
                "generate more (braingen generate --per-z) or lower the ratio"
            )
        picks = np.random.default_rng(seed).choice(len(pool), n_synthetic, replace=False)
        self.synthetic = [pool[i] for i in np.sort(picks)]
        self._check_size(pool)
        self._real_labels = {
            name: np.asarray(
                [
                    label_value(name, v)
                    for v in self.real.manifest.get(name, [None] * len(self.real))
                ],
                dtype=np.float32,
            )
            for name in KNOWN_COVARIATES
        }
        synthetic_masks = all(row["mask_file"] for _, row in self.synthetic)
        #: True when every item carries ``tissue`` (real tissue.npy and synthetic masks).
        self.has_tissue = self.real.has_tissue and synthetic_masks
        if require_tissue and not self.has_tissue:
            why = (
                f"{self.real.split_dir} has no tissue.npy (the cohort has no tissue segmentations)"
                if not self.real.has_tissue
                else f"{self.synthetic_dir} has slices without masks (generate with --masks)"
            )
            raise InputError(f"tissue labels needed but {why}")
        self._cache: dict[int, dict[str, torch.Tensor]] = {}
        if preload:
            self._cache = {i: self._synthetic_item(i) for i in range(len(self.synthetic))}

    def _synthetic_pool(self) -> list[tuple[Path, dict[str, str]]]:
        """(PNG path, manifest row) of every generated slice listed in the manifest."""
        manifest = self.synthetic_dir / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{manifest} not found; write the folder with `braingen generate --out "
                f"{self.synthetic_dir}` first"
            )
        pool = []
        for row in read_manifest(manifest):
            if row["type"] != "slice" or file_kind(row["file"]) != "png":
                continue
            if Path(row["file"]).name != row["file"] or row["file"].startswith("."):
                raise InputError(f"{manifest}: file {row['file']!r} is not a plain file name")
            path = self.synthetic_dir / row["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {manifest} but missing")
            mask = row["mask_file"]
            if mask and (Path(mask).name != mask or not (self.synthetic_dir / mask).is_file()):
                raise FileNotFoundError(f"{manifest}: mask {mask!r} of {row['file']} is missing")
            pool.append((path, row))
        if not pool:
            raise InputError(f"{manifest} lists no PNG slices; generate with --format png or both")
        return pool

    def _check_size(self, pool: Sequence[tuple[Path, Mapping[str, str]]]) -> None:
        """Refuse (one line) a pool whose first slice differs in size from the real slices."""
        if not pool:
            return
        height, width = read_slice(pool[0][0]).shape
        size = self.real.image_size
        if (height, width) != (size, size):
            raise InputError(
                f"synthetic slices in {self.synthetic_dir} are {height}x{width} but the real "
                f"slices in {self.real.split_dir} are {size}x{size}; generate with a model "
                "trained on this data"
            )

    def __len__(self) -> int:
        return len(self.real_indices) + len(self.synthetic)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        n_real = len(self.real_indices)
        if index < n_real:
            index = int(self.real_indices[index])
            item = self.real[index]
            out = {"image": item["image"], "z": item["z"], "is_synthetic": torch.tensor(False)}
            out |= {n: torch.tensor(v[index]) for n, v in self._real_labels.items()}
            if self.has_tissue:
                out["tissue"] = item["tissue"]
            return out
        cached = self._cache.get(index - n_real)
        return dict(cached) if cached is not None else self._synthetic_item(index - n_real)

    def _synthetic_item(self, number: int) -> dict[str, torch.Tensor]:
        """The ``number``-th drawn synthetic slice as an item, read from its files."""
        path, row = self.synthetic[number]
        out = {
            "image": torch.from_numpy(read_slice(path)[None]),
            "z": torch.tensor(float(row["z"]), dtype=torch.float32),
            "is_synthetic": torch.tensor(True),
        }
        out |= {
            n: torch.tensor(label_value(n, row[n]), dtype=torch.float32) for n in KNOWN_COVARIATES
        }
        if self.has_tissue:
            grey = np.asarray(Image.open(self.synthetic_dir / row["mask_file"]), dtype=np.int64)
            out["tissue"] = torch.from_numpy(grey // LABEL_PNG_STEP)
        return out
