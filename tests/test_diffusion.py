"""Schedulers, guided DDIM, SDEdit, inpainting, trajectories and the LDM training task;
the recipe levers: min-SNR-γ weighting, zero terminal SNR, mirrored latents."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
import torch.nn.functional as F
from monai.networks.schedulers import PNDMScheduler
from support import TINY_COND, TINY_LATENT_SHAPE, RecordingRun, quiet_fit, tiny_ldm
from torch import nn
from torch.utils.data import Dataset

from pipeline.core.checkpoint import load_checkpoint
from pipeline.core.config import LDMConfig, TrainConfig
from pipeline.core.errors import InputError
from pipeline.inference import diffusion
from pipeline.inference.diffusion import (
    build_scheduler,
    ddim_sample,
    diffusion_loss,
    guided_output,
    guided_sample,
    inpaint,
    min_snr_weight,
    pndm_sample,
    scheduler_config,
    sdedit,
    step_guidance,
)
from pipeline.models.unet import ZConditionedUNet
from pipeline.training import ldm
from pipeline.training.ldm import TRAJECTORY_GIF, Evaluator, LatentSet, LDMTask, random_mirror
from pipeline.training.loop import Optimization

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


def test_dropout_acts_in_training_only_and_keeps_the_parameter_names() -> None:
    plain, dropped = _unet(), _unet(_cfg(dropout=0.5))
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    dropped.load_state_dict(plain.state_dict())  # files without dropout load unchanged
    x, t, z = torch.randn(2, *SHAPE, generator=_gen(1)), torch.tensor([10, 500]), torch.rand(2)
    with torch.no_grad():
        assert torch.equal(dropped(x, t, z), plain(x, t, z))  # eval: no dropout
        dropped.train()
        first, second = dropped(x, t, z), dropped(x, t, z)
    assert not torch.allclose(first, second)
    assert not torch.allclose(first, plain(x, t, z))


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


def test_guidance_min_t_guides_only_the_high_noise_steps() -> None:
    assert (step_guidance(500, 2.0, 500), step_guidance(499, 2.0, 500)) == (2.0, 1.0)
    assert step_guidance(0, 2.0, 0) == 2.0  # 0 guides every step
    unet, z = _unet(), torch.tensor([0.1, 0.5, 0.9])
    config = scheduler_config(_cfg(prediction_type="v_prediction"))
    sched = build_scheduler(config, "ddim")
    calls: list[tuple[int, int]] = []
    unet.register_forward_hook(lambda m, a, out: calls.append((int(a[1][0]), a[0].shape[0])))
    partly = ddim_sample(unet, sched, z, SHAPE, 5, 3.0, _gen(), guidance_min_t=500)
    # timesteps 999, 749, 500 guided (conditional and null in one batch); 250, 0 conditional only
    assert calls == [(999, 6), (749, 6), (500, 6), (250, 3), (0, 3)]
    everywhere = ddim_sample(unet, sched, z, SHAPE, 5, 3.0, _gen())
    nowhere = ddim_sample(unet, sched, z, SHAPE, 5, 3.0, _gen(), guidance_min_t=1000)
    torch.testing.assert_close(nowhere, ddim_sample(unet, sched, z, SHAPE, 5, 1.0, _gen()))
    assert (partly - everywhere).abs().mean() > 1e-4 and (partly - nowhere).abs().mean() > 1e-4

    calls.clear()
    kwargs = {"steps": 4, "guidance": 3.0, "generator": _gen(), "guidance_min_t": 500}
    guided_sample(unet, config, z, SHAPE, sampler="pndm", **kwargs)
    # PLMS timesteps 750, 500, 500, 250, 0 (the warm-up repeats the second)
    assert calls == [(750, 6), (500, 6), (500, 6), (250, 3), (0, 3)]
    calls.clear()
    sdedit(unet, sched, torch.randn(3, *SHAPE), z, 0.6, 10, 3.0, _gen(), guidance_min_t=500)
    assert [n for _, n in calls] == [6 if t >= 500 else 3 for t, _ in calls]
    assert {n for _, n in calls} == {3, 6}


def test_guidance_min_t_is_checked_and_defaults_to_every_step() -> None:
    assert LDMConfig().guidance_min_t == 0  # files written before the key existed
    with pytest.raises(ValueError, match="guidance_min_t must be in"):
        LDMConfig(guidance_min_t=1001)
    with pytest.raises(ValueError, match="guidance_min_t"):
        LDMConfig(guidance_min_t=-1)


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


# ------------------------------------------------------------------ min-SNR-γ weighting


def test_min_snr_weights_match_hand_computed_values() -> None:
    alpha_bar = torch.tensor([0.2, 0.5, 0.9, 0.99, 0.0, 1.0])  # SNR 1/4, 1, 9, 99, 0, ∞
    eps = min_snr_weight(alpha_bar, "epsilon", 5.0)  # min(SNR, 5) / SNR
    v = min_snr_weight(alpha_bar, "v_prediction", 5.0)  # min(SNR, 5) / (SNR + 1)
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 5 / 9, 5 / 99, 1.0, 0.0]))
    torch.testing.assert_close(v, torch.tensor([0.2, 0.5, 0.5, 0.05, 0.0, 0.0]))
    torch.testing.assert_close(
        min_snr_weight(alpha_bar[:4], "v_prediction", 1.0), torch.tensor([0.2, 0.5, 0.1, 0.01])
    )
    with pytest.raises(InputError, match="prediction_type"):
        min_snr_weight(alpha_bar, "sample", 5.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_loss_weights_each_sample_and_uniform_is_unchanged(prediction_type: str) -> None:
    cfg = _cfg(prediction_type=prediction_type)
    sched, unet = build_scheduler(scheduler_config(cfg), "ddpm"), _unet(cfg)
    latent = torch.randn(3, *SHAPE, generator=_gen(10))
    noise = torch.randn(3, *SHAPE, generator=_gen(11))
    t, z, drop = torch.tensor([5, 300, 900]), torch.tensor([0.1, 0.5, 0.9]), torch.zeros(3) > 0
    with torch.no_grad():
        uniform = diffusion_loss(unet, sched, latent, z, noise, t, drop)
        weighted = diffusion_loss(
            unet, sched, latent, z, noise, t, drop, weighting="min_snr", min_snr_gamma=5.0
        )
        # the formula before loss weighting existed
        v = prediction_type == "v_prediction"
        target = (sched.get_velocity(latent, noise, t) if v else noise).float()
        out = unet(sched.add_noise(latent, noise, t), t, z, drop).float()
    assert torch.equal(uniform, F.mse_loss(out, target))
    a = sched.alphas_cumprod[t].double()
    snr = a / (1 - a)
    w = snr.clamp(max=5.0) / (snr + 1 if v else snr)
    per_sample = (out - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(weighted, (w.float() * per_sample).mean())
    assert w.min() < 0.5 * w.max()  # the timesteps are weighted differently
    assert abs(float(weighted) - float(uniform)) > 1e-3
    with pytest.raises(InputError, match="weighting"):
        diffusion_loss(unet, sched, latent, z, noise, t, drop, weighting="snr")  # type: ignore[arg-type]


# ------------------------------------------------------------------ zero terminal SNR


def _ztsnr_cfg() -> LDMConfig:
    return _cfg(prediction_type="v_prediction", zero_terminal_snr=True)


def test_zero_terminal_snr_rescales_every_scheduler_alike(monkeypatch) -> None:
    config = scheduler_config(_ztsnr_cfg())
    plain = build_scheduler(scheduler_config(_cfg(prediction_type="v_prediction")), "ddpm")
    ddpm, ddim = build_scheduler(config, "ddpm"), build_scheduler(config, "ddim")
    a, a0 = ddpm.alphas_cumprod, plain.alphas_cumprod
    assert float(a[-1]) == 0.0 and float(a0[-1]) > 0  # the last timestep is pure noise now
    torch.testing.assert_close(a[0], a0[0])  # and the first is unchanged
    assert (a[1:] < a[:-1]).all()
    assert ((ddpm.betas > 0) & (ddpm.betas <= 1)).all() and float(ddpm.betas[-1]) == 1.0
    torch.testing.assert_close(ddpm.alphas, 1 - ddpm.betas)
    s0 = a0.double().sqrt()  # Algorithm 1: sqrt(ᾱ) shifted and scaled
    expected = (s0 - s0[-1]) * s0[0] / (s0[0] - s0[-1])
    torch.testing.assert_close(a.double().sqrt(), expected, atol=1e-6, rtol=0)
    assert torch.equal(ddim.alphas_cumprod, a) and torch.equal(ddim.betas, ddpm.betas)

    built: list[PNDMScheduler] = []

    class Recording(PNDMScheduler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(diffusion, "PNDMScheduler", Recording)
    pndm_sample(_unet(_ztsnr_cfg()), config, torch.tensor([0.5]), SHAPE, 3, 1.0, _gen())
    assert len(built) == 1 and torch.equal(built[0].alphas_cumprod, a)
    assert "zero_terminal_snr" not in scheduler_config(_cfg())  # saved schedules read the same


def test_zero_terminal_snr_needs_v_prediction() -> None:
    with pytest.raises(InputError, match=r"zero_terminal_snr.*v_prediction.*'epsilon'"):
        scheduler_config(_cfg(zero_terminal_snr=True))


def test_zero_terminal_snr_sampling_starts_at_pure_noise_and_stays_finite() -> None:
    cfg = _ztsnr_cfg()
    config = scheduler_config(cfg)
    sched, unet = build_scheduler(config, "ddim"), _unet(cfg)
    z = torch.tensor([0.0, 0.5, 1.0])
    for eta in (0.0, 1.0):
        assert torch.isfinite(ddim_sample(unet, sched, z, SHAPE, 4, 2.0, _gen(), eta=eta)).all()
    kwargs = {"steps": 4, "guidance": 2.0, "generator": _gen()}
    assert torch.isfinite(guided_sample(unet, config, z, SHAPE, sampler="pndm", **kwargs)).all()
    assert torch.isfinite(sdedit(unet, sched, torch.randn(3, *SHAPE), z, 1.0, 4, 2.0, _gen())).all()

    target = torch.randn(3, *SHAPE, generator=_gen(5))
    out, traj = ddim_sample(
        _Oracle(target, sched), sched, z, SHAPE, 5, 2.5, _gen(), return_trajectory=True
    )
    assert traj.timesteps[0] == cfg.num_train_timesteps - 1
    torch.testing.assert_close(traj.x0[0], target)  # at ᾱ = 0, x0 = -v exactly
    torch.testing.assert_close(out, target, atol=1e-3, rtol=1e-3)
    oracle = _Oracle(target, build_scheduler(config, "ddpm"))
    pndm = pndm_sample(oracle, config, z, SHAPE, 10, 2.5, _gen())
    torch.testing.assert_close(pndm, target, atol=1e-3, rtol=1e-3)
    with pytest.raises(InputError, match="pndm cannot start"):  # steps = T: PLMS at ᾱ = 0
        pndm_sample(unet, config, z, SHAPE, cfg.num_train_timesteps, 2.0, _gen())


def test_min_snr_loss_and_gradients_are_finite_with_zero_terminal_snr() -> None:
    cfg = _ztsnr_cfg()
    sched, unet = build_scheduler(scheduler_config(cfg), "ddpm"), _unet(cfg)
    ends = torch.tensor([0, cfg.num_train_timesteps - 1])  # SNR 666 and 0
    w = min_snr_weight(sched.alphas_cumprod[ends], "v_prediction", 5.0)
    assert torch.isfinite(w).all() and float(w[1]) == 0.0
    latent, noise = torch.randn(2, *SHAPE, generator=_gen(12)), torch.randn(2, *SHAPE)
    z, drop = torch.tensor([0.2, 0.8]), torch.zeros(2, dtype=torch.bool)
    for weighting in ("uniform", "min_snr"):
        unet.zero_grad()
        loss = diffusion_loss(unet, sched, latent, z, noise, ends, drop, weighting=weighting)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in unet.parameters() if p.grad is not None)


# ------------------------------------------------------------------ mirrored latents


def test_random_mirror_flips_about_half_reproducibly() -> None:
    latent = torch.randn(400, *SHAPE, generator=_gen(9))
    torch.manual_seed(0)
    a = random_mirror(latent)
    torch.manual_seed(0)
    b = random_mirror(latent)
    assert torch.equal(a, b)
    flipped = (a == latent.flip(-1)).flatten(1).all(1)
    kept = (a == latent).flatten(1).all(1)
    assert (flipped ^ kept).all()  # each latent whole, either as it was or mirrored
    assert 150 < int(flipped.sum()) < 250  # Binomial(400, 1/2): mean 200, sd 10
    torch.manual_seed(1)
    assert not torch.equal(random_mirror(latent), a)


def test_train_step_mirrors_and_weights_only_when_asked(monkeypatch) -> None:
    seen: list[tuple[torch.Tensor, ...]] = []
    weightings: list[str] = []

    def spy(unet, scheduler, latent, z, noise, t, drop, **kwargs):
        seen.append((latent.clone(), noise.clone(), t.clone(), drop.clone()))
        weightings.append(kwargs["weighting"])
        return diffusion_loss(unet, scheduler, latent, z, noise, t, drop, **kwargs)

    monkeypatch.setattr(ldm, "diffusion_loss", spy)
    batch = {"latent": torch.randn(32, *SHAPE, generator=_gen(13)), "z": torch.rand(32)}
    for cfg in (_cfg(), _cfg(mirror_latents=True, loss_weighting="min_snr")):
        task = _task(cfg)
        torch.manual_seed(3)
        task.train_step(batch, 0, Optimization(task.optimizers, 0.0))
    (plain, *draws), (mirrored, *same_draws) = seen
    assert torch.equal(plain, batch["latent"])
    flipped = (mirrored == batch["latent"].flip(-1)).flatten(1).all(1)
    kept = (mirrored == batch["latent"]).flatten(1).all(1)
    assert (flipped ^ kept).all() and 4 <= int(flipped.sum()) <= 28
    for x, y in zip(draws, same_draws, strict=True):  # flips are drawn last: same noise, t, drop
        assert torch.equal(x, y)
    assert weightings == ["uniform", "min_snr"]


def test_train_step_trains_on_posterior_samples_only_when_asked(monkeypatch) -> None:
    seen: list[tuple[torch.Tensor, ...]] = []

    def spy(unet, scheduler, latent, z, noise, t, drop, **kwargs):
        seen.append((latent.clone(), noise.clone(), t.clone(), drop.clone()))
        return diffusion_loss(unet, scheduler, latent, z, noise, t, drop, **kwargs)

    monkeypatch.setattr(ldm, "diffusion_loss", spy)
    mean = torch.randn(16, *SHAPE, generator=_gen(13))
    std = torch.rand(16, *SHAPE, generator=_gen(14))
    batch = {"latent": mean, "latent_std": std, "z": torch.rand(16)}
    for cfg, data in (
        (_cfg(), batch),  # off: the stored std is ignored
        (_cfg(posterior_samples=True), batch),
        (_cfg(posterior_samples=True), {"latent": mean, "z": batch["z"]}),  # no std (VQ-VAE)
    ):
        task = _task(cfg)
        torch.manual_seed(3)
        task.train_step(data, 0, Optimization(task.optimizers, 0.0))
    (plain, *draws), (sampled, *same_draws), (no_std, *_) = seen
    assert torch.equal(plain, mean) and torch.equal(no_std, mean)
    for x, y in zip(draws, same_draws, strict=True):  # drawn after noise, t and dropout
        assert torch.equal(x, y)
    # the same global stream, replayed: the diffusion noise, t, dropout, then the posterior's
    torch.manual_seed(3)
    torch.randn_like(mean), torch.randint(0, task.scheduler.num_train_timesteps, (16,))
    torch.rand(16)
    torch.testing.assert_close(sampled, mean + std * torch.randn_like(mean))
    assert not torch.equal(sampled, mean)


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


class _EstimateRecorder(_Oracle):
    """The exact model, self-conditioned: it records the estimate each call gets."""

    self_condition = True

    def __init__(self, target: torch.Tensor, scheduler) -> None:
        super().__init__(target, scheduler)
        self.estimates: list[torch.Tensor | None] = []
        self.grad_enabled: list[bool] = []

    def forward(self, x, t, z, drop_mask, x0_estimate=None):
        self.estimates.append(x0_estimate)
        self.grad_enabled.append(torch.is_grad_enabled())
        return super().forward(x, t, z, drop_mask)


def test_a_self_conditioned_unet_takes_the_estimate_as_more_input_channels() -> None:
    cfg = _cfg(self_condition=True)
    unet = _unet(cfg)
    assert unet.unet.conv_in.conv.in_channels == 2 * SHAPE[0]
    x, t, z = torch.randn(2, *SHAPE, generator=_gen(1)), torch.tensor([10, 500]), torch.rand(2)
    with torch.no_grad():
        none, zeros = unet(x, t, z), unet(x, t, z, x0_estimate=torch.zeros_like(x))
        some = unet(x, t, z, x0_estimate=torch.randn(x.shape, generator=_gen(2)))
    torch.testing.assert_close(none, zeros)  # no estimate is the zeros it trained with
    assert not torch.allclose(none, some)
    with pytest.raises(InputError, match="self_condition"):
        _unet()(x, t, z, x0_estimate=x)


@pytest.mark.parametrize("sampler", ["ddim", "pndm"])
def test_samplers_give_a_self_conditioned_unet_the_previous_steps_estimate(sampler: str) -> None:
    cfg = _cfg(prediction_type="v_prediction")
    config = scheduler_config(cfg)
    target = torch.randn(2, *SHAPE, generator=_gen(4))
    oracle = _EstimateRecorder(target, build_scheduler(config, "ddpm"))
    z = torch.tensor([0.2, 0.8])
    out = guided_sample(
        oracle, config, z, SHAPE, sampler=sampler, steps=4, guidance=2.0, generator=_gen()
    )
    torch.testing.assert_close(out, target, atol=1e-3, rtol=1e-3)
    first, *rest = oracle.estimates
    assert first is None and len(rest) >= 3
    for estimate in rest:  # the exact model's x0, for both halves of the guided batch
        torch.testing.assert_close(estimate, torch.cat([target, target]), atol=1e-3, rtol=1e-3)


def test_the_self_conditioned_loss_trains_the_pass_given_a_no_gradient_estimate() -> None:
    cfg = _cfg(prediction_type="v_prediction")
    scheduler = build_scheduler(scheduler_config(cfg), "ddpm")
    latent = torch.randn(3, *SHAPE, generator=_gen(5))
    oracle = _EstimateRecorder(latent, scheduler)
    noise, t = torch.randn(latent.shape, generator=_gen(6)), torch.tensor([5, 300, 999])
    args = (oracle, scheduler, latent, torch.rand(3), noise, t, torch.zeros(3, dtype=torch.bool))
    assert float(diffusion_loss(*args, self_condition=True)) < 1e-8
    assert oracle.estimates[0] is None and oracle.grad_enabled == [False, True]
    torch.testing.assert_close(oracle.estimates[1], latent, atol=1e-4, rtol=1e-4)
    oracle.estimates.clear()
    diffusion_loss(*args)
    assert oracle.estimates == [None]  # off: one pass, no estimate


def test_train_step_self_conditions_about_half_the_steps_with_the_same_draws(monkeypatch) -> None:
    seen: list[tuple[torch.Tensor, ...]] = []
    flags: list[bool] = []

    def spy(unet, scheduler, latent, z, noise, t, drop, **kwargs):
        seen.append((noise.clone(), t.clone(), drop.clone()))
        flags.append(kwargs["self_condition"])
        return diffusion_loss(unet, scheduler, latent, z, noise, t, drop, **kwargs)

    monkeypatch.setattr(ldm, "diffusion_loss", spy)
    batch = {"latent": torch.randn(4, *SHAPE, generator=_gen(13)), "z": torch.rand(4)}
    for cfg in (_cfg(), _cfg(self_condition=True)):
        task = _task(cfg)
        for step in range(16):
            torch.manual_seed(step)
            task.train_step(batch, step, Optimization(task.optimizers, 0.0))
    plain, conditioned = flags[:16], flags[16:]
    assert not any(plain) and 3 <= sum(conditioned) <= 13
    for x, y in zip(seen[:16], seen[16:], strict=True):  # drawn last: the same noise, t, drop
        for a, b in zip(x, y, strict=True):
            assert torch.equal(a, b)
