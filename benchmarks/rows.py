"""The benchmark rows: ours and the reference, measured side by side in this process.

Every function takes a :class:`Bench` (parameters, device, data, budgets) and returns
:class:`~benchmarks.measure.Row` objects. Training sides alternate step by step under the same
wall-clock budget (:func:`~benchmarks.measure.interleaved`); training throughput comes from
the same runs whose models are then scored on the test split, so rows 1 and 2 share runs.
Peak memory is measured afterwards, one training step (or one sampling call) per side.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer, LatentDiffusionInferer, VQVAETransformerInferer
from monai.utils.enums import OrderingType
from monai.utils.ordering import Ordering
from torch import nn

from benchmarks import monai_models as mm
from benchmarks import prepare_throughput
from benchmarks.measure import PeakMemory, Row, interleaved, n_params, timed
from pipeline.core.config import AutoencoderConfig, AutoencoderKind, Params, Sampler, TrainConfig
from pipeline.data.datasets import EVAL_BATCH, EvalData
from pipeline.inference.autoregressive import sample_codes
from pipeline.inference.diffusion import (
    build_scheduler,
    guided_sample,
    scheduler_config,
)
from pipeline.metrics.perceptual import get_lpips
from pipeline.metrics.quality import reconstruction_metrics
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.conditioning import Conditioner
from pipeline.models.pixelcnn import GatedPixelCNN
from pipeline.models.unet import ZConditionedUNet
from pipeline.training.autoencoder import AutoencoderTask
from pipeline.training.ldm import LDMTask
from pipeline.training.loop import (
    Optimization,
    autocast_context,
    autocast_dtype,
    batch_indices,
)

logger = logging.getLogger(__name__)

#: Candidate widths when a MONAI network is scaled to our parameter count.
WIDTHS = range(8, 513, 8)
#: Share of the training budget given to the adversarial-step and LDM-step measurements.
ADVERSARIAL_SHARE = 0.2
#: Alternating repeats of the LDM sampling measurement (the fastest counts).
SAMPLING_REPEATS = 2
#: DDIM steps of the quality reference (``benchmarks.sampling_steps``: our default sampler and
#: step count are the fewest within 5 % of its fd_alex and z-probe MAE).
REFERENCE_DDIM_STEPS = 50


@dataclass
class Bench:
    """What every row needs.

    Attributes:
        params: our parameters (profile applied): model sizes, batch sizes, sampling settings.
        device: where everything runs.
        train: the training split in memory (slices (N, 1, H, W) in [0, 1], z, masks).
        test: the test split the reconstructions are scored on.
        budget: wall-clock seconds of each first-stage training run.
        n_samples: slices per sampling measurement.
        prepare_subjects: demo subjects of the prepare measurement.
        seed: seeds models, batch order and noise.
        matched: our sampler and step count that match DDIM 50 in quality on the trained
            demo LDM (``benchmarks.sampling_steps``' recommendation); None: the configured
            ``ldm.sampler`` and ``ldm.sample_steps``, unverified.
    """

    params: Params
    device: torch.device
    train: EvalData
    test: EvalData
    budget: float
    n_samples: int
    prepare_subjects: int
    seed: int = 0
    matched: tuple[Sampler, int] | None = None
    _lpips: nn.Module | None = field(default=None, repr=False)

    @property
    def lpips(self) -> nn.Module:
        """The LPIPS module (loaded on first use)."""
        if self._lpips is None:
            self._lpips = get_lpips(self.device)
        return self._lpips

    @property
    def levels(self) -> int:
        """Downsamplings of our first stage."""
        return len(self.params.autoencoder.channels) - 1

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Spatial size (h, w) of our first stage's latents and code grids."""
        f = 2**self.levels
        return self.train.image.shape[-2] // f, self.train.image.shape[-1] // f

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Index batches of the training split in the seeded order ``fit`` uses."""
        for idx in batch_indices(len(self.train.image), batch_size, self.seed, 0):
            yield torch.tensor(idx)


def autocast(
    device: torch.device, train: TrainConfig | None = None
) -> contextlib.AbstractContextManager[Any]:
    """The autocast of one measured step, the same for both sides.

    Args:
        device: where the step runs.
        train: the training settings of the stage measured: its steps then run under the
            autocast our training loop uses for them (bf16 on CUDA, and on a CPU with native
            bf16 where ``train.cpu_bf16`` is set). None (sampling): bf16 on CUDA only, as
            our samplers run.
    """
    if train is None:
        return autocast_context(device, torch.bfloat16 if device.type == "cuda" else None)
    return autocast_context(device, autocast_dtype(device, train))


def _without_adversarial(cfg: AutoencoderConfig, start: int) -> AutoencoderConfig:
    """``cfg`` with the discriminator starting at step ``start``."""
    disc = cfg.discriminator.model_copy(update={"start_step": start})
    return cfg.model_copy(update={"discriminator": disc})


def _our_step(task: AutoencoderTask, bench: Bench) -> Callable[[int], int]:
    """One step of our first stage (linear warmup, then the configured lr) on the next batch."""
    train_cfg = task.cfg.train
    order = bench.batches(train_cfg.batch_size)
    lrs = {name: [g["lr"] for g in opt.param_groups] for name, opt in task.optimizers.items()}

    def step(i: int) -> int:
        idx = next(order)
        batch = {"image": bench.train.image[idx].to(bench.device), "z": bench.train.z[idx]}
        batch["z"] = batch["z"].to(bench.device)
        warm = min(1.0, (i + 1) / max(1, train_cfg.warmup_steps))
        for name, opt in task.optimizers.items():
            for group, lr in zip(opt.param_groups, lrs[name], strict=True):
                group["lr"] = lr * warm
        with autocast(bench.device, train_cfg):
            task.train_step(batch, i, Optimization(task.optimizers, train_cfg.grad_clip))
        return len(idx)

    return step


def _monai_step(train: Callable[[torch.Tensor], Any], bench: Bench) -> Callable[[int], int]:
    """One MONAI tutorial step on the next batch of the same order as ours."""
    order = bench.batches(bench.params.autoencoder.train.batch_size)

    def step(_: int) -> int:
        idx = next(order)
        with autocast(bench.device, bench.params.autoencoder.train):
            train(bench.train.image[idx].to(bench.device))
        return len(idx)

    return step


def _score(recon: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], bench: Bench) -> dict:
    """Test SSIM and LPIPS of eval-mode reconstructions ``recon(x, z)``."""
    out = []
    with torch.no_grad():
        for x, z in zip(
            bench.test.image.split(EVAL_BATCH), bench.test.z.split(EVAL_BATCH), strict=True
        ):
            out.append(recon(x.to(bench.device), z.to(bench.device)).float().clamp(0, 1).cpu())
    test = bench.test
    return reconstruction_metrics(
        test.image, torch.cat(out), test.mask, test.z_index, device=bench.device
    )


def _step_mib(step: Callable[[int], int], bench: Bench) -> float:
    """Peak memory (MiB) of one more training step (at full learning rate)."""
    with PeakMemory(bench.device).measure() as mem:
        step(10**6)
    return mem.mib


def _train_and_score(
    sides: dict[str, tuple[Callable[[int], int], nn.Module, Callable[..., torch.Tensor]]],
    bench: Bench,
) -> dict[str, dict[str, Any]]:
    """Train the sides for the same budget, then score each; then one step's peak memory.

    Args:
        sides: name -> (step, trained module, ``recon(x, z)``).
        bench: data, device and budget.

    Returns:
        name -> throughput, steps, test SSIM/LPIPS and peak memories.
    """
    for _, module, _ in sides.values():
        module.train()
    steps = {name: side[0] for name, side in sides.items()}
    timings = interleaved(steps, seconds=bench.budget, device=bench.device)
    out: dict[str, dict[str, Any]] = {}
    for name, (step, module, recon) in sides.items():
        module.eval()
        with PeakMemory(bench.device).measure() as mem_eval:
            scores = _score(recon, bench)
        module.train()
        out[name] = {
            "slices_per_s": timings[name].slices_per_s,
            "steps": timings[name].iterations,
            "ssim": float(scores["ssim"]),
            "lpips": float(scores["lpips"]),
            "train_mib": _step_mib(step, bench),
            "eval_mib": mem_eval.mib,
        }
    return out


def _first_stage_pair(
    bench: Bench, kind: AutoencoderKind
) -> tuple[list[Row], AutoencoderTask, mm.AutoencoderKLStep | mm.VQVAEStep]:
    """Rows 1 and 2 for one kind: budget-limited training, then test SSIM and LPIPS."""
    cfg, cond, dev = bench.params.autoencoder, bench.params.conditioning, bench.device
    torch.manual_seed(bench.seed)
    task = AutoencoderTask(_without_adversarial(cfg, 10**9), cond, kind, bench.lpips, dev)
    target = n_params(task.model)
    torch.manual_seed(bench.seed)
    monai: mm.AutoencoderKLStep | mm.VQVAEStep
    if kind == "vqvae":
        width, net = mm.closest_width(
            lambda w: mm.vqvae(w, bench.levels, cfg.vq.num_codes, cfg.vq.code_dim), target, WIDTHS
        )
        monai = mm.VQVAEStep(net.to(dev))
        label, recipe = "VQ-VAE", "ours L1+LPIPS+VQ (EMA, restarts) | MONAI VQVAE L1+VQ, Adam 1e-4"
    else:
        width, net = mm.closest_width(
            lambda w: mm.autoencoder_kl(w, bench.levels, cfg.kl.latent_channels), target, WIDTHS
        )
        d_width, disc = mm.closest_width(
            lambda w: mm.patch_discriminator(w, cfg.discriminator.n_layers),
            n_params(task.disc),
            range(4, 257, 4),
        )
        monai = mm.AutoencoderKLStep(net.to(dev), disc.to(dev), bench.lpips)
        label = "KL autoencoder"
        recipe = "ours VAE-GAN L1+LPIPS+KL | MONAI AutoencoderKL L1+1e-3 LPIPS+1e-6 KL, Adam 1e-4"
    results = _train_and_score(
        {
            "ours": (
                _our_step(task, bench),
                task.model,
                lambda x, z: task.model.decode_from_latent(task.model.encode_to_latent(x, z), z),
            ),
            "monai": (_monai_step(monai, bench), monai.model, lambda x, _z: monai.reconstruct(x)),
        },
        bench,
    )
    ours, theirs = results["ours"], results["monai"]
    sizes = {
        "ours_params": target,
        "monai_params": n_params(monai.model),
        "monai_width": width,
        "ours_steps": ours["steps"],
        "monai_steps": theirs["steps"],
        "budget_s": bench.budget,
    }
    note = f"{recipe}; {target / 1e6:.2f}M vs {n_params(monai.model) / 1e6:.2f}M params"
    budget = f"after {bench.budget:.0f} s of training ({ours['steps']} vs {theirs['steps']} steps)"
    rows = [
        Row(
            f"{label} training",
            "slices/s",
            ours["slices_per_s"],
            theirs["slices_per_s"],
            ours_mib=ours["train_mib"],
            reference_mib=theirs["train_mib"],
            note=note + " (no adversarial term: see the next rows)",
            behind="ours adds an LPIPS (AlexNet) forward and backward per step that the "
            "MONAI VQ-VAE recipe lacks; autoencoder.perceptual_weight: 0 removes it, at a cost "
            "in LPIPS"
            if kind == "vqvae"
            else "",
            extra=sizes,
        ),
        Row(
            f"{label} reconstruction",
            "test SSIM",
            ours["ssim"],
            theirs["ssim"],
            ours_mib=ours["eval_mib"],
            reference_mib=theirs["eval_mib"],
            note=budget,
            behind="a short budget is a few dozen steps, dominated by the start of training; "
            "compare with the full 5-minute budget",
            extra=sizes,
        ),
        Row(
            f"{label} reconstruction",
            "test LPIPS",
            ours["lpips"],
            theirs["lpips"],
            better="lower",
            ours_mib=ours["eval_mib"],
            reference_mib=theirs["eval_mib"],
            note=budget + "; ours weighs LPIPS 0.5 in its loss, MONAI's recipe 0.001",
            extra=sizes,
        ),
    ]
    if kind == "vaegan":
        rows[0].extra |= {"monai_disc_params": n_params(monai.disc), "monai_disc_width": d_width}
    return rows, task, monai


def _adversarial_row(bench: Bench, task: AutoencoderTask, monai: mm.AutoencoderKLStep) -> Row:
    """Throughput of the generator + discriminator step (the adversarial phase)."""
    task.cfg = _without_adversarial(bench.params.autoencoder, 0)
    monai.adversarial = True
    for module in (task.model, task.disc, monai.model, monai.disc):
        module.train()
    steps = {"ours": _our_step(task, bench), "monai": _monai_step(monai, bench)}
    seconds = max(1.0, ADVERSARIAL_SHARE * bench.budget)
    timings = interleaved(steps, seconds=seconds, device=bench.device)
    return Row(
        "KL autoencoder + PatchGAN training",
        "slices/s",
        timings["ours"].slices_per_s,
        timings["monai"].slices_per_s,
        ours_mib=_step_mib(steps["ours"], bench),
        reference_mib=_step_mib(steps["monai"], bench),
        behind="ours computes the VQGAN adaptive weight, two extra backward passes to the "
        "decoder's last layer per step; computing it every few steps would close the gap",
        note="ours hinge + VQGAN adaptive weight | MONAI least squares, weight 0.01; "
        f"disc {n_params(task.disc) / 1e3:.0f}k vs {n_params(monai.disc) / 1e3:.0f}k params",
    )


def first_stage_rows(bench: Bench) -> list[Row]:
    """Rows 1-2: first-stage training throughput and test reconstruction after the budget."""
    vq_rows, _, _ = _first_stage_pair(bench, "vqvae")
    kl_rows, task, monai = _first_stage_pair(bench, "vaegan")
    return [*vq_rows, *kl_rows, _adversarial_row(bench, task, cast(mm.AutoencoderKLStep, monai))]


def _sampling_levels(n: int, device: torch.device) -> torch.Tensor:
    return torch.linspace(0, 1, n, device=device)


def ldm_rows(bench: Bench) -> list[Row]:
    """Row 3: LDM training step, guided DDIM sampling at equal steps and our default sampler at
    matched quality (decoding included) vs MONAI."""
    p, dev = bench.params, bench.device
    cfg, cond = p.ldm, p.conditioning
    channels = p.autoencoder.kl.latent_channels
    shape = (channels, *bench.latent_hw)
    torch.manual_seed(bench.seed)
    our_ae = Autoencoder(p.autoencoder, cond, "vaegan").to(dev).eval()
    unet = ZConditionedUNet(cfg, cond, channels).to(dev)
    task = LDMTask(unet, build_scheduler(scheduler_config(cfg), "ddpm"), cfg)
    _, monai_ae = mm.closest_width(
        lambda w: mm.autoencoder_kl(w, bench.levels, channels), n_params(our_ae), WIDTHS
    )
    monai_ae = monai_ae.to(dev).eval()
    monai_unet = mm.diffusion_unet(cfg, channels, cond.dim).to(dev)
    context = Conditioner(cond).to(dev)  # MONAI's side conditions through a context token
    opt = torch.optim.Adam([*monai_unet.parameters(), *context.parameters()], lr=mm.LR_LDM)
    train_sched = build_scheduler(scheduler_config(cfg), "ddpm")
    latent_inferer = LatentDiffusionInferer(train_sched, scale_factor=1.0)
    plain_inferer = DiffusionInferer(train_sched)
    batch, seconds = cfg.train.batch_size, max(2.0, ADVERSARIAL_SHARE * bench.budget)
    dtype = autocast_dtype(dev, cfg.train)
    precision = "in bf16 autocast, as ldm.train trains" if dtype else "in fp32"
    order = bench.batches(batch)

    def ours(i: int) -> int:
        data = {
            "latent": torch.randn(batch, *shape, device=dev),  # encoded once, before training
            "z": torch.rand(batch, device=dev),
        }
        with autocast(dev, cfg.train):
            task.train_step(data, i, Optimization(task.optimizers, cfg.train.grad_clip))
        return batch

    def monai_step(from_images: bool) -> Callable[[int], int]:
        def step(_: int) -> int:
            idx = next(order)
            z = bench.train.z[idx].to(dev)
            ctx = context(z)[:, None]
            drop = torch.rand(len(idx), device=dev) < cfg.cond_dropout
            ctx = torch.where(drop[:, None, None], torch.full_like(ctx, -1.0), ctx)
            noise = torch.randn(len(idx), *shape, device=dev)
            t = torch.randint(0, cfg.num_train_timesteps, (len(idx),), device=dev)
            with autocast(dev, cfg.train):
                if from_images:
                    pred = latent_inferer(
                        inputs=bench.train.image[idx].to(dev),
                        autoencoder_model=monai_ae,
                        diffusion_model=monai_unet,
                        noise=noise,
                        timesteps=t,
                        condition=ctx,
                    )
                else:
                    pred = plain_inferer(
                        inputs=torch.randn(len(idx), *shape, device=dev),
                        diffusion_model=monai_unet,
                        noise=noise,
                        timesteps=t,
                        condition=ctx,
                    )
                loss = F.mse_loss(pred.float(), noise.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return len(idx)

        return step

    steps = {"ours": ours, "monai": monai_step(True), "monai_latents": monai_step(False)}
    timings = interleaved(steps, seconds=seconds, device=dev)
    rates = {name: t.slices_per_s for name, t in timings.items()}
    mems = {name: _step_mib(step, bench) for name, step in steps.items()}

    unet.eval()
    monai_unet.eval()
    n, steps, w = bench.n_samples, cfg.sample_steps, cfg.guidance
    z = _sampling_levels(n, dev)

    def sample_ours(n_steps: int, sampler: Sampler = "ddim") -> torch.Tensor:
        gen = torch.Generator(device=dev).manual_seed(bench.seed)
        with torch.no_grad(), autocast(dev):
            lat = guided_sample(
                unet,
                scheduler_config(cfg),
                z,
                shape,
                sampler=sampler,
                steps=n_steps,
                guidance=w,
                generator=gen,
            )
            return our_ae.decode_from_latent(lat.float(), z)  # type: ignore[union-attr]

    matched_sampler, matched_steps = bench.matched or (cfg.sampler, steps)

    def sample_ours_matched(n_steps: int) -> torch.Tensor:
        return sample_ours(n_steps, matched_sampler)

    def sample_monai(n_steps: int) -> torch.Tensor:
        sched = build_scheduler(scheduler_config(cfg), "ddim")
        sched.set_timesteps(n_steps)
        gen = torch.Generator(device=dev).manual_seed(bench.seed)
        with torch.no_grad(), autocast(dev):
            return latent_inferer.sample(
                input_noise=torch.randn(n, *shape, generator=gen, device=dev),
                autoencoder_model=monai_ae,
                diffusion_model=monai_unet,
                scheduler=sched,
                conditioning=context(z)[:, None],
                mode="crossattn",
                verbose=False,
                cfg=w,
            )

    # name -> (sampler, its steps); "matched": our default sampler and step count against
    # MONAI's DDIM at the step count our default matches in quality
    samplers = {
        "ours": (sample_ours, steps),
        "monai": (sample_monai, steps),
        "ours_matched": (sample_ours_matched, matched_steps),
        "monai_matched": (sample_monai, REFERENCE_DDIM_STEPS),
    }
    for fn in {sample_ours, sample_monai, sample_ours_matched}:
        fn(1)  # warm-up
    seconds_taken: dict[str, list[float]] = {name: [] for name in samplers}
    sample_mems = {}
    for repeat in range(SAMPLING_REPEATS):  # alternating; the fastest repeat counts
        for name, (fn, n_steps) in samplers.items():
            with PeakMemory(dev).measure() as mem:
                _, elapsed = timed(lambda fn=fn, n_steps=n_steps: fn(n_steps), dev)
            seconds_taken[name].append(elapsed)
            if repeat == 0:
                sample_mems[name] = mem.mib
    speeds = {name: n / min(times) for name, times in seconds_taken.items()}
    unet_params = {"ours_unet": n_params(unet), "monai_unet": n_params(monai_unet)}
    return [
        Row(
            "LDM training step",
            "slices/s",
            rates["ours"],
            rates["monai"],
            ours_mib=mems["ours"],
            reference_mib=mems["monai"],
            behind="the UNets are the same MONAI blocks; ours adds gradient clipping and "
            "non-finite checks (a host synchronisation each) per step",
            note="ours trains on latents encoded once (encode_latents) | MONAI "
            "LatentDiffusionInferer encodes every batch; MONAI on stored latents: "
            f"{rates['monai_latents']:.1f} slices/s; batch {batch}; "
            f"both sides {precision}",
            extra={**unet_params, "monai_latents_slices_per_s": rates["monai_latents"]},
        ),
        Row(
            "LDM guided DDIM sampling",
            "slices/s",
            speeds["ours"],
            speeds["monai"],
            ours_mib=sample_mems["ours"],
            reference_mib=sample_mems["monai"],
            behind="the UNets are the same MONAI blocks; the difference is noise of a "
            "shared machine or our z-embedding, which MONAI's context token lacks",
            note=f"{n} slices, {steps} DDIM steps, guidance {w:g}, decoding included; "
            "both batch the conditional and null passes",
            extra=unet_params,
        ),
        Row(
            "LDM sampling at matched quality",
            "slices/s",
            speeds["ours_matched"],
            speeds["monai_matched"],
            ours_mib=sample_mems["ours_matched"],
            reference_mib=sample_mems["monai_matched"],
            note=f"{n} slices, guidance {w:g}, decoding included; ours {matched_sampler} "
            f"{matched_steps} steps | MONAI DDIM {REFERENCE_DDIM_STEPS} steps; "
            + (
                f"ours is the fewest-step setting within 5 % of DDIM {REFERENCE_DDIM_STEPS}'s "
                "fd_alex and z-probe MAE on the trained demo LDM (reports/sampling_steps.md)"
                if bench.matched
                else "no sampling_steps.json: ours is the configured default, its quality "
                "match unverified"
            ),
            extra={
                "ours_sampler": matched_sampler,
                "ours_steps": matched_steps,
                "reference_steps": REFERENCE_DDIM_STEPS,
                "quality_matched": bench.matched is not None,
            },
        ),
    ]


def prior_rows(bench: Bench) -> list[Row]:
    """Row 4: prior sampling on the same code grid, decoding included."""
    p, dev = bench.params, bench.device
    cond, vq = p.conditioning, p.autoencoder.vq
    h, w = bench.latent_hw
    n = bench.n_samples
    torch.manual_seed(bench.seed)
    prior = GatedPixelCNN(vq.num_codes, p.prior, cond).to(dev).eval()
    our_vq = Autoencoder(p.autoencoder, cond, "vqvae").to(dev).eval()
    width, trans = mm.closest_width(
        lambda d: mm.transformer(d, vq.num_codes, h * w), n_params(prior), WIDTHS
    )
    trans = trans.to(dev).eval()
    _, monai_vq = mm.closest_width(
        lambda c: mm.vqvae(c, bench.levels, vq.num_codes, vq.code_dim), n_params(our_vq), WIDTHS
    )
    monai_vq = monai_vq.to(dev).eval()
    z = _sampling_levels(n, dev)
    ordering = Ordering(
        ordering_type=OrderingType.RASTER_SCAN.value, spatial_dims=2, dimensions=(1, h, w)
    )

    def ours() -> torch.Tensor:
        gen = torch.Generator(device=dev).manual_seed(bench.seed)
        codes = sample_codes(prior, z, (h, w), generator=gen)
        with torch.no_grad():
            return our_vq.decode_indices(codes, z)

    def monai() -> torch.Tensor:
        return VQVAETransformerInferer().sample(
            latent_spatial_dim=(h, w),
            starting_tokens=torch.full((n, 1), vq.num_codes, device=dev),
            vqvae_model=monai_vq,
            transformer_model=trans,
            ordering=ordering,
            conditioning=torch.randn(n, 1, width, device=dev),  # the z token's embedding
            verbose=False,
        )

    speeds, mems = {}, {}
    for name, fn in (("ours", ours), ("monai", monai)):
        with PeakMemory(dev).measure() as mem:
            _, elapsed = timed(fn, dev)
        speeds[name], mems[name] = n / elapsed, mem.mib
    return [
        Row(
            "prior sampling",
            "slices/s",
            speeds["ours"],
            speeds["monai"],
            ours_mib=mems["ours"],
            reference_mib=mems["monai"],
            note=f"{n} slices, {h}x{w} grid of {vq.num_codes} codes, decoding included; ours "
            f"gated PixelCNN with incremental batched sampling ({n_params(prior) / 1e6:.2f}M) | "
            f"MONAI DecoderOnlyTransformer {width}x{mm.TRANSFORMER_DEPTH} "
            f"({n_params(trans) / 1e6:.2f}M) via VQVAETransformerInferer",
            extra={"ours_params": n_params(prior), "monai_params": n_params(trans)},
        )
    ]


def prepare_rows(bench: Bench) -> list[Row]:
    """Row 5: prepare throughput with 2 workers against 1 (no MONAI counterpart)."""
    with PeakMemory(torch.device("cpu")).measure() as mem:
        result = prepare_throughput.main(["--subjects", str(bench.prepare_subjects)])
    children_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return [
        Row(
            "prepare (2 workers vs 1)",
            "volumes/s",
            result["volumes_per_s_2"],
            result["volumes_per_s_1"],
            ours_mib=mem.mib,
            reference_mib=math.nan,
            behind="the worker pool's start-up (spawned processes importing numpy, scipy and "
            "nibabel) outweighs a handful of volumes; it pays off on real cohorts of hundreds "
            "of volumes, and prepare.workers: 1 is faster for tiny ones",
            note=f"{int(result['volumes'])} full-size demo volumes (176x208x176); reference = "
            f"1 worker; peak MiB is the parent process (largest child {children_mib:.0f} MiB)",
            extra=result,
        )
    ]


ROWS: dict[str, Callable[[Bench], list[Row]]] = {
    "first_stage": first_stage_rows,
    "ldm": ldm_rows,
    "prior": prior_rows,
    "prepare": prepare_rows,
}
