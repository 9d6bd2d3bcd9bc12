"""Training, evaluation and export of the first stage (VQ-VAE or VAE-GAN autoencoder).

- :class:`AutoencoderTask`: the :class:`~pipeline.training.loop.TrainingTask` of both kinds. One
  generator step (L1 + LPIPS + VQ commitment or annealed KL + VQGAN-weighted adversarial
  loss, and for the VAE-GAN optionally the scale-equivariance term) and, once the
  discriminator has started, one discriminator step per batch.
- :class:`Evaluator`: the ``evaluate`` callback of :func:`~pipeline.training.loop.fit`: validation
  SSIM/PSNR/LPIPS, "real | recon" grids ordered by z, random-latent grids (vaegan) and a
  codebook-usage histogram (vqvae).
- :func:`train_first_stage`: the whole ``train_autoencoder`` stage for one kind (the model
  file goes through :mod:`pipeline.models.files`), with the decoder-only phase
  (``autoencoder.decoder_finetune``) as a second :func:`~pipeline.training.loop.fit` after the
  first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from pipeline.core import distributed
from pipeline.core.config import (
    AutoencoderConfig,
    AutoencoderKind,
    ConditioningConfig,
    DecoderFinetuneConfig,
    Params,
)
from pipeline.core.errors import InputError
from pipeline.core.figures import figure_image, rows_by_z, save_png
from pipeline.core.io import write_json
from pipeline.core.stage import StagePaths
from pipeline.core.tracking import StageRun
from pipeline.data.datasets import EVAL_BATCH, EvalData, SliceDataset
from pipeline.metrics.perceptual import get_lpips
from pipeline.metrics.quality import reconstruction_metrics
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.discriminator import ZPatchDiscriminator
from pipeline.models.files import load_autoencoder, save_model
from pipeline.training.concurrency import take_freed_cores
from pipeline.training.loop import Optimization, TrainingTask, adamw, finish_resume, fit
from pipeline.training.losses import (
    adaptive_weight,
    discriminator_loss,
    generator_loss,
    kl_weight,
    ssim_loss,
)

logger = logging.getLogger(__name__)

#: AdamW betas of both first-stage optimizers (VQGAN's).
_BETAS = (0.5, 0.9)
#: Rows of the reconstruction grids (slices spread evenly over z).
GRID_ROWS = 8
#: Random latents per z level in the VAE-GAN sample grid.
GRID_SAMPLES = 6


def build_autoencoder(
    cfg: AutoencoderConfig, cond_cfg: ConditioningConfig, kind: AutoencoderKind
) -> Autoencoder:
    """A freshly initialised autoencoder.

    Args:
        cfg: architecture, VQ and KL settings.
        cond_cfg: z-embedding settings.
        kind: ``vqvae`` or ``vaegan``.

    Returns:
        The :class:`Autoencoder` (train mode, on the CPU).
    """
    return Autoencoder(cfg, cond_cfg, kind)


def sync_buffers(target: nn.Module, source: nn.Module) -> nn.Module:
    """Copy every buffer of ``source`` into ``target``.

    The weight EMA of :func:`~pipeline.training.loop.fit` averages parameters only; the VQ codebook
    and its statistics are buffers and must come from the live model.

    Args:
        target: module to update in place (e.g. the EMA copy).
        source: module of the same architecture (the live model).

    Returns:
        ``target``.
    """
    src = dict(source.named_buffers())
    with torch.no_grad():
        for name, buf in target.named_buffers():
            buf.copy_(src[name])
    return target


class AutoencoderTask(TrainingTask):
    """Both optimizers of the first stage and its ``train_step``.

    Modules: ``model`` (the :class:`Autoencoder`, weight EMA applies to it) and ``disc`` (the
    :class:`ZPatchDiscriminator`). Optimizers: AdamW with betas (0.5, 0.9) as in VQGAN; the
    generator at ``cfg.train.lr``, the discriminator at ``cfg.discriminator.lr``.
    :meth:`freeze_encoder` switches to the decoder-only phase.

    Args:
        cfg: autoencoder section of the params.
        cond_cfg: z-embedding settings.
        kind: ``vqvae`` or ``vaegan``.
        perceptual: frozen LPIPS module ``(x, y) -> (B,)``
            (:func:`pipeline.metrics.perceptual.get_lpips`);
            may be None only when ``cfg.perceptual_weight`` is 0.
        device: where the modules live.

    Raises:
        ValueError: ``perceptual`` is missing although ``perceptual_weight`` > 0.
    """

    ema_module = "model"

    def __init__(
        self,
        cfg: AutoencoderConfig,
        cond_cfg: ConditioningConfig,
        kind: AutoencoderKind,
        perceptual: nn.Module | None,
        device: torch.device,
    ) -> None:
        if perceptual is None and cfg.perceptual_weight > 0:
            raise InputError(
                f"perceptual_weight={cfg.perceptual_weight} needs an LPIPS module; pass "
                "pipeline.metrics.perceptual.get_lpips(device) or set "
                "autoencoder.perceptual_weight: 0"
            )
        self.cfg, self.kind, self.perceptual = cfg, kind, perceptual
        self.model = build_autoencoder(cfg, cond_cfg, kind).to(device)
        self.disc = ZPatchDiscriminator(cfg.discriminator, cond_cfg).to(device)
        self.modules = {"model": self.model, "disc": self.disc}
        wd = cfg.train.weight_decay
        self.optimizers = {
            "model": adamw(self.model.parameters(), cfg.train.lr, wd, _BETAS),
            "disc": adamw(self.disc.parameters(), cfg.discriminator.lr, wd, _BETAS),
        }
        self.encoder_frozen = False
        self.adversarial_after_freeze = True

    def freeze_encoder(self, phase: DecoderFinetuneConfig) -> None:
        """Start the decoder-only phase.

        Freezes the encoder and the z-embedding (the latents no longer change) and gives the
        ``model`` optimizer a fresh AdamW over the decoder's parameters at ``phase.train.lr``.
        With ``phase.discriminator_lr`` set, the discriminator keeps its optimizer and state
        at that peak learning rate; unset, the adversarial term stays off for the phase.
        Call it between the two :func:`fit` calls, on the weights the first phase exports
        (load them into ``self.model`` first).

        Args:
            phase: the phase's settings; ``train`` must be set (its ``lr`` and
                ``weight_decay`` are read here).

        Raises:
            InputError: a VQ-VAE (its codebook would still move in the forward pass), or
                ``phase.train`` unset.
        """
        if self.model.quantizer is not None:
            raise InputError("decoder-only fine-tuning is for the vaegan kind, not vqvae")
        if phase.train is None:
            raise InputError("decoder_finetune.train is not set: the phase is off")
        self.model.encoder.requires_grad_(False)
        self.model.z_embed.requires_grad_(False)
        decoder = [p for p in self.model.parameters() if p.requires_grad]
        train = phase.train
        self.optimizers["model"] = adamw(decoder, train.lr, train.weight_decay, _BETAS)
        if phase.discriminator_lr is not None:
            for group in self.optimizers["disc"].param_groups:  # fit schedules from initial_lr
                group["lr"] = group["initial_lr"] = phase.discriminator_lr
        self.adversarial_after_freeze = phase.discriminator_lr is not None
        self.encoder_frozen = True

    @property
    def scale_equivariance_on(self) -> bool:
        """Whether ``train_step`` adds the scale-equivariance term: ``scale_equivariance``
        > 0, a vaegan, and the encoder still training (the term shapes the latent, which the
        decoder-only phase no longer changes)."""
        return self.cfg.scale_equivariance > 0 and self.kind == "vaegan" and not self.encoder_frozen

    def adversarial_on(self, step: int) -> bool:
        """Whether the discriminator trains and feeds the generator at ``step``.

        Args:
            step: global step.

        Returns:
            True from ``discriminator.start_step`` on, for the kinds in
            ``discriminator.kinds``, unless ``discriminator.weight`` is 0 or the decoder-only
            phase runs without a ``discriminator_lr``.
        """
        d = self.cfg.discriminator
        if self.encoder_frozen and not self.adversarial_after_freeze:
            return False
        return self.kind in d.kinds and d.weight > 0 and step >= d.start_step

    def train_step(
        self, batch: dict[str, torch.Tensor], step: int, optim: Optimization
    ) -> dict[str, float]:
        """One generator step and (after ``discriminator.start_step``) one discriminator step.

        Args:
            batch: ``image`` (B, 1, H, W) in [0, 1], ``z`` (B,) in [0, 1] and, where the
                split has tissue labels, ``tissue`` (B, H, W) int64 (trains the decoder's
                tissue head with weight ``tissue_weight``).
            step: global step (drives the KL schedule and the discriminator start).
            optim: applies each loss to its optimizer.

        Returns:
            Scalar losses and statistics to log.
        """
        cfg = self.cfg
        x, z = batch["image"], batch["z"]
        out = self.net("model")(x, z, downscaled=self.scale_equivariance_on)
        rec = (out.recon - x).abs().mean()
        perc = (
            self.perceptual(out.recon, x).mean()
            if self.perceptual is not None
            else torch.zeros((), device=x.device)
        )
        nll = cfg.l1_weight * rec + cfg.perceptual_weight * perc
        logs: dict[str, float] = {"rec": rec.item(), "perceptual": perc.item()}
        if out.tissue_logits is not None and "tissue" in batch:
            tissue = F.cross_entropy(out.tissue_logits, batch["tissue"])
            nll = nll + cfg.tissue_weight * tissue
            logs["tissue_ce"] = tissue.item()
        if out.downscaled_recon is not None:
            small = (out.downscaled_recon - F.avg_pool2d(x, 2)).abs().mean()
            nll = nll + cfg.scale_equivariance * small
            logs["scale_equivariance"] = small.item()
        if cfg.ssim_weight > 0:
            structure = ssim_loss(out.recon, x)
            nll = nll + cfg.ssim_weight * structure
            logs["ssim_loss"] = structure.item()
        if out.vq_loss is not None:
            latent_loss = out.vq_loss
            logs.update(
                vq=out.vq_loss.item(),
                perplexity=float(out.perplexity),
                codes_used=float(out.codes_used),
            )
        elif self.encoder_frozen:  # the KL term has no trainable weights left
            latent_loss = torch.zeros((), device=x.device)
            logs["kl"] = out.kl.item()
        else:
            weight = kl_weight(
                step,
                cfg.train.steps,
                cycles=cfg.kl.cycles,
                ramp_ratio=cfg.kl.ramp_ratio,
                max_weight=cfg.kl.max_weight,
            )
            latent_loss = weight * out.kl
            logs.update(kl=out.kl.item(), kl_weight=weight)

        adv_on = self.adversarial_on(step)
        adv = aw = torch.zeros((), device=x.device)
        if adv_on:
            self.disc.requires_grad_(False)  # the generator step needs no discriminator grads
            adv = generator_loss(self.disc(out.recon, z), cfg.discriminator.loss)
            aw = cfg.discriminator.weight * adaptive_weight(
                nll,
                adv,
                self.model.decoder.last_layer,
                max_weight=cfg.discriminator.adaptive_weight_max,
            )
        loss = nll + latent_loss + aw * adv
        optim.step("model", loss)

        d_loss = torch.zeros(())
        if adv_on:
            self.disc.requires_grad_(True)
            disc = self.net("disc")
            d_loss = discriminator_loss(
                disc(x, z), disc(out.recon.detach(), z), cfg.discriminator.loss
            )
            optim.step("disc", d_loss)
        logs.update(
            adv=adv.item(), adaptive_weight=float(aw), d_loss=d_loss.item(), loss=loss.item()
        )
        return logs

    def export_module(self, ema: nn.Module | None) -> Autoencoder:
        """The weights to export: the EMA copy (with the live codebook buffers) if any.

        Args:
            ema: the EMA copy of the autoencoder kept by ``fit`` (None when disabled).

        Returns:
            The autoencoder to evaluate or save.
        """
        return self.model if ema is None else cast(Autoencoder, sync_buffers(ema, self.model))


@torch.no_grad()
def reconstruct(
    model: Autoencoder, image: torch.Tensor, z: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """Deterministic reconstructions (posterior mean / nearest codes), clamped to [0, 1].

    Args:
        model: the autoencoder.
        image: (N, 1, H, W) intensities in [0, 1].
        z: (N,) positions in [0, 1].
        device: where to run the model.

    Returns:
        (N, 1, H, W) on the CPU, in [0, 1].
    """
    out = []
    for xb, zb in zip(image.split(EVAL_BATCH), z.split(EVAL_BATCH), strict=True):
        xb, zb = xb.to(device), zb.to(device)
        out.append(model.decode_from_latent(model.encode_to_latent(xb, zb), zb).clamp(0, 1).cpu())
    return torch.cat(out)


def shuffled(z: torch.Tensor, seed: int) -> torch.Tensor:
    """A deliberately wrong condition: ``z`` permuted.

    Args:
        z: (N,) positions in [0, 1].
        seed: seed of the permutation.

    Returns:
        (N,) the same values in a random order.
    """
    return z[torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))]


def reconstruction_report(
    model: Autoencoder, data: EvalData, device: torch.device, *, seed: int = 0
) -> dict[str, Any]:
    """SSIM, brain SSIM, PSNR, LPIPS overall and per z, and the same with a shuffled z.

    Args:
        model: the autoencoder (eval mode).
        data: the split.
        device: where to run model and LPIPS.
        seed: seed of the z shuffle.

    Returns:
        ``{ssim, ssim_brain, psnr, lpips, per_z: {z_index: {...}}, shuffled_z: {ssim, ...}}``.
    """
    recon = reconstruct(model, data.image, data.z, device)
    report = reconstruction_metrics(data.image, recon, data.mask, data.z_index, device=device)
    wrong = reconstruct(model, data.image, shuffled(data.z, seed), device)
    wrong_metrics = reconstruction_metrics(
        data.image, wrong, data.mask, data.z_index, device=device
    )
    report["shuffled_z"] = {k: v for k, v in wrong_metrics.items() if k != "per_z"}
    return report


def recon_grid(model: Autoencoder, data: EvalData, device: torch.device) -> np.ndarray:
    """Grid with rows ordered by z: real | recon | recon given the wrong z (order reversed).

    Args:
        model: the autoencoder.
        data: the split; ``GRID_ROWS`` slices spread over z are shown.
        device: where to run the model.

    Returns:
        (H', W') float array in [0, 1].
    """
    idx = data.spread_over_z(GRID_ROWS)
    x, z = data.image[idx], data.z[idx]
    recon = reconstruct(model, x, z, device)
    wrong = reconstruct(model, x, torch.flip(z, dims=[0]), device)
    return rows_by_z([x, recon, wrong], z)


@torch.no_grad()
def random_latent_grid(
    model: Autoencoder, latent_shape: tuple[int, int, int], device: torch.device, seed: int = 0
) -> np.ndarray:
    """Decode N(0, I) latents at evenly spaced z levels: row = z, column = the same latent.

    Args:
        model: a vaegan autoencoder.
        latent_shape: (C, h, w).
        device: where to run the decoder.
        seed: seed of the latents.

    Returns:
        (H', W') float array in [0, 1].
    """
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(GRID_SAMPLES, *latent_shape, generator=gen).to(device)
    levels = torch.linspace(0, 1, GRID_ROWS)
    columns = [
        model.decode_from_latent(latents[j].expand(GRID_ROWS, -1, -1, -1), levels.to(device))
        .clamp(0, 1)
        .cpu()
        for j in range(GRID_SAMPLES)
    ]
    return rows_by_z(columns, levels)


@torch.no_grad()
def code_counts(model: Autoencoder, data: EvalData, device: torch.device) -> torch.Tensor:
    """How often each code is used on ``data``.

    Args:
        model: a vqvae autoencoder.
        data: the split.
        device: where to run the encoder.

    Returns:
        (K,) int64 counts.

    Raises:
        ValueError: ``model`` is not a vqvae.
    """
    if model.quantizer is None:
        raise InputError(f"code usage needs a vqvae autoencoder; got {model.kind!r}")
    counts = torch.zeros(model.quantizer.num_codes, dtype=torch.long)
    for xb, zb in zip(data.image.split(EVAL_BATCH), data.z.split(EVAL_BATCH), strict=True):
        idx = model.encode_to_indices(xb.to(device), zb.to(device)).flatten().cpu()
        counts += torch.bincount(idx, minlength=len(counts))
    return counts


def usage_histogram(counts: torch.Tensor) -> np.ndarray:
    """Bar chart of code usage, codes sorted by frequency.

    Args:
        counts: (K,) usage counts.

    Returns:
        (H, W, 3) uint8 image.
    """
    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.subplots()
    values = torch.sort(counts, descending=True).values.numpy()
    ax.bar(np.arange(len(values)), values, width=1.0)
    used = int((counts > 0).sum())
    ax.set(
        xlabel="code (sorted by use)",
        ylabel="count",
        title=f"codebook usage: {used}/{len(values)} codes used",
    )
    fig.tight_layout()
    return figure_image(fig)


class Evaluator:
    """The ``evaluate(step, ema_module)`` callback of :func:`~pipeline.training.loop.fit`.

    Logs val SSIM/brain SSIM/PSNR/LPIPS (returned, so ``fit`` logs them), a "real | recon |
    wrong z" grid ordered by z, for vaegan a grid decoded from random latents per z, and for
    vqvae the codebook perplexity and usage histogram of the val split.

    Args:
        task: the training task (its live model supplies the VQ buffers for the EMA copy).
        data: the validation split.
        run: the stage's tracking run (images go there).
        device: where to evaluate.
    """

    def __init__(
        self, task: AutoencoderTask, data: EvalData, run: StageRun, device: torch.device
    ) -> None:
        self.task, self.data, self.run, self.device = task, data, run, device

    def __call__(self, step: int, ema: nn.Module | None) -> dict[str, float]:
        model = self.task.export_module(ema)
        recon = reconstruct(model, self.data.image, self.data.z, self.device)
        metrics = reconstruction_metrics(
            self.data.image, recon, self.data.mask, self.data.z_index, device=self.device
        )
        logs = {f"val_{k}": float(v) for k, v in metrics.items() if k != "per_z"}
        self.run.log_image(recon_grid(model, self.data, self.device), "grids/recon", step=step)
        if model.quantizer is not None:
            counts = code_counts(model, self.data, self.device)
            probs = counts.float() / counts.sum()
            logs["val_perplexity"] = float(torch.exp(-(probs * torch.log(probs + 1e-10)).sum()))
            logs["val_codes_used"] = float((counts > 0).float().mean())
            self.run.log_image(usage_histogram(counts), "codebook/usage", step=step)
        else:
            f = model.downsample_factor
            shape = (
                model.latent_channels,
                self.data.image.shape[-2] // f,
                self.data.image.shape[-1] // f,
            )
            self.run.log_image(
                random_latent_grid(model, shape, self.device),
                "samples/random_latents",
                step=step,
            )
        return logs


def train_first_stage(
    params: Params,
    kind: AutoencoderKind,
    *,
    run: StageRun,
    device: torch.device,
    paths: StagePaths,
    identity: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """Train one autoencoder kind, export it and evaluate it on the test split.

    Args:
        params: all parameters (autoencoder, conditioning, data, seed).
        kind: ``vqvae`` or ``vaegan``.
        run: the stage's tracking run.
        device: training device.
        paths: where the outputs go.
        identity: the run's :func:`~pipeline.core.identity.stage_identity` (resume hash).
        progress: show a progress bar.

    Returns:
        The test report written to ``paths.report``.
    """
    cfg, cond_cfg = params.autoencoder, params.conditioning
    prepared = Path(params.data.prepared_dir)
    train = SliceDataset(prepared / "train")
    val = EvalData.from_dataset(SliceDataset(prepared / "val"))
    test = EvalData.from_dataset(SliceDataset(prepared / "test"))

    torch.manual_seed(params.seed)
    task = AutoencoderTask(cfg, cond_cfg, kind, get_lpips(device), device)
    result = fit(
        task,
        train,
        cfg.train,
        run=run,
        resume_dir=paths.resume_dir,
        seed=params.seed,
        device=device,
        evaluate=Evaluator(task, val, run, device),
        config_for_hash=identity,
        progress=progress,
    )
    finetune = cfg.decoder_finetune.train
    last_step = result.step
    if finetune is not None and kind in cfg.decoder_finetune.kinds:
        task.model.load_state_dict(task.export_module(result.ema).state_dict())
        task.freeze_encoder(cfg.decoder_finetune)
        take_freed_cores()  # side by side on the CPU: the sibling's core once it has finished
        result = fit(
            task,
            train,
            finetune,
            run=run,
            resume_dir=paths.resume_dir / "decoder",
            seed=params.seed + 1,
            device=device,
            evaluate=Evaluator(task, val, run, device),
            config_for_hash=identity,
            progress=progress,
            step_offset=cfg.train.steps,
        )
        last_step = cfg.train.steps + result.step
    if not distributed.is_main():  # under torchrun rank 0 alone exports and reports
        return {}
    data_meta = {
        "image_size": int(test.image.shape[-1]),
        "n_slices": params.prepare.n_slices,
        "percentiles": list(params.prepare.percentiles),
        "n_train": len(train),
    }
    exported = task.export_module(result.ema)
    # Masks can be made only by a tissue head that saw tissue labels.
    tissue_labels = bool(train.has_tissue and exported.has_tissue_head)
    save_model(
        paths.model,
        f"ae_{kind}",
        exported,
        cfg,
        {"data": data_meta, "tissue_labels": tissue_labels},
        cond_cfg,
    )
    model, _ = load_autoencoder(paths.model, device)
    report = reconstruction_report(model, test, device, seed=params.seed)
    write_json(paths.report, report)
    grid_png = recon_grid(model, test, device)
    save_png(grid_png, paths.grid)
    run.log_dict(report, f"reports/{paths.report.name}")
    run.log_image(grid_png, f"reports/{paths.grid.name}")
    run.log_metrics(
        {f"test_{k}": float(v) for k, v in report.items() if isinstance(v, float)}, step=last_step
    )
    finish_resume(paths.resume_dir)
    finish_resume(paths.resume_dir / "decoder")
    logger.info(
        "ae_%s: test ssim %.4f, ssim_brain %.4f, lpips %.4f (shuffled z: ssim %.4f)",
        kind,
        report["ssim"],
        report["ssim_brain"],
        report["lpips"],
        report["shuffled_z"]["ssim"],
    )
    return report
