"""First-stage training task, evaluation callback, resume, export and loading."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from support import TINY_COND, RecordingRun, quiet_fit, stage_kwargs
from torch.utils.data import Dataset

from pipeline.core.checkpoint import CheckpointError, save_checkpoint
from pipeline.core.config import (
    AutoencoderConfig,
    DecoderFinetuneConfig,
    DiscriminatorConfig,
    KLConfig,
    Params,
    TrainConfig,
    VQConfig,
    params_from_dict,
)
from pipeline.core.errors import InputError
from pipeline.core.stage import StagePaths
from pipeline.metrics.perceptual import get_lpips
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.files import load_autoencoder, save_model
from pipeline.training.autoencoder import (
    AutoencoderTask,
    EvalData,
    Evaluator,
    reconstruction_report,
    train_first_stage,
)
from pipeline.training.loop import Optimization

CPU = torch.device("cpu")
SIZE = 32  # the smallest side LPIPS accepts


def _cfg(**train) -> AutoencoderConfig:
    return AutoencoderConfig(
        channels=(8, 16, 16),
        norm_groups=4,
        vq=VQConfig(num_codes=16, code_dim=4),
        kl=KLConfig(latent_channels=2, cycles=2, max_weight=1e-3),
        discriminator=DiscriminatorConfig(
            channels=8, n_layers=2, norm_groups=4, start_step=4, weight=0.5
        ),
        train=TrainConfig(
            **(
                {
                    "steps": 12,
                    "batch_size": 4,
                    "lr": 2e-3,
                    "warmup_steps": 0,
                    "ckpt_every": 4,
                    "eval_every": 6,
                    "log_every": 2,
                }
                | train
            )
        ),
    )


def _task(kind: str, cfg: AutoencoderConfig | None = None) -> AutoencoderTask:
    torch.manual_seed(0)
    return AutoencoderTask(cfg or _cfg(), TINY_COND, kind, get_lpips(CPU), CPU)  # type: ignore[arg-type]


class _Slices(Dataset):
    """Blobs whose brightness depends on z, with a mask; items as SliceDataset yields them."""

    def __init__(self, n: int = 16) -> None:
        gen = torch.Generator().manual_seed(0)
        self.z_index = torch.arange(n) % 4
        self.z = self.z_index.float() / 3
        yy, xx = torch.meshgrid(
            torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij"
        )
        radius = 0.5 + 0.3 * torch.rand(n, 1, 1, generator=gen)
        self.mask = ((xx**2 + yy**2)[None] < radius**2).float()[:, None]
        texture = 0.2 * torch.rand(n, 1, SIZE, SIZE, generator=gen)
        self.image = self.mask * (0.5 + 0.3 * self.z[:, None, None, None] + texture)

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "image": self.image[i],
            "mask": self.mask[i],
            "z": self.z[i],
            "z_index": self.z_index[i],
        }


def _fixed_batch() -> dict[str, torch.Tensor]:
    data = _Slices(4)
    return {"image": data.image, "z": data.z}


@pytest.mark.parametrize("kind", ["vqvae", "vaegan"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(kind: str) -> None:
    task = _task(kind)
    batch = _fixed_batch()
    logs = [task.train_step(batch, step, Optimization(task.optimizers, 1.0)) for step in range(8)]
    first, last = logs[0], logs[-1]
    assert last["rec"] < 0.7 * first["rec"]
    assert last["perceptual"] < first["perceptual"]
    expected = {"rec", "perceptual", "adv", "adaptive_weight", "d_loss", "loss"}
    expected |= {"vq", "perplexity", "codes_used"} if kind == "vqvae" else {"kl", "kl_weight"}
    assert expected == set(last)


def test_discriminator_starts_at_start_step() -> None:
    task = _task("vaegan")
    batch = _fixed_batch()
    disc_before = [p.clone() for p in task.disc.parameters()]
    logs = [task.train_step(batch, step, Optimization(task.optimizers, 1.0)) for step in range(5)]
    assert all(lg["d_loss"] == 0 and lg["adaptive_weight"] == 0 for lg in logs[:4])
    assert logs[4]["d_loss"] > 0 and logs[4]["adaptive_weight"] > 0
    assert any(
        not torch.equal(a, b) for a, b in zip(disc_before, task.disc.parameters(), strict=True)
    )


@pytest.mark.parametrize(
    ("kinds", "kind", "adversarial"),
    [(("vaegan",), "vqvae", False), (("vaegan",), "vaegan", True), (("vqvae",), "vqvae", True)],
)
def test_only_the_listed_kinds_train_against_the_discriminator(
    kinds: tuple[str, ...], kind: str, adversarial: bool
) -> None:
    cfg = _cfg()
    disc = cfg.discriminator.model_copy(update={"kinds": kinds})
    cfg = cfg.model_copy(update={"discriminator": disc})
    task = _task(kind, cfg)
    logs = task.train_step(_fixed_batch(), 10, Optimization(task.optimizers, 1.0))
    assert (logs["d_loss"] != 0) is adversarial
    assert (logs["adaptive_weight"] > 0) is adversarial


@pytest.mark.parametrize(
    ("kind", "key", "logged"),
    [("vqvae", "ssim_weight", "ssim_loss"), ("vaegan", "scale_equivariance", "scale_equivariance")],
)
def test_a_term_weight_adds_its_term_to_the_loss(kind: str, key: str, logged: str) -> None:
    """SSIM (any kind) and scale equivariance (the L1 of the pooled latent's decode against
    the pooled slice, vaegan): off at weight 0, added times the weight otherwise."""
    batch = _fixed_batch()
    base = _task(kind)
    plain = base.train_step(batch, 0, Optimization(base.optimizers, 1.0))
    assert logged not in plain
    task = _task(kind, _cfg().model_copy(update={key: 2.0}))
    logs = task.train_step(batch, 0, Optimization(task.optimizers, 1.0))
    assert 0 < logs[logged] < 1
    assert logs["loss"] == pytest.approx(plain["loss"] + 2.0 * logs[logged], rel=1e-4)


def test_scale_equivariance_is_off_for_the_vqvae_and_in_the_decoder_only_phase() -> None:
    cfg = _cfg().model_copy(update={"scale_equivariance": 1.0})
    batch = _fixed_batch()
    vq = _task("vqvae", cfg)
    assert "scale_equivariance" not in vq.train_step(batch, 0, Optimization(vq.optimizers, 1.0))
    task = _task("vaegan", cfg)
    assert task.scale_equivariance_on
    task.freeze_encoder(DecoderFinetuneConfig(train=TrainConfig(steps=2, lr=2e-3)))
    assert not task.scale_equivariance_on
    logs = task.train_step(batch, 0, Optimization(task.optimizers, 1.0))
    assert "scale_equivariance" not in logs


def test_downscaled_decode_is_the_decode_of_the_pooled_latent() -> None:
    model = _task("vaegan").model.eval()
    batch = _fixed_batch()
    with torch.no_grad():
        out = model(batch["image"], batch["z"], downscaled=True)
        expected = model.decode_from_latent(
            torch.nn.functional.avg_pool2d(out.latent, 2), batch["z"]
        )
    assert out.downscaled_recon is not None
    assert out.downscaled_recon.shape == (4, 1, SIZE // 2, SIZE // 2)
    torch.testing.assert_close(out.downscaled_recon, expected)
    assert model(batch["image"], batch["z"]).downscaled_recon is None
    with pytest.raises(InputError, match="vaegan"):
        _task("vqvae").model(batch["image"], batch["z"], downscaled=True)


def test_decoder_only_phase_keeps_the_latents_and_trains_the_decoder() -> None:
    task = _task("vaegan")
    batch = _fixed_batch()
    for step in range(6):  # the first phase, discriminator on from step 4
        task.train_step(batch, step, Optimization(task.optimizers, 1.0))
    task.model.eval()
    latents = task.model.encode_to_latent(batch["image"], batch["z"]).detach()
    frozen = {k: v.clone() for k, v in task.model.state_dict().items() if "decoder" not in k}
    decoder = {k: v.clone() for k, v in task.model.decoder.state_dict().items()}
    disc = [p.clone() for p in task.disc.parameters()]
    disc_state = task.optimizers["disc"].state_dict()["state"]
    task.freeze_encoder(
        DecoderFinetuneConfig(train=TrainConfig(steps=4, lr=2e-3), discriminator_lr=2e-4)
    )
    # the discriminator keeps its AdamW state; its peak lr is the phase's, for fit's schedule
    kept = task.optimizers["disc"].state_dict()["state"]
    assert kept.keys() == disc_state.keys()
    torch.testing.assert_close(kept[0]["exp_avg_sq"], disc_state[0]["exp_avg_sq"])
    assert {(g["lr"], g["initial_lr"]) for g in task.optimizers["disc"].param_groups} == {
        (2e-4, 2e-4)
    }
    task.model.train()
    logs = [task.train_step(batch, s, Optimization(task.optimizers, 1.0)) for s in range(6, 10)]
    task.model.eval()
    torch.testing.assert_close(task.model.encode_to_latent(batch["image"], batch["z"]), latents)
    for key, value in task.model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
    after = task.model.decoder.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in decoder.items()), "the decoder is unchanged"
    assert any(not torch.equal(a, b) for a, b in zip(disc, task.disc.parameters(), strict=True))
    assert all(lg["d_loss"] > 0 and lg["kl"] > 0 for lg in logs)
    # the KL term is out of the loss: its weights are frozen
    assert logs[-1]["loss"] == pytest.approx(
        logs[-1]["rec"]
        + 0.5 * logs[-1]["perceptual"]
        + logs[-1]["adaptive_weight"] * logs[-1]["adv"],
        rel=1e-4,
    )


def test_decoder_only_phase_without_discriminator_lr_leaves_the_adversarial_term_out() -> None:
    task = _task("vaegan")
    batch = _fixed_batch()
    for step in range(6):  # the first phase, discriminator on from step 4
        task.train_step(batch, step, Optimization(task.optimizers, 1.0))
    disc = [p.clone() for p in task.disc.parameters()]
    task.freeze_encoder(DecoderFinetuneConfig(train=TrainConfig(steps=4, lr=2e-3)))
    logs = [task.train_step(batch, s, Optimization(task.optimizers, 1.0)) for s in range(6, 9)]
    assert all(lg["adv"] == lg["d_loss"] == lg["adaptive_weight"] == 0 for lg in logs)
    assert all(torch.equal(a, b) for a, b in zip(disc, task.disc.parameters(), strict=True))
    assert logs[-1]["loss"] == pytest.approx(
        logs[-1]["rec"] + 0.5 * logs[-1]["perceptual"], rel=1e-4
    )


def test_decoder_only_phase_refuses_a_vqvae() -> None:
    with pytest.raises(InputError, match="vaegan"):
        _task("vqvae").freeze_encoder(DecoderFinetuneConfig(train=TrainConfig(steps=2)))


def test_decoder_only_phase_needs_its_loop_settings() -> None:
    task = _task("vaegan")
    with pytest.raises(InputError, match=r"decoder_finetune\.train"):
        task.freeze_encoder(DecoderFinetuneConfig())
    assert all(p.requires_grad for p in task.model.encoder.parameters())  # left as it was


@pytest.mark.parametrize("kind", ["vqvae", "vaegan"])
def test_resume_after_kill_matches_uninterrupted_run(kind: str, tmp_path) -> None:
    data, cfg = _Slices(), _cfg(ema_decay=0.9)

    def run(task: AutoencoderTask, folder: str, evaluate=None):
        return quiet_fit(
            task,
            data,
            cfg.train,
            tmp_path / folder,
            evaluate=evaluate,
            config_for_hash={"kind": kind},
        )

    straight = _task(kind, cfg)
    straight_result = run(straight, "a")

    def die(step: int, ema) -> dict[str, float]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(_task(kind, cfg), "b", evaluate=die)  # dies at step 6, after the checkpoint at 4
    resumed = _task(kind, cfg)
    result = run(resumed, "b")
    assert result.resumed_from == 4
    for name in ("model", "disc"):
        for (key, a), b in zip(
            straight.modules[name].state_dict().items(),
            resumed.modules[name].state_dict().values(),
            strict=True,
        ):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"{name}.{key}")
    for a, b in zip(straight_result.ema.parameters(), result.ema.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["vqvae", "vaegan"])
def test_evaluator_logs_metrics_and_grids(kind: str) -> None:
    task = _task(kind)
    run = RecordingRun()
    logs = Evaluator(task, EvalData.from_dataset(_Slices(8)), run, CPU)(6, None)
    assert {"val_ssim", "val_ssim_brain", "val_psnr", "val_lpips"} <= set(logs)
    assert "grids/recon_000006.png" in run.images
    extra = "codebook/usage_000006.png" if kind == "vqvae" else "samples/random_latents_000006.png"
    assert extra in run.images
    if kind == "vqvae":
        assert 0 < logs["val_codes_used"] <= 1


def test_report_has_per_z_and_shuffled_z() -> None:
    task = _task("vqvae")
    report = reconstruction_report(task.model.eval(), EvalData.from_dataset(_Slices(8)), CPU)
    assert {"ssim", "ssim_brain", "psnr", "lpips"} <= set(report)
    assert set(report["per_z"]) == {0, 1, 2, 3}
    assert set(report["shuffled_z"]) == {"ssim", "ssim_brain", "psnr", "lpips"}


@pytest.mark.parametrize("kind", ["vqvae", "vaegan"])
def test_export_and_load_round_trip(kind: str, tmp_path, monkeypatch) -> None:
    cfg = _cfg()
    task = _task(kind, cfg)
    task.train_step(_fixed_batch(), 0, Optimization(task.optimizers, 1.0))  # moves the codebook
    path = tmp_path / f"ae_{kind}.pt"
    data = {"image_size": SIZE, "n_slices": 4}
    save_model(path, f"ae_{kind}", task.model, cfg, {"data": data}, TINY_COND)

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model, meta = load_autoencoder(path, CPU)
    assert calls == [True]
    assert not model.training and model.kind == kind
    assert meta["data"] == {"image_size": SIZE, "n_slices": 4} and "code_version" in meta
    assert meta["conditioning"] == TINY_COND.model_dump(mode="json")
    x, z = _fixed_batch().values()
    task.model.eval()
    torch.testing.assert_close(model.encode_to_latent(x, z), task.model.encode_to_latent(x, z))
    torch.testing.assert_close(model(x, z).recon, task.model(x, z).recon)


def test_missing_corrupt_or_foreign_files_give_clear_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_autoencoder(tmp_path / "nope.pt")
    cfg = _cfg()
    path = tmp_path / "ae.pt"
    save_model(path, "ae_vaegan", _task("vaegan", cfg).model, cfg, {"data": {}}, TINY_COND)
    blob = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_autoencoder(tmp_path / "cut.pt")
    save_checkpoint(tmp_path / "prior.pt", {"kind": "pixelcnn", "modules": {}})
    with pytest.raises(CheckpointError, match="not an autoencoder"):
        load_autoencoder(tmp_path / "prior.pt")
    save_checkpoint(
        tmp_path / "odd.pt",
        {
            "kind": "ae_vqvae",
            "modules": {"model": {}},
            "config": cfg.model_dump(mode="json"),
            "metadata": {"conditioning": TINY_COND.model_dump()},
        },
    )
    with pytest.raises(CheckpointError, match="does not match"):
        load_autoencoder(tmp_path / "odd.pt")


def _write_prepared(root, n_per_split: int = 8) -> None:
    """A prepared-data folder as the prepare stage writes it (float16 slices, uint8 masks)."""
    data = _Slices(n_per_split)
    for split in ("train", "val", "test"):
        folder = root / split
        folder.mkdir(parents=True)
        np.save(folder / "slices.npy", data.image.numpy().astype(np.float16))
        np.save(folder / "masks.npy", data.mask.numpy().astype(np.uint8))
        pd.DataFrame({"z_index": data.z_index.numpy(), "z": data.z.numpy()}).to_csv(
            folder / "manifest.csv", index=False
        )


def _stage_params(root, **finetune) -> Params:
    return params_from_dict(
        {
            "device": "cpu",
            "data": {"prepared_dir": str(root / "prepared")},
            "prepare": {"n_slices": 4, "image_size": SIZE},
            "conditioning": TINY_COND.model_dump(),
            "autoencoder": _cfg(steps=4, ckpt_every=2, eval_every=4).model_dump()
            | {"decoder_finetune": {"train": {"batch_size": 4, "log_every": 1} | finetune}},
        }
    )


def test_a_killed_decoder_phase_resumes_where_it_stopped(tmp_path, monkeypatch) -> None:
    _write_prepared(tmp_path / "prepared")
    params = _stage_params(tmp_path, steps=4, ckpt_every=2, eval_every=3)

    def stage(folder: str) -> Autoencoder:
        paths = StagePaths.standard("ae", "ae", "ae.png", root=tmp_path / folder)
        train_first_stage(params, "vaegan", **stage_kwargs(paths))
        return load_autoencoder(paths.model)[0]

    straight = stage("a")
    evaluate = Evaluator.__call__

    def die_in_the_phase(self, step: int, ema):
        if step == 7:  # the phase's step 3, after its checkpoint at 2
            raise KeyboardInterrupt
        return evaluate(self, step, ema)

    monkeypatch.setattr(Evaluator, "__call__", die_in_the_phase)
    with pytest.raises(KeyboardInterrupt):
        stage("b")
    assert (tmp_path / "b" / "checkpoints" / "ae" / "decoder" / "last.pt").is_file()
    monkeypatch.setattr(Evaluator, "__call__", evaluate)
    resumed = stage("b")
    for (key, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("kind", ["vqvae", "vaegan"])
def test_train_first_stage_writes_model_report_and_grid(kind: str, tmp_path) -> None:
    _write_prepared(tmp_path / "prepared")
    params = _stage_params(tmp_path, steps=2)
    paths = StagePaths.standard(f"ae_{kind}", f"ae_{kind}", f"ae_{kind}_recon.png", root=tmp_path)
    run = RecordingRun()
    report = train_first_stage(params, kind, **stage_kwargs(paths, run))
    # the vaegan's decoder-only phase goes on in the same run, numbered from step 4
    logged = {step for step, m in run.metrics if "rec" in m}
    assert max(logged) == (6 if kind == "vaegan" else 4)
    assert [step for step, m in run.metrics if "test_ssim" in m] == [max(logged)]
    assert not (paths.resume_dir / "decoder" / "last.pt").exists()

    assert json.loads(paths.report.read_text())["ssim"] == pytest.approx(report["ssim"])
    assert set(report["per_z"]) == {0, 1, 2, 3} and "shuffled_z" in report
    assert paths.grid.is_file() and not (paths.resume_dir / "last.pt").exists()
    model, meta = load_autoencoder(paths.model)
    assert model.kind == kind
    assert meta["data"] == {
        "image_size": SIZE,
        "n_slices": 4,
        "percentiles": [0.5, 99.5],
        "n_train": 8,
    }
    assert not any(a.startswith("model/") for a in run.artifacts)  # stored once: a logged model
    assert run.dicts[f"reports/{paths.report.name}"] == report
    assert any("test_ssim" in m for _, m in run.metrics)
