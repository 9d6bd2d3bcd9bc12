"""Schedulers, guided DDIM, SDEdit, inpainting, trajectories and the LDM training task."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
from support import TINY_COND, TINY_LATENT_SHAPE, RecordingRun, quiet_fit, tiny_ldm
from torch import nn
from torch.utils.data import Dataset

from pipeline.core.checkpoint import load_checkpoint
from pipeline.core.config import LDMConfig, TrainConfig
from pipeline.inference.diffusion import (
    build_scheduler,
    ddim_sample,
    diffusion_loss,
    guided_output,
    guided_sample,
    inpaint,
    pndm_sample,
    scheduler_config,
    sdedit,
)
from pipeline.models.unet import ZConditionedUNet
from pipeline.training.ldm import TRAJECTORY_GIF, Evaluator, LatentSet, LDMTask

SHAPE = TINY_LATENT_SHAPE
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw) -> LDMConfig:
    train = TrainConfig(steps=8, batch_size=4, lr=1e-3, warmup_steps=0, ckpt_every=4, eval_every=6)
    return tiny_ldm(
        **({"sample_steps": 4, "grid_levels": 2, "grid_samples": 2, "train": train} | kw)
    )


def _unet(cfg: LDMConfig | None = None) -> ZConditionedUNet:
    """A tiny UNet whose zero-initialised branches get random weights (z matters at init)."""
    torch.manual_seed(0)
    unet = ZConditionedUNet(cfg or _cfg(), TINY_COND, SHAPE[0]).eval()
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return unet


class _Oracle(nn.Module):
    """Predicts the exact epsilon / v that leads every x_t to a fixed clean latent."""

    def __init__(self, target: torch.Tensor, scheduler) -> None:
        super().__init__()
        self.target, self.scheduler = target, scheduler

    def forward(self, x, t, z, drop_mask):
        a = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        target = self.target.repeat(x.shape[0] // self.target.shape[0], 1, 1, 1)
        eps = (x - a.sqrt() * target) / (1 - a).sqrt()
        if self.scheduler.prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * target
        return eps


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_schedulers_share_betas_and_do_not_clip() -> None:
    cfg = _cfg(prediction_type="v_prediction")
    config = scheduler_config(cfg)
    ddpm, ddim = build_scheduler(config, "ddpm"), build_scheduler(config, "ddim")
    torch.testing.assert_close(ddpm.betas, ddim.betas)
    assert not ddpm.clip_sample and not ddim.clip_sample
    assert ddim.prediction_type == "v_prediction"
    assert float(ddpm.alphas_cumprod[-1]) < 1e-3  # the last step is (almost) pure noise
    with pytest.raises(ValueError, match="kind"):
        build_scheduler(config, "pndm")  # type: ignore[arg-type]


def test_guidance_is_one_batched_forward_equal_to_two_forwards() -> None:
    unet = _unet()
    x = torch.randn(3, *SHAPE, generator=_gen())
    t, z = torch.tensor([10, 500, 990]), torch.tensor([0.0, 0.4, 1.0])
    with torch.no_grad():
        cond = unet(x, t, z, torch.zeros(3, dtype=torch.bool))
        uncond = unet(x, t, z, torch.ones(3, dtype=torch.bool))
        guided = guided_output(unet, x, t, z, guidance=3.0)
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), atol=1e-5, rtol=1e-4)
    assert (cond - uncond).abs().mean() > 1e-4

    batches: list[int] = []
    unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    ddim_sample(unet, build_scheduler(scheduler_config(_cfg()), "ddim"), z, SHAPE, 5, 3.0, _gen())
    assert batches == [6] * 5  # one forward per step, conditional and null in one batch
    batches.clear()
    ddim_sample(unet, build_scheduler(scheduler_config(_cfg()), "ddim"), z, SHAPE, 5, 1.0, _gen())
    assert batches == [3] * 5  # w = 1 needs no null pass


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_reaches_the_clean_latent_of_an_exact_model(prediction_type: str) -> None:
    sched = build_scheduler(scheduler_config(_cfg(prediction_type=prediction_type)), "ddim")
    target = torch.randn(2, *SHAPE, generator=_gen(5))
    z = torch.tensor([0.2, 0.7])
    out, traj = ddim_sample(
        _Oracle(target, sched), sched, z, SHAPE, 7, 2.5, _gen(), return_trajectory=True
    )
    torch.testing.assert_close(out, target, atol=1e-3, rtol=1e-3)
    assert traj.x_t.shape == traj.x0.shape == (7, 2, *SHAPE)
    assert traj.timesteps[0] == 999 and traj.timesteps[-1] == 0
    torch.testing.assert_close(traj.x0[-1], target, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pndm_reaches_the_clean_latent_of_an_exact_model(prediction_type: str) -> None:
    config = scheduler_config(_cfg(prediction_type=prediction_type))
    target = torch.randn(2, *SHAPE, generator=_gen(5))
    oracle = _Oracle(target, build_scheduler(config, "ddpm"))
    out = pndm_sample(oracle, config, torch.tensor([0.2, 0.7]), SHAPE, 10, 2.5, _gen())
    torch.testing.assert_close(out, target, atol=1e-3, rtol=1e-3)


def test_guided_sample_runs_the_named_sampler_with_one_forward_per_step() -> None:
    unet, config = _unet(), scheduler_config(_cfg())
    z = torch.tensor([0.0, 0.5, 1.0])
    batches: list[int] = []
    unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    kwargs = {"steps": 5, "guidance": 2.0}
    pndm = guided_sample(unet, config, z, SHAPE, sampler="pndm", generator=_gen(1), **kwargs)
    assert batches == [6] * 6  # PLMS: one extra forward for its warm-up (corrector) step
    again = guided_sample(unet, config, z, SHAPE, sampler="pndm", generator=_gen(1), **kwargs)
    torch.testing.assert_close(pndm, again, atol=0, rtol=0)  # the scheduler state is reset
    ddim = guided_sample(unet, config, z, SHAPE, sampler="ddim", generator=_gen(1), **kwargs)
    expected = ddim_sample(unet, build_scheduler(config, "ddim"), z, SHAPE, 5, 2.0, _gen(1))
    torch.testing.assert_close(ddim, expected, atol=0, rtol=0)
    assert (pndm - ddim).abs().mean() > 1e-4  # a different sampler, not a renamed one
    with pytest.raises(ValueError, match="sampler"):
        guided_sample(unet, config, z, SHAPE, sampler="euler", generator=_gen(), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        guided_sample(unet, config, z, SHAPE, sampler="pndm", steps=0, guidance=2.0, generator=None)


def test_ddim_is_deterministic_under_a_seed() -> None:
    unet, sched = _unet(), build_scheduler(scheduler_config(_cfg()), "ddim")
    z = torch.tensor([0.0, 0.33, 1.0])
    a = ddim_sample(unet, sched, z, SHAPE, 4, 2.0, _gen(1))
    b = ddim_sample(unet, sched, z, SHAPE, 4, 2.0, _gen(1))
    c = ddim_sample(unet, sched, z, SHAPE, 4, 2.0, _gen(2))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().mean() > 1e-2
    stochastic = [ddim_sample(unet, sched, z, SHAPE, 4, 2.0, _gen(1), eta=1.0) for _ in range(2)]
    torch.testing.assert_close(stochastic[0], stochastic[1], atol=0, rtol=0)
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(unet, sched, z, SHAPE, 0, 2.0, _gen())


def test_sdedit_strength_zero_returns_input_and_one_ignores_it() -> None:
    unet, sched = _unet(), build_scheduler(scheduler_config(_cfg()), "ddim")
    latent, z = torch.randn(2, *SHAPE, generator=_gen(3)), torch.tensor([0.1, 0.9])
    torch.testing.assert_close(sdedit(unet, sched, latent, z, 0.0, 10, 2.0, _gen()), latent)
    light = sdedit(unet, sched, latent, z, 0.1, 10, 2.0, _gen())
    full = sdedit(unet, sched, latent, z, 1.0, 10, 2.0, _gen())
    assert (light - latent).abs().mean() < (full - latent).abs().mean()
    with pytest.raises(ValueError, match="strength"):
        sdedit(unet, sched, latent, z, 1.5, 10, 2.0, _gen())


def test_inpainting_keeps_the_known_region() -> None:
    unet, sched = _unet(), build_scheduler(scheduler_config(_cfg()), "ddim")
    latent, z = torch.randn(2, *SHAPE, generator=_gen(4)), torch.tensor([0.3, 0.6])
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 2:6] = 1  # regenerate the centre
    out = inpaint(unet, sched, latent, mask, z, 6, 2.0, _gen())
    keep = (mask == 0).expand_as(latent)
    torch.testing.assert_close(out[keep], latent[keep], atol=1e-5, rtol=1e-5)
    assert (out - latent)[~keep].abs().mean() > 1e-2
    with pytest.raises(ValueError, match="mask"):
        inpaint(unet, sched, latent, mask[:, :, :4], z, 6, 2.0, _gen())


def test_v_prediction_loss_uses_the_velocity_target() -> None:
    sched = build_scheduler(scheduler_config(_cfg(prediction_type="v_prediction")), "ddpm")
    target = torch.randn(2, *SHAPE, generator=_gen(6))
    noise = torch.randn(2, *SHAPE, generator=_gen(7))
    t, z, drop = torch.tensor([100, 800]), torch.rand(2), torch.zeros(2, dtype=torch.bool)
    loss = diffusion_loss(_Oracle(target, sched), sched, target, z, noise, t, drop)
    assert float(loss) < 1e-8


class _Latents(Dataset):
    """Latents whose mean depends on z, as LatentDataset yields them."""

    def __init__(self, n: int = 16) -> None:
        self.z = (torch.arange(n) % 4).float() / 3
        self.latent = torch.randn(n, *SHAPE, generator=_gen(8)) * 0.3 + self.z[:, None, None, None]

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"latent": self.latent[i], "z": self.z[i]}


def _task(cfg: LDMConfig) -> LDMTask:
    torch.manual_seed(0)
    unet = ZConditionedUNet(cfg, TINY_COND, SHAPE[0])
    return LDMTask(unet, build_scheduler(scheduler_config(cfg), "ddpm"), cfg)


def _fit(task: LDMTask, cfg: LDMConfig, folder: Path, **kwargs):
    return quiet_fit(task, _Latents(), cfg.train, folder, config_for_hash={"ldm": 1}, **kwargs)


def test_ldm_resume_after_kill_matches_uninterrupted_run(tmp_path) -> None:
    cfg = _cfg()
    straight = _task(cfg)
    _fit(straight, cfg, tmp_path / "a")

    def die(step, ema):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(_task(cfg), cfg, tmp_path / "b", evaluate=die)  # dies at step 6
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 4
    resumed = _task(cfg)
    assert _fit(resumed, cfg, tmp_path / "b").resumed_from == 4
    for a, b in zip(straight.unet.parameters(), resumed.unet.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_evaluator_logs_grid_z_error_and_trajectory(tmp_path) -> None:
    cfg = _cfg(train=_cfg().train.model_copy(update={"ema_decay": 0.9}))
    task, data = _task(cfg), _Latents()
    run = RecordingRun()

    def decode(latent, z):
        image = torch.sigmoid(latent.mean(1, keepdim=True))
        return nn.functional.interpolate(image, scale_factor=2)

    evaluator = Evaluator(
        task,
        decode,
        run,  # type: ignore[arg-type]
        config=cfg,
        val=LatentSet(data.latent[:8], data.z[:8]),
        reference=LatentSet(data.latent, data.z),
        latent_shape=SHAPE,
        n_slices=4,
        final_step=cfg.train.steps,
        device=CPU,
    )
    result = _fit(task, cfg, tmp_path, run=run, evaluate=evaluator)
    assert result.ema is not None
    assert {"samples/ldm_000006.png", "samples/ldm_000008.png"} <= set(run.images)
    assert run.images["samples/ldm_000008.png"].shape == (2 * 18 + 2, 2 * 18 + 2)
    assert "samples/ldm_trajectory_strip.png" in run.images
    gif = iio.imread(run.artifacts[f"samples/{TRAJECTORY_GIF}"], index=None, extension=".gif")
    assert len(gif) == cfg.sample_steps
    evals = [m for _, m in run.metrics if "val_loss" in m]
    assert len(evals) == 2 and all(0 <= m["nn_level_error"] <= 3 for m in evals)
