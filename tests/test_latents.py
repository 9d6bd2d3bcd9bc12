"""encode_latents: the latents layout, the scale factor, atomicity and LatentDataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support import TINY_AE_X2

from pipeline.core.config import ConditioningConfig, LDMConfig, Params
from pipeline.data.latents import LatentDataset, read_latent_meta
from pipeline.inference.encode import encode_all, encode_latents
from pipeline.inference.texture import Texture
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.codec import LatentCodec, StdCurve
from pipeline.models.files import save_model
from pipeline.training.ldm import mirrored_training_latents

CPU = torch.device("cpu")
COND = ConditioningConfig(sinusoidal_dim=8, dim=8)
SIZES = {"train": 10, "val": 4, "test": 5}


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """Prepared splits as the prepare stage writes them (16x16 slices, 4 z levels)."""
    gen = np.random.default_rng(0)
    for split, n in SIZES.items():
        folder = tmp_path / "prepared" / split
        folder.mkdir(parents=True)
        z_index = np.arange(n) % 4
        slices = gen.random((n, 1, 16, 16)) * (0.5 + z_index[:, None, None, None] / 8)
        np.save(folder / "slices.npy", slices.astype(np.float16))
        np.save(folder / "masks.npy", (slices > 0.2).astype(np.uint8))
        manifest = {"subject": [f"{split}{i // 4}" for i in range(n)], "z_index": z_index}
        pd.DataFrame({**manifest, "z": z_index / 3}).to_csv(folder / "manifest.csv", index=False)
    return tmp_path / "prepared"


def _export(path: Path, kind: str, seed: int = 0) -> Autoencoder:
    torch.manual_seed(seed)
    model = Autoencoder(TINY_AE_X2, COND, kind).eval()  # type: ignore[arg-type]
    save_model(path, f"ae_{kind}", model, TINY_AE_X2, {"data": {"image_size": 16}}, COND)
    return model


def _images(prepared: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.load(prepared / split / "slices.npy").astype(np.float32))
    z = torch.from_numpy(pd.read_csv(prepared / split / "manifest.csv")["z"].to_numpy(np.float32))
    return x, z


def test_vqvae_codes_latents_manifest_and_meta(tmp_path: Path, prepared: Path) -> None:
    model = _export(tmp_path / "ae_vqvae.pt", "vqvae")
    out = tmp_path / "latents" / "vqvae"
    meta = encode_latents(
        tmp_path / "ae_vqvae.pt", prepared, out, CPU, batch_size=3, progress=False
    )

    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["source"] == "vqvae" and meta["num_codes"] == 16
    assert meta["latent_shape"] == [3, 8, 8] and meta["splits"] == SIZES
    assert meta["texture_sigma"] >= 0 and 0 <= meta["background_floor"] <= 1  # calibrated
    assert Texture.from_meta(meta).residual is not None  # the residual texture too
    assert meta["posterior_std"] == 0.0  # the decoder sees the quantised latent itself
    assert "posterior_std_curve" not in meta
    for split, n in SIZES.items():
        assert sorted(p.name for p in (out / split).iterdir()) == [
            "codes.npy",
            "latents.npy",
            "manifest.csv",
        ]
        codes, latents = np.load(out / split / "codes.npy"), np.load(out / split / "latents.npy")
        assert codes.dtype == np.int16 and codes.shape == (n, 8, 8)
        assert latents.dtype == np.float32 and latents.shape == (n, 3, 8, 8)
        x, z = _images(prepared, split)
        with torch.no_grad():
            np.testing.assert_array_equal(codes, model.encode_to_indices(x, z).numpy())
            # the codec's stage-2 inputs: the quantised latent the decoder reads, scaled
            quantised = model.encode_to_latent(x, z).numpy() * meta["scale_factor"]
            np.testing.assert_allclose(latents, quantised, atol=1e-4)
        pd.testing.assert_frame_equal(
            pd.read_csv(out / split / "manifest.csv"),
            pd.read_csv(prepared / split / "manifest.csv"),
        )
    x, z = _images(prepared, "train")
    with torch.no_grad():
        unscaled = model.encode_to_latent(x, z).numpy()
    assert meta["scale_factor"] == pytest.approx(1 / unscaled.std(dtype=np.float64), rel=1e-5)
    train = np.load(out / "train" / "latents.npy")
    assert train.std(dtype=np.float64) == pytest.approx(1.0, rel=1e-4)


def test_latent_dataset_serves_the_stored_stage_2_inputs(tmp_path: Path, prepared: Path) -> None:
    _export(tmp_path / "ae_vqvae.pt", "vqvae")
    out = tmp_path / "latents" / "vqvae"
    encode_latents(tmp_path / "ae_vqvae.pt", prepared, out, CPU, progress=False)

    meta = read_latent_meta(out)
    data = LatentDataset(out / "train")
    raw = np.load(out / "train" / "latents.npy")
    item = data[3]
    assert set(item) == {"latent", "codes", "z", "z_index"}  # no posterior std for a VQ-VAE
    assert not (out / "train" / "latent_stds.npy").exists()
    torch.testing.assert_close(item["latent"], torch.from_numpy(raw[3]))
    assert meta["scale_factor"] > 0
    assert item["codes"].dtype == torch.int64 and item["codes"].shape == (8, 8)
    assert item["z"].dtype == torch.float32 and float(item["z"]) == pytest.approx(1.0)
    assert int(item["z_index"]) == 3
    scaled = torch.stack([data[i]["latent"] for i in range(len(data))])
    assert float(scaled.double().std(unbiased=False)) == pytest.approx(1.0, rel=1e-4)


def test_vaegan_posterior_mean_without_codes(tmp_path: Path, prepared: Path) -> None:
    model = _export(tmp_path / "ae_vaegan.pt", "vaegan")
    out = tmp_path / "latents" / "vaegan"
    meta = encode_latents(tmp_path / "ae_vaegan.pt", prepared, out, CPU, progress=False)

    assert meta["source"] == "vaegan" and "num_codes" not in meta
    assert not (out / "train" / "codes.npy").exists()
    x, z = _images(prepared, "val")
    with torch.no_grad():
        mean = model.encode_to_latent(x, z).numpy()
    np.testing.assert_allclose(
        np.load(out / "val" / "latents.npy"), mean * meta["scale_factor"], atol=1e-4
    )
    assert "codes" not in LatentDataset(out / "val")[0]
    # the posterior's std over the training slices (all of them: fewer than the limit)
    x, z = _images(prepared, "train")
    with torch.no_grad():
        _, std = model.encode_posterior(x, z)
    expected = float(std.double().pow(2).mean().sqrt()) * meta["scale_factor"]
    assert meta["posterior_std"] == pytest.approx(expected, rel=1e-4) and expected > 0
    # and every slice's own std beside its latent, in the same scaled units
    stored = np.load(out / "train" / "latent_stds.npy")
    np.testing.assert_allclose(stored, std.numpy() * meta["scale_factor"], rtol=1e-4)
    assert float(np.sqrt((stored.astype(np.float64) ** 2).mean())) == pytest.approx(
        meta["posterior_std"], rel=1e-4
    )
    # the std as a curve over |latent|: fitted on the stored training latents and stds
    curve = StdCurve.from_meta(meta["posterior_std_curve"])
    assert curve == StdCurve.fit(np.load(out / "train" / "latents.npy"), stored)
    assert len(curve.magnitude) > 1
    item = LatentDataset(out / "train")[2]
    torch.testing.assert_close(item["latent_std"], torch.from_numpy(stored[2]))
    assert (out / "val" / "latent_stds.npy").is_file()
    # the texture about the mean decodes; about posterior samples' decodes where asked
    assert meta["texture_about"] == "means"
    sampled = encode_latents(
        tmp_path / "ae_vaegan.pt",
        prepared,
        tmp_path / "sampled",
        CPU,
        progress=False,
        posterior_samples=True,
    )
    assert sampled["texture_about"] == "posterior_samples"
    assert Texture.from_meta(sampled).residual != Texture.from_meta(meta).residual
    assert sampled["scale_factor"] == meta["scale_factor"]  # the latents themselves unchanged


def test_killed_encoding_leaves_no_meta_and_no_temp_files(
    tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _export(tmp_path / "ae_vqvae.pt", "vqvae")
    out = tmp_path / "latents" / "vqvae"
    encode_latents(tmp_path / "ae_vqvae.pt", prepared, out, CPU, progress=False)

    import pipeline.inference.encode as latents

    real = latents.encode_dataset

    def dies_on_test_split(*args, **kwargs):
        if kwargs["desc"].endswith("/test"):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(latents, "encode_dataset", dies_on_test_split)
    with pytest.raises(KeyboardInterrupt):
        encode_latents(tmp_path / "ae_vqvae.pt", prepared, out, CPU, progress=False)
    assert not (out / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="encode_latents"):
        read_latent_meta(out)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_changed_autoencoder_makes_latents_stale(tmp_path: Path, prepared: Path) -> None:
    _export(tmp_path / "ae_vqvae.pt", "vqvae")
    out = tmp_path / "latents" / "vqvae"
    encode_latents(tmp_path / "ae_vqvae.pt", prepared, out, CPU, progress=False)
    _export(tmp_path / "ae_vqvae.pt", "vqvae", seed=1)
    with pytest.raises(ValueError, match="re-run encode_latents"):
        read_latent_meta(out)


def test_encode_all_uses_only_existing_autoencoders(tmp_path: Path, prepared: Path) -> None:
    params = Params(data={"prepared_dir": str(prepared)})  # type: ignore[arg-type]
    models, root = tmp_path / "models", tmp_path / "latents"
    with pytest.raises(FileNotFoundError, match="train_autoencoder"):
        encode_all(params, CPU, models_dir=models, latents_root=root, progress=False)
    _export(models / "ae_vaegan.pt", "vaegan")
    metas = encode_all(params, CPU, models_dir=models, latents_root=root, progress=False)
    assert list(metas) == ["vaegan"]
    assert metas["vaegan"]["texture_about"] == "means"  # Params() trains on posterior means
    assert (root / "vaegan" / "meta.json").is_file() and not (root / "vqvae").exists()


def test_missing_inputs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="prepare stage"):
        encode_latents(tmp_path / "ae.pt", tmp_path / "nothing", tmp_path / "out", CPU)
    with pytest.raises(FileNotFoundError, match="encode_latents"):
        LatentDataset(tmp_path / "nothing")


def test_mirrored_training_latents_encode_the_flipped_slices_with_their_own_labels(
    tmp_path: Path, prepared: Path
) -> None:
    """``ldm.mirror_slices``: each mirrored slice is encoded again (not the flipped latent),
    keeps its slice's z and labels, and carries its posterior std."""
    model = _export(tmp_path / "ae_vaegan.pt", "vaegan")
    out = tmp_path / "latents" / "vaegan"
    meta = encode_latents(tmp_path / "ae_vaegan.pt", prepared, out, CPU, progress=False)
    train = LatentDataset(out / "train")
    codec = LatentCodec(model, meta["scale_factor"])
    mirrored = mirrored_training_latents(codec, train, prepared / "train", CPU)
    assert len(mirrored) == len(train)
    x, z = _images(prepared, "train")
    with torch.no_grad():
        mean, std = codec.encode_stage_2_posterior(x.flip(-1), z)
    for i in (0, len(train) - 1):
        item, base = mirrored[i], train[i]
        assert set(item) == set(base) == {"latent", "latent_std", "z", "z_index"}
        assert item["z"] == base["z"] and item["z_index"] == base["z_index"]
        torch.testing.assert_close(item["latent"], mean[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(item["latent_std"], std[i], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(item["latent"], base["latent"].flip(-1), atol=1e-3)
    assert LDMConfig().mirror_slices is False  # files and params from before the key
