"""The ``evaluate`` stage: every figure of the trained models on the test split.

Sections of ``reports/metrics.json`` (a DVC metric; every number also goes to MLflow):

- ``real``: the z-probe MAE on real test slices (the floor, slice units), the MS-SSIM
  diversity of the real slices, and under ``split_halves`` the distribution metrics of one
  half of the test split against the other (alternate slices in z order; each half holds half
  the slices, so compare these values only with each other).
- ``blurred_real``: the real test slices blurred with a Gaussian (``evaluate.blur_sigma``
  px), scored like a generator against the unblurred slices: the reference to beat.
- ``ldm`` / ``pixelcnn``: as many generated slices per z as the test split holds, scored
  against the real test slices: ``fd_alex``, ``kid`` (+ ``kid_std``), ``precision``,
  ``recall``, ``ms_ssim`` (diversity, lower = more diverse), ``zprobe_mae`` (slice units)
  and ``intensity_distance`` (mean over z of the per-z foreground-histogram distance).
- ``ae_vqvae`` / ``ae_vaegan``: reconstruction ``ssim``, ``ssim_brain``, ``psnr``, ``lpips``
  (and the same with a shuffled z).

Beside the figures every section records ``n_samples``, ``seed`` and the sha256 of the model
file(s) it measured. Per-z curves go to ``reports/per_z/<metric>.csv`` (a DVC plot, column
``z_index`` plus one column per section) and to ``reports/eval_per_z.png``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy import ndimage

from pipeline.core.checkpoint import CheckpointError
from pipeline.core.config import EvaluateConfig, Params
from pipeline.core.errors import InputError
from pipeline.core.figures import figure_image, save_png
from pipeline.core.identity import file_sha256
from pipeline.core.io import atomic_write, write_json
from pipeline.core.tracking import StageRun, flatten
from pipeline.data.datasets import EvalData, SliceDataset
from pipeline.inference.sampling import load_generator, sample
from pipeline.metrics.quality import (
    alex_features,
    feature_metrics,
    intensity_distance_per_z,
    ms_ssim_diversity,
)
from pipeline.models.conditioning import index_from_z, z_from_index
from pipeline.models.files import load_autoencoder, load_probe
from pipeline.models.zprobe import ZProbe
from pipeline.training.autoencoder import reconstruction_report
from pipeline.training.zprobe import predict_z

logger = logging.getLogger(__name__)

#: Generators evaluated, by model file stem.
GENERATORS = ("ldm", "pixelcnn")
#: Reconstruction metrics whose per-z curves are written.
RECON_METRICS = ("ssim", "ssim_brain", "psnr", "lpips")

#: metric -> section -> {z_index: value}
Curves = dict[str, dict[str, dict[int, float]]]


@dataclass(frozen=True)
class EvaluatePaths:
    """Inputs and outputs of the ``evaluate`` stage.

    Attributes:
        test: the prepared test split, ``data/prepared/test``.
        models: folder of the model files (``ae_<kind>.pt``, ``ldm.pt``, ``pixelcnn.pt``,
            ``zprobe.pt``).
        metrics: ``reports/metrics.json``.
        per_z: folder of the per-z curves, ``reports/per_z``.
        per_z_png: the per-z curves as one figure, ``reports/eval_per_z.png``.
    """

    test: Path
    models: Path
    metrics: Path
    per_z: Path
    per_z_png: Path

    @classmethod
    def standard(cls, prepared_dir: str | Path, root: str | Path = ".") -> EvaluatePaths:
        """The standard layout under ``root``, reading ``<prepared_dir>/test``."""
        root = Path(root)
        return cls(
            test=root / prepared_dir / "test",
            models=root / "models",
            metrics=root / "reports" / "metrics.json",
            per_z=root / "reports" / "per_z",
            per_z_png=root / "reports" / "eval_per_z.png",
        )


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur each slice with a Gaussian (reflecting borders), as the ``blurred_real`` reference.

    Args:
        images: (N, 1, H, W) intensities in [0, 1].
        sigma: standard deviation in pixels (> 0).

    Returns:
        (N, 1, H, W) float32 intensities in [0, 1].
    """
    if sigma <= 0:
        raise InputError(f"sigma must be > 0 pixels; got {sigma}")
    blurred = ndimage.gaussian_filter(images.float().numpy(), sigma=(0, 0, sigma, sigma))
    return torch.from_numpy(blurred).clamp(0, 1)


def split_halves(z_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves of a split with the same spread over z: alternate slices in z order.

    Args:
        z_index: (N,) integer slice indices.

    Returns:
        (indices of half A, indices of half B); A gets the extra slice when N is odd.
    """
    order = torch.argsort(z_index, stable=True)
    return order[0::2], order[1::2]


def per_z_mean(values: torch.Tensor, z_index: torch.Tensor) -> dict[int, float]:
    """Mean of ``values`` (N,) at each z_index (N,) present."""
    return {int(level): float(values[z_index == level].mean()) for level in torch.unique(z_index)}


def zprobe_errors(
    probe: ZProbe, images: torch.Tensor, z: torch.Tensor, n_slices: int
) -> torch.Tensor:
    """Absolute z-probe error of each slice at its stated position, in slice units.

    Args:
        probe: the trained z-index probe.
        images: (N, 1, H, W) intensities in [0, 1].
        z: (N,) stated positions in [0, 1] (true for real slices, requested for generated).
        n_slices: K, the number of slice levels.

    Returns:
        (N,) ``|predicted z - z| * (K - 1)``.
    """
    return index_from_z((predict_z(probe, images) - z.float()).abs(), n_slices)


def generate_like(
    generator_path: Path, z_index: torch.Tensor, n_slices: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Generate as many slices per z level as ``z_index`` holds.

    Every level 0..K-1 is sampled ``max count`` times in one
    :func:`pipeline.inference.sampling.sample` call (the generator's default sampling
    settings); the first ``count`` slices of each level are kept.

    Args:
        generator_path: ``models/ldm.pt`` or ``models/pixelcnn.pt``.
        z_index: (N,) slice indices of the real set to match.
        n_slices: K.
        seed: sampling seed.
        device: where to sample.

    Returns:
        (images (N, 1, H, W) in [0, 1], their z_index (N,), provenance: checkpoint and
        autoencoder sha256, sampling settings, seconds).
    """
    generator = load_generator(generator_path, device)
    counts = torch.bincount(z_index, minlength=n_slices)
    n_max = int(counts.max())
    levels = z_from_index(torch.arange(n_slices, dtype=torch.float32), n_slices)
    started = time.perf_counter()
    images, z = sample(generator, levels, n_max, seed)
    seconds = time.perf_counter() - started
    fake_index = torch.arange(n_slices).repeat_interleave(n_max)
    keep = (torch.arange(len(z)) % n_max) < counts[fake_index]
    cfg = generator.config
    settings = (
        {"sampler": cfg.sampler, "steps": cfg.sample_steps, "guidance": cfg.guidance}
        if generator.kind == "ldm"
        else {"temperature": cfg.temperature, "top_k": cfg.top_k}
    )
    provenance = {
        "checkpoint_sha256": file_sha256(generator_path),
        "autoencoder_sha256": generator.metadata.get("autoencoder_sha256"),
        "sampling": settings,
        "sample_seconds": seconds,
    }
    return images[keep], fake_index[keep], provenance


def set_figures(
    real: EvalData,
    fake: torch.Tensor,
    fake_index: torch.Tensor,
    *,
    probe: ZProbe,
    n_slices: int,
    cfg: EvaluateConfig,
    device: torch.device,
    seed: int,
    real_features: np.ndarray | None = None,
) -> tuple[dict[str, Any], Curves]:
    """Score a generated (or reference) set against the real slices.

    Args:
        real: the real test split.
        fake: (M, 1, H, W) slices in [0, 1] to score.
        fake_index: (M,) the z_index each slice stands for.
        probe: the z-index probe.
        n_slices: K.
        cfg: the ``evaluate`` section.
        device: where AlexNet runs.
        seed: seed of the KID subsets and MS-SSIM pairs.
        real_features: :func:`~pipeline.metrics.quality.alex_features` of ``real.image`` when the
            caller scores several sets against the same real slices (extracted here if None).

    Returns:
        (``{fd_alex, kid, kid_std, precision, recall, ms_ssim, zprobe_mae,
        intensity_distance, n_samples, seed}``, per-z curves of ``zprobe_mae`` and
        ``intensity_distance``).
    """
    if real_features is None:
        real_features = alex_features(real.image, device=device)
    dist = feature_metrics(
        real_features,
        alex_features(fake, device=device),
        k=cfg.knn_k,
        kid_subsets=cfg.kid_subsets,
        kid_subset_size=cfg.kid_subset_size,
        seed=seed,
    )
    errors = zprobe_errors(probe, fake, z_from_index(fake_index.float(), n_slices), n_slices)
    intensity_z, intensity = intensity_distance_per_z(
        real.image, real.z_index, fake, fake_index, threshold=cfg.intensity_threshold
    )
    figures = {
        "fd_alex": dist["fd_alex"],
        "kid": dist["kid_mean"],
        "kid_std": dist["kid_std"],
        "precision": dist["precision"],
        "recall": dist["recall"],
        "ms_ssim": ms_ssim_diversity(fake, num_pairs=cfg.ms_ssim_pairs, seed=seed),
        "zprobe_mae": float(errors.mean()),
        "intensity_distance": intensity,
        "n_samples": len(fake),
        "seed": seed,
    }
    curves = {
        "zprobe_mae": per_z_mean(errors, fake_index),
        "intensity_distance": intensity_z,
    }
    return figures, curves


def real_figures(
    real: EvalData,
    *,
    probe: ZProbe,
    n_slices: int,
    cfg: EvaluateConfig,
    device: torch.device,
    seed: int,
) -> tuple[dict[str, Any], Curves]:
    """The real-data floor: z-probe MAE, real diversity and half-against-half figures.

    Args:
        real: the real test split.
        probe: the z-index probe.
        n_slices: K.
        cfg: the ``evaluate`` section.
        device: where AlexNet runs.
        seed: seed of the KID subsets and MS-SSIM pairs.

    Returns:
        (``{zprobe_mae, ms_ssim, n_samples, seed, split_halves: {...}}`` — ``split_halves``
        is None when a half holds no more than ``knn_k`` slices or the halves share no z
        level (one slice per level) — and the per-z ``zprobe_mae`` curve).
    """
    errors = zprobe_errors(probe, real.image, real.z, n_slices)
    figures: dict[str, Any] = {
        "zprobe_mae": float(errors.mean()),
        "ms_ssim": ms_ssim_diversity(real.image, num_pairs=cfg.ms_ssim_pairs, seed=seed),
        "n_samples": len(real.image),
        "seed": seed,
        "split_halves": None,
    }
    a, b = split_halves(real.z_index)
    shared = set(real.z_index[a].tolist()) & set(real.z_index[b].tolist())
    if min(len(a), len(b)) > cfg.knn_k and shared:
        half = EvalData(real.image[a], real.mask[a], real.z[a], real.z_index[a])
        halves, _ = set_figures(
            half,
            real.image[b],
            real.z_index[b],
            probe=probe,
            n_slices=n_slices,
            cfg=cfg,
            device=device,
            seed=seed,
        )
        halves.pop("zprobe_mae")
        halves.pop("ms_ssim")
        figures["split_halves"] = halves
    else:
        logger.warning("test split too small for split-half figures (%d slices)", len(real.z))
    return figures, {"zprobe_mae": per_z_mean(errors, real.z_index)}


def autoencoder_figures(
    path: Path, real: EvalData, device: torch.device, seed: int
) -> tuple[dict[str, Any], Curves]:
    """Reconstruction figures of one autoencoder (via ``first_stage.reconstruction_report``).

    Args:
        path: ``models/ae_<kind>.pt``.
        real: the real test split.
        device: where the model and LPIPS run.
        seed: seed of the z shuffle.

    Returns:
        (``{ssim, ssim_brain, psnr, lpips, shuffled_z, n_samples, seed, checkpoint_sha256}``,
        per-z curves of the four metrics).
    """
    model, _ = load_autoencoder(path, device)
    report = reconstruction_report(model, real, device, seed=seed)
    per_z = report.pop("per_z")
    report |= {"n_samples": len(real.image), "seed": seed, "checkpoint_sha256": file_sha256(path)}
    curves = {m: {int(z): values[m] for z, values in per_z.items()} for m in RECON_METRICS}
    return report, curves


def _merge(curves: Curves, section: str, new: Curves) -> None:
    for metric, values in new.items():
        curves.setdefault(metric, {})[section] = values


def curve_tables(curves: Curves) -> dict[str, pd.DataFrame]:
    """One table per metric: column ``z_index`` then one column per section (NaN if absent)."""
    tables = {}
    for metric, sections in curves.items():
        levels = sorted({z for values in sections.values() for z in values})
        columns = {
            name: [values.get(z, math.nan) for z in levels] for name, values in sections.items()
        }
        tables[metric] = pd.DataFrame({"z_index": levels, **columns})
    return tables


def curves_figure(tables: Mapping[str, pd.DataFrame]) -> np.ndarray:
    """All per-z curves, one panel per metric, one line per section.

    Args:
        tables: from :func:`curve_tables`.

    Returns:
        (H, W, 3) uint8 image.
    """
    ncol = min(3, max(len(tables), 1))
    nrow = max(math.ceil(len(tables) / ncol), 1)
    fig = Figure(figsize=(4.2 * ncol, 3.2 * nrow), dpi=100)
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for ax, (metric, table) in zip(axes, tables.items(), strict=False):
        for column in table.columns.drop("z_index"):
            ax.plot(table["z_index"], table[column], marker=".", label=column)
        ax.set(title=metric, xlabel="slice index z")
        ax.legend(fontsize=7)
    for ax in axes[len(tables) :]:
        ax.set_axis_off()
    fig.tight_layout()
    return figure_image(fig)


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-NaN numbers of a nested report, flattened to dotted keys (for MLflow)."""
    return {
        key: float(value)
        for key, value in flatten(metrics).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def evaluate(
    params: Params, *, run: StageRun, device: torch.device, paths: EvaluatePaths
) -> dict[str, Any]:
    """Measure every model on the test split; write metrics.json and the per-z curves.

    Args:
        params: all parameters (``evaluate``, ``autoencoder.kinds``, ``prepare.n_slices``,
            ``seed``).
        run: the stage's tracking run.
        device: where models and metrics run.
        paths: inputs and outputs.

    Returns:
        The content of ``reports/metrics.json``.

    Raises:
        ValueError: the test split holds too few slices for the neighbour metrics.
        CheckpointError: a model file is missing, corrupt, or was made for another K.
    """
    cfg, seed, n_slices = params.evaluate, params.seed, params.prepare.n_slices
    real = EvalData.from_dataset(SliceDataset(paths.test))
    if len(real.image) <= cfg.knn_k or int(real.z_index.max()) >= n_slices:
        raise InputError(
            f"{paths.test} holds {len(real.image)} slices with z_index up to "
            f"{int(real.z_index.max())}; evaluate needs more than evaluate.knn_k={cfg.knn_k} "
            f"slices and z_index < prepare.n_slices={n_slices} (re-run prepare)"
        )
    probe_path = paths.models / "zprobe.pt"
    probe, probe_meta = load_probe(probe_path, device)
    if probe_meta.get("n_slices") != n_slices:
        raise CheckpointError(
            f"{probe_path} was trained for {probe_meta.get('n_slices')} slice levels, params "
            f"have prepare.n_slices={n_slices}; re-run train_zprobe"
        )
    probe_sha = {"zprobe_sha256": file_sha256(probe_path)}
    scoring = {"probe": probe, "n_slices": n_slices, "cfg": cfg, "device": device, "seed": seed}
    metrics: dict[str, Any] = {}
    curves: Curves = {}

    metrics["real"], new = real_figures(real, **scoring)
    metrics["real"] |= probe_sha
    _merge(curves, "real", new)
    scoring["real_features"] = alex_features(real.image, device=device)  # once for every set
    blurred = gaussian_blur(real.image, cfg.blur_sigma)
    metrics["blurred_real"], new = set_figures(real, blurred, real.z_index, **scoring)
    metrics["blurred_real"] |= {"sigma_px": cfg.blur_sigma} | probe_sha
    _merge(curves, "blurred_real", new)
    for name in GENERATORS:
        images, index, provenance = generate_like(
            paths.models / f"{name}.pt", real.z_index, n_slices, seed, device
        )
        metrics[name], new = set_figures(real, images, index, **scoring)
        metrics[name] |= provenance | probe_sha
        _merge(curves, name, new)
        logger.info(
            "%s: fd_alex %.4g (blurred real %.4g), z-probe MAE %.3g (real %.3g) slices",
            name,
            metrics[name]["fd_alex"],
            metrics["blurred_real"]["fd_alex"],
            metrics[name]["zprobe_mae"],
            metrics["real"]["zprobe_mae"],
        )
    for kind in params.autoencoder.kinds:
        section = f"ae_{kind}"
        metrics[section], new = autoencoder_figures(
            paths.models / f"{section}.pt", real, device, seed
        )
        _merge(curves, section, new)

    tables = curve_tables(curves)
    for metric, table in tables.items():
        atomic_write(paths.per_z / f"{metric}.csv", lambda tmp, t=table: t.to_csv(tmp, index=False))
        run.log_artifact(paths.per_z / f"{metric}.csv", "per_z")
    figure = curves_figure(tables)
    save_png(figure, paths.per_z_png)
    write_json(paths.metrics, metrics)
    _log(run, metrics, tables, figure, paths)
    return metrics


def _log(
    run: StageRun,
    metrics: Mapping[str, Any],
    tables: Mapping[str, pd.DataFrame],
    figure: np.ndarray,
    paths: EvaluatePaths,
) -> None:
    """Every figure to MLflow; per-z values as metric histories with step = z_index."""
    run.log_metrics(numeric_metrics(metrics))
    for metric, table in tables.items():
        for row in table.to_dict("records"):
            values = {
                f"per_z.{metric}.{k}": v
                for k, v in row.items()
                if k != "z_index" and math.isfinite(v)
            }
            run.log_metrics(values, step=int(row["z_index"]))
    run.log_image(figure, f"reports/{paths.per_z_png.name}")
    run.log_dict(dict(metrics), f"reports/{paths.metrics.name}")
