"""Labelled synthetic slices, written as files for data augmentation.

:func:`generate` is what ``braingen generate`` and the ``generate`` stage run. It loads a
generator (``models/ldm.pt`` or ``models/pixelcnn.pt``), turns the request (z levels, per-z
count and covariates, or a spec file: :mod:`pipeline.inference.requests`) into slices per
level, samples them and writes one file per slice (with ``masks``, a tissue-label file
beside it) plus ``manifest.csv`` with every slice's labels: z, each covariate it was
conditioned on (empty = unconditioned), the mask file, sampler and guidance.

Reproducibility: the slices of one level depend only on (model file, seed, z, the level's
requested slices and the sampling settings): each level is sampled in one call with its own
seed derived from ``(seed, z)``, so ``--z 17`` gives the same slices as the z=17 rows of
``--z 0:31``. The network batch holds the samples of one level (split into
:data:`pipeline.inference.sampling.CHUNK`-sized chunks).

File names are built only from validated pieces: ``{prefix}_s{seed}_{level}_{sample}`` with
``prefix`` a checked token (default: the model kind), ``level`` ``z017`` for slice index 17 or
``f02500`` for the fraction 0.25, and ``sample`` a 4-digit counter over the level's slices;
volumes are ``{prefix}_s{seed}_vol_{sample}.nii.gz``; a mask adds ``_mask`` before the suffix.

Several processes may write into one folder at once:

* every file is written under a unique temporary name and hard-linked to its real name,
  which fails atomically if the name exists (or renamed over it with ``overwrite``), so no
  run clobbers another's file and a killed run leaves only complete files;
* ``manifest.csv`` is updated last: under an exclusive ``fcntl.flock`` on
  ``.manifest.lock`` in the folder, the current manifest is read, this run's rows replace
  rows for the same files and are appended, and the result is renamed into place. Readers
  always see a complete manifest, and every finished run's rows are in it exactly once.

Runs with different seeds or prefixes never share a file name; a second run with the same
request refuses (or, with ``overwrite``, rewrites the same content). Files of a run killed
before its manifest update are complete but unlisted; re-run it with ``overwrite``.

With a :class:`NoveltySettings`, every slice is checked against the training split for near
copies (:mod:`pipeline.metrics.novelty`) and a copy-like slice is re-sampled with a seed
derived from (level seed, attempt) (:func:`attempt_seed`); every level is sampled and checked
before the first file is written, so a level that stays copy-like fails the run with nothing
written. Each slice's manifest row records its nearest-training similarities and the number
of re-samples it took (:data:`NOVELTY_COLUMNS`; empty without the check).

Slices are decoded and finished like real ones (the model file's calibration): an LDM's
latents are decoded as posterior samples where ``ldm.decode_posterior_std`` > 0
(:mod:`pipeline.models.codec`; 0 in the defaults), then the background haze the first stage
leaves is cleared and the texture of what it misses is drawn (:mod:`pipeline.inference.texture`:
the residual texture, or the scan noise for a model file calibrated before it); each is
recorded per row in the manifest (``posterior_std``, ``texture_sigma``, ``background_floor``,
``texture_residual_std``; 0 with ``texture=False``, for a PixelCNN's posterior, or for a model
file made before the calibration), with ``decode_noise``
(``by_magnitude``: each latent element's noise at the posterior's std for its magnitude,
:class:`~pipeline.models.codec.StdCurve`; ``isotropic``; ``none``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.core.config import NoveltyConfig, Sampler
from pipeline.core.device import resolve_device
from pipeline.core.errors import InputError
from pipeline.core.identity import file_sha256
from pipeline.core.labels import Schema
from pipeline.data.datasets import EvalData, SliceDataset
from pipeline.data.manifests import merge_manifest
from pipeline.data.slice_files import (
    OutputExistsError,
    check_token,
    publish,
    write_label_nifti,
    write_label_png,
    write_nifti,
    write_png16,
)
from pipeline.inference.requests import (
    SliceRequest,
    ZLevel,
    build_requests,
    read_spec,
    total_slices,
)
from pipeline.inference.sampling import (
    Samples,
    SamplingSettings,
    check_masks,
    load_generator,
    sample_slices,
)
from pipeline.inference.texture import Texture

logger = logging.getLogger(__name__)

Format = Literal["png", "nifti", "both"]
SUFFIXES: dict[str, tuple[str, ...]] = {
    "png": (".png",),
    "nifti": (".nii.gz",),
    "both": (".png", ".nii.gz"),
}
#: Manifest columns of the novelty check: similarity measure
#: (:data:`pipeline.metrics.novelty.MEASURES`) → column of the kept slice's similarity to its
#: nearest training slice; ``novelty_attempts`` holds the re-samples it took (0 = first draw).
NOVELTY_COLUMNS: dict[str, str] = {
    "pixel_corr": "nearest_train_corr",
    "pixel_relative": "nearest_train_relative",
    "ssim": "nearest_train_ssim",
    "alex_cos": "nearest_train_alex",
}
_NO_NOVELTY: dict[str, Any] = dict.fromkeys([*NOVELTY_COLUMNS.values(), "novelty_attempts"], "")


def level_seed(seed: int, z: float) -> int:
    """The seed one level is sampled with: a hash of (seed, z), independent of other levels."""
    state = np.random.SeedSequence([seed, round(z * 10**6)]).generate_state(1, np.uint64)
    return int(state[0])


def attempt_seed(seed: int, attempt: int) -> int:
    """The seed of re-sample ``attempt`` (1, 2, ...) of a level sampled with ``seed``."""
    return int(np.random.SeedSequence([seed, attempt]).generate_state(1, np.uint64)[0])


def output_spacing(metadata: dict[str, Any]) -> tuple[float, float]:
    """(pixel_mm, slice_mm) written into NIfTI headers.

    ``prepare`` pads every source slice to a square and resizes it to ``image_size``, so the
    physical pixel size depends on the source. It is taken from the model file's metadata
    keys ``pixel_mm`` and ``slice_mm`` when present (top level or under ``data``); model
    files that do not record them (those written by this version's training stages) get
    1 mm, i.e. the NIfTI spacing is nominal.
    """
    data = metadata.get("data") if isinstance(metadata.get("data"), dict) else {}
    pixel = metadata.get("pixel_mm", data.get("pixel_mm", 1.0))
    slice_ = metadata.get("slice_mm", data.get("slice_mm", 1.0))
    return float(pixel), float(slice_)


@dataclass(frozen=True)
class NoveltySettings:
    """The near-copy check of :func:`generate` (:mod:`pipeline.metrics.novelty`).

    Attributes:
        prepared_dir: the ``prepare`` output folder: copies are searched in its ``train``
            split; its ``val`` split (``test`` when val has no slices) is the held-out
            reference that sets the thresholds.
        config: ``quantile``, ``candidates`` and ``max_attempts`` (``evaluate.novelty`` in
            ``params.yaml``; ``max_copy_like`` is for ``evaluate`` only).
    """

    prepared_dir: Path
    config: NoveltyConfig = field(default_factory=NoveltyConfig)


#: ``resample(indices, seed)``: fresh draws of the level's slices at ``indices`` (same z and
#: covariates): (n, 1, H, W) images and their (n, H, W) tissue labels (None without masks).
Resample = Callable[[np.ndarray, int], Samples]
#: ``screen(slices, resample, seed, name)``: a level's slices with copy-like ones replaced
#: (tissue labels follow their image), and each slice's novelty manifest values.
Screen = Callable[[Samples, Resample, int, str], tuple[Samples, list[dict[str, Any]]]]


def _split_images(split_dir: Path) -> torch.Tensor:
    """(N, 1, H, W) slices of a prepared split, intensities in [0, 1]."""
    return EvalData.from_dataset(SliceDataset(split_dir)).image


def reference_split(prepared_dir: Path) -> Path:
    """The held-out split the novelty thresholds come from: ``val``, or ``test`` if val is empty."""
    val = prepared_dir / "val"
    slices = val / "slices.npy"
    if slices.is_file() and len(np.load(slices, mmap_mode="r")) == 0:
        logger.info("%s has no slices; the novelty reference is the test split", val)
        return prepared_dir / "test"
    return val


def novelty_screen(settings: NoveltySettings, device: torch.device) -> Screen:
    """Load the training and reference splits and return the check of one level's slices.

    The screen finds each slice's nearest training slice, re-samples the copy-like ones
    (above the reference's ``quantile`` on any measure) with :func:`attempt_seed` until none
    is left or ``max_attempts`` re-samples are spent, and returns the kept slices with their
    :data:`NOVELTY_COLUMNS` values.

    Args:
        settings: where the splits are and the check's settings.
        device: where AlexNet and the all-pairs products run.

    Returns:
        ``screen(slices, resample, seed, name)``; it raises :class:`InputError` (one line,
        naming the level) when a slice is still copy-like after the last attempt.

    Raises:
        PreparedDataError: a split is missing or inconsistent.
    """
    # Imported here: loading generate for a run without the check pulls in no metric code.
    from pipeline.metrics.novelty import (
        RULE_MEASURES,
        NearestTraining,
        copy_like,
        nearest_training,
        thresholds,
    )
    from pipeline.metrics.quality import alex_features

    cfg = settings.config
    train = _split_images(settings.prepared_dir / "train")
    train_features = alex_features(train, device=device)

    def nearest(images: torch.Tensor) -> NearestTraining:
        return nearest_training(
            images, train, device=device, candidates=cfg.candidates, train_features=train_features
        )

    reference_dir = reference_split(settings.prepared_dir)
    limits = thresholds(nearest(_split_images(reference_dir)), cfg.quantile)
    logger.info("novelty thresholds (q=%g of %s): %s", cfg.quantile, reference_dir, limits)

    def screen(
        slices: Samples, resample: Resample, seed: int, name: str
    ) -> tuple[Samples, list[dict[str, Any]]]:
        images = slices.images.clone()
        tissue = None if slices.tissue is None else slices.tissue.clone()
        near = nearest(images)
        flagged = copy_like(near, limits)
        attempts = np.zeros(len(images), dtype=np.int64)
        for attempt in range(1, cfg.max_attempts + 1):
            redo = np.flatnonzero(flagged)
            if redo.size == 0:
                break
            fresh = resample(redo, attempt_seed(seed, attempt))
            fresh_near = nearest(fresh.images)
            images[redo] = fresh.images
            if tissue is not None and fresh.tissue is not None:
                tissue[redo] = fresh.tissue
            near.put(redo, fresh_near)
            flagged[redo] = copy_like(fresh_near, limits)
            attempts[redo] = attempt
        if flagged.any():
            j = int(np.flatnonzero(flagged)[0])
            above = ", ".join(
                f"{m} {near.similarity[m][j]:.4f} > {limits[m]:.4f}"
                for m in RULE_MEASURES
                if near.similarity[m][j] > limits[m]
            )
            raise InputError(
                f"level {name}: {int(flagged.sum())} of {len(images)} slices still copy-like "
                f"after {cfg.max_attempts} re-samples (sample {j}: {above}; thresholds: the "
                f"held-out slices' {cfg.quantile:g} quantile); nothing written. The model "
                "reproduces training slices at this level: try another seed or raise max_attempts"
            )
        rows = [
            {col: round(float(near.similarity[m][j]), 6) for m, col in NOVELTY_COLUMNS.items()}
            | {"novelty_attempts": int(attempts[j])}
            for j in range(len(images))
        ]
        return Samples(images, slices.z, slices.covariates, tissue), rows

    return screen


@dataclass
class GenerateResult:
    """What :func:`generate` wrote.

    Attributes:
        files: every file written (slices and volumes), manifest excluded.
        manifest: the folder's ``manifest.csv`` (None for ``validate_only``).
        slices: number of generated slices.
        seconds: wall time of sampling and writing.
    """

    files: list[Path]
    manifest: Path | None
    slices: int
    seconds: float


def _check_request(fmt: str, per_z: int, seed: int, out_dir: Path) -> None:
    if fmt not in SUFFIXES:
        raise InputError(f"format must be one of {sorted(SUFFIXES)}; got {fmt!r}")
    if isinstance(per_z, bool) or not isinstance(per_z, int) or per_z < 1:
        raise InputError(f"per_z must be an integer >= 1; got {per_z!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be an integer >= 0; got {seed!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output {out_dir} exists and is not a folder")


@dataclass
class LevelPlan:
    """The slices asked for at one z level, in request order.

    Attributes:
        level: the position.
        covariates: per slice, the canonical value of each schema covariate (None =
            unconditioned).
        codes: (n, len(schema)) float32 covariate codes of the slices (NaN = unconditioned).
    """

    level: ZLevel
    covariates: list[dict[str, Any]]
    codes: np.ndarray


def plan_levels(requests: list[SliceRequest], schema: Schema) -> list[LevelPlan]:
    """Group requests by z level (levels in order of first appearance) and expand counts."""
    plans: dict[float, LevelPlan] = {}
    for request in requests:
        plan = plans.setdefault(
            request.level.z, LevelPlan(request.level, [], np.zeros((0, len(schema)), np.float32))
        )
        plan.covariates += [dict(request.covariates)] * request.count
        codes = np.asarray([request.codes(schema)] * request.count, np.float32)
        plan.codes = np.concatenate([plan.codes, codes.reshape(request.count, len(schema))])
    return list(plans.values())


def _cell(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def generate(
    model_path: str | Path,
    z_levels: str | None = None,
    per_z: int = 4,
    seed: int = 0,
    out_dir: str | Path = "synthetic",
    fmt: Format = "png",
    steps: int | None = None,
    guidance: float | None = None,
    sampler: Sampler | None = None,
    volume: bool = False,
    overwrite: bool = False,
    device: str | torch.device = "auto",
    prefix: str | None = None,
    progress: bool = True,
    novelty: NoveltySettings | None = None,
    texture: bool = True,
    covariates: Mapping[str, str | None] | None = None,
    spec: str | Path | None = None,
    masks: bool = False,
    validate_only: bool = False,
) -> GenerateResult:
    """Generate the requested labelled slices and write them with a manifest.

    The request is either ``z_levels`` x ``per_z`` x ``covariates`` (lists crossed, ranges
    drawn per slice: :func:`pipeline.inference.requests.build_requests`) or a ``spec`` file
    (:func:`pipeline.inference.requests.read_spec`). It is checked against the model's
    covariate schema before anything is sampled.

    Args:
        model_path: ``models/ldm.pt``, ``models/pixelcnn.pt`` or another generator file.
        z_levels: ``--z`` syntax (see :func:`pipeline.inference.requests.parse_z`):
            ``"0:31"``, ``"17"``, ``"0.25,0.5"``; None means every level of the model.
        per_z: slices per level and covariate combination (>= 1).
        seed: >= 0; with the model file, the request and the settings it fixes every slice.
        out_dir: folder to write into (created; may already hold other runs' files).
        fmt: ``png`` (16-bit greyscale, intensities [0, 1] → 0..65535), ``nifti``
            (``.nii.gz`` float32 in [0, 1], RAS, spacing from :func:`output_spacing`) or
            ``both``.
        steps: sampling steps (ldm; default the model's ``sample_steps``).
        guidance: classifier-free guidance weight (ldm: z and covariates; pixelcnn: covariates;
            default the model's ``guidance``).
        sampler: ``ddim`` or ``pndm`` (ldm; default the model's ``sampler``).
        volume: also write, for each sample index, the requested levels stacked bottom to
            top as one pseudo-volume NIfTI (slices of different samples are unrelated
            anatomically; the stack is for browsing, not a real volume).
        overwrite: replace existing outputs instead of refusing.
        device: ``auto``, ``cpu``, ``cuda`` or a torch device.
        prefix: file-name prefix (letters, digits, ``_``, ``-``); default the model kind.
        progress: show a tqdm bar (on stderr).
        novelty: re-sample near copies of training slices (see the module docstring and
            :func:`novelty_screen`); None writes the slices as sampled and leaves the
            :data:`NOVELTY_COLUMNS` empty.
        texture: finish slices like real ones (see the module docstring); False writes the
            decoder's output.
        covariates: covariate name → option text (``"60:90"``, ``"F"``, ``"0.5,1"``);
            unnamed covariates are unconditioned.
        spec: a CSV or YAML spec file (rows: z, count, covariates) instead of
            ``z_levels``/``per_z``/``covariates``.
        masks: also write each slice's tissue labels (``<name>_mask.png``: grey levels
            0/85/170/255 = background/CSF/GM/WM as in the OASIS PNG release; NIfTI: uint8
            labels 0..3), decoded with the image.
        validate_only: check the request against the model and write nothing.

    Returns:
        A :class:`GenerateResult` (no files and no manifest for ``validate_only``).

    Raises:
        CheckpointError: missing or unusable model file.
        InputError: bad z, per_z, seed, format, prefix, covariate, spec or sampling setting;
            masks from a model without them; with ``novelty``, a slice still copy-like after
            the last re-sample (nothing written in every case).
        OutputExistsError: an output exists and ``overwrite`` is False (nothing written).
        PreparedDataError: with ``novelty``, a prepared split is missing or inconsistent.
    """
    out_dir, model_path = Path(out_dir), Path(model_path)
    _check_request(fmt, per_z, seed, out_dir)
    if prefix is not None:
        check_token(prefix, "prefix")
    if spec is not None and (covariates or z_levels not in (None, "", "all")):
        raise InputError("give either --spec or --z/--per-z and covariate options, not both")
    if isinstance(device, str):
        device = resolve_device(device)
    gm = load_generator(model_path, device)
    n_slices = gm.n_slices
    if spec is not None:
        requests = read_spec(
            Path(spec), gm.schema, n_slices, seed=seed, reference=gm.covariate_reference
        )
    else:
        requests = build_requests(
            gm.schema, n_slices, z_levels, per_z, covariates or {}, seed, gm.covariate_reference
        )
    if masks:
        check_masks(gm)
    plans = plan_levels(requests, gm.schema)
    counts = {len(plan.covariates) for plan in plans}
    if volume and (len(plans) < 2 or len(counts) != 1):
        raise InputError("--volume needs at least two z levels with the same number of slices")
    settings = SamplingSettings.resolve(gm, sampler=sampler, steps=steps, guidance=guidance)
    total = total_slices(requests)
    if validate_only:
        logger.info("request valid: %d slices at %d levels; nothing written", total, len(plans))
        return GenerateResult([], None, total, 0.0)
    prefix = prefix or gm.kind
    image_suffixes = SUFFIXES[fmt]

    def slice_names(level: ZLevel, j: int) -> list[str]:
        return [f"{prefix}_s{seed}_{level.name}_{j:04d}{sfx}" for sfx in image_suffixes]

    def mask_name(name: str) -> str:
        for sfx in image_suffixes:
            if name.endswith(sfx):
                return name[: -len(sfx)] + "_mask" + sfx
        return name

    n_volumes = next(iter(counts)) if volume else 0
    volume_names = [f"{prefix}_s{seed}_vol_{j:04d}.nii.gz" for j in range(n_volumes)]
    planned = [
        n for plan in plans for j in range(len(plan.covariates)) for n in slice_names(plan.level, j)
    ]
    planned += volume_names
    planned += [mask_name(n) for n in planned] if masks else []
    clash = [n for n in planned if (out_dir / n).exists()]
    if clash and not overwrite:
        raise OutputExistsError(
            f"{out_dir / clash[0]} already exists ({len(clash)} of "
            f"{len(planned)} outputs do); pass --overwrite to replace them"
        )
    screen = None if novelty is None else novelty_screen(novelty, device)
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    common = {
        "model": gm.kind,
        "checkpoint_sha256": file_sha256(model_path),
        "seed": seed,
        "sampler": settings.sampler or "",
        "steps": "" if settings.steps is None else settings.steps,
        "guidance": "" if settings.guidance is None else settings.guidance,
        "guidance_min_t": "" if settings.guidance_min_t is None else settings.guidance_min_t,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        **(gm.texture if texture else Texture()).summary(),
        "posterior_std": gm.codec.posterior_std if texture else 0.0,
        "decode_noise": gm.codec.decode_noise if texture else "none",
    }
    pixel_mm, slice_mm = output_spacing(gm.metadata)
    rows: list[dict[str, Any]] = []
    files: list[Path] = []

    def write(name: str, array: np.ndarray, labels: np.ndarray | None, **row: Any) -> None:
        """Publish one PNG or NIfTI file (and its mask file) and note its manifest row."""
        if name.endswith(".png"):
            writer = partial(write_png16, array)
            mask_writer = partial(write_label_png, labels)
        else:
            writer = partial(write_nifti, array, pixel_mm=pixel_mm, slice_mm=slice_mm)
            mask_writer = partial(write_label_nifti, labels, pixel_mm=pixel_mm, slice_mm=slice_mm)
        publish(out_dir / name, writer, overwrite=overwrite)
        files.append(out_dir / name)
        if labels is not None:
            publish(out_dir / mask_name(name), mask_writer, overwrite=overwrite)
            files.append(out_dir / mask_name(name))
        mask_file = "" if labels is None else mask_name(name)
        rows.append({"file": name, **row, **common, "mask_file": mask_file})

    def draw(plan: LevelPlan, indices: np.ndarray, draw_seed: int) -> Samples:
        """The level's slices at ``indices`` (their z and covariates), drawn with a seed."""
        z = torch.full((len(indices),), plan.level.z)
        codes = torch.from_numpy(plan.codes[indices]) if gm.schema else None
        return sample_slices(
            gm,
            z,
            draw_seed,
            covariates=codes,
            masks=masks,
            texture=texture,
            **settings.as_dict(),
        )

    def sampled(bar: tqdm) -> Iterator[tuple[LevelPlan, Samples, list[dict[str, Any]]]]:
        """Each level's slices and their novelty manifest values."""
        for plan in plans:
            n = len(plan.covariates)
            first = level_seed(seed, plan.level.z)
            slices = draw(plan, np.arange(n), first)
            extra = [_NO_NOVELTY] * n
            if screen is not None:
                slices, extra = screen(slices, partial(draw, plan), first, plan.level.name)
            bar.update(n)
            yield plan, slices, extra

    stacks: list[tuple[np.ndarray, np.ndarray | None]] = []
    with tqdm(total=total, unit="slice", desc=f"generate {gm.kind}", disable=not progress) as bar:
        # with the check, every level passes it before the first file is written
        batches = sampled(bar) if screen is None else list(sampled(bar))
        for plan, slices, extra in batches:
            level = plan.level
            z_index = "" if level.z_index is None else level.z_index
            arrays = slices.images[:, 0].numpy()
            labels = None if slices.tissue is None else slices.tissue.numpy().astype(np.uint8)
            for j, image in enumerate(arrays):
                values = {name: _cell(v) for name, v in plan.covariates[j].items()}
                for name in slice_names(level, j):
                    write(
                        name,
                        image,
                        None if labels is None else labels[j],
                        type="slice",
                        z_index=z_index,
                        z=round(level.z, 6),
                        sample=j,
                        **extra[j],
                        **values,
                    )
            if volume:
                stacks.append((arrays, labels))
    order = np.argsort([plan.level.z for plan in plans], kind="stable")
    for j, name in enumerate(volume_names):
        stack = np.stack([stacks[i][0][j] for i in order])
        label_stack = None if not masks else np.stack([stacks[i][1][j] for i in order])  # type: ignore[index]
        write(name, stack, label_stack, type="volume", z_index="", z="", sample=j, **_NO_NOVELTY)
    manifest = merge_manifest(out_dir, rows)
    seconds = time.perf_counter() - started
    logger.info("wrote %d slices (%d files) to %s in %.1f s", total, len(files), out_dir, seconds)
    return GenerateResult(files, manifest, total, seconds)
