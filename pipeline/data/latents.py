"""Encoded latents and code grids of the prepared slices, as written by ``encode_latents``.

Layout under ``data/latents/<source>/`` (``source`` is the autoencoder kind)::

    {train,val,test}/latents.npy   float32 (N, C, h, w): the stage-2 inputs of
                                   :class:`pipeline.models.codec.LatentCodec`, i.e. the
                                   first stage's latent times ``scale_factor``
    {train,val,test}/latent_stds.npy float32 (N, C, h, w): the VAE-GAN posterior's std in the
                                   same scaled units (vaegan only), so latent + std * noise is
                                   a posterior sample
    {train,val,test}/codes.npy     int16 (N, h, w) VQ code indices (vqvae only)
    {train,val,test}/manifest.csv  the prepared manifest (z, z_index, subject, ...), row i ↔ item i
    meta.json                      {"source", "autoencoder", "autoencoder_sha256",
                                    "scale_factor", "latent_shape", "texture_sigma",
                                    "background_floor", "texture_residual" (Residual.as_meta:
                                    the texture model of what the first stage misses),
                                    "texture_about" ("posterior_samples" or "means": the
                                    reconstructions it was measured on),
                                    "posterior_std" (the RMS of the
                                    stds, 0 for vqvae), "posterior_std_curve" (vaegan:
                                    the RMS std over bins of |latent|, StdCurve.as_meta),
                                    "num_codes" (vqvae),
                                    "splits": {split: N}}

``meta.json`` is removed first and written last by the encoder, so its presence means a
complete, consistent set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pipeline.core.errors import InputError
from pipeline.core.identity import file_sha256
from pipeline.core.labels import Schema, covariate_codes, covariate_reference, covariate_schema

SPLITS = ("train", "val", "test")


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
        raise InputError(
            f"{ae_path} changed after the latents in {latents_dir} were encoded; "
            f"re-run encode_latents (dvc repro)"
        )
    return meta


def latents_identity(latents_dir: str | Path) -> dict[str, Any]:
    """What a second stage's run depends on in the latents it trains on (part of its
    :func:`~pipeline.core.identity.stage_identity`): the autoencoder's sha256 and the scale
    factor, so a run killed before its latents were re-encoded never resumes onto new ones.

    Raises:
        FileNotFoundError: no ``meta.json`` (run ``encode_latents`` first).
    """
    meta = read_latent_meta(latents_dir)
    return {"autoencoder_sha256": meta["autoencoder_sha256"], "scale_factor": meta["scale_factor"]}


def training_covariates(
    split_dir: str | Path, names: tuple[str, ...]
) -> tuple[Schema, list[dict[str, Any]]]:
    """What a second stage conditions on, from the manifest of its training split: the
    covariate schema of ``names`` (ranges and categories of the training subjects) and the
    subjects' covariates (:func:`~pipeline.core.labels.covariate_reference`), both stored in
    its model file.

    Raises:
        InputError: a named covariate is unknown or has no value in the training split.
    """
    if not names:
        return (), []
    manifest = pd.read_csv(Path(split_dir) / "manifest.csv", keep_default_na=False, na_values=[""])
    schema = covariate_schema(manifest, names)
    return schema, covariate_reference(manifest, schema)


class LatentDataset(Dataset):
    """One split of encoded latents (and code grids for the VQ-VAE).

    Items are dicts: ``latent`` (C, h, w) float32, the stage-2 input as stored (already
    multiplied by the codec's scale factor), ``latent_std`` (C, h, w) float32, its posterior's
    std (only if the split has ``latent_stds.npy``), ``codes`` (h, w) int64 (only if the
    split has ``codes.npy``), ``z`` float32 scalar in [0, 1], ``z_index`` int64 and, with a
    non-empty schema, ``covariates`` (len(schema),) float32 codes (0 where unknown) with
    ``covariates_known`` (len(schema),) bool
    (:func:`pipeline.models.conditioning.batch_covariates` turns them back into NaN codes).

    Args:
        split_dir: ``data/latents/<source>/<split>``.
        schema: covariates to read from the manifest
            (:func:`~pipeline.core.labels.covariate_codes`).

    Raises:
        FileNotFoundError: the folder lacks ``latents.npy`` or ``manifest.csv``.
        ValueError: the arrays and the manifest disagree in length.
    """

    def __init__(self, split_dir: str | Path, schema: Schema = ()) -> None:
        self.split_dir = Path(split_dir)
        for name in ("latents.npy", "manifest.csv"):
            if not (self.split_dir / name).is_file():
                raise FileNotFoundError(
                    f"{self.split_dir / name} not found; run the encode_latents stage first"
                )
        self.latents = np.load(self.split_dir / "latents.npy", mmap_mode="r")
        stds_path = self.split_dir / "latent_stds.npy"
        self.stds = np.load(stds_path, mmap_mode="r") if stds_path.is_file() else None
        codes_path = self.split_dir / "codes.npy"
        self.codes = np.load(codes_path, mmap_mode="r") if codes_path.is_file() else None
        self.manifest = pd.read_csv(
            self.split_dir / "manifest.csv", keep_default_na=False, na_values=[""]
        )
        manifest = self.manifest
        self.z = manifest["z"].to_numpy(np.float32)
        self.covariates = covariate_codes(manifest, schema) if schema else None
        self.z_index = manifest["z_index"].to_numpy(np.int64)
        lengths = {len(self.latents), len(self.z)} | {
            len(a) for a in (self.stds, self.codes) if a is not None
        }
        if len(lengths) != 1:
            raise InputError(
                f"{self.split_dir}: latents.npy, latent_stds.npy, codes.npy and manifest.csv "
                f"disagree in length ({sorted(lengths)}); re-run the encode_latents stage"
            )

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {
            "latent": torch.from_numpy(np.array(self.latents[i], dtype=np.float32)),
            "z": torch.tensor(self.z[i]),
            "z_index": torch.tensor(self.z_index[i]),
        }
        if self.stds is not None:
            item["latent_std"] = torch.from_numpy(np.array(self.stds[i], dtype=np.float32))
        if self.codes is not None:
            item["codes"] = torch.from_numpy(self.codes[i].astype(np.int64))
        if self.covariates is not None:
            codes = torch.from_numpy(self.covariates[i])
            # NaN-free for the training loop's finite-batch guard; the mask says what is known
            item["covariates"] = torch.nan_to_num(codes)
            item["covariates_known"] = ~torch.isnan(codes)
        return item
