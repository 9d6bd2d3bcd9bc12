"""Latents and code grids of the prepared slices (the ``encode_latents`` stage's library).

A trained first stage (in eval mode, under ``torch.no_grad``) encodes every prepared split.
Layout under ``data/latents/<source>/`` (``source`` is the autoencoder kind)::

    {train,val,test}/latents.npy   float32 (N, C, h, w), UNscaled: the VAE-GAN's posterior
                                   mean, or the VQ-VAE's continuous pre-quantisation latent
    {train,val,test}/codes.npy     int16 (N, h, w) VQ code indices (vqvae only)
    {train,val,test}/manifest.csv  the prepared manifest (z, z_index, subject, ...), row i ↔ item i
    meta.json                      {"source", "autoencoder", "autoencoder_sha256",
                                    "scale_factor", "latent_shape", "num_codes" (vqvae),
                                    "splits": {split: N}}

``scale_factor`` is 1 / std of the training split's latents (Rombach et al. 2022); models
trained on the latents multiply by it and store it in their checkpoints. Every file is
written to a temporary name and renamed; ``meta.json`` is removed first and written last,
so its presence means a complete, consistent set.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline.config import Params
from pipeline.data import SliceDataset
from pipeline.first_stage import load_autoencoder
from pipeline.io import atomic_write, write_json
from pipeline.models.autoencoder import Autoencoder
from pipeline.sampling import file_sha256

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: Slices per encoder batch.
ENCODE_BATCH = 64


@torch.no_grad()
def encode_dataset(
    model: Autoencoder,
    dataset: Dataset,
    device: torch.device,
    *,
    batch_size: int = ENCODE_BATCH,
    progress: bool = True,
    desc: str = "encode",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Encode every slice of a dataset, in order.

    Args:
        model: first stage in eval mode.
        dataset: items with ``image`` (1, H, W) intensities in [0, 1] and ``z`` in [0, 1].
        device: where the model runs.
        batch_size: slices per batch.
        progress: show a progress bar.
        desc: progress bar label.

    Returns:
        ``(latents, codes)``: float32 (N, C, h, w) unscaled latents (posterior mean for
        ``vaegan``, pre-quantisation latent for ``vqvae``) and, for ``vqvae``, int16
        (N, h, w) code indices (else None).
    """
    latents: list[torch.Tensor] = []
    codes: list[torch.Tensor] = []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc=desc, disable=not progress):
        x, z = batch["image"].to(device).float(), batch["z"].to(device).float()
        if model.kind == "vqvae":
            latents.append(model.pre_quant(x, z).float().cpu())
            codes.append(model.encode_to_indices(x, z).cpu())
        else:
            latents.append(model.encode_to_latent(x, z).float().cpu())
    lat = torch.cat(latents).numpy()
    return lat, torch.cat(codes).numpy().astype(np.int16) if codes else None


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: np.save(tmp, array))


def encode_latents(
    autoencoder_path: str | Path,
    prepared_dir: str | Path,
    out_dir: str | Path,
    device: torch.device,
    *,
    batch_size: int = ENCODE_BATCH,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode all prepared splits with one autoencoder and write the latents layout.

    Args:
        autoencoder_path: ``models/ae_vqvae.pt`` or ``models/ae_vaegan.pt``.
        prepared_dir: ``data/prepared`` (split folders with slices.npy and manifest.csv).
        out_dir: ``data/latents/<kind>``.
        device: where the autoencoder runs.
        batch_size: slices per encoder batch.
        progress: show progress bars.

    Returns:
        The meta dict written to ``out_dir/meta.json``.

    Raises:
        FileNotFoundError: no ``train`` split in ``prepared_dir``.
        CheckpointError: the autoencoder file is missing or unreadable.
        ValueError: the training latents are constant (no scale factor can be computed).
    """
    prepared, out = Path(prepared_dir), Path(out_dir)
    if not (prepared / "train" / "manifest.csv").is_file():
        raise FileNotFoundError(
            f"{prepared / 'train'} has no prepared slices; run the prepare stage first"
        )
    model, _ = load_autoencoder(autoencoder_path, device)
    sha256 = file_sha256(autoencoder_path)
    (out / "meta.json").unlink(missing_ok=True)
    counts: dict[str, int] = {}
    std, latent_shape = 0.0, list[int]()
    for split in SPLITS:  # train first: its latents give the scale factor
        src = prepared / split
        if not (src / "manifest.csv").is_file():
            logger.warning("no prepared split %s; %s not written", src, out / split)
            shutil.rmtree(out / split, ignore_errors=True)
            continue
        latents, codes = encode_dataset(
            model,
            SliceDataset(src),
            device,
            batch_size=batch_size,
            progress=progress,
            desc=f"{model.kind}/{split}",
        )
        _save_npy(out / split / "latents.npy", latents)
        if codes is not None:
            _save_npy(out / split / "codes.npy", codes)
        atomic_write(
            out / split / "manifest.csv",
            lambda tmp, src=src: shutil.copyfile(src / "manifest.csv", tmp),
        )
        counts[split] = len(latents)
        if split == "train":
            std, latent_shape = float(np.std(latents, dtype=np.float64)), list(latents.shape[1:])
    if not std > 0:
        raise ValueError(
            f"the {model.kind} latents of {prepared / 'train'} are constant (std {std}); "
            f"the autoencoder {autoencoder_path} is broken, retrain it"
        )
    meta: dict[str, Any] = {
        "source": model.kind,
        "autoencoder": str(autoencoder_path),
        "autoencoder_sha256": sha256,
        "scale_factor": 1.0 / std,
        "latent_shape": latent_shape,
        "splits": counts,
    }
    if model.quantizer is not None:
        meta["num_codes"] = int(model.quantizer.codebook.shape[0])
    write_json(out / "meta.json", meta)
    logger.info(
        "%s latents %s -> %s (scale factor %.4g)", model.kind, counts, out, meta["scale_factor"]
    )
    return meta


def read_latent_meta(latents_dir: str | Path) -> dict[str, Any]:
    """``meta.json`` of encoded latents, checked against the autoencoder file it names.

    Args:
        latents_dir: ``data/latents/<source>``.

    Returns:
        The meta dict (see the module docstring).

    Raises:
        FileNotFoundError: no ``meta.json`` (encode_latents has not run or was killed).
        ValueError: the autoencoder file changed since the latents were encoded.
    """
    meta_path = Path(latents_dir) / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found; run the encode_latents stage first (dvc repro encode_latents)"
        )
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    ae_path = Path(meta["autoencoder"])
    if ae_path.is_file() and file_sha256(ae_path) != meta.get("autoencoder_sha256"):
        raise ValueError(
            f"{ae_path} changed after the latents in {latents_dir} were encoded; "
            f"re-run encode_latents (dvc repro)"
        )
    return meta


class LatentDataset(Dataset):
    """One split of encoded latents (and code grids for the VQ-VAE).

    Items are dicts: ``latent`` (C, h, w) float32 multiplied by ``scale_factor``, ``codes``
    (h, w) int64 (only if the split has ``codes.npy``), ``z`` float32 scalar in [0, 1] and
    ``z_index`` int64.

    Args:
        split_dir: ``data/latents/<source>/<split>``.
        scale_factor: multiplies every latent (``meta.json``'s ``scale_factor`` for models
            that work in the scaled space; 1.0 returns the stored latents).

    Raises:
        FileNotFoundError: the folder lacks ``latents.npy`` or ``manifest.csv``.
        ValueError: the arrays and the manifest disagree in length.
    """

    def __init__(self, split_dir: str | Path, scale_factor: float = 1.0) -> None:
        self.split_dir = Path(split_dir)
        for name in ("latents.npy", "manifest.csv"):
            if not (self.split_dir / name).is_file():
                raise FileNotFoundError(
                    f"{self.split_dir / name} not found; run the encode_latents stage first"
                )
        self.scale_factor = float(scale_factor)
        self.latents = np.load(self.split_dir / "latents.npy", mmap_mode="r")
        codes_path = self.split_dir / "codes.npy"
        self.codes = np.load(codes_path, mmap_mode="r") if codes_path.is_file() else None
        manifest = pd.read_csv(self.split_dir / "manifest.csv")
        self.z = manifest["z"].to_numpy(np.float32)
        self.z_index = manifest["z_index"].to_numpy(np.int64)
        lengths = {len(self.latents), len(self.z)} | (
            {len(self.codes)} if self.codes is not None else set()
        )
        if len(lengths) != 1:
            raise ValueError(
                f"{self.split_dir}: latents.npy, codes.npy and manifest.csv disagree in length "
                f"({sorted(lengths)}); re-run the encode_latents stage"
            )

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {
            "latent": torch.from_numpy(np.array(self.latents[i], dtype=np.float32))
            * self.scale_factor,
            "z": torch.tensor(self.z[i]),
            "z_index": torch.tensor(self.z_index[i]),
        }
        if self.codes is not None:
            item["codes"] = torch.from_numpy(self.codes[i].astype(np.int64))
        return item


def encode_all(
    params: Params,
    device: torch.device,
    *,
    models_dir: str | Path = "models",
    latents_root: str | Path = "data/latents",
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Encode with every kind in ``params.autoencoder.kinds`` whose model file exists.

    Args:
        params: all parameters (``autoencoder.kinds``, ``data.prepared_dir``).
        device: where the autoencoders run.
        models_dir: folder with ``ae_<kind>.pt``.
        latents_root: output root; each kind goes to ``<latents_root>/<kind>``.
        progress: show progress bars.

    Returns:
        The meta dict of each encoded kind.

    Raises:
        FileNotFoundError: none of the configured autoencoder files exists.
    """
    metas: dict[str, dict[str, Any]] = {}
    for kind in params.autoencoder.kinds:
        path = Path(models_dir) / f"ae_{kind}.pt"
        if not path.is_file():
            logger.warning("%s not found; no %s latents are written", path, kind)
            continue
        metas[kind] = encode_latents(
            path, params.data.prepared_dir, Path(latents_root) / kind, device, progress=progress
        )
    if not metas:
        missing = ", ".join(f"{models_dir}/ae_{k}.pt" for k in params.autoencoder.kinds)
        raise FileNotFoundError(
            f"no autoencoder to encode with ({missing} missing); "
            f"run the train_autoencoder stage first"
        )
    return metas
