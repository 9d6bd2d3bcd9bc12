"""PixelCNN prior training: a learnable z-dependent toy distribution, resume, evaluation, stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support import TINY_AE_X2, RecordingRun, quiet_fit, stage_kwargs, write_ellipse_splits

from pipeline.core.checkpoint import load_checkpoint
from pipeline.core.config import ConditioningConfig, Params, PriorConfig, TrainConfig, VQConfig
from pipeline.core.identity import file_sha256
from pipeline.core.stage import StagePaths
from pipeline.data.datasets import EvalData
from pipeline.inference.autoregressive import sample_codes
from pipeline.inference.sampling import load_generator, sample
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.files import save_model
from pipeline.models.pixelcnn import GatedPixelCNN
from pipeline.training.prior import (
    GRID_LEVELS,
    CodeSet,
    PriorEvaluator,
    PriorTask,
    augmentations,
    augmented_codes,
    code_nll,
    nll_bits_per_code,
    train_prior,
)

CPU = torch.device("cpu")
COND = ConditioningConfig(sinusoidal_dim=16, dim=32)
ROW, COL = torch.arange(4)[:, None], torch.arange(4)[None, :]
STRIPES = [(ROW + phase) % 2 + 0 * COL for phase in (0, 1)]
CHECKERS = [(ROW + COL + phase) % 2 + 2 for phase in (0, 1)]


def toy_codes(n: int, seed: int) -> CodeSet:
    """4x4 grids: stripes of codes {0, 1} for z < 0.5, a checkerboard of {2, 3} above; the
    phase is a fair coin, so the true entropy is 1 bit per grid = 1/16 bit per code."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.rand(n, generator=gen)
    phase = torch.randint(0, 2, (n,), generator=gen)
    stripes, checkers = torch.stack(STRIPES)[phase], torch.stack(CHECKERS)[phase]
    return CodeSet(torch.where((z < 0.5)[:, None, None], stripes, checkers), z)


def _task(cfg: PriorConfig) -> PriorTask:
    torch.manual_seed(0)
    return PriorTask(GatedPixelCNN(4, cfg, COND), cfg.train)


def _cfg(**train) -> PriorConfig:
    base = {"batch_size": 64, "lr": 3e-3, "warmup_steps": 20, "ckpt_every": 10_000}
    return PriorConfig(channels=16, n_layers=2, kernel_size=3, train=TrainConfig(**base | train))


def _fraction_matching(codes: torch.Tensor, patterns: list[torch.Tensor]) -> float:
    hits = torch.stack([(codes == p).flatten(1).all(1) for p in patterns]).any(0)
    return float(hits.float().mean())


def test_code_nll_is_the_cross_entropy_of_the_logits() -> None:
    prior = GatedPixelCNN(4, _cfg(), COND).eval()
    data = toy_codes(6, seed=1)
    logits = prior(data.codes, data.z)  # (B, K, h, w), stored channels-last
    assert logits.shape == (6, 4, 4, 4)
    expected = torch.nn.functional.cross_entropy(logits.contiguous(), data.codes)
    assert torch.allclose(code_nll(prior, data.codes, data.z), expected, atol=1e-6)
    total = code_nll(prior, data.codes, data.z, reduction="sum")
    assert torch.allclose(total, expected * data.codes.numel(), rtol=1e-5)


def test_prior_learns_a_z_dependent_toy_distribution(tmp_path: Path) -> None:
    cfg = _cfg(steps=200, eval_every=10_000)
    task = _task(cfg)
    quiet_fit(task, toy_codes(1024, 0), cfg.train, tmp_path)
    prior = task.modules["prior"].eval()

    bits = nll_bits_per_code(prior, toy_codes(512, 1), CPU)
    assert 1 / 16 - 1e-3 < bits < 1 / 16 + 0.03  # true entropy 1/16; uniform would be 2
    for z, patterns in ((0.05, STRIPES), (0.3, STRIPES), (0.7, CHECKERS), (0.95, CHECKERS)):
        codes = sample_codes(
            prior, torch.full((64,), z), (4, 4), generator=torch.Generator().manual_seed(0)
        )
        assert _fraction_matching(codes, patterns) >= 0.9, f"samples at z={z}"


def test_resume_after_kill_matches_uninterrupted_run(tmp_path: Path) -> None:
    cfg = _cfg(steps=20, ckpt_every=10, eval_every=15, ema_decay=0.9)
    data = toy_codes(256, 0)

    def run(task: PriorTask, resume_dir: Path, evaluate=None):
        return quiet_fit(
            task, data, cfg.train, resume_dir, evaluate=evaluate, config_for_hash={"prior": 1}
        )

    straight = _task(cfg)
    run(straight, tmp_path / "a")

    def dies(step: int, ema) -> dict[str, float]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(_task(cfg), tmp_path / "b", evaluate=dies)  # dies at step 15
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 10
    resumed = _task(cfg)
    result = run(resumed, tmp_path / "b")
    assert result.resumed_from == 10
    for a, b in zip(
        straight.modules["prior"].state_dict().values(),
        resumed.modules["prior"].state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_evaluator_reports_bits_per_code_and_logs_a_grid_per_z_level() -> None:
    cfg = _cfg(steps=1)
    task = _task(cfg)
    run = RecordingRun()

    def decode(codes: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Codes as intensities, 2x upsampled, brightened with z: (B, 1, 8, 8)."""
        image = codes[:, None].float() / 3 * 0.5 + 0.5 * z[:, None, None, None]
        return image.repeat_interleave(2, -1).repeat_interleave(2, -2)

    val = toy_codes(32, 1)
    evaluator = PriorEvaluator(task, val, decode, run, cfg, (4, 4), CPU, seed=0)  # type: ignore[arg-type]
    logs = evaluator(7, None)
    assert logs["val_bits_per_code"] == pytest.approx(
        nll_bits_per_code(task.modules["prior"], val, CPU)
    )
    assert 0 < logs["val_bits_per_code"] < 2 * math.log2(4)
    image = run.images["samples/prior_000007.png"]
    assert image.shape == (GRID_LEVELS * 10 + 2, 8 * 10 + 2)  # 8x8 tiles with 2-pixel padding
    rows = [image[2 + 10 * i : 10 + 10 * i, 2:-2].mean() for i in range(GRID_LEVELS)]
    assert rows == sorted(rows)  # brightness grows with z: row i holds level i
    evaluator(8, None)  # the grid's sampler is seeded: the same prior gives the same grid
    np.testing.assert_array_equal(run.images["samples/prior_000008.png"], image)


def test_augmentations_list_every_variant_but_the_identity() -> None:
    assert augmentations(False, 0) == []
    assert augmentations(True, 0) == [(True, 0, 0)]
    shifted = augmentations(True, 2)
    assert len(shifted) == 9 and len(set(shifted)) == 9 and (False, 0, 0) not in shifted
    assert (False, -2, 0) in shifted and (True, 0, 2) in shifted


def test_augmented_codes_encode_mirrored_and_shifted_slices() -> None:
    torch.manual_seed(0)
    autoencoder = Autoencoder(TINY_AE_X2, COND, "vqvae").eval()
    image = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    z = torch.linspace(0, 1, 6)
    slices = EvalData(image, torch.ones_like(image), z, torch.arange(6))
    out = augmented_codes(autoencoder, slices, CPU, [(True, 0, 0), (False, 2, 0), (True, 0, -2)])
    with torch.no_grad():
        expected = [
            autoencoder.encode_to_indices(image.flip(-1), z),
            autoencoder.encode_to_indices(image.roll(2, dims=-2), z),
            autoencoder.encode_to_indices(image.flip(-1).roll(-2, dims=-1), z),
        ]
    torch.testing.assert_close(out.codes, torch.cat(expected).long())
    torch.testing.assert_close(out.z, z.repeat(3))


def _latents_dir(tmp_path: Path) -> Path:
    """A real (untrained) VQ-VAE and code grids laid out as encode_latents writes them."""
    ae_cfg = TINY_AE_X2.model_copy(update={"vq": VQConfig(num_codes=4, code_dim=3)})
    torch.manual_seed(0)
    ae_path = tmp_path / "models" / "ae_vqvae.pt"
    save_model(ae_path, "ae_vqvae", Autoencoder(ae_cfg, COND, "vqvae"), ae_cfg, {"data": {}}, COND)
    root = tmp_path / "latents" / "vqvae"
    for split, n, seed in (("train", 256, 0), ("val", 32, 1), ("test", 32, 2)):
        data = toy_codes(n, seed)
        (root / split).mkdir(parents=True)
        np.save(root / split / "codes.npy", data.codes.numpy().astype(np.int16))
        np.save(root / split / "latents.npy", np.zeros((n, 3, 4, 4), np.float32))
        z_index = (data.z.numpy() * 31).round().astype(int)
        pd.DataFrame({"z": data.z.numpy(), "z_index": z_index}).to_csv(
            root / split / "manifest.csv", index=False
        )
    meta = {
        "source": "vqvae",
        "autoencoder": str(ae_path),
        "num_codes": 4,
        "autoencoder_sha256": file_sha256(ae_path),
        "scale_factor": 1.0,
        "latent_shape": [3, 4, 4],
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def test_stage_trains_exports_and_the_model_file_samples(tmp_path: Path) -> None:
    latents = _latents_dir(tmp_path)
    paths = StagePaths(
        latents=latents,
        model=tmp_path / "models" / "pixelcnn.pt",
        report=tmp_path / "reports" / "prior.json",
        grid=tmp_path / "reports" / "prior_samples.png",
        resume_dir=tmp_path / "checkpoints" / "prior",
    )
    prepared = write_ellipse_splits(tmp_path / "prepared", size=8)
    params = Params.model_validate(
        {
            "conditioning": COND.model_dump(),
            "prior": _cfg(steps=6, eval_every=3, ckpt_every=3).model_dump(),
            "data": {"prepared_dir": str(prepared)},
        }
    )
    run = RecordingRun()
    report = train_prior(params, **stage_kwargs(paths, run))  # type: ignore[arg-type]

    assert json.loads(paths.report.read_text()) == report
    assert 0 < report["test_bits_per_code"] < 4 and report["steps"] == 6
    assert report["sampling"]["grids"] == 64
    assert sorted(run.images) == [
        "reports/prior_samples.png",
        "samples/prior_000003.png",
        "samples/prior_000006.png",
    ]
    assert paths.grid.is_file() and not (paths.resume_dir / "last.pt").exists()
    assert not any(a.startswith("model/") for a in run.artifacts)  # stored once: a logged model
    meta = load_checkpoint(paths.model)["metadata"]
    assert meta["code_shape"] == [4, 4] and meta["num_codes"] == 4
    assert meta["autoencoder_sha256"] == file_sha256(tmp_path / "models" / "ae_vqvae.pt")
    generator = load_generator(paths.model)
    images, _ = sample(generator, [0.2, 0.8], 3, seed=5)
    assert images.shape == (6, 1, 8, 8) and float(images.min()) >= 0 and float(images.max()) <= 1
    torch.testing.assert_close(images, sample(generator, [0.2, 0.8], 3, seed=5)[0])
