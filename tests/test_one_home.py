"""Each concern has one home: sampling settings, model files, the codec, z ↔ slice index,
the error policy and the ``braingen`` module entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.core.checkpoint import load_checkpoint
from pipeline.core.config import (
    AutoencoderConfig,
    ConditioningConfig,
    KLConfig,
    ZProbeConfig,
)
from pipeline.core.errors import BraingenError, InputError
from pipeline.core.stage import main as stage_main
from pipeline.inference import edit
from pipeline.inference.sampling import REFERENCE_DDIM_STEPS, SamplingSettings, load_generator
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.codec import LatentCodec, StdCurve
from pipeline.models.conditioning import index_from_z, z_from_index
from pipeline.models.files import WRITTEN_BY, load_model, save_model
from pipeline.models.zprobe import ZProbe

ROOT = Path(__file__).resolve().parents[1]


def _pndm(generator):
    """The generator with a PNDM default of 10 steps, as the demo profile trains it."""
    generator.config = generator.config.model_copy(update={"sampler": "pndm", "sample_steps": 10})
    return generator


def test_sampling_settings_resolve_steps_for_the_sampler_they_were_tuned_for(
    tiny_generators,
) -> None:
    gen = _pndm(load_generator(tiny_generators["ldm"]))
    cfg = gen.config
    assert SamplingSettings.resolve(gen) == SamplingSettings(
        "pndm", 10, cfg.guidance, cfg.guidance_min_t
    )
    assert SamplingSettings.resolve(gen, guidance_min_t=300).guidance_min_t == 300
    with pytest.raises(InputError, match="guidance_min_t"):
        SamplingSettings.resolve(gen, guidance_min_t=-1)
    ddim = SamplingSettings.resolve(gen, sampler="ddim")
    assert ddim.sampler == "ddim" and ddim.steps == REFERENCE_DDIM_STEPS == 50
    assert SamplingSettings.resolve(gen, sampler="ddim", steps=7).steps == 7
    with pytest.raises(InputError, match="top_k"):
        SamplingSettings.resolve(gen, top_k=3)
    prior = load_generator(tiny_generators["pixelcnn"])
    with pytest.raises(InputError, match="guidance_min_t"):
        SamplingSettings.resolve(prior, guidance_min_t=500)
    assert SamplingSettings.resolve(prior).as_dict() == {
        "guidance": prior.config.guidance,  # covariate guidance (PixelCNN)
        "temperature": prior.config.temperature,
    }


def test_sdedit_and_inpaint_run_ddim_steps_not_the_pndm_ones(
    tiny_generators, tmp_path, monkeypatch
) -> None:
    """The bug: ``sample_steps: 10`` (tuned for PNDM) was run as 10 DDIM steps."""
    real_load = edit.load_generator
    monkeypatch.setattr(edit, "load_generator", lambda *a, **k: _pndm(real_load(*a, **k)))
    seen: list[int] = []

    def spy(unet, scheduler, latent, *args, **kwargs):
        seen.append(args[-3])  # steps
        return latent

    monkeypatch.setattr(
        edit, "sdedit", lambda u, s, lat, z, strength, *a, **k: spy(u, s, lat, *a, **k)
    )
    monkeypatch.setattr(
        edit, "inpaint", lambda u, s, lat, mask, z, *a, **k: spy(u, s, lat, *a, **k)
    )
    image = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))).save(image)
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(mask)
    edit.sdedit_file(tiny_generators["ldm"], image, tmp_path / "a.png", "0.5", device="cpu")
    edit.inpaint_file(tiny_generators["ldm"], image, mask, tmp_path / "b.png", "0.5", device="cpu")
    assert seen == [REFERENCE_DDIM_STEPS, REFERENCE_DDIM_STEPS]


def test_every_model_kind_has_the_same_metadata_block(tmp_path, tiny_generators) -> None:
    probe_cfg = ZProbeConfig(channels=(4, 8))
    save_model(tmp_path / "zprobe.pt", "zprobe", ZProbe(probe_cfg.channels), probe_cfg, {})
    files = {**tiny_generators, "zprobe": tmp_path / "zprobe.pt"}
    for name, path in files.items():
        kind = load_checkpoint(path)["kind"]
        loaded = load_model(path)
        assert loaded.kind == kind in WRITTEN_BY, name
        assert "code_version" in loaded.metadata, name
        assert not loaded.network.training
        if kind != "zprobe":
            assert "conditioning" in loaded.metadata, name


def test_a_model_file_of_another_kind_is_refused_naming_the_stage(tiny_generators) -> None:
    with pytest.raises(BraingenError, match=r"not a generator file.*train_ldm / train_prior"):
        load_generator(tiny_generators["vqvae"])


def test_codec_owns_the_scale_factor_both_ways() -> None:
    cond = ConditioningConfig(sinusoidal_dim=8, dim=8)
    cfg = AutoencoderConfig(channels=(8, 8), norm_groups=4, kl=KLConfig(latent_channels=2))
    torch.manual_seed(0)
    ae = Autoencoder(cfg, cond, "vaegan").eval()
    x, z = torch.rand(3, 1, 16, 16), torch.tensor([0.0, 0.5, 1.0])
    codec = LatentCodec(ae, scale_factor=0.25)
    with torch.no_grad():
        latent = codec.encode_stage_2_inputs(x, z)
        torch.testing.assert_close(latent, ae.encode_to_latent(x, z) * 0.25)
        torch.testing.assert_close(
            codec.decode_stage_2_outputs(latent, z),
            ae.decode_from_latent(latent / 0.25, z).clamp(0, 1),
        )
    assert LatentCodec.fit_scale_factor(torch.full((4,), 2.0) * torch.tensor([1, -1, 1, -1])) == 0.5
    with pytest.raises(InputError, match="constant"):
        LatentCodec.fit_scale_factor(torch.ones(5))
    with pytest.raises(InputError, match="scale_factor"):
        LatentCodec(ae, scale_factor=0.0)


def _tiny_autoencoder(kind: str) -> Autoencoder:
    cond = ConditioningConfig(sinusoidal_dim=8, dim=8)
    cfg = AutoencoderConfig(channels=(8, 8), norm_groups=4, kl=KLConfig(latent_channels=2))
    torch.manual_seed(0)
    return Autoencoder(cfg, cond, kind).eval()  # type: ignore[arg-type]


@torch.no_grad()
def test_codec_decodes_a_posterior_sample_only_when_given_a_generator() -> None:
    ae = _tiny_autoencoder("vaegan")
    x, z = torch.rand(3, 1, 16, 16), torch.tensor([0.0, 0.5, 1.0])
    codec = LatentCodec(ae, scale_factor=0.25, posterior_std=0.5)
    latent = codec.encode_stage_2_inputs(x, z)
    drawn = codec.decode_stage_2_outputs(latent, z, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        drawn, ae.decode_from_latent((latent + 0.5 * noise) / 0.25, z).clamp(0, 1)
    )
    mean_decoded = codec.decode_stage_2_outputs(latent, z)
    assert not torch.allclose(drawn, mean_decoded)
    torch.testing.assert_close(mean_decoded, ae.decode_from_latent(latent / 0.25, z).clamp(0, 1))
    no_std = LatentCodec(ae, scale_factor=0.25)  # a file made before the calibration
    assert torch.equal(
        no_std.decode_stage_2_outputs(latent, z, generator=torch.Generator()), mean_decoded
    )
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(InputError, match="posterior_std"):
            LatentCodec(ae, posterior_std=bad)


def test_std_curve_fits_the_std_by_magnitude_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    latents = rng.uniform(-3, 3, size=(200, 2, 4, 4))
    stds = np.where(np.abs(latents) < 1, 0.9, 0.1)  # a sparse code: tight where it is large
    curve = StdCurve.fit(latents, stds, knots=12)
    assert len(curve.magnitude) == 12 and list(curve.magnitude) == sorted(curve.magnitude)
    at = curve(torch.tensor([[0.0, 0.3, 2.0, 5.0]]))
    assert at.shape == (1, 4) and at.dtype == torch.float32
    torch.testing.assert_close(at, torch.tensor([[0.9, 0.9, 0.1, 0.1]]))  # ends held
    assert StdCurve.from_meta(curve.as_meta()) == curve and StdCurve.from_meta(None) is None
    torch.testing.assert_close(curve.scaled(0.5)(torch.tensor([0.0])), torch.tensor([0.45]))
    for magnitude, std in (((1.0, 0.5), (0.1, 0.1)), ((0.0,), (-0.1,)), ((0.0, 1.0), (0.1,))):
        with pytest.raises(InputError, match="std curve"):
            StdCurve(magnitude, std)


@torch.no_grad()
def test_codec_draws_each_elements_decode_noise_at_the_curves_std() -> None:
    ae = _tiny_autoencoder("vaegan")
    curve = StdCurve((0.0, 1.0), (0.8, 0.1))
    codec = LatentCodec(ae, scale_factor=1.0, posterior_std=0.5, std_curve=curve)
    latent = torch.zeros(64, 2, 8, 8)
    latent[:, 1] = 2.0  # channel 0 near the prior, channel 1 carries the slice
    drawn = codec.sample_posterior(latent, torch.Generator().manual_seed(1))
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(drawn, latent + curve(latent) * noise)
    spread = (drawn - latent).std(dim=(0, 2, 3))
    assert abs(float(spread[0]) - 0.8) < 0.03 and abs(float(spread[1]) - 0.1) < 0.01
    isotropic = LatentCodec(ae, scale_factor=1.0, posterior_std=0.5)
    spread = (isotropic.sample_posterior(latent, torch.Generator()) - latent).std(dim=(0, 2, 3))
    assert torch.allclose(spread, torch.tensor([0.5, 0.5]), atol=0.03)
    silent = LatentCodec(ae, scale_factor=1.0, posterior_std=0.0, std_curve=curve)
    assert torch.equal(silent.sample_posterior(latent, torch.Generator()), latent)
    assert [c.decode_noise for c in (codec, isotropic, silent)] == [
        "by_magnitude",
        "isotropic",
        "none",
    ]


@torch.no_grad()
def test_stage_2_posterior_is_in_scaled_units_and_has_no_std_for_a_vqvae() -> None:
    x, z = torch.rand(4, 1, 16, 16), torch.linspace(0, 1, 4)
    ae = _tiny_autoencoder("vaegan")
    mean, std = ae.encode_posterior(x, z)
    assert mean.shape == std.shape == (4, 2, 8, 8) and bool((std > 0).all())
    torch.testing.assert_close(mean, ae.encode_to_latent(x, z))
    scaled_mean, scaled_std = LatentCodec(ae, 1.5).encode_stage_2_posterior(x, z)
    torch.testing.assert_close(scaled_mean, mean * 1.5)
    torch.testing.assert_close(scaled_std, std * 1.5)
    vq = _tiny_autoencoder("vqvae")
    vq_mean, vq_std = LatentCodec(vq, 1.5).encode_stage_2_posterior(x, z)
    torch.testing.assert_close(vq_mean, LatentCodec(vq, 1.5).encode_stage_2_inputs(x, z))
    assert vq_std is None
    with pytest.raises(InputError, match="vaegan"):
        vq.encode_posterior(x, z)


def test_z_and_slice_index_convert_both_ways() -> None:
    assert z_from_index(0, 32) == 0.0 and z_from_index(31, 32) == 1.0
    assert index_from_z(0.5, 33) == 16.0
    levels = np.arange(8)
    np.testing.assert_allclose(index_from_z(z_from_index(levels, 8), 8), levels)


def test_a_user_error_is_one_line_a_bug_keeps_its_traceback(capsys) -> None:
    def user() -> None:
        raise InputError("bad value 3; use 4")

    with pytest.raises(SystemExit) as stop:
        stage_main(user)
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip() == "error: bad value 3; use 4"

    def bug() -> None:
        raise ValueError("an internal shape mismatch")  # not a BraingenError: a bug

    with pytest.raises(ValueError, match="internal"):
        stage_main(bug)


def test_python_m_pipeline_cli_knows_the_stage_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("prepare", "train-autoencoder", "train-ldm", "evaluate", "generate"):
        assert command in out
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train-autoencoder", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: kind must be one of")


def test_stage_identity_names_seed_and_latent_inputs(tmp_path) -> None:
    """The bugs: the z-probe's resume hash left out the seed, the LDM's the autoencoder."""
    import json

    from pipeline.core.config import Params
    from pipeline.core.identity import stage_identity
    from pipeline.core.tracking import params_hash
    from pipeline.data.latents import latents_identity

    a, b = Params(seed=0), Params(seed=1)
    for stage in ("train_zprobe", "train_autoencoder", "train_prior", "train_ldm"):
        assert params_hash(stage_identity(a, stage)) != params_hash(stage_identity(b, stage))
    (tmp_path / "meta.json").write_text(
        json.dumps({"autoencoder": "gone.pt", "autoencoder_sha256": "abc", "scale_factor": 0.5})
    )
    first = stage_identity(a, "train_ldm", **latents_identity(tmp_path))
    (tmp_path / "meta.json").write_text(
        json.dumps({"autoencoder": "gone.pt", "autoencoder_sha256": "def", "scale_factor": 0.5})
    )
    again = stage_identity(a, "train_ldm", **latents_identity(tmp_path))
    assert params_hash(first) != params_hash(again)
    assert first["ldm"] == a.ldm.model_dump(mode="json") and first["seed"] == 0
