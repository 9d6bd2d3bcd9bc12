"""The ``evaluate`` stage: every figure of the trained models on the test split.

Sections of ``reports/metrics.json`` (a DVC metric; every number also goes to MLflow):

- ``real``: the z-probe MAE on real test slices (the floor, slice units), the MS-SSIM
  diversity of the real slices, their scan-noise level ``noise_sigma`` (intensity units,
  :func:`pipeline.inference.texture.noise_sigma`), and under ``split_halves`` the
  distribution metrics of one half of the test split against the other (alternate slices in
  z order; each half holds half the slices, so compare these values only with each other);
  under ``other_subjects`` the same metrics of as many real slices of training subjects
  (whole volumes, :func:`other_subjects_rows`) against the test split: the reference at a
  generator's set size.
- ``blurred_real``: the real test slices blurred with a Gaussian (``evaluate.blur_sigma``
  px), scored like a generator against the unblurred slices: the reference to beat.
- ``ldm`` / ``pixelcnn``: one generated slice per real test slice, at its z and the
  covariates the generator conditions on (with its mask), scored against the real test
  slices: ``fd_alex``, ``kid`` (+ ``kid_std``), ``precision``,
  ``recall``, ``ms_ssim`` (diversity, lower = more diverse), ``zprobe_mae`` (slice units)
  ``intensity_distance`` (mean over z of the per-z foreground-histogram distance) and
  ``noise_sigma`` (the finished slices' noise level: a texture judge fooled by noise well
  above the real level would be bought, not earned).
- ``ae_vqvae`` / ``ae_vaegan``: reconstruction ``ssim``, ``ssim_brain``, ``psnr``, ``lpips``
  (and the same with a shuffled z); under ``other_subjects`` the distribution metrics of the
  reconstructions of ``real.other_subjects``' slices, decoded and finished as the generator
  on its latents finishes slices, against the test split: what a second stage that
  reproduced its training slices exactly would score at a generator's set size (the
  ceiling beside fd_alex, precision and recall in the verdict table), the mean over as many
  posterior and texture draws as ``evaluate.sampling_seeds`` (``draws``): one draw's recall
  moves by about ±0.025.
- ``c2st`` in ``real`` (the control, about 0.5: a judge trained on the training subjects
  against the validation subjects, scored on two halves of the test slices that hold every
  test subject, alternate levels of each volume),
  ``blurred_real`` (about 1.0), each generator and each autoencoder's reconstructions (the
  ceiling of its second stage; decoded and finished as that generator's slices are, with the
  ``posterior_std`` and ``texture`` calibration each generator section records,
  :func:`ceiling_reconstructions`, :mod:`pipeline.inference.texture`):
  ``raw`` and ``blur`` (both sides blurred by
  ``evaluate.c2st.blur_sigma`` px; this hides pixel-scale texture, not blur, which adds up)
  ROC AUC of a judge CNN trained on the training split against synthetic slices
  (:mod:`pipeline.metrics.c2st`), with its AUC curve over training steps.
- ``novelty`` in each generator and in ``real`` (the real test slices: the reference): each
  slice's similarity to its nearest training slice and the copy-like fraction
  (:mod:`pipeline.metrics.novelty`). More than ``evaluate.novelty.max_copy_like`` copy-like
  samples logs a warning.
- ``labels`` in each generator (:mod:`pipeline.evaluation.label_fidelity`): the label probes
  of ``train_probes`` (models/covariate_probe.pt, models/segmenter.pt; skipped with a reason
  when absent) on real test slices, on the slices above (generated at the same z and
  covariates), and on the shuffled-covariate control; mask Dice of generated image against
  generated mask.

Beside the figures every section records ``n_samples``, ``seed`` and the sha256 of the model
file(s) it measured. Per-z curves go to ``reports/per_z/<metric>.csv`` (a DVC plot, column
``z_index`` plus one column per section) and to ``reports/eval_per_z.png``; the judges' AUC
over training steps to ``reports/c2st_strength.png``; each generator's closest sample/training
pairs to ``reports/novelty_<generator>.png``; real slices with their tissue maps above the
slices generated at their z and covariates with the generated masks to
``reports/labelled_<generator>.png``; the covariate probe's readings of real, matched and
shuffled slices against the asked-for age and CDR, and the age error per z, to
``reports/labels_<generator>.png``; the look test (real test slices, their reconstructions by
the generator's first stage finished as its slices are, and the slices generated at their z
and covariates, magnified with no smoothing: :func:`beside_real_figure`) to
``reports/beside_real_<generator>.png``.

One generator's section is :func:`score_generator` on an :class:`EvalContext` (the splits,
probes and references built once); ``benchmarks/scoring.py`` calls the same function for the
benchmarks that compare sampling settings, starts, recipe arms and training budgets.

Each generator is scored on ``evaluate.sampling_seeds`` sampling seeds (``seed``, ``seed + 1``,
...): its section holds their mean (:func:`pipeline.evaluation.seeds.mean_section`), which
the verdicts judge, and under ``seeds`` each figure's mean and range and how many seeds met
every bar; the per-z curves, grids and judge curves are the first seed's. Its raw and blurred
judges are trained once (:func:`generator_judges`) and read on every seed's slices.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import nn

from pipeline.core.checkpoint import CheckpointError
from pipeline.core.config import EvaluateConfig, Params
from pipeline.core.errors import InputError
from pipeline.core.figures import figure_image, grid, save_png
from pipeline.core.identity import file_sha256
from pipeline.core.io import atomic_write, write_json
from pipeline.core.labels import covariate_codes
from pipeline.core.tracking import StageRun, flatten
from pipeline.data.datasets import EVAL_BATCH, EvalData, SliceDataset
from pipeline.evaluation.label_fidelity import fidelity_summary, label_fidelity
from pipeline.evaluation.seeds import mean_section, seed_row, summarise
from pipeline.inference.sampling import (
    GeneratorModel,
    Samples,
    SamplingSettings,
    load_generator,
    sample_slices,
)
from pipeline.inference.texture import Texture, finish, noise_sigma
from pipeline.metrics.c2st import C2STResult, blur, strength_curve_figure, two_sample_aucs
from pipeline.metrics.novelty import (
    NearestTraining,
    closest_pairs_figure,
    nearest_training,
    novelty_summary,
)
from pipeline.metrics.quality import (
    alex_features,
    feature_metrics,
    intensity_distance_per_z,
    ms_ssim_diversity,
)
from pipeline.models.codec import LatentCodec
from pipeline.models.conditioning import index_from_z, z_from_index
from pipeline.models.files import (
    load_autoencoder,
    load_covariate_probe,
    load_probe,
    load_segmenter,
)
from pipeline.models.probes import CovariateProbe
from pipeline.models.zprobe import ZProbe
from pipeline.training.autoencoder import reconstruction_report
from pipeline.training.concurrency import WorkerPool, pool_workers
from pipeline.training.probes import CovariateLabels
from pipeline.training.zprobe import predict_z

logger = logging.getLogger(__name__)

#: Generators evaluated, by model file stem.
GENERATORS = ("ldm", "pixelcnn")
#: Reconstruction metrics whose per-z curves are written.
RECON_METRICS = ("ssim", "ssim_brain", "psnr", "lpips")
#: the distribution figures kept under each ``other_subjects`` (real slices and their
#: reconstructions, at a generator's set size)
SAME_SIZE_FIGURES = ("fd_alex", "kid", "kid_std", "precision", "recall", "n_samples")
#: Seed distance between the autoencoder ceiling's draws (draw k seeds its texture noise with
#: seed + 3 + k x stride and its posterior draws with seed + 4 + k x stride; draw 0 is the
#: judges' draw).
CEILING_DRAW_STRIDE = 1000
#: Sampling seed of the judges' synthetic training slices, added to ``params.seed``: far
#: from the scored seeds (``seed`` .. ``seed + evaluate.sampling_seeds - 1``) and their label
#: controls (``seed + 2`` ..), so no slice a judge learns shares its noise with one it is
#: read on.
JUDGE_SEED_OFFSET = 500
#: Levels of the look test (:func:`beside_real_figure`), as fractions of the K levels: the
#: cerebrum from the temporal lobes to above the ventricles, where grey and white matter show.
BESIDE_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7)
#: Real slices per level in the look test, each from another volume.
BESIDE_PER_LEVEL = 2
#: Magnification of the look test: each pixel drawn as a BESIDE_SCALE x BESIDE_SCALE block.
BESIDE_SCALE = 2

#: metric -> section -> {z_index: value}
Curves = dict[str, dict[str, dict[int, float]]]


@dataclass(frozen=True)
class EvaluatePaths:
    """Inputs and outputs of the ``evaluate`` stage.

    Attributes:
        train: the prepared training split (the judges' real side, the novelty check's
            neighbours), ``data/prepared/train``.
        val: the prepared validation split (the real-against-real judge's second side),
            ``data/prepared/val``.
        test: the prepared test split, ``data/prepared/test``.
        models: folder of the model files (``ae_<kind>.pt``, ``ldm.pt``, ``pixelcnn.pt``,
            ``zprobe.pt``).
        metrics: ``reports/metrics.json``.
        per_z: folder of the per-z curves, ``reports/per_z``.
        per_z_png: the per-z curves as one figure, ``reports/eval_per_z.png``.
        c2st_png: the judges' AUC over training steps, ``reports/c2st_strength.png``.
        reports: folder of ``novelty_<generator>.png``, ``reports``.
    """

    train: Path
    val: Path
    test: Path
    models: Path
    metrics: Path
    per_z: Path
    per_z_png: Path
    c2st_png: Path
    reports: Path

    @classmethod
    def standard(cls, prepared_dir: str | Path, root: str | Path = ".") -> EvaluatePaths:
        """The standard layout under ``root``, reading ``<prepared_dir>/test``."""
        root = Path(root)
        return cls(
            train=root / prepared_dir / "train",
            val=root / prepared_dir / "val",
            test=root / prepared_dir / "test",
            models=root / "models",
            metrics=root / "reports" / "metrics.json",
            per_z=root / "reports" / "per_z",
            per_z_png=root / "reports" / "eval_per_z.png",
            c2st_png=root / "reports" / "c2st_strength.png",
            reports=root / "reports",
        )


def split_halves(z_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint halves of a split with the same spread over z: alternate slices in z order.

    Args:
        z_index: (N,) integer slice indices.

    Returns:
        (indices of half A, indices of half B); A gets the extra slice when N is odd.
    """
    order = torch.argsort(z_index, stable=True)
    return order[0::2], order[1::2]


def other_subjects_rows(manifest: pd.DataFrame, size: int, seed: int) -> torch.Tensor:
    """Rows of whole training volumes drawn at random: a real set of other subjects the size
    of the test split (the same-size reference of fd_alex and precision / recall).

    Volumes (``subject`` and, where the manifest has it, ``session``) are taken in a seeded
    random order, each whole, until ``size`` rows are reached; the last one is cut to fit.
    The split halves compare half the test split with the other half, and fd_alex is biased
    upward in small sets (precision / recall loosen), so this is the reference at the set
    size a generator is scored at.

    Args:
        manifest: the training split's manifest, row i for slice i.
        size: slices wanted (the test split's count).
        seed: seed of the volume order.

    Returns:
        (min(size, len(manifest)),) int64 row indices, volume by volume.
    """
    keys = [c for c in ("subject", "session") if c in manifest.columns]  # prepare writes both
    volumes = list(manifest.groupby(keys, sort=True).indices.values())
    order = torch.randperm(len(volumes), generator=torch.Generator().manual_seed(seed))
    rows = np.concatenate([volumes[i] for i in order.tolist()])
    return torch.from_numpy(rows[:size].astype(np.int64))


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
    generator: GeneratorModel,
    z_index: torch.Tensor,
    n_slices: int,
    seed: int,
    *,
    manifest: pd.DataFrame | None = None,
    masks: bool = False,
) -> tuple[Samples, float]:
    """Generate one slice per real slice: at its z level and, for a covariate-conditioned
    generator, at its covariates (the generator's default sampling settings).

    Args:
        generator: a loaded generator (:func:`~pipeline.inference.sampling.load_generator`).
        z_index: (N,) slice indices of the real slices to match.
        n_slices: K.
        seed: sampling seed.
        manifest: the real slices' manifest rows (row i ↔ ``z_index[i]``), whose ``age``,
            ``sex``, ``cdr``... columns are the covariates asked for; None: z alone.
        masks: also decode each slice's tissue labels, where the generator makes them.

    Returns:
        (:class:`~pipeline.inference.sampling.Samples`, row i for real slice i; the seconds
        sampling took).
    """
    codes = None
    if manifest is not None and generator.schema:
        codes = torch.from_numpy(covariate_codes(manifest, generator.schema))
    started = time.perf_counter()
    samples = sample_slices(
        generator,
        z_from_index(z_index.float(), n_slices),
        seed,
        covariates=codes,
        masks=masks and generator.tissue_labels,
    )
    return samples, time.perf_counter() - started


def provenance(generator: GeneratorModel, path: Path) -> dict[str, Any]:
    """What made a generator's slices: checkpoint and autoencoder sha256, latent source,
    finishing, posterior std and sampling settings (``metrics.json``)."""
    return {
        "checkpoint_sha256": file_sha256(path),
        "autoencoder_sha256": generator.metadata.get("autoencoder_sha256"),
        "latent_source": generator.codec.autoencoder.kind,
        "texture": generator.texture.summary(),
        "posterior_std": generator.codec.posterior_std,
        "decode_noise": generator.codec.decode_noise,
        "sampling": SamplingSettings.resolve(generator).as_dict(),
    }


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
        intensity_distance, noise_sigma, n_samples, seed}``, per-z curves of ``zprobe_mae`` and
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
        "noise_sigma": noise_sigma(fake),
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
        (``{zprobe_mae, ms_ssim, noise_sigma, n_samples, seed, split_halves: {...}}`` —
        ``split_halves`` is None when a half holds no more than ``knn_k`` slices or the
        halves share no z level (one slice per level) — and the per-z ``zprobe_mae`` curve).
    """
    errors = zprobe_errors(probe, real.image, real.z, n_slices)
    figures: dict[str, Any] = {
        "zprobe_mae": float(errors.mean()),
        "ms_ssim": ms_ssim_diversity(real.image, num_pairs=cfg.ms_ssim_pairs, seed=seed),
        "noise_sigma": noise_sigma(real.image),
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


@torch.no_grad()
def ceiling_reconstructions(
    codec: LatentCodec,
    image: torch.Tensor,
    z: torch.Tensor,
    device: torch.device,
    generator: torch.Generator,
    *,
    posterior_samples: bool = False,
) -> torch.Tensor:
    """A first stage's reconstructions decoded as the generator on its latents decodes
    samples: each slice's stage-2 input as the generator was trained on it (the posterior
    mean, or with ``posterior_samples`` a draw from the posterior), decoded as a posterior
    sample when ``codec`` has a ``posterior_std``
    (:meth:`~pipeline.models.codec.LatentCodec.decode_stage_2_outputs`).

    Args:
        codec: the generator's codec (scale factor and posterior std).
        image: (N, 1, H, W) slices in [0, 1].
        z: (N,) their positions in [0, 1].
        device: where the autoencoder runs.
        generator: a seeded CPU generator for the posterior draws.
        posterior_samples: the generator was trained on posterior samples
            (``ldm.posterior_samples``); ignored for a VQ-VAE.

    Returns:
        (N, 1, H, W) on the CPU, in [0, 1] (not yet finished).
    """
    out = []
    for xb, zb in zip(image.split(EVAL_BATCH), z.split(EVAL_BATCH), strict=True):
        xb, zb = xb.to(device), zb.to(device)
        latent, std = codec.encode_stage_2_posterior(xb, zb)
        if posterior_samples and std is not None:
            latent = latent + std * torch.randn(std.shape, generator=generator).to(std.device)
        out.append(codec.decode_stage_2_outputs(latent, zb, generator=generator).float().cpu())
    return torch.cat(out)


def finished_reconstructions(
    codec: LatentCodec,
    texture: Texture,
    image: torch.Tensor,
    z: torch.Tensor,
    posterior: torch.Generator,
    noise: torch.Generator,
    *,
    device: torch.device,
    posterior_samples: bool = False,
) -> torch.Tensor:
    """:func:`ceiling_reconstructions` finished with ``texture`` as the generator finishes
    its samples (:func:`~pipeline.inference.texture.finish`).

    Args:
        codec, image, z, device, posterior_samples: as for :func:`ceiling_reconstructions`.
        texture: the generator's calibrated noise texture.
        posterior: a seeded CPU generator for the posterior draws.
        noise: a seeded CPU generator for the texture noise.

    Returns:
        (N, 1, H, W) on the CPU, in [0, 1].
    """
    raw = ceiling_reconstructions(
        codec, image, z, device, posterior, posterior_samples=posterior_samples
    )
    return finish(raw, texture, noise)


@dataclass(frozen=True)
class JudgeJob:
    """One classifier two-sample test to run: which section and variant it scores, and its sets.

    Attributes:
        section: the ``metrics.json`` section it belongs to (``real``, ``ldm``, ...).
        variant: ``raw``, or ``blur`` (all four sets blurred by ``cfg.c2st.blur_sigma`` px).
        real_train: (M, 1, H, W) real slices the judge learns as real.
        fake_train: (M', 1, H, W) slices it learns as synthetic.
        real_test: (N, 1, H, W) unseen real slices.
        fake_tests: one or more (N', 1, H, W) sets of unseen synthetic slices (a generator's
            slices from each sampling seed): the one judge is read on each.
        cfg: the ``evaluate`` section (``c2st`` settings).
        seed: the judge's seed (the same for every job, so jobs differ only in their data).
    """

    section: str
    variant: str
    real_train: torch.Tensor
    fake_train: torch.Tensor
    real_test: torch.Tensor
    fake_tests: tuple[torch.Tensor, ...]
    cfg: EvaluateConfig
    seed: int


def judge_jobs(
    section: str,
    real_train: torch.Tensor,
    fake_train: torch.Tensor,
    real_test: torch.Tensor,
    fake_tests: Sequence[torch.Tensor],
    *,
    cfg: EvaluateConfig,
    seed: int,
    variants: tuple[str, ...] = ("raw", "blur"),
) -> list[JudgeJob]:
    """The judges of one synthetic (or reference) set: one :class:`JudgeJob` per variant,
    each read on every set of ``fake_tests``."""
    sets = (real_train.cpu(), fake_train.cpu(), real_test.cpu())
    tests = tuple(x.cpu() for x in fake_tests)
    return [JudgeJob(section, v, *sets, tests, cfg, seed) for v in variants]


#: The device judges run on in this process (set by :func:`_judge_device`).
_JUDGE: dict[str, torch.device] = {}


def _judge_device(device: torch.device) -> None:
    _JUDGE["device"] = device


def _run_judge(job: JudgeJob) -> list[C2STResult]:
    return two_sample_aucs(
        job.real_train,
        job.fake_train,
        job.real_test,
        job.fake_tests,
        cfg=job.cfg.c2st,
        device=_JUDGE["device"],
        seed=job.seed,
        blur_sigma=job.cfg.c2st.blur_sigma if job.variant == "blur" else None,
    )


def run_judges(jobs: list[JudgeJob], device: torch.device) -> list[list[C2STResult]]:
    """Train every judge, side by side on CPU cores (one thread each: the judge is small and
    uses two threads poorly, :mod:`pipeline.metrics.c2st`), else one after the other.

    Returns:
        One list per job, in order: its judge's result on each of its ``fake_tests``.
    """
    workers = min(pool_workers(device), len(jobs))
    device = device if workers == 1 else torch.device("cpu")
    with WorkerPool(workers, _judge_device, (device,)) as pool:
        return pool.map(_run_judge, jobs, desc="c2st judges", unit="judge")


def judge_train_rows(n_train: int, count: int, seed: int) -> torch.Tensor:
    """Training slices whose synthetic counterparts a judge learns: ``count`` of the ``n_train``
    rows, drawn at random (seeded).

    Returns:
        (min(count, n_train),) int64 row indices, sorted.
    """
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return torch.sort(order[:count]).values


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


def beside_real_rows(
    z_index: torch.Tensor, n_slices: int, per_level: int = BESIDE_PER_LEVEL
) -> torch.Tensor:
    """The test slices the look test shows: at each of :data:`BESIDE_LEVELS` (once per level
    where small K rounds two to one), ``per_level`` slices spread evenly over those at that
    level (the split is stored volume by volume, so each is from another volume).

    Args:
        z_index: (N,) the test slices' level indices.
        n_slices: K.
        per_level: slices per level (fewer where the split has fewer at a level).

    Returns:
        (n,) int64 row indices, level by level.
    """
    rows = []
    for level in sorted({round(fraction * (n_slices - 1)) for fraction in BESIDE_LEVELS}):
        at_level = torch.nonzero(z_index == level).flatten()
        if len(at_level):
            picks = torch.linspace(0, len(at_level) - 1, min(per_level, len(at_level)))
            rows.append(at_level[picks.round().long()])
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)


def beside_real_figure(
    real: torch.Tensor, ceiling: torch.Tensor, generated: torch.Tensor, rows: torch.Tensor
) -> np.ndarray:
    """The look test: what a reader compares, at the same z and covariates, one column each.

    Args:
        real: (N, 1, H, W) real test slices in [0, 1].
        ceiling: (N, 1, H, W) their reconstructions by the generator's first stage, decoded
            and finished as the generator's slices are (:func:`finished_reconstructions`).
        generated: (N, 1, H, W) slices generated at each real slice's z and covariates.
        rows: (n,) the test slices to show (:func:`beside_real_rows`).

    Returns:
        (3 (H + 2) + 2, n (W + 2) + 2) x :data:`BESIDE_SCALE` array in [0, 1], rows real,
        ceiling, generated; each pixel a square block (nearest neighbour: no smoothing to
        hide or add texture).
    """
    tiles = torch.cat([real[rows], ceiling[rows], generated[rows]])
    image = grid(tiles, ncol=len(rows))
    return np.kron(image, np.ones((BESIDE_SCALE, BESIDE_SCALE)))


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-NaN numbers of a nested report, flattened to dotted keys (for MLflow)."""
    return {
        key: float(value)
        for key, value in flatten(metrics).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


@dataclass(frozen=True)
class EvalContext:
    """What scoring a generator as ``evaluate`` does needs, built once per run.

    Attributes:
        real: the test split (N slices).
        train: the training split (M slices): the judges' real side, the novelty neighbours.
        test_manifest: the test split's manifest (row i ↔ ``real`` slice i).
        train_manifest: the training split's manifest.
        cfg: the ``evaluate`` section.
        n_slices: K.
        seed: ``params.seed``: the metrics' own draws (KID subsets, MS-SSIM pairs, judges).
        device: where models and metrics run.
        zprobe: the z-index probe.
        real_features: (N, 256) AlexNet features of the test slices.
        judge_rows: the training rows whose synthetic counterparts the judges learn.
        train_features: (M, 256) AlexNet features of the training slices.
        reference: the real test slices' nearest training slices (the novelty reference).
        covariate_probe: the covariate probe of ``train_probes``, or None.
        segmenter: the tissue segmenter of ``train_probes``, or None.
        train_labels: the training slices' labels (the label probes' chance figures).
        probe_sha: ``{"zprobe_sha256": ...}`` of the z-probe file.
    """

    real: EvalData
    train: EvalData
    test_manifest: pd.DataFrame
    train_manifest: pd.DataFrame
    cfg: EvaluateConfig
    n_slices: int
    seed: int
    device: torch.device
    zprobe: ZProbe
    real_features: np.ndarray
    judge_rows: torch.Tensor
    train_features: np.ndarray
    reference: NearestTraining
    covariate_probe: CovariateProbe | None
    segmenter: nn.Module | None
    train_labels: CovariateLabels
    probe_sha: dict[str, str]

    @classmethod
    def build(cls, params: Params, paths: EvaluatePaths, device: torch.device) -> EvalContext:
        """Load the splits and probes of ``paths`` and compute what every generator shares.

        Raises:
            InputError: the test split holds too few slices, or levels beyond K.
            CheckpointError: the z-probe is missing, corrupt, or was made for another K.
        """
        cfg, seed, n_slices = params.evaluate, params.seed, params.prepare.n_slices
        test_set, train_set = SliceDataset(paths.test), SliceDataset(paths.train)
        real = EvalData.from_dataset(test_set)
        if len(real.image) <= cfg.knn_k or int(real.z_index.max()) >= n_slices:
            raise InputError(
                f"{paths.test} holds {len(real.image)} slices with z_index up to "
                f"{int(real.z_index.max())}; evaluate needs more than evaluate.knn_k="
                f"{cfg.knn_k} slices and z_index < prepare.n_slices={n_slices} (re-run prepare)"
            )
        train = EvalData.from_dataset(train_set)
        probe_path = paths.models / "zprobe.pt"
        probe, probe_meta = load_probe(probe_path, device)
        if probe_meta.get("n_slices") != n_slices:
            raise CheckpointError(
                f"{probe_path} was trained for {probe_meta.get('n_slices')} slice levels, params "
                f"have prepare.n_slices={n_slices}; re-run train_zprobe"
            )
        train_features = alex_features(train.image, device=device)
        reference = nearest_training(
            real.image,
            train.image,
            device=device,
            candidates=cfg.novelty.candidates,
            train_features=train_features,
        )
        covariate_probe, segmenter = label_probes(paths.models, device)
        return cls(
            real=real,
            train=train,
            test_manifest=test_set.manifest,
            train_manifest=train_set.manifest,
            cfg=cfg,
            n_slices=n_slices,
            seed=seed,
            device=device,
            zprobe=probe,
            real_features=alex_features(real.image, device=device),
            judge_rows=judge_train_rows(len(train.image), cfg.c2st.train_samples, seed),
            train_features=train_features,
            reference=reference,
            covariate_probe=covariate_probe,
            segmenter=segmenter,
            train_labels=CovariateLabels.from_manifest(train_set.manifest),
            probe_sha={"zprobe_sha256": file_sha256(probe_path)},
        )

    @property
    def measuring(self) -> dict[str, Any]:
        """Keyword arguments of :func:`real_figures`: the z-probe, K, cfg, device and seed."""
        return {
            "probe": self.zprobe,
            "n_slices": self.n_slices,
            "cfg": self.cfg,
            "device": self.device,
            "seed": self.seed,
        }

    @property
    def scoring(self) -> dict[str, Any]:
        """Keyword arguments of :func:`set_figures` against the test split (its AlexNet
        features computed once)."""
        return self.measuring | {"real_features": self.real_features}

    @property
    def judging(self) -> dict[str, Any]:
        """Keyword arguments of :func:`judge_jobs`."""
        return {"cfg": self.cfg, "seed": self.seed}


@dataclass
class GeneratorScore:
    """One generator scored as ``evaluate`` scores it (:func:`score_generator`).

    Attributes:
        section: its ``metrics.json`` section, without ``c2st`` (the judges still to run) and
            without the model file's provenance.
        curves: its per-z curves.
        samples: the slices, one per test slice (row i at test slice i's z and covariates).
        nearest: each slice's nearest training slice.
        label_figures: :func:`~pipeline.evaluation.label_fidelity.label_fidelity`'s figures.
    """

    section: dict[str, Any]
    curves: Curves
    samples: Samples
    nearest: NearestTraining
    label_figures: dict[str, np.ndarray]


def score_generator(
    name: str, generator: GeneratorModel, ctx: EvalContext, seed: int
) -> GeneratorScore:
    """Every figure of one generator at its default sampling settings
    (:meth:`~pipeline.inference.sampling.GeneratorModel.with_defaults` for others).

    Slices are drawn at each test slice's z and covariates with sampling seed ``seed`` and
    the label controls with ``seed + 2``; the metrics' own draws keep ``ctx.seed``. The
    realism judges are not trained here: :func:`generator_judges` builds one pair for all
    of a generator's seeds.

    Args:
        name: the section name (``ldm``, ``pixelcnn``).
        generator: a loaded generator.
        ctx: the run's :class:`EvalContext`.
        seed: sampling seed (``evaluate`` uses ``params.seed``).
    """
    real, n_slices = ctx.real, ctx.n_slices
    samples, seconds = generate_like(
        generator, real.z_index, n_slices, seed, manifest=ctx.test_manifest, masks=True
    )
    section, curves = set_figures(real, samples.images, real.z_index, **ctx.scoring)
    section["sample_seconds"] = seconds
    nearest = nearest_training(
        samples.images,
        ctx.train.image,
        device=ctx.device,
        candidates=ctx.cfg.novelty.candidates,
        train_features=ctx.train_features,
    )
    section["novelty"] = novelty_summary(nearest, ctx.reference, ctx.cfg.novelty.quantile)
    section["labels"], label_figures = label_fidelity(
        generator,
        real,
        ctx.test_manifest,
        probe=ctx.covariate_probe,
        segmenter=ctx.segmenter,
        n=ctx.cfg.label_samples,
        seed=seed + 2,
        train_labels=ctx.train_labels,
        matched=samples,
    )
    return GeneratorScore(section, curves, samples, nearest, label_figures)


def generator_judges(
    name: str, generator: GeneratorModel, ctx: EvalContext, scores: Sequence[GeneratorScore]
) -> list[JudgeJob]:
    """One generator's realism judges (raw and blurred), each trained once and read on the
    slices of every sampling seed in ``scores`` (:func:`score_generator`, in seed order).

    The judge learns real training slices against the generator's slices at the same
    training slices' z and covariates (``ctx.judge_rows``), drawn with sampling seed
    ``ctx.seed +`` :data:`JUDGE_SEED_OFFSET`, which no scored seed shares: the slices it is
    read on must not share their noise draws with the slices it learned.
    """
    rows = ctx.judge_rows
    fakes, _ = generate_like(
        generator,
        ctx.train.z_index[rows],
        ctx.n_slices,
        ctx.seed + JUDGE_SEED_OFFSET,
        manifest=ctx.train_manifest.iloc[rows.numpy()],
    )
    tests = [scored.samples.images for scored in scores]
    return judge_jobs(name, ctx.train.image, fakes.images, ctx.real.image, tests, **ctx.judging)


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
    ctx = EvalContext.build(params, paths, device)
    cfg, seed, real, train = ctx.cfg, ctx.seed, ctx.real, ctx.train
    scoring, judging, probe_sha = ctx.scoring, ctx.judging, ctx.probe_sha
    val = EvalData.from_dataset(SliceDataset(paths.val))
    metrics: dict[str, Any] = {}
    curves: Curves = {}
    judges: list[JudgeJob] = []  # trained together at the end, side by side

    metrics["real"], new = real_figures(real, **ctx.measuring)
    metrics["real"] |= probe_sha
    _merge(curves, "real", new)
    # the control: a judge that learns the training subjects against the validation
    # subjects, asked to tell two halves of the (unseen) test subjects apart; each volume's
    # levels alternate between the halves, so both hold every subject (the split is stored
    # volume by volume, levels in order) and subject identity cannot decide
    test_a, test_b = torch.arange(0, len(real.z), 2), torch.arange(1, len(real.z), 2)
    judges += judge_jobs(
        "real", train.image, val.image, real.image[test_a], [real.image[test_b]], **judging
    )
    metrics["real"]["novelty"] = novelty_summary(ctx.reference, ctx.reference, cfg.novelty.quantile)

    others = other_subjects_rows(ctx.train_manifest, len(real.image), seed)
    same_size, _ = set_figures(real, train.image[others], train.z_index[others], **scoring)
    metrics["real"]["other_subjects"] = {k: same_size[k] for k in SAME_SIZE_FIGURES}
    blurred = blur(real.image, cfg.blur_sigma)
    metrics["blurred_real"], new = set_figures(real, blurred, real.z_index, **scoring)
    metrics["blurred_real"] |= {"sigma_px": cfg.blur_sigma} | probe_sha
    _merge(curves, "blurred_real", new)
    judges += judge_jobs(
        "blurred_real",
        train.image,
        blur(train.image, cfg.blur_sigma),
        real.image,
        [blurred],
        variants=("raw",),
        **judging,
    )
    judge_rows = ctx.judge_rows
    generators = {name: load_generator(paths.models / f"{name}.pt", device) for name in GENERATORS}
    seeds = [seed + k for k in range(cfg.sampling_seeds)]
    per_seed: dict[str, list[dict[str, Any]]] = {}  # each generator's section per seed
    first_images: dict[str, torch.Tensor] = {}  # each generator's first seed's slices
    target: dict[int, list[dict[str, Any]]] = {}  # id(job) -> each seed's section, generators
    for name, generator in generators.items():
        metrics[name] = {}  # its place in metrics.json; the seeds' mean once judged
        scores = [score_generator(name, generator, ctx, s) for s in seeds]
        per_seed[name] = [scored.section for scored in scores]
        jobs = generator_judges(name, generator, ctx, scores)
        judges += jobs
        target |= {id(job): per_seed[name] for job in jobs}
        first = scores[0]  # the first seed's curves and figures
        first_images[name] = first.samples.images
        _merge(curves, name, first.curves)
        save_png(
            closest_pairs_figure(first.samples.images, train.image, first.nearest),
            paths.reports / f"novelty_{name}.png",
        )
        save_png(first.label_figures["pairs"], paths.reports / f"labelled_{name}.png")
        if "covariates" in first.label_figures:
            save_png(first.label_figures["covariates"], paths.reports / f"labels_{name}.png")
    # each autoencoder's reconstructions decoded and finished as the generator on its latents
    # decodes and finishes slices
    finishing: dict[str, tuple[LatentCodec, Texture, bool]] = {}
    ceiling_test: dict[str, torch.Tensor] = {}  # kind -> the test split's, finished
    for gm in generators.values():
        trained_on_samples = bool(getattr(gm.config, "posterior_samples", False))
        finishing[gm.codec.autoencoder.kind] = (gm.codec, gm.texture, trained_on_samples)
    for kind in params.autoencoder.kinds:
        section = f"ae_{kind}"
        path = paths.models / f"{section}.pt"
        metrics[section], new = autoencoder_figures(path, real, device, seed)
        _merge(curves, section, new)
        if kind in finishing:
            codec, texture, on_samples = finishing[kind]
        else:
            codec, texture = LatentCodec(load_autoencoder(path, device)[0]), Texture()
            on_samples = False
        reconstructed = partial(
            finished_reconstructions, codec, texture, device=device, posterior_samples=on_samples
        )
        noise = torch.Generator().manual_seed(seed + 3)
        posterior = torch.Generator().manual_seed(seed + 4)
        fake_train, fake_test, fake_others = (
            reconstructed(x, z, posterior, noise)
            for x, z in (
                (train.image[judge_rows], train.z[judge_rows]),
                (real.image, real.z),
                (train.image[others], train.z[others]),
            )
        )
        judges += judge_jobs(section, train.image, fake_train, real.image, [fake_test], **judging)
        ceiling_test[kind] = fake_test
        # one draw's recall moves by about ±0.025 against a bar of 0.8: the ceiling is the
        # mean over as many posterior and texture draws as the generator has sampling seeds
        draws = [fake_others] + [
            reconstructed(
                train.image[others],
                train.z[others],
                torch.Generator().manual_seed(seed + 4 + CEILING_DRAW_STRIDE * k),
                torch.Generator().manual_seed(seed + 3 + CEILING_DRAW_STRIDE * k),
            )
            for k in range(1, len(seeds))
        ]
        ceilings = [set_figures(real, draw, train.z_index[others], **scoring)[0] for draw in draws]
        metrics[section]["other_subjects"] = mean_section(
            [{k: c[k] for k in SAME_SIZE_FIGURES} for c in ceilings]
        ) | {"draws": len(draws)}
    shown = beside_real_rows(real.z_index, ctx.n_slices)
    for name, generator in generators.items():
        ceiling = ceiling_test[generator.codec.autoencoder.kind]
        save_png(
            beside_real_figure(real.image, ceiling, first_images[name], shown),
            paths.reports / f"beside_real_{name}.png",
        )
    judge_curves: dict[str, list[tuple[int, float]]] = {}
    for job, results in zip(judges, run_judges(judges, device), strict=True):
        sections = target.get(id(job), [metrics[job.section]])
        for section, result in zip(sections, results, strict=True):
            section.setdefault("c2st", {})[job.variant] = result.as_dict()
        judge_curves[f"{job.section} ({job.variant})"] = results[0].curve  # first seed
    for name, generator in generators.items():
        metrics[name] = mean_section(per_seed[name]) | provenance(
            generator, paths.models / f"{name}.pt"
        )
        metrics[name] |= probe_sha
        rows = [seed_row(section, metrics, name) for section in per_seed[name]]
        metrics[name]["seeds"] = {"seeds": seeds, **summarise(rows)}
        _warn_copies(name, metrics[name]["novelty"], cfg)
        logger.info(
            "%s (mean of %d sampling seeds): fd_alex %.4g (real halves %.4g); z-probe MAE %.3g "
            "(real %.3g) slices; C2ST AUC %.3g raw, %.3g blurred (real vs real %.3g); every bar "
            "met on %d of %d seeds",
            name,
            len(seeds),
            metrics[name]["fd_alex"],
            _halves(metrics, "fd_alex"),
            metrics[name]["zprobe_mae"],
            metrics["real"]["zprobe_mae"],
            metrics[name]["c2st"]["raw"]["auc"],
            metrics[name]["c2st"]["blur"]["auc"],
            metrics["real"]["c2st"]["blur"]["auc"],
            metrics[name]["seeds"]["all_bars_met"],
            len(seeds),
        )
        logger.info("%s label fidelity: %s", name, fidelity_summary(metrics[name]["labels"]))

    tables = curve_tables(curves)
    for metric, table in tables.items():
        atomic_write(paths.per_z / f"{metric}.csv", lambda tmp, t=table: t.to_csv(tmp, index=False))
        run.log_artifact(paths.per_z / f"{metric}.csv", "per_z")
    figure = curves_figure(tables)
    save_png(figure, paths.per_z_png)
    save_png(strength_curve_figure(judge_curves), paths.c2st_png)
    write_json(paths.metrics, metrics)
    _log(run, metrics, tables, figure, paths)
    return metrics


def label_probes(
    models: Path, device: torch.device
) -> tuple[CovariateProbe | None, nn.Module | None]:
    """The covariate probe and tissue segmenter of ``train_probes``, None where absent (a
    segmenter trained without tissue labels counts as absent)."""
    probe_path, seg_path = models / "covariate_probe.pt", models / "segmenter.pt"
    probe = load_covariate_probe(probe_path, device)[0] if probe_path.is_file() else None
    segmenter = None
    if seg_path.is_file():
        network, meta = load_segmenter(seg_path, device)
        segmenter = network if meta.get("trained") else None
    return probe, segmenter


def _halves(metrics: Mapping[str, Any], key: str) -> float:
    halves = metrics["real"].get("split_halves") or {}
    return float(halves.get(key, math.nan))


def _warn_copies(name: str, novelty: Mapping[str, Any], cfg: EvaluateConfig) -> None:
    """One warning line when more than ``max_copy_like`` of a generator's samples are copy-like."""
    fraction = novelty["copy_like_fraction"]
    if fraction > cfg.novelty.max_copy_like:
        logger.warning(
            "%s: %.1f %% of samples are copy-like (nearer a training slice than %.0f %% of real "
            "test slices are; limit %.0f %%): see reports/novelty_%s.png",
            name,
            100 * fraction,
            100 * cfg.novelty.quantile,
            100 * cfg.novelty.max_copy_like,
            name,
        )


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
    looks = [*paths.reports.glob("novelty_*.png"), *paths.reports.glob("beside_real_*.png")]
    for png in [paths.c2st_png, *sorted(looks)]:
        run.log_artifact(png, "reports")
    run.log_dict(dict(metrics), f"reports/{paths.metrics.name}")
