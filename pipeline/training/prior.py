"""Training, evaluation and export of the PixelCNN prior over VQ codes (``train_prior``).

- :class:`PriorTask`: cross-entropy of every code given the codes before it (the target is
  the input itself; the network's causality makes this next-code prediction).
- :class:`PriorEvaluator`: the ``evaluate`` callback of :func:`~pipeline.training.loop.fit`:
  validation NLL in bits per code and a sample grid decoded through the VQ-VAE, one row per
  z level.
- :func:`train_prior`: the whole stage; the model file (:mod:`pipeline.models.files`) is
  read back by :func:`pipeline.inference.sampling.load_generator`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from pipeline.core import distributed
from pipeline.core.config import Params, PriorConfig, TrainConfig
from pipeline.core.errors import InputError
from pipeline.core.figures import grid, save_png
from pipeline.core.io import write_json
from pipeline.core.labels import schema_to_meta
from pipeline.core.stage import StagePaths
from pipeline.core.tracking import StageRun
from pipeline.data.datasets import EvalData, SliceDataset
from pipeline.data.latents import LatentDataset, read_latent_meta, training_covariates
from pipeline.inference.autoregressive import sample_codes
from pipeline.inference.texture import Texture
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.conditioning import batch_covariates, drop_covariates
from pipeline.models.files import load_autoencoder, save_model
from pipeline.models.pixelcnn import GatedPixelCNN
from pipeline.training.loop import Optimization, TrainingTask, adamw, finish_resume, fit

logger = logging.getLogger(__name__)

#: Rows (z levels, evenly spaced over [0, 1]) and columns (samples) of the sample grid.
GRID_LEVELS = 8
GRID_SAMPLES = 8
#: Code grids per batch when computing an NLL.
EVAL_BATCH = 64

Decode = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def code_nll(
    prior: nn.Module,
    codes: torch.Tensor,
    z: torch.Tensor,
    reduction: str = "mean",
    covariates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative log-likelihood of the codes, in nats.

    The prior's logits are laid out channels-last, so the softmax over the K codes runs on
    contiguous rows (several times faster on the CPU than over the channel axis).

    Args:
        prior: the PixelCNN.
        codes: (B, h, w) int64 code indices.
        z: (B,) slice positions in [0, 1].
        reduction: ``"mean"`` (per code) or ``"sum"`` (over every code of the batch).
        covariates: optional (B, n) covariate codes (NaN = unknown).

    Returns:
        Scalar cross-entropy of the logits at every position against the code there.
    """
    logits = prior(codes, z, covariates).permute(0, 2, 3, 1)  # (B, h, w, K), contiguous
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), codes.reshape(-1), reduction=reduction
    )


class PriorTask(TrainingTask):
    """Maximum-likelihood training of a :class:`GatedPixelCNN` on code grids.

    Args:
        prior: the network, already on its device.
        cfg: training settings (``lr``, ``weight_decay``).
        covariate_dropout: probability that each covariate of a training grid is made
            unknown (``conditioning.covariate_dropout``).
    """

    ema_module = "prior"

    def __init__(
        self, prior: GatedPixelCNN, cfg: TrainConfig, covariate_dropout: float = 0.0
    ) -> None:
        self.covariate_dropout = covariate_dropout
        self.modules = {"prior": prior}
        self.optimizers = {"prior": adamw(prior.parameters(), cfg.lr, cfg.weight_decay)}

    def train_step(
        self, batch: dict[str, torch.Tensor], step: int, optim: Optimization
    ) -> dict[str, float]:
        """One step on a batch with ``codes`` (B, h, w) int64, ``z`` (B,) and, for a
        covariate-conditioned prior, ``covariates`` (B, n) codes."""
        covariates = batch_covariates(batch)
        if covariates is not None:
            covariates = drop_covariates(covariates, self.covariate_dropout)
        loss = code_nll(self.net("prior"), batch["codes"], batch["z"], covariates=covariates)
        optim.step("prior", loss)
        return {"loss": loss.item(), "bits_per_code": loss.item() / math.log(2)}


@dataclass
class CodeSet(Dataset):
    """Code grids of one split held in memory; items ``{"codes": (h, w) int64, "z": ()}``
    (and ``"covariates": (n,)`` when the set has them).

    Attributes:
        codes: (N, h, w) int64 code indices.
        z: (N,) float32 slice positions in [0, 1].
        covariates: (N, n) float32 covariate codes (NaN = unknown), or None.
    """

    codes: torch.Tensor
    z: torch.Tensor
    covariates: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"codes": self.codes[i], "z": self.z[i]}
        if self.covariates is not None:  # as LatentDataset hands them over
            codes = self.covariates[i]
            item["covariates"] = torch.nan_to_num(codes)
            item["covariates_known"] = ~torch.isnan(codes)
        return item

    @classmethod
    def from_dataset(cls, dataset: LatentDataset) -> CodeSet:
        """The codes of a split of VQ-VAE latents.

        Raises:
            ValueError: the split has no code grids (not encoded with a VQ-VAE).
        """
        if dataset.codes is None:
            raise InputError(
                f"{dataset.split_dir} has no codes.npy; the prior needs latents encoded with "
                f"the vqvae autoencoder (data/latents/vqvae)"
            )
        codes = torch.from_numpy(np.asarray(dataset.codes, dtype=np.int64))
        covariates = dataset.covariates
        return cls(
            codes,
            torch.from_numpy(dataset.z),
            None if covariates is None else torch.from_numpy(covariates),
        )


def augmentations(mirror: bool, shift_px: int) -> list[tuple[bool, int, int]]:
    """The (mirrored, dy, dx) variants of each training slice, the identity excluded.

    Args:
        mirror: include the left-right mirrored slice (and its shifted copies).
        shift_px: also shift by this many pixels up, down, left and right (0: no shifts).

    Returns:
        Variants in a fixed order; ``[]`` when neither is asked for.
    """
    shifts = [(0, 0)]
    if shift_px:
        shifts += [(shift_px, 0), (-shift_px, 0), (0, shift_px), (0, -shift_px)]
    flips = [False, True] if mirror else [False]
    return [(m, dy, dx) for m in flips for dy, dx in shifts if (m, dy, dx) != (False, 0, 0)]


@torch.no_grad()
def augmented_codes(
    autoencoder: Autoencoder,
    slices: EvalData,
    device: torch.device,
    variants: list[tuple[bool, int, int]],
) -> CodeSet:
    """Code grids of mirrored and shifted copies of the slices, for the prior's training set.

    A mirrored or slightly shifted axial slice is plausible anatomy, but its codes are not
    the mirrored or shifted codes (each code is a patch with its own orientation, and a
    shift by less than a code's footprint changes every patch), so the copies are encoded
    again. Shifts roll the image; the slices' borders are background.

    Args:
        autoencoder: the VQ-VAE the prior's codes come from, in eval mode.
        slices: the training slices (image (N, 1, H, W), z (N,)).
        device: where the autoencoder lives.
        variants: (mirrored, dy, dx) per copy, from :func:`augmentations` (not empty).

    Returns:
        (N * len(variants), h, w) codes, variant by variant, and their (unchanged) z.
    """
    codes, zs = [], []
    for mirrored, dy, dx in variants:
        for image, z in zip(
            slices.image.split(EVAL_BATCH), slices.z.split(EVAL_BATCH), strict=True
        ):
            image = image.flip(-1) if mirrored else image
            image = image.roll((dy, dx), dims=(-2, -1))
            codes.append(autoencoder.encode_to_indices(image.to(device), z.to(device)).cpu())
            zs.append(z.float())
    return CodeSet(torch.cat(codes).long(), torch.cat(zs))


@torch.no_grad()
def nll_bits_per_code(prior: nn.Module, data: CodeSet, device: torch.device) -> float:
    """Negative log-likelihood of a split under the prior, in bits per code.

    Args:
        prior: the PixelCNN.
        data: code grids and their positions.
        device: where the prior lives.

    Returns:
        Mean cross-entropy over every code of every grid (nats) / ln 2.
    """
    total = 0.0
    for codes, z in zip(data.codes.split(EVAL_BATCH), data.z.split(EVAL_BATCH), strict=True):
        codes, z = codes.to(device), z.to(device)
        total += code_nll(prior, codes, z, reduction="sum").item()
    return total / data.codes.numel() / math.log(2)


def grid_levels() -> torch.Tensor:
    """z of every tile of the sample grid, row by row: (GRID_LEVELS * GRID_SAMPLES,)."""
    return torch.linspace(0, 1, GRID_LEVELS).repeat_interleave(GRID_SAMPLES)


def sample_grid(
    prior: GatedPixelCNN,
    decode: Decode,
    code_shape: tuple[int, int],
    config: PriorConfig,
    device: torch.device,
    seed: int,
) -> np.ndarray:
    """Sample codes at evenly spaced z levels and tile the decoded slices.

    Args:
        prior: the PixelCNN.
        decode: (B, h, w) codes, (B,) z -> (B, 1, H, W) slices in [0, 1]-ish.
        code_shape: (h, w).
        config: sampling defaults (``temperature``, ``top_k``).
        device: where the prior lives.
        seed: seeds the sampler, so grids of different steps are comparable.

    Returns:
        (H', W') array in [0, 1]: row i holds GRID_SAMPLES samples at level i (low z on top).
    """
    z = grid_levels().to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    codes = sample_codes(prior, z, code_shape, config.temperature, config.top_k, generator)
    with torch.no_grad():
        images = decode(codes, z)
    return grid(images.clamp(0, 1), ncol=GRID_SAMPLES)


class PriorEvaluator:
    """``evaluate`` callback: validation NLL and a sample grid per z level.

    Args:
        task: the training task (its prior is used when no EMA copy exists).
        val: validation code grids.
        decode: (B, h, w) codes, (B,) z -> (B, 1, H, W) slices (the VQ-VAE's decoder).
        run: tracking run the grid is logged to (image history ``samples/prior``, one step per
            evaluation).
        config: sampling defaults.
        code_shape: (h, w).
        device: where the prior lives.
        seed: seeds the sample grid.
    """

    def __init__(
        self,
        task: PriorTask,
        val: CodeSet,
        decode: Decode,
        run: StageRun,
        config: PriorConfig,
        code_shape: tuple[int, int],
        device: torch.device,
        seed: int,
    ) -> None:
        self.task, self.val, self.decode, self.run = task, val, decode, run
        self.config, self.code_shape, self.device, self.seed = config, code_shape, device, seed
        self.last_grid: np.ndarray | None = None

    def __call__(self, step: int, ema: nn.Module | None) -> dict[str, float]:
        prior = ema if ema is not None else self.task.modules["prior"]
        logs = {"val_bits_per_code": nll_bits_per_code(prior, self.val, self.device)}
        self.last_grid = sample_grid(
            prior, self.decode, self.code_shape, self.config, self.device, self.seed
        )
        self.run.log_image(self.last_grid, "samples/prior", step=step)
        logger.info("step %d: val %.4f bits/code", step, logs["val_bits_per_code"])
        return logs


def sampling_speed(
    prior: GatedPixelCNN, config: PriorConfig, code_shape: tuple[int, int], device: torch.device
) -> dict[str, float]:
    """Seconds to sample one batch of GRID_LEVELS * GRID_SAMPLES code grids (no decoding)."""
    z = grid_levels().to(device)
    start = time.perf_counter()
    sample_codes(prior, z, code_shape, config.temperature, config.top_k)
    seconds = time.perf_counter() - start
    return {"grids": len(z), "seconds": seconds, "grids_per_s": len(z) / seconds}


def train_prior(
    params: Params,
    *,
    run: StageRun,
    device: torch.device,
    paths: StagePaths,
    identity: dict[str, Any],
    progress: bool = True,
) -> dict[str, Any]:
    """Train the prior on the VQ-VAE's code grids, export it and report its test NLL.

    Args:
        params: all parameters (``prior``, ``conditioning``, ``seed``).
        run: the stage's tracking run.
        device: training device.
        paths: inputs and outputs.
        identity: the run's :func:`~pipeline.core.identity.stage_identity` (resume hash).
        progress: show a progress bar.

    Returns:
        The report written to ``paths.report``.

    Raises:
        FileNotFoundError: the latents have not been encoded.
        ValueError: the latents are not VQ-VAE codes, or the autoencoder changed since.
    """
    cfg, cond_cfg = params.prior, params.conditioning
    meta = read_latent_meta(paths.latents)
    if "num_codes" not in meta:
        raise InputError(
            f"{paths.latents} holds {meta.get('source')!r} latents without codes; the prior "
            f"needs the vqvae latents (add vqvae to autoencoder.kinds and run encode_latents)"
        )
    schema, reference = training_covariates(paths.latents / "train", cond_cfg.covariates)
    train = CodeSet.from_dataset(LatentDataset(paths.latents / "train", schema))
    val, test = (CodeSet.from_dataset(LatentDataset(paths.latents / s)) for s in ("val", "test"))
    num_codes = int(meta["num_codes"])
    code_shape = (int(val.codes.shape[1]), int(val.codes.shape[2]))
    autoencoder, _ = load_autoencoder(meta["autoencoder"], device)
    variants = augmentations(cfg.mirror_augment, cfg.shift_augment_px)
    if variants:
        slices = EvalData.from_dataset(SliceDataset(Path(params.data.prepared_dir) / "train"))
        extra = augmented_codes(autoencoder, slices, device, variants)
        covariates = train.covariates  # the copies keep their slice's covariates
        train = CodeSet(
            torch.cat([train.codes, extra.codes]),
            torch.cat([train.z, extra.z]),
            None if covariates is None else covariates.repeat(len(variants) + 1, 1),
        )
        logger.info("training on %d code grids (%d augmented copies)", len(train), len(extra))

    torch.manual_seed(params.seed)
    codebook = autoencoder.quantizer.codebook
    prior = GatedPixelCNN(num_codes, cfg, cond_cfg, codebook, schema).to(device)
    task = PriorTask(prior, cfg.train, cond_cfg.covariate_dropout)
    evaluator = PriorEvaluator(
        task, val, autoencoder.decode_indices, run, cfg, code_shape, device, params.seed
    )
    started = time.perf_counter()
    result = fit(
        task,
        train,
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
    train_seconds = time.perf_counter() - started
    final = result.ema if result.ema is not None else prior
    metadata = {
        "autoencoder": meta["autoencoder"],
        "autoencoder_sha256": meta["autoencoder_sha256"],
        "num_codes": num_codes,
        "code_shape": list(code_shape),
        "n_slices": params.prepare.n_slices,
        **Texture.from_meta(meta).as_meta(),
        "covariates": schema_to_meta(schema),
        "covariate_reference": reference,
    }
    save_model(paths.model, "pixelcnn", final, cfg, metadata, cond_cfg)
    final.eval()
    report = {
        "steps": result.step,
        "train_seconds": train_seconds,
        "test_bits_per_code": nll_bits_per_code(final, test, device),
        "val_bits_per_code": result.history.get("val_bits_per_code"),
        "train_bits_per_code": result.history.get("bits_per_code"),
        "uniform_bits_per_code": math.log2(num_codes),
        "sampling": sampling_speed(final, cfg, code_shape, device),  # type: ignore[arg-type]
    }
    write_json(paths.report, report)
    if evaluator.last_grid is not None:
        save_png(evaluator.last_grid, paths.grid)
        run.log_image(evaluator.last_grid, f"reports/{paths.grid.name}")
    run.log_dict(report, f"reports/{paths.report.name}")
    run.log_metrics({"test_bits_per_code": report["test_bits_per_code"]}, step=result.step)
    finish_resume(paths.resume_dir)
    logger.info(
        "prior: test %.4f bits/code (uniform %.2f); %d grids sampled in %.1f s",
        report["test_bits_per_code"],
        report["uniform_bits_per_code"],
        report["sampling"]["grids"],
        report["sampling"]["seconds"],
    )
    return report
