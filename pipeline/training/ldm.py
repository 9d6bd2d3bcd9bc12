"""Training, evaluation and export of the latent diffusion model (the ``train_ldm`` stage).

- :class:`LDMTask`: DDPM training on scaled latents with condition dropout (epsilon or v
  target, uniform or min-SNR-γ loss weighting, posterior samples or means, optionally
  left-right mirrored latents: :func:`random_mirror`, optionally self-conditioning); the
  loop keeps an EMA of the UNet,
  which is what gets sampled and exported.
- :class:`Evaluator`: the ``evaluate`` callback: validation loss, a sample grid with one row
  per z level decoded through the first stage, the nearest-training-latent z error of those
  samples, and at the last step the DDIM trajectory as a GIF and a strip image (logged to
  MLflow and saved beside the sample grid as ``reports/ldm_trajectory.{gif,png}``).
- :func:`decode_as_generated`: the evaluator's decode, the one ``generate`` uses.
- :func:`train_ldm`: the whole stage; the model file ``models/ldm.pt``
  (:mod:`pipeline.models.files`) is read back by
  :func:`pipeline.inference.sampling.load_generator`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import torch
from monai.networks.schedulers import Scheduler
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from pipeline.core import distributed
from pipeline.core.config import LDMConfig, Params
from pipeline.core.errors import InputError
from pipeline.core.figures import grid, rows_by_z, save_png
from pipeline.core.io import atomic_write, write_json
from pipeline.core.labels import schema_to_meta
from pipeline.core.stage import StagePaths
from pipeline.core.tracking import StageRun, to_uint8_image
from pipeline.data.datasets import SliceDataset
from pipeline.data.latents import LatentDataset, read_latent_meta, training_covariates
from pipeline.inference.diffusion import (
    Trajectory,
    build_scheduler,
    ddim_sample,
    diffusion_loss,
    guided_sample,
    scheduler_config,
)
from pipeline.inference.encode import encode_dataset
from pipeline.inference.sampling import load_generator, sample
from pipeline.inference.texture import Texture
from pipeline.models.codec import LatentCodec, StdCurve
from pipeline.models.conditioning import batch_covariates, drop_covariates, index_from_z
from pipeline.models.files import load_autoencoder, save_model
from pipeline.models.unet import ZConditionedUNet
from pipeline.training.loop import Optimization, TrainingTask, adamw, finish_resume, fit

logger = logging.getLogger(__name__)

#: Share of training steps that give a self-conditioned UNet its own estimate (Chen et al.).
SELF_CONDITION_P = 0.5
#: Latents per batch when computing the validation loss.
EVAL_BATCH = 64
#: At most this many validation latents enter the validation loss.
VAL_LIMIT = 512
#: z levels of the trajectory GIF and strip, and columns (steps) of the strip.
TRAJECTORY_LEVELS = (0.2, 0.4, 0.6, 0.8)
STRIP_COLUMNS = 8
#: Slices generated (per 8 levels) when measuring the sampling speed.
SPEED_PER_LEVEL = 4
#: File names of the final trajectory, written beside the sample grid.
TRAJECTORY_PNG, TRAJECTORY_GIF = "ldm_trajectory.png", "ldm_trajectory.gif"

Decode = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def decode_as_generated(codec: LatentCodec, seed: int) -> Decode:
    """Scaled latents, z → slices decoded as ``sample_slices`` decodes them (a posterior
    sample around each latent), with the same noise draws at every call, so evaluations
    at different steps differ only by the model."""

    def decode(latent: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return codec.decode_stage_2_outputs(
            latent, z, generator=torch.Generator().manual_seed(seed)
        )

    return decode


def random_mirror(latent: torch.Tensor) -> torch.Tensor:
    """Each latent flipped left-right (last dim) with probability 0.5, drawn from the global RNG.

    An augmentation, valid as an approximation: the brain is roughly left-right symmetric
    (slices are stored upright, the subject's left on the left, so the last dim is
    left-right), and the first stage is convolutional, so the latent of a mirrored slice is
    close to the mirrored latent (not equal: strides, padding, learned asymmetric kernels and
    a real brain's asymmetry). The training loop seeds the global RNG and saves its state in
    resume checkpoints, so runs and resumed runs draw the same flips.

    Args:
        latent: (B, C, h, w) scaled latents.

    Returns:
        (B, C, h, w) latents, about half of them mirrored.
    """
    flip = torch.rand(latent.shape[0], device=latent.device) < 0.5
    return torch.where(flip.view(-1, *(1,) * (latent.ndim - 1)), latent.flip(-1), latent)


class LDMTask(TrainingTask):
    """DDPM training of a :class:`ZConditionedUNet` on scaled latents.

    Args:
        unet: the denoiser, already on its device.
        scheduler: the training schedule (``DDPMScheduler``; its prediction type is the target).
        config: ``ldm`` section (``cond_dropout``, ``loss_weighting``, ``min_snr_gamma``,
            ``posterior_samples``, ``mirror_latents``, ``train.lr``, ``train.weight_decay``).
        covariate_dropout: probability that each covariate of a training slice is made
            unknown (``conditioning.covariate_dropout``).
    """

    ema_module = "unet"

    def __init__(
        self,
        unet: ZConditionedUNet,
        scheduler: Scheduler,
        config: LDMConfig,
        covariate_dropout: float = 0.0,
    ) -> None:
        self.unet, self.scheduler, self.config = unet, scheduler, config
        self.covariate_dropout = covariate_dropout
        self.modules: dict[str, nn.Module] = {"unet": unet}
        self.optimizers = {
            "unet": adamw(unet.parameters(), config.train.lr, config.train.weight_decay)
        }

    def train_step(
        self, batch: dict[str, torch.Tensor], step: int, optim: Optimization
    ) -> dict[str, float]:
        """One denoising step on a batch with ``latent`` (B, C, h, w), ``z`` (B,), optionally
        ``latent_std`` (B, C, h, w) and, for a covariate-conditioned UNet, ``covariates``
        (B, n) codes.

        Timesteps are uniform over [0, T), the pure-noise t = T - 1 included. With
        ``posterior_samples`` and a ``latent_std``, the latent is replaced by
        ``latent + latent_std * noise`` (a posterior sample). That noise, the mirror flips,
        the per-covariate dropout and (with ``self_condition``) whether this step forms a
        clean-latent estimate (probability :data:`SELF_CONDITION_P`) are drawn after the
        diffusion noise, timesteps and condition dropout, so with those options off and no
        covariates the random stream is the same as before the options existed.
        """
        cfg = self.config
        latent, z = batch["latent"], batch["z"]
        n = latent.shape[0]
        noise = torch.randn_like(latent)
        t = torch.randint(0, self.scheduler.num_train_timesteps, (n,), device=latent.device)
        drop = torch.rand(n, device=latent.device) < cfg.cond_dropout
        if cfg.posterior_samples and "latent_std" in batch:
            latent = latent + batch["latent_std"] * torch.randn_like(latent)
        if cfg.mirror_latents:
            latent = random_mirror(latent)
        covariates = batch_covariates(batch)
        if covariates is not None:
            covariates = drop_covariates(covariates, self.covariate_dropout)
        estimate = cfg.self_condition and bool(torch.rand(()) < SELF_CONDITION_P)
        loss = diffusion_loss(
            self.net("unet"),
            self.scheduler,
            latent,
            z,
            noise,
            t,
            drop,
            weighting=cfg.loss_weighting,
            min_snr_gamma=cfg.min_snr_gamma,
            covariates=covariates,
            self_condition=estimate,
        )
        optim.step("unet", loss)
        return {"loss": loss.item()}


class _WithLatents(Dataset):
    """The items of a :class:`LatentDataset` with ``latent`` (and ``latent_std``) replaced.

    Args:
        base: the split whose z, covariates and other labels each item keeps.
        latents: (N, C, h, w) scaled latents, row i for ``base``'s item i.
        stds: (N, C, h, w) their posterior stds, or None (a VQ-VAE's latents).
    """

    def __init__(self, base: LatentDataset, latents: np.ndarray, stds: np.ndarray | None) -> None:
        if len(latents) != len(base):
            raise ValueError(f"{len(latents)} latents for {len(base)} items")
        self.base, self.latents, self.stds = base, latents, stds

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.base[i]
        item["latent"] = torch.from_numpy(self.latents[i])
        if self.stds is not None:
            item["latent_std"] = torch.from_numpy(self.stds[i])
        return item


@torch.no_grad()
def mirrored_training_latents(
    codec: LatentCodec, train: LatentDataset, slices_dir: Path, device: torch.device
) -> Dataset:
    """The training split's latents encoded from its left-right mirrored slices.

    A mirrored axial slice is plausible anatomy, but its latent is not the mirrored latent
    (:func:`random_mirror`), so the mirrored slices are encoded again, as
    :func:`pipeline.training.prior.augmented_codes` does for the prior's code grids.

    Args:
        codec: the first stage (in eval mode) with the latents' scale factor.
        train: the training latents (row i encodes slice i of ``slices_dir``).
        slices_dir: the prepared training split those latents were encoded from.
        device: where the first stage runs.

    Returns:
        Items as ``train``'s (the same z, covariates and labels), with the mirrored slices'
        latents and, for a VAE-GAN, their posterior stds.
    """
    encoded = encode_dataset(codec, SliceDataset(slices_dir), device, mirror=True, progress=False)
    return _WithLatents(train, encoded.latents, encoded.stds)


@dataclass
class LatentSet:
    """A split of scaled latents held in memory.

    Attributes:
        latent: (N, C, h, w) scaled latents.
        z: (N,) positions in [0, 1].
    """

    latent: torch.Tensor
    z: torch.Tensor

    @classmethod
    def from_dataset(cls, dataset: Dataset, limit: int | None = None) -> LatentSet:
        """Collect (the first ``limit``) items of a ``LatentDataset``-like dataset."""
        latents, zs = [], []
        for batch in DataLoader(dataset, batch_size=EVAL_BATCH, shuffle=False):
            latents.append(batch["latent"].float())
            zs.append(batch["z"].float())
        latent, z = torch.cat(latents), torch.cat(zs)
        return cls(latent[:limit], z[:limit])


@torch.no_grad()
def validation_loss(
    unet: nn.Module, scheduler: Scheduler, data: LatentSet, device: torch.device, seed: int = 0
) -> float:
    """Conditional denoising loss on ``data`` with noise and timesteps fixed by ``seed``.

    Always the uniform MSE (whatever ``ldm.loss_weighting``), so runs that differ only in
    their loss weighting report comparable validation losses.
    """
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for latent, z in zip(data.latent.split(EVAL_BATCH), data.z.split(EVAL_BATCH), strict=True):
        noise = torch.randn(latent.shape, generator=gen)
        t = torch.randint(0, scheduler.num_train_timesteps, (len(z),), generator=gen)
        drop = torch.zeros(len(z), dtype=torch.bool)
        loss = diffusion_loss(unet, scheduler, *(v.to(device) for v in (latent, z, noise, t, drop)))
        total += float(loss) * len(z)
        count += len(z)
    return total / max(count, 1)


def nearest_z_error(samples: torch.Tensor, z: torch.Tensor, reference: LatentSet) -> torch.Tensor:
    """|z of the nearest reference latent - requested z| for each sample (L2 in latent space).

    Args:
        samples: (B, C, h, w) generated scaled latents.
        z: (B,) requested positions.
        reference: training latents and their positions.

    Returns:
        (B,) absolute z errors in [0, 1].
    """
    dist = torch.cdist(samples.flatten(1).cpu().float(), reference.latent.flatten(1))
    return (reference.z[dist.argmin(dim=1)] - z.cpu()).abs()


def trajectory_images(
    trajectory: Trajectory, z: torch.Tensor, decode: Decode, columns: int = STRIP_COLUMNS
) -> tuple[list[np.ndarray], np.ndarray]:
    """GIF frames and a strip image of one sampling run.

    Args:
        trajectory: from ``ddim_sample(..., return_trajectory=True)``.
        z: (B,) positions of the samples.
        decode: scaled latent, z -> (B, 1, H, W) in [0, 1].
        columns: steps shown in the strip (evenly spaced, the last included).

    Returns:
        Frames (one (H', W') array in [0, 1] per step: top row x_t, bottom row predicted
        x0, one column per sample) and the strip (rows by z, columns = predicted x0 at
        ``columns`` steps).
    """
    frames, x0_images = [], []
    for x_t, x0 in zip(trajectory.x_t, trajectory.x0, strict=True):
        noisy, clean = decode(x_t, z).cpu(), decode(x0, z).cpu()
        frames.append(grid(torch.cat([noisy, clean]), ncol=len(z)))
        x0_images.append(clean)
    picks = torch.linspace(0, len(x0_images) - 1, min(columns, len(x0_images))).round().long()
    strip = rows_by_z([x0_images[i] for i in picks.tolist()], z.cpu())
    return frames, strip


def save_gif(frames: list[np.ndarray], path: str | Path) -> Path:
    """Save (H', W') frames in [0, 1] as a looping GIF (120 ms per frame), atomically."""
    images = [to_uint8_image(f) for f in frames]
    return atomic_write(path, lambda tmp: iio.imwrite(tmp, images, duration=120, loop=0))


class Evaluator:
    """``evaluate(step, ema)`` callback of :func:`~pipeline.training.loop.fit` for :class:`LDMTask`.

    Args:
        task: the task (its UNet is sampled when no EMA is kept).
        decode: scaled latent, z -> (B, 1, H, W) slices in [0, 1].
        run: tracking run for grids and the trajectory GIF.
        config: ``ldm`` section (sampling steps, guidance, grid size).
        val: validation latents for the validation loss.
        reference: training latents for the nearest-neighbour z error.
        latent_shape: (C, h, w).
        n_slices: K slice levels (converts z errors to levels).
        final_step: the last training step (the trajectory is logged there).
        device: where sampling runs.
        seed: seed of the grid's noise (the same at every evaluation).
    """

    def __init__(
        self,
        task: LDMTask,
        decode: Decode,
        run: StageRun,
        *,
        config: LDMConfig,
        val: LatentSet,
        reference: LatentSet,
        latent_shape: tuple[int, int, int],
        n_slices: int,
        final_step: int,
        device: torch.device,
        seed: int = 0,
    ) -> None:
        self.task, self.decode, self.run, self.config = task, decode, run, config
        self.val, self.reference, self.latent_shape = val, reference, latent_shape
        self.n_slices, self.final_step = n_slices, final_step
        self.device, self.seed = device, seed
        self.ddim = build_scheduler(scheduler_config(config), "ddim")
        self.last_grid: np.ndarray | None = None
        #: (GIF frames, strip) of the final step's sampling run, set by the last evaluation.
        self.trajectory: tuple[list[np.ndarray], np.ndarray] | None = None

    def _sample(self, unet: nn.Module, z: torch.Tensor, trajectory: bool = False) -> Any:
        """Latents from the default sampler; DDIM for a trajectory (its x0 at every step)."""
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        cfg, z = self.config, z.to(self.device)
        if trajectory:
            return ddim_sample(
                unet,
                self.ddim,
                z,
                self.latent_shape,
                steps=cfg.sample_steps,
                guidance=cfg.guidance,
                generator=gen,
                return_trajectory=True,
                guidance_min_t=cfg.guidance_min_t,
            )
        return guided_sample(
            unet,
            scheduler_config(cfg),
            z,
            self.latent_shape,
            sampler=cfg.sampler,
            steps=cfg.sample_steps,
            guidance=cfg.guidance,
            generator=gen,
            guidance_min_t=cfg.guidance_min_t,
        )

    def __call__(self, step: int, ema: nn.Module | None) -> dict[str, float]:
        """Validation loss, sample grid and z error (and the trajectory at the last step)."""
        unet = ema if ema is not None else self.task.unet
        cfg = self.config
        z = torch.linspace(0, 1, cfg.grid_levels).repeat_interleave(cfg.grid_samples)
        latents = self._sample(unet, z)
        images = self.decode(latents, z.to(self.device)).cpu()
        self.last_grid = grid(images, ncol=cfg.grid_samples)
        self.run.log_image(self.last_grid, "samples/ldm", step=step)
        err = index_from_z(nearest_z_error(latents, z, self.reference), self.n_slices)
        metrics = {
            "val_loss": validation_loss(unet, self.task.scheduler, self.val, self.device),
            "nn_level_error": float(err.mean()),
        }
        if step == self.final_step:
            self._log_trajectory(unet)
        logger.info(
            "step %d: val_loss %.4f, samples' nearest training latent %.2f levels off",
            step,
            metrics["val_loss"],
            metrics["nn_level_error"],
        )
        return metrics

    def _log_trajectory(self, unet: nn.Module) -> None:
        z = torch.tensor(TRAJECTORY_LEVELS)
        _, trajectory = self._sample(unet, z, trajectory=True)
        frames, strip = trajectory_images(trajectory, z.to(self.device), self.decode)
        self.trajectory = (frames, strip)
        with tempfile.TemporaryDirectory() as tmp:
            self.run.log_artifact(save_gif(frames, Path(tmp) / TRAJECTORY_GIF), "samples")
        self.run.log_image(strip, "samples/ldm_trajectory_strip.png")
        for index, frame in enumerate(frames):  # the image slider steps through the denoising
            self.run.log_image(frame, "trajectory/ldm", step=index)


def sampling_speed(model_path: Path, device: torch.device, seed: int) -> dict[str, float]:
    """Slices per second of :func:`pipeline.inference.sampling.sample` (decoding included)."""
    generator = load_generator(model_path, device)
    levels = torch.linspace(0, 1, 8)
    sample(generator, levels[:1], 1, seed, steps=2)  # warm-up
    start = time.perf_counter()
    images, _ = sample(generator, levels, SPEED_PER_LEVEL, seed)
    seconds = time.perf_counter() - start
    cfg = generator.config
    return {
        "slices_per_s": len(images) / seconds,
        "slices": len(images),
        "sampler": cfg.sampler,
        "steps": cfg.sample_steps,
        "guidance": cfg.guidance,
    }


def decode_std_curve(cfg: LDMConfig, meta: dict[str, Any], latents: Path) -> StdCurve | None:
    """The curve the LDM's decode noise follows (``ldm.decode_noise: by_magnitude``): the
    latents' ``posterior_std_curve`` times ``ldm.decode_posterior_std``. None where the noise
    is isotropic or there is none (a VQ-VAE, or a decode factor of 0).

    Raises:
        InputError: ``by_magnitude`` on latents encoded before the curve was recorded.
    """
    if cfg.decode_noise != "by_magnitude" or not cfg.decode_posterior_std:
        return None
    if not float(meta.get("posterior_std") or 0.0):
        return None
    curve = StdCurve.from_meta(meta.get("posterior_std_curve"))
    if curve is None:
        raise InputError(
            f"{latents / 'meta.json'} has no posterior_std_curve for ldm.decode_noise: "
            "by_magnitude; re-run encode_latents (dvc repro encode_latents) or set "
            "ldm.decode_noise: isotropic"
        )
    return curve.scaled(cfg.decode_posterior_std)


def train_ldm(
    params: Params,
    *,
    run: StageRun,
    device: torch.device,
    paths: StagePaths,
    identity: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """Train the latent diffusion model, export it and measure its sampling speed.

    Args:
        params: all parameters (``ldm``, ``conditioning``, ``prepare.n_slices``, ``seed``).
        run: the stage's tracking run.
        device: training device.
        paths: inputs and outputs.
        identity: the run's :func:`~pipeline.core.identity.stage_identity` (resume hash).
        progress: show a progress bar.

    Returns:
        The report written to ``paths.report``.
    """
    cfg, cond_cfg = params.ldm, params.conditioning
    meta = read_latent_meta(paths.latents)
    scale = float(meta["scale_factor"])
    shape = tuple(int(s) for s in meta["latent_shape"])
    schema, reference = training_covariates(paths.latents / "train", cond_cfg.covariates)
    train = LatentDataset(paths.latents / "train", schema)
    val = LatentSet.from_dataset(LatentDataset(paths.latents / "val"), VAL_LIMIT)
    if cfg.posterior_samples and train.stds is None and meta["source"] == "vaegan":
        raise InputError(
            f"{paths.latents / 'train'} has no latent_stds.npy for ldm.posterior_samples; "
            "re-run encode_latents (dvc repro encode_latents)"
        )
    posterior_std = cfg.decode_posterior_std * float(meta.get("posterior_std") or 0.0)
    std_curve = decode_std_curve(cfg, meta, paths.latents)
    codec = LatentCodec(
        load_autoencoder(meta["autoencoder"], device)[0], scale, posterior_std, std_curve
    )
    dataset: Dataset = train  # the mirrored slices' latents join it, not the nearest-latent check
    if cfg.mirror_slices:
        prepared_train = Path(params.data.prepared_dir) / "train"
        mirrored = mirrored_training_latents(codec, train, prepared_train, device)
        dataset = ConcatDataset([train, mirrored])
        logger.info("training on %d latents (%d of mirrored slices)", len(dataset), len(mirrored))

    torch.manual_seed(params.seed)
    unet = ZConditionedUNet(cfg, cond_cfg, shape[0], schema).to(device)
    scheduler = build_scheduler(scheduler_config(cfg), "ddpm")
    task = LDMTask(unet, scheduler, cfg, cond_cfg.covariate_dropout)
    evaluator = Evaluator(
        task,
        decode_as_generated(codec, params.seed),
        run,
        config=cfg,
        val=val,
        reference=LatentSet.from_dataset(train),
        latent_shape=shape,  # type: ignore[arg-type]
        n_slices=params.prepare.n_slices,
        final_step=cfg.train.steps,
        device=device,
        seed=params.seed,
    )
    started = time.perf_counter()
    result = fit(
        task,
        dataset,
        cfg.train,
        run=run,
        resume_dir=paths.resume_dir,
        seed=params.seed,
        device=device,
        evaluate=evaluator,
        config_for_hash=identity,
        progress=progress,
    )
    if not distributed.is_main():  # under torchrun rank 0 alone exports and reports
        return {}
    if evaluator.last_grid is None:  # resumed after the last step: nothing was evaluated
        result.history.update(evaluator(result.step, result.ema))
    metadata = {
        "autoencoder": meta["autoencoder"],
        "autoencoder_sha256": meta["autoencoder_sha256"],
        "scale_factor": codec.scale_factor,
        "latent_shape": list(shape),
        "latent_source": cfg.latent_source,
        "n_slices": params.prepare.n_slices,
        "scheduler": scheduler_config(cfg),
        **Texture.from_meta(meta).as_meta(),
        "posterior_std": posterior_std,
        **({} if std_curve is None else {"posterior_std_curve": std_curve.as_meta()}),
        "covariates": schema_to_meta(schema),
        "covariate_reference": reference,
    }
    network = result.ema if result.ema is not None else unet
    save_model(paths.model, "ldm", network, cfg, metadata, cond_cfg)
    report = {
        "steps": result.step,
        "train_seconds": time.perf_counter() - started,
        "final_loss": result.history.get("loss"),
        "val_loss": result.history.get("val_loss"),
        "nn_level_error": result.history.get("nn_level_error"),
        "sampling": sampling_speed(paths.model, device, params.seed),
    }
    write_json(paths.report, report)
    save_png(evaluator.last_grid, paths.grid)
    run.log_image(evaluator.last_grid, f"reports/{paths.grid.name}")
    if evaluator.trajectory is not None:
        save_gif(evaluator.trajectory[0], paths.grid.with_name(TRAJECTORY_GIF))
        save_png(evaluator.trajectory[1], paths.grid.with_name(TRAJECTORY_PNG))
    run.log_dict(report, f"reports/{paths.report.name}")
    run.log_metrics({"sampling_slices_per_s": report["sampling"]["slices_per_s"]}, result.step)
    finish_resume(paths.resume_dir)
    logger.info(
        "ldm: final loss %.4f, %.1f slices/s at %d %s steps (guidance %.2g)",
        report["final_loss"] or float("nan"),
        report["sampling"]["slices_per_s"],
        report["sampling"]["steps"],
        report["sampling"]["sampler"],
        report["sampling"]["guidance"],
    )
    return report
