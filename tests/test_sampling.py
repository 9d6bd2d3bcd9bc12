"""The one sampling entry point (ldm and pixelcnn files) and the train_ldm stage function."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support import RecordingRun, stage_kwargs

from pipeline.core.checkpoint import CheckpointError
from pipeline.core.config import (
    AutoencoderConfig,
    ConditioningConfig,
    KLConfig,
    LDMConfig,
    Params,
    PrepareConfig,
    PriorConfig,
    TrainConfig,
    VQConfig,
)
from pipeline.core.identity import file_sha256
from pipeline.core.stage import StagePaths
from pipeline.inference.diffusion import build_scheduler, scheduler_config
from pipeline.inference.sampling import StaleModelError, load_generator, sample
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.files import save_model
from pipeline.models.pixelcnn import GatedPixelCNN
from pipeline.models.unet import ZConditionedUNet
from pipeline.training.ldm import train_ldm

COND = ConditioningConfig(sinusoidal_dim=16, dim=16)
AE = AutoencoderConfig(
    channels=(8, 16, 16),
    norm_groups=4,
    vq=VQConfig(num_codes=16, code_dim=3),
    kl=KLConfig(latent_channels=3),
)
LDM = LDMConfig(
    channels=(16, 32),
    attention_levels=(False, True),
    num_head_channels=8,
    norm_groups=8,
    sample_steps=2,
    grid_levels=2,
    grid_samples=2,
    train=TrainConfig(steps=4, batch_size=4, warmup_steps=0, ckpt_every=2, eval_every=4),
)
SHAPE = (3, 8, 8)  # 32x32 slices, factor 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny nets: one thread is fastest, and avoids spinning against other jobs' cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _autoencoder(path: Path, kind: str, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = Autoencoder(AE, COND, kind)  # type: ignore[arg-type]
    save_model(path, f"ae_{kind}", model, AE, {"data": {"image_size": 32, "n_slices": 4}}, COND)
    return path


def _ldm_file(tmp_path: Path, scale: float = 0.37) -> Path:
    ae = _autoencoder(tmp_path / "ae_vaegan.pt", "vaegan")
    torch.manual_seed(0)
    meta = {
        "autoencoder": str(ae),
        "autoencoder_sha256": file_sha256(ae),
        "scale_factor": scale,
        "latent_shape": list(SHAPE),
        "scheduler": scheduler_config(LDM),
    }
    save_model(tmp_path / "ldm.pt", "ldm", ZConditionedUNet(LDM, COND, SHAPE[0]), LDM, meta, COND)
    return tmp_path / "ldm.pt"


def test_ldm_file_round_trip_keeps_scale_factor_and_schedule(tmp_path) -> None:
    gen = load_generator(_ldm_file(tmp_path, scale=0.37))
    assert gen.kind == "ldm" and gen.codec.scale_factor == pytest.approx(0.37)
    assert gen.latent_shape == SHAPE
    assert not build_scheduler(gen.schedule, "ddim").clip_sample
    assert gen.metadata["scheduler"]["beta_start"] == LDM.beta_start
    assert not gen.network.training


def test_ldm_sample_shapes_range_z_and_determinism(tmp_path) -> None:
    gen = load_generator(_ldm_file(tmp_path))
    images, z = sample(gen, [0.25, 0.5], n_per_z=3, seed=7)
    assert images.shape == (6, 1, 32, 32)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    torch.testing.assert_close(z, torch.tensor([0.25] * 3 + [0.5] * 3))
    again, _ = sample(gen, [0.25, 0.5], n_per_z=3, seed=7)
    torch.testing.assert_close(images, again, atol=0, rtol=0)
    other, _ = sample(gen, [0.25, 0.5], n_per_z=3, seed=8, steps=3, guidance=1.0)
    assert not torch.equal(images, other)
    fractional, _ = sample(gen, 0.4375, n_per_z=1, seed=0)  # between slice levels
    assert fractional.shape == (1, 1, 32, 32)


def test_sample_rejects_bad_arguments(tmp_path) -> None:
    gen = load_generator(_ldm_file(tmp_path))
    with pytest.raises(ValueError, match=r"z must lie in \[0, 1\]"):
        sample(gen, [0.5, 1.2], n_per_z=1, seed=0)
    with pytest.raises(ValueError, match="n_per_z"):
        sample(gen, 0.5, n_per_z=0, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        sample(gen, 0.5, n_per_z=1, seed=0, temperature=0.8)
    with pytest.raises(ValueError, match="guidance"):
        sample(gen, 0.5, n_per_z=1, seed=0, guidance=-1.0)


def test_load_generator_refuses_other_files_and_changed_autoencoder(tmp_path) -> None:
    path = _ldm_file(tmp_path)
    with pytest.raises(CheckpointError, match="not a generator file"):
        load_generator(tmp_path / "ae_vaegan.pt")
    _autoencoder(tmp_path / "ae_vaegan.pt", "vaegan", seed=1)  # retrained since
    with pytest.raises(StaleModelError, match="changed"):
        load_generator(path)


def test_pixelcnn_file_samples_through_the_same_entry_point(tmp_path) -> None:
    ae = _autoencoder(tmp_path / "ae_vqvae.pt", "vqvae")
    prior_cfg = PriorConfig(channels=8, n_layers=2, kernel_size=3, temperature=0.9)
    torch.manual_seed(0)
    meta = {
        "autoencoder": str(ae),
        "autoencoder_sha256": file_sha256(ae),
        "num_codes": 16,
        "code_shape": [8, 8],
    }
    prior = GatedPixelCNN(16, prior_cfg, COND)
    save_model(tmp_path / "pixelcnn.pt", "pixelcnn", prior, prior_cfg, meta, COND)
    gen = load_generator(tmp_path / "pixelcnn.pt")
    assert gen.kind == "pixelcnn" and gen.latent_shape == (8, 8)
    images, z = sample(gen, [0.0, 1.0], n_per_z=2, seed=3, top_k=4)
    assert images.shape == (4, 1, 32, 32) and z.tolist() == [0.0, 0.0, 1.0, 1.0]
    again, _ = sample(gen, [0.0, 1.0], n_per_z=2, seed=3, top_k=4)
    torch.testing.assert_close(images, again, atol=0, rtol=0)
    with pytest.raises(ValueError, match="steps"):
        sample(gen, 0.5, n_per_z=1, seed=0, steps=10)


def _latents(root: Path, ae: Path, scale: float) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        (root / split).mkdir(parents=True)
        z_index = np.arange(n) % 4
        np.save(root / split / "latents.npy", rng.normal(0, 1, (n, *SHAPE)).astype("f4"))
        pd.DataFrame({"z_index": z_index, "z": z_index / 3, "subject": "s"}).to_csv(
            root / split / "manifest.csv", index=False
        )
    meta = {
        "source": "vaegan",
        "autoencoder": str(ae),
        "autoencoder_sha256": file_sha256(ae),
        "scale_factor": scale,
        "latent_shape": list(SHAPE),
    }
    (root / "meta.json").write_text(json.dumps(meta))


def test_train_ldm_writes_model_report_and_grid(tmp_path) -> None:
    ae = _autoencoder(tmp_path / "models" / "ae_vaegan.pt", "vaegan")
    paths = StagePaths.standard("ldm", "ldm", "ldm_samples.png", "vaegan", tmp_path)
    _latents(paths.latents, ae, scale=0.5)
    params = Params(conditioning=COND, ldm=LDM, prepare=PrepareConfig(n_slices=4))
    run = RecordingRun("ldm")
    report = train_ldm(params, **stage_kwargs(paths, run))
    assert report["steps"] == 4 and report["sampling"]["slices_per_s"] > 0
    assert json.loads(paths.report.read_text())["final_loss"] == pytest.approx(report["final_loss"])
    assert paths.grid.is_file() and "ldm.pt" in run.artifacts
    assert load_generator(paths.model).codec.scale_factor == pytest.approx(0.5)
    assert not (paths.resume_dir / "last.pt").exists()


def test_train_ldm_rerun_after_kill_before_export_still_writes_everything(
    tmp_path, monkeypatch
) -> None:
    import pipeline.training.ldm as ldm_task

    ae = _autoencoder(tmp_path / "models" / "ae_vaegan.pt", "vaegan")
    paths = StagePaths.standard("ldm", "ldm", "ldm_samples.png", "vaegan", tmp_path)
    _latents(paths.latents, ae, scale=0.5)
    params = Params(conditioning=COND, ldm=LDM, prepare=PrepareConfig(n_slices=4))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ldm_task, "save_model", killed)
        with pytest.raises(KeyboardInterrupt):
            train_ldm(params, **stage_kwargs(paths))
    report = train_ldm(params, **stage_kwargs(paths))
    assert report["steps"] == 4 and report["val_loss"] is not None
    assert paths.grid.is_file() and paths.model.is_file()
