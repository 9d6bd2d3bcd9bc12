"""Synthetic slices at requested z levels, written as files for data augmentation.

:func:`generate` is what ``braingen generate`` and the ``generate`` stage run. It loads a
generator (``models/ldm.pt`` or ``models/pixelcnn.pt``), samples ``per_z`` slices at every
requested level and writes one file per slice plus ``manifest.csv``.

Reproducibility: the slices of one level depend only on (model file, seed, z, per_z and the
sampling settings): each level is sampled with its own seed derived from ``(seed, z)``, so
``--z 17`` gives the same slices as the z=17 rows of ``--z 0:31``. One network batch holds
the samples of one level (split into :data:`pipeline.inference.sampling.CHUNK`-sized chunks).

File names are built only from validated pieces: ``{prefix}_s{seed}_{level}_{sample}`` with
``prefix`` a checked token (default: the model kind), ``level`` ``z017`` for slice index 17 or
``f02500`` for the fraction 0.25, and ``sample`` a 4-digit counter; volumes are
``{prefix}_s{seed}_vol_{sample}.nii.gz``.

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

Slices carry the scan-noise texture the first stage removes (the model file's
``texture_sigma``, :mod:`pipeline.inference.texture`), recorded per row in the manifest
(``texture_sigma``; 0 with ``texture=False`` or a model file made before the calibration).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
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
from pipeline.data.datasets import EvalData, SliceDataset
from pipeline.data.manifests import merge_manifest
from pipeline.data.slice_files import (
    OutputExistsError,
    check_token,
    publish,
    write_nifti,
    write_png16,
)
from pipeline.inference.sampling import SamplingSettings, load_generator, sample
from pipeline.models.conditioning import index_from_z, z_from_index

logger = logging.getLogger(__name__)

Format = Literal["png", "nifti", "both"]
SUFFIXES: dict[str, tuple[str, ...]] = {
    "png": (".png",),
    "nifti": (".nii.gz",),
    "both": (".png", ".nii.gz"),
}
#: z fractions are given with at most this many decimals (they name files exactly).
Z_DECIMALS = 4
_INDEX = re.compile(r"-?\d+")
#: Manifest columns of the novelty check: similarity measure
#: (:data:`pipeline.metrics.novelty.MEASURES`) → column of the kept slice's similarity to its
#: nearest training slice; ``novelty_attempts`` holds the re-samples it took (0 = first draw).
NOVELTY_COLUMNS: dict[str, str] = {
    "pixel_corr": "nearest_train_corr",
    "ssim": "nearest_train_ssim",
    "alex_cos": "nearest_train_alex",
}
_NO_NOVELTY: dict[str, Any] = dict.fromkeys([*NOVELTY_COLUMNS.values(), "novelty_attempts"], "")


@dataclass(frozen=True)
class ZLevel:
    """One requested slice position.

    Attributes:
        z: position in [0, 1].
        z_index: ``z * (K - 1)`` in slice units (an integer for index requests; None when
            the model does not record K).
        name: file-name token, ``z017`` (slice index 17) or ``f02500`` (fraction 0.25).
    """

    z: float
    z_index: float | None
    name: str


def _index_level(index: int, n_slices: int | None, token: str) -> ZLevel:
    if n_slices is None:
        raise InputError(
            f"--z {token}: this model file does not record its number of slice levels K; "
            "give z as fractions in [0, 1] (e.g. 0.25,0.5)"
        )
    if not 0 <= index <= n_slices - 1:
        raise InputError(
            f"--z {token}: slice index {index} is outside 0..{n_slices - 1} "
            f"(the model has K={n_slices} levels)"
        )
    width = max(3, len(str(n_slices - 1)))
    return ZLevel(z_from_index(index, n_slices), index, f"z{index:0{width}d}")


def _fraction_level(token: str, n_slices: int | None) -> ZLevel:
    try:
        z = float(token)
    except ValueError:
        raise InputError(
            f"--z {token!r}: expected a slice index (17), an inclusive range (0:31) or a "
            "fraction with a decimal point (0.25)"
        ) from None
    if not 0.0 <= z <= 1.0:  # also rejects nan
        raise InputError(f"--z {token}: z fraction must lie in [0, 1], got {z}")
    key = z * 10**Z_DECIMALS
    if abs(key - round(key)) > 1e-6:
        raise InputError(f"--z {token}: give z fractions with at most {Z_DECIMALS} decimals")
    z_index = None if n_slices is None else round(index_from_z(z, n_slices), 4)
    return ZLevel(z, z_index, f"f{round(key):05d}")


def parse_z(spec: str | None, n_slices: int | None) -> list[ZLevel]:
    """Parse a ``--z`` request into slice positions.

    Args:
        spec: comma-separated items, each a slice index (``17``), an inclusive index range
            (``0:31``) or a fraction with a decimal point (``0.25``, at most 4 decimals);
            ``None``, ``""`` or ``"all"`` means every level 0..K-1. Indices become
            z = index / (K - 1).
        n_slices: K, the model's number of slice levels (``metadata["n_slices"]``), or None
            if unknown (then only fractions are accepted).

    Returns:
        The levels in request order.

    Raises:
        ValueError: malformed item, index outside 0..K-1, fraction outside [0, 1] or with
            more than 4 decimals, or a level requested twice.
    """
    if spec is None or spec.strip() in ("", "all"):
        return [_index_level(i, n_slices, "all") for i in range(n_slices or 1)]
    levels: list[ZLevel] = []
    for raw in spec.split(","):
        token = raw.strip()
        if ":" in token:
            lo, _, hi = (part.strip() for part in token.partition(":"))
            if not (_INDEX.fullmatch(lo) and _INDEX.fullmatch(hi)):
                raise InputError(f"--z {token}: a range needs two slice indices, e.g. 0:31")
            if int(lo) > int(hi):
                raise InputError(f"--z {token}: range start {lo} is above its end {hi}")
            _index_level(int(hi), n_slices, token)  # names the end if it is out of range
            levels += [_index_level(i, n_slices, token) for i in range(int(lo), int(hi) + 1)]
        elif _INDEX.fullmatch(token):
            levels.append(_index_level(int(token), n_slices, token))
        else:
            levels.append(_fraction_level(token, n_slices))
    seen: set[int] = set()
    for level in levels:
        key = round(level.z * 10**6)
        if key in seen:
            raise InputError(f"--z {spec}: z={level.z:g} is requested twice")
        seen.add(key)
    return levels


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


#: ``resample(n, seed)``: n more (n, 1, H, W) slices of the level being checked.
Resample = Callable[[int, int], torch.Tensor]
#: ``screen(images, resample, seed, name)``: a level's (n, 1, H, W) slices with copy-like ones
#: replaced, and each slice's novelty manifest values.
Screen = Callable[[torch.Tensor, Resample, int, str], tuple[torch.Tensor, list[dict[str, Any]]]]


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
        ``screen(images, resample, seed, name)``; it raises :class:`InputError` (one line,
        naming the level) when a slice is still copy-like after the last attempt.

    Raises:
        PreparedDataError: a split is missing or inconsistent.
    """
    # Imported here: loading generate for a run without the check pulls in no metric code.
    from pipeline.metrics.novelty import NearestTraining, copy_like, nearest_training, thresholds
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
        images: torch.Tensor, resample: Resample, seed: int, name: str
    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        images = images.clone()
        near = nearest(images)
        flagged = copy_like(near, limits)
        attempts = np.zeros(len(images), dtype=np.int64)
        for attempt in range(1, cfg.max_attempts + 1):
            redo = np.flatnonzero(flagged)
            if redo.size == 0:
                break
            fresh = resample(len(redo), attempt_seed(seed, attempt))
            fresh_near = nearest(fresh)
            images[redo] = fresh
            near.put(redo, fresh_near)
            flagged[redo] = copy_like(fresh_near, limits)
            attempts[redo] = attempt
        if flagged.any():
            j = int(np.flatnonzero(flagged)[0])
            above = ", ".join(
                f"{m} {near.similarity[m][j]:.4f} > {limits[m]:.4f}"
                for m in NOVELTY_COLUMNS
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
        return images, rows

    return screen


@dataclass
class GenerateResult:
    """What :func:`generate` wrote.

    Attributes:
        files: every file written (slices and volumes), manifest excluded.
        manifest: the folder's ``manifest.csv``.
        slices: number of generated slices.
        seconds: wall time of sampling and writing.
    """

    files: list[Path]
    manifest: Path
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
) -> GenerateResult:
    """Generate ``per_z`` slices at each requested level and write them with a manifest.

    Args:
        model_path: ``models/ldm.pt``, ``models/pixelcnn.pt`` or another generator file.
        z_levels: ``--z`` syntax (see :func:`parse_z`): ``"0:31"``, ``"17"``,
            ``"0.25,0.5"``; None means every level of the model.
        per_z: slices per level (>= 1).
        seed: >= 0; with the model file, z and the settings it fixes every slice.
        out_dir: folder to write into (created; may already hold other runs' files).
        fmt: ``png`` (16-bit greyscale, intensities [0, 1] → 0..65535), ``nifti``
            (``.nii.gz`` float32 in [0, 1], RAS, spacing from :func:`output_spacing`) or
            ``both``.
        steps: sampling steps (ldm; default the model's ``sample_steps``).
        guidance: classifier-free guidance weight (ldm; default the model's ``guidance``).
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
        texture: add the calibrated scan noise (see the module docstring); False writes the
            decoder's clean output.

    Returns:
        A :class:`GenerateResult`.

    Raises:
        CheckpointError: missing or unusable model file.
        ValueError: bad z, per_z, seed, format, prefix or sampling setting.
        OutputExistsError: an output exists and ``overwrite`` is False (nothing written).
        InputError: with ``novelty``, a slice still copy-like after the last re-sample
            (nothing written).
        PreparedDataError: with ``novelty``, a prepared split is missing or inconsistent.
    """
    out_dir, model_path = Path(out_dir), Path(model_path)
    _check_request(fmt, per_z, seed, out_dir)
    if prefix is not None:
        check_token(prefix, "prefix")
    if isinstance(device, str):
        device = resolve_device(device)
    gm = load_generator(model_path, device)
    n_slices = gm.metadata.get("n_slices")
    levels = parse_z(z_levels, None if n_slices is None else int(n_slices))
    if volume and len(levels) < 2:
        raise InputError("--volume needs at least two z levels to stack")
    prefix = prefix or gm.kind
    settings = SamplingSettings.resolve(gm, sampler=sampler, steps=steps, guidance=guidance)

    def slice_names(level: ZLevel, j: int) -> list[str]:
        return [f"{prefix}_s{seed}_{level.name}_{j:04d}{sfx}" for sfx in SUFFIXES[fmt]]

    volume_names = [f"{prefix}_s{seed}_vol_{j:04d}.nii.gz" for j in range(per_z)] * volume
    planned = [n for lv in levels for j in range(per_z) for n in slice_names(lv, j)]
    clash = [n for n in [*planned, *volume_names] if (out_dir / n).exists()]
    if clash and not overwrite:
        raise OutputExistsError(
            f"{out_dir / clash[0]} already exists ({len(clash)} of "
            f"{len(planned) + len(volume_names)} outputs do); pass --overwrite to replace them"
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
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "texture_sigma": gm.texture_sigma if texture else 0.0,
    }
    pixel_mm, slice_mm = output_spacing(gm.metadata)
    rows: list[dict[str, Any]] = []
    files: list[Path] = []

    def write(name: str, array: np.ndarray, **row: Any) -> None:
        """Publish one PNG or NIfTI file and note its manifest row."""
        if name.endswith(".png"):
            writer = partial(write_png16, array)
        else:
            writer = partial(write_nifti, array, pixel_mm=pixel_mm, slice_mm=slice_mm)
        publish(out_dir / name, writer, overwrite=overwrite)
        files.append(out_dir / name)
        rows.append({"file": name, **row, **common})

    def draw(z: float, n: int, draw_seed: int) -> torch.Tensor:
        """(n, 1, H, W) slices at ``z`` in [0, 1], sampled with ``draw_seed``."""
        return sample(gm, [z], n, draw_seed, texture=texture, **settings.as_dict())[0]

    def sampled(bar: tqdm) -> Iterator[tuple[ZLevel, np.ndarray, list[dict[str, Any]]]]:
        """Each level's (per_z, H, W) slices and their novelty manifest values."""
        for level in levels:
            first = level_seed(seed, level.z)
            images, extra = draw(level.z, per_z, first), [_NO_NOVELTY] * per_z
            if screen is not None:
                images, extra = screen(images, partial(draw, level.z), first, level.name)
            bar.update(per_z)
            yield level, images[:, 0].numpy(), extra

    stacks: list[np.ndarray] = []
    total = len(levels) * per_z
    with tqdm(total=total, unit="slice", desc=f"generate {gm.kind}", disable=not progress) as bar:
        # with the check, every level passes it before the first file is written
        batches = sampled(bar) if screen is None else list(sampled(bar))
        for level, arrays, extra in batches:
            z_index = "" if level.z_index is None else level.z_index
            for j, image in enumerate(arrays):
                for name in slice_names(level, j):
                    write(
                        name,
                        image,
                        type="slice",
                        z_index=z_index,
                        z=round(level.z, 6),
                        sample=j,
                        **extra[j],
                    )
            if volume:
                stacks.append(arrays)
    order = np.argsort([level.z for level in levels], kind="stable")
    for j, name in enumerate(volume_names):
        stack = np.stack([stacks[i][j] for i in order])
        write(name, stack, type="volume", z_index="", z="", sample=j, **_NO_NOVELTY)
    manifest = merge_manifest(out_dir, rows)
    seconds = time.perf_counter() - started
    logger.info("wrote %d slices (%d files) to %s in %.1f s", total, len(files), out_dir, seconds)
    return GenerateResult(files, manifest, total, seconds)
