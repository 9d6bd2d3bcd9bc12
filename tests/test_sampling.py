"""The one sampling entry point (ldm and pixelcnn files) and the train_ldm stage function."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support import (
    TINY_COND,
    TINY_LATENT_SHAPE,
    TINY_PRIOR,
    RecordingRun,
    save_tiny_autoencoder,
    save_tiny_ldm,
    save_tiny_pixelcnn,
    stage_kwargs,
    tiny_ldm,
)

from pipeline.core.checkpoint import CheckpointError
from pipeline.core.config import Params, PrepareConfig, TrainConfig
from pipeline.core.errors import InputError
from pipeline.core.identity import file_sha256
from pipeline.core.stage import StagePaths
from pipeline.inference.diffusion import build_scheduler
from pipeline.inference.sampling import (
    REFERENCE_DDIM_STEPS,
    StaleModelError,
    load_generator,
    sample,
)
from pipeline.models.codec import StdCurve
from pipeline.training.ldm import decode_std_curve, train_ldm

LDM = tiny_ldm(
    grid_levels=2,
    grid_samples=2,
    train=TrainConfig(steps=4, batch_size=4, warmup_steps=0, ckpt_every=2, eval_every=4),
)
SHAPE = TINY_LATENT_SHAPE  # 32x32 slices, factor 4

pytestmark = pytest.mark.usefixtures("one_thread")


def _ldm_file(tmp_path: Path, scale: float = 0.37) -> Path:
    ae = save_tiny_autoencoder(tmp_path / "ae_vaegan.pt", "vaegan")
    return save_tiny_ldm(tmp_path / "ldm.pt", ae, scale_factor=scale, config=LDM)


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
    save_tiny_autoencoder(tmp_path / "ae_vaegan.pt", "vaegan", seed=1)  # retrained since
    with pytest.raises(StaleModelError, match="changed"):
        load_generator(path)


def test_pixelcnn_file_samples_through_the_same_entry_point(tmp_path) -> None:
    ae = save_tiny_autoencoder(tmp_path / "ae_vqvae.pt", "vqvae")
    prior_cfg = TINY_PRIOR.model_copy(update={"temperature": 0.9})
    save_tiny_pixelcnn(tmp_path / "pixelcnn.pt", ae, config=prior_cfg)
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


def _ldm_stage(tmp_path: Path) -> tuple[Params, StagePaths]:
    """Params and paths of a train_ldm run on random latents of an untrained KL autoencoder."""
    ae = save_tiny_autoencoder(tmp_path / "models" / "ae_vaegan.pt", "vaegan")
    paths = StagePaths.standard("ldm", "ldm", "ldm_samples.png", "vaegan", tmp_path)
    _latents(paths.latents, ae, scale=0.5)
    return Params(conditioning=TINY_COND, ldm=LDM, prepare=PrepareConfig(n_slices=4)), paths


def test_train_ldm_writes_model_report_and_grid(tmp_path) -> None:
    params, paths = _ldm_stage(tmp_path)
    run = RecordingRun("ldm")
    report = train_ldm(params, **stage_kwargs(paths, run))
    assert report["steps"] == 4 and report["sampling"]["slices_per_s"] > 0
    assert json.loads(paths.report.read_text())["final_loss"] == pytest.approx(report["final_loss"])
    assert paths.grid.is_file()
    assert not any(a.startswith("model/") for a in run.artifacts)  # stored once: a logged model
    assert run.dicts["reports/ldm.json"] == report
    assert load_generator(paths.model).codec.scale_factor == pytest.approx(0.5)
    assert not (paths.resume_dir / "last.pt").exists()


def test_train_ldm_rerun_after_kill_before_export_still_writes_everything(
    tmp_path, monkeypatch
) -> None:
    import pipeline.training.ldm as ldm_task

    params, paths = _ldm_stage(tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ldm_task, "save_model", killed)
        with pytest.raises(KeyboardInterrupt):
            train_ldm(params, **stage_kwargs(paths))
    report = train_ldm(params, **stage_kwargs(paths))
    assert report["steps"] == 4 and math.isfinite(report["val_loss"])
    assert paths.grid.is_file() and paths.model.is_file()


def test_train_ldm_on_posterior_samples_needs_the_stds_and_scales_the_decode_noise(
    tmp_path,
) -> None:
    params, paths = _ldm_stage(tmp_path)
    meta = json.loads((paths.latents / "meta.json").read_text())
    (paths.latents / "meta.json").write_text(json.dumps(meta | {"posterior_std": 0.5}))
    on_samples = LDM.model_copy(
        update={
            "posterior_samples": True,
            "decode_posterior_std": 0.6,
            "decode_noise": "isotropic",
        }
    )
    params = params.model_copy(update={"ldm": on_samples})
    with pytest.raises(ValueError, match=r"latent_stds\.npy"):
        train_ldm(params, **stage_kwargs(paths))
    for split, n in (("train", 12), ("val", 4)):
        np.save(paths.latents / split / "latent_stds.npy", np.full((n, *SHAPE), 0.3, "f4"))
    train_ldm(params, **stage_kwargs(paths))
    gen = load_generator(paths.model)
    assert gen.codec.posterior_std == pytest.approx(0.3)  # 0.6 x the posterior's 0.5
    assert gen.config.posterior_samples and gen.codec.std_curve is None


def test_train_ldm_decode_noise_by_magnitude_follows_the_latents_curve(tmp_path) -> None:
    params, paths = _ldm_stage(tmp_path)
    meta = json.loads((paths.latents / "meta.json").read_text()) | {"posterior_std": 0.5}
    (paths.latents / "meta.json").write_text(json.dumps(meta))
    by_magnitude = LDM.model_copy(
        update={"decode_posterior_std": 0.6, "decode_noise": "by_magnitude"}
    )
    params = params.model_copy(update={"ldm": by_magnitude})
    with pytest.raises(InputError, match="posterior_std_curve"):  # latents from before it
        train_ldm(params, **stage_kwargs(paths))
    curve = StdCurve((0.0, 1.0), (0.9, 0.2))
    meta["posterior_std_curve"] = curve.as_meta()
    (paths.latents / "meta.json").write_text(json.dumps(meta))
    train_ldm(params, **stage_kwargs(paths))
    gen = load_generator(paths.model)
    assert gen.codec.std_curve == curve.scaled(0.6)  # 0.6 x the posterior's, element by element
    assert gen.codec.posterior_std == pytest.approx(0.3)  # the RMS, as recorded
    no_noise = by_magnitude.model_copy(update={"decode_posterior_std": 0.0})
    assert decode_std_curve(no_noise, meta, paths.latents) is None
    assert decode_std_curve(by_magnitude, meta | {"posterior_std": 0.0}, paths.latents) is None


def test_with_defaults_samples_as_the_explicit_settings_and_checks_them(tmp_path) -> None:
    ae = save_tiny_autoencoder(tmp_path / "ae_vqvae.pt", "vqvae")
    save_tiny_pixelcnn(tmp_path / "pixelcnn.pt", ae, config=TINY_PRIOR)
    gen = load_generator(tmp_path / "pixelcnn.pt")
    hotter = gen.with_defaults(temperature=1.7, top_k=4)
    assert hotter.network is gen.network and gen.config == TINY_PRIOR  # shared, not changed
    assert (hotter.config.temperature, hotter.config.top_k) == (1.7, 4)
    as_defaults, _ = sample(hotter, [0.0, 1.0], n_per_z=2, seed=5)
    explicit, _ = sample(gen, [0.0, 1.0], n_per_z=2, seed=5, temperature=1.7, top_k=4)
    torch.testing.assert_close(as_defaults, explicit, atol=0, rtol=0)
    with pytest.raises(InputError, match="steps"):
        gen.with_defaults(steps=10)  # an LDM setting
    with pytest.raises(InputError, match="unknown"):
        gen.with_defaults(temprature=1.0)
    with pytest.raises(InputError, match="temperature"):
        gen.with_defaults(temperature=0.0)

    ldm = load_generator(_ldm_file(tmp_path))
    pndm = ldm.with_defaults(sampler="pndm")  # another sampler: the reference step count
    assert (pndm.config.sampler, pndm.config.sample_steps) == ("pndm", REFERENCE_DDIM_STEPS)
    fewer = ldm.with_defaults(steps=3, guidance=1.0)
    as_defaults, _ = sample(fewer, 0.5, n_per_z=2, seed=1)
    explicit, _ = sample(ldm, 0.5, n_per_z=2, seed=1, steps=3, guidance=1.0)
    torch.testing.assert_close(as_defaults, explicit, atol=0, rtol=0)
