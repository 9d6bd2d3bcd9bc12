"""Synthetic stand-in cohort in the OASIS-1 layout, derived from the MNI152 template.

NOT OASIS data. Every subject is synthesised from nilearn's packaged MNI152 2009a
template (skull-stripped T1 with grey/white-matter probability maps, read from the
installed package, no download):

1. anatomy: a random affine (rotation, per-axis scale within ±6 %, translation) and a
   smooth elastic displacement map the OASIS-1 T88_111 grid into template space (head
   size stays close to the atlas, as in OASIS's atlas-registered T88 images);
2. sex: on top of the random scale, the anatomy of an ``M`` subject is :data:`SEX_SCALE`
   = 1.05 times larger than that of an ``F`` subject (deterministic, every axis; F is
   scaled by 1/1.05, M by 1), the one image signal of sex. M brains keep the atlas-sized
   range (overall scale within 0.94-1.062 of the template, the largest the 176x208x176
   grid holds), F brains 0.90-1.01. The CSV's eTIV carries the same M/F ratio cubed
   (about 1590 vs 1380 cm³, as in OASIS-1); its spread, and ASF, are drawn separately;
3. age and dementia, as two separate image signals, so that a probe (and a generator
   conditioned on both) can tell them apart: *ageing* (from age alone) enlarges the
   ventricles (CSF grows by a smooth per-subject margin of up to
   :data:`_MAX_VENTRICLE_MM`) and thins the cortex a little; *dementia* (from CDR alone)
   thins grey matter from its outer surface (a smooth per-subject thickness loss of up to
   :data:`_MAX_THINNING_MM` turns GM into CSF) and darkens the periventricular white matter.
   In real brains both show as atrophy and overlap; the stand-in keeps them apart on
   purpose, and its CDR > 0 subjects are all 60 or older, as in OASIS-1;
4. scan: contrast gamma, a smooth multiplicative bias field and Rician noise; a rescan
   (``_MR2``) shares the anatomy and gets its own small repositioning and scan effects.

Volumes are written exactly like OASIS-1: Analyze 7.5 int16 ``176x208x176x1`` pairs
(radiological x-flip, 1 mm), an FSL_SEG tissue segmentation (1 CSF, 2 GM, 3 WM), the
``oasis_cross-sectional.csv`` demographics table and the ``discN`` folder tree, so the
normal OASIS-1 reader takes them. The segmentation is computed on the same warped grid as
the image (after the sex and random scaling), so its labels follow the image voxel for
voxel: ``seg > 0`` is the brain. Deterministic by seed.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi
from skimage.measure import block_reduce

from data_prep.parallel import ordered_map
from pipeline.core.config import DemoConfig

logger = logging.getLogger(__name__)

OASIS_SHAPE: tuple[int, int, int] = (176, 208, 176)
CSV_NAME = "oasis_cross-sectional.csv"
#: Written into every volume's header ``descrip`` field (Analyze allows 80 characters).
STAND_IN_LABEL = "braingen synthetic stand-in from MNI152 (nilearn); NOT OASIS data"
CSV_COLUMNS = (
    "ID",
    "M/F",
    "Hand",
    "Age",
    "Educ",
    "SES",
    "MMSE",
    "CDR",
    "eTIV",
    "nWBV",
    "ASF",
    "Delay",
)
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
README = """SYNTHETIC STAND-IN COHORT - NOT OASIS DATA

Every volume in this folder was synthesised by braingen (data_prep/demo_cohort.py) from
the MNI152 2009a template shipped inside the nilearn package: random affine and elastic
warps, age-driven ventricle growth, CDR-driven cortical thinning and white-matter
darkening (kept apart on purpose; real atrophy mixes them), bias field and noise.
Sex shows in the images as head size only: the anatomy of an M subject is scaled 5 %
larger than that of an F subject (on top of a random per-subject scale within 6 %).
No image or value here comes from a real person or from the OASIS project. The folder
imitates the OASIS-1 cross-sectional layout and file format only so that the OASIS-1
reader can be exercised end to end. Demographics in {csv} are random numbers.

seed={seed}  subjects={n}  grid={shape} at {voxel:g} mm
"""

#: Template intensity (t1 scaled to max 1) of white matter; output int16 puts it at 1000.
_WM_LEVEL = 0.87
_OUTPUT_WM = 1000.0
#: Largest ventricle growth (mm) at ageing 1, and grey-matter thickness loss (mm) at dementia 1
#: (ageing adds :data:`_AGEING_THINNING` of it). 64-pixel slices have about 2.8 mm pixels.
_MAX_VENTRICLE_MM = 8.0
_MAX_THINNING_MM = 3.0
_AGEING_THINNING = 0.3
#: Darkening of the periventricular white matter at dementia 1 (fraction of its intensity).
_MAX_WM_DARKENING = 0.25
#: Dementia level of each CDR (0 for unknown: OASIS-1 leaves CDR blank under 60).
DEMENTIA = {0.0: 0.0, 0.5: 0.5, 1.0: 0.8, 2.0: 1.0}
#: Distance to the ventricles (mm) outside the template: far from any.
_FAR_MM = 1e3
#: Spacing (mm) of the coarse grid on which smooth random fields are drawn.
_COARSE_MM = 8.0
#: Linear size of an ``M`` subject's anatomy relative to an ``F`` subject's (head size).
SEX_SCALE = 1.05


def sex_scale(sex: str | None) -> float:
    """The deterministic anatomy scale of a sex: 1 for ``M`` (and unknown), 1/SEX_SCALE for
    ``F``, so M/F = :data:`SEX_SCALE` and no brain grows beyond the grid (an M brain at the
    random scale's largest, 1.062, already nearly fills it)."""
    return 1.0 / SEX_SCALE if sex == "F" else 1.0


@dataclass(frozen=True)
class Subject:
    """Demographics and anatomy of one synthetic subject.

    Attributes:
        subject: ``OAS1_XXXX``.
        index: 0-based position in the cohort (seeds its anatomy).
        disc: disc number the subject's sessions are written to.
        sex: ``F`` or ``M``.
        age: years.
        educ: education level 1-5 (None under 60, as in OASIS-1).
        ses: socio-economic status 1-5 (None under 60).
        mmse: mini-mental state examination 0-30 (None under 60).
        cdr: clinical dementia rating 0, 0.5, 1, 2 (None under 60).
        ageing: age-driven atrophy in [0, 1] (ventricles).
        dementia: CDR-driven atrophy in [0, 1] (cortex, periventricular white matter).
        etiv: estimated total intracranial volume (cm³).
        nwbv: normalised whole-brain volume.
    """

    subject: str
    index: int
    disc: int
    sex: str
    age: int
    educ: int | None
    ses: int | None
    mmse: int | None
    cdr: float | None
    ageing: float
    dementia: float
    etiv: int
    nwbv: float


@dataclass(frozen=True)
class Session:
    """One scan session to synthesise.

    Attributes:
        subject: the subject.
        session: ``MR1`` or ``MR2``.
        n_mpr: number of averaged MPRAGE scans in the file name (``mpr_n<n_mpr>``).
        delay: days since MR1 (None for MR1).
    """

    subject: Subject
    session: str
    n_mpr: int
    delay: int | None = None

    @property
    def session_id(self) -> str:
        """``OAS1_XXXX_MRn``."""
        return f"{self.subject.subject}_{self.session}"

    def folder(self, root: Path) -> Path:
        """The session folder inside the cohort root."""
        disc = self.subject.disc
        return root / f"oasis_cross-sectional_disc{disc}" / f"disc{disc}" / self.session_id

    def image_stem(self) -> str:
        """``OAS1_XXXX_MRn_mpr_nN_anon_111_t88_masked_gfc``."""
        return f"{self.session_id}_mpr_n{self.n_mpr}_anon_111_t88_masked_gfc"


def build_demo_cohort(out_dir: str | Path, cfg: DemoConfig, seed: int) -> list[Session]:
    """Synthesise the cohort and write it in the OASIS-1 layout.

    The cohort is built in a temporary sibling folder and renamed over ``out_dir`` at the
    end, so an interrupted build never leaves a partial cohort behind.

    Args:
        out_dir: cohort root (replaced if it exists).
        cfg: cohort size, discs, warp/noise strengths, workers, grid scale.
        seed: everything is a deterministic function of it.

    Returns:
        The sessions written, in order.
    """
    out_dir = Path(out_dir)
    shape = tuple(max(8, round(n * cfg.grid_scale)) for n in OASIS_SHAPE)
    step = max(1, min(4, int(1 / cfg.grid_scale)))
    sessions = cohort_sessions(cfg.n_subjects, cfg.n_discs, seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        maps_dir = work / ".template"
        save_template_maps(maps_dir, step)
        write = partial(
            _write_session, root=work, maps_dir=maps_dir, cfg=cfg, seed=seed, shape=shape
        )
        list(ordered_map(write, sessions, workers=cfg.workers, desc="make_demo", unit="session"))
        shutil.rmtree(maps_dir)
        write_csv(work / CSV_NAME, sessions)
        voxel = OASIS_SHAPE[0] / shape[0]
        (work / "README.txt").write_text(
            README.format(csv=CSV_NAME, seed=seed, n=cfg.n_subjects, shape=shape, voxel=voxel)
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work)
    logger.info("wrote %d sessions of %d subjects to %s", len(sessions), cfg.n_subjects, out_dir)
    return sessions


def cohort_sessions(n_subjects: int, n_discs: int, seed: int) -> list[Session]:
    """Draw the cohort's demographics and sessions (subject index 1 also gets an MR2).

    Ages mimic OASIS-1 (about 40 % under 60, no clinical scores under 60); the dementia
    rating rises with age; ``mpr_nN`` cycles through 3..6 so every name variant occurs.

    Args:
        n_subjects: number of subjects.
        n_discs: subjects are spread over this many discs in contiguous blocks.
        seed: demographic seed.

    Returns:
        Sessions sorted by id.
    """
    rng = np.random.default_rng([seed, 1])
    variants = np.concatenate([[4, 3, 5, 6], rng.choice([3, 4], size=n_subjects + 1)])
    variants[4:] = rng.permutation(variants[4:])
    sessions: list[Session] = []
    for i in range(n_subjects):
        young = rng.random() < 0.4
        age = int(rng.integers(18, 60) if young else rng.integers(60, 97))
        cdr = educ = ses = mmse = None
        if not young:
            p_dementia = min(0.65, 0.15 + 0.5 * (age - 60) / 36)
            cdr = (
                float(rng.choice([0.5, 1.0, 2.0], p=[0.7, 0.25, 0.05]))
                if rng.random() < p_dementia
                else 0.0
            )
            educ, ses = int(rng.integers(1, 6)), int(rng.integers(1, 6))
            mmse = int(np.clip(round(29.3 - 5 * cdr + rng.normal(0, 1.2)), 14, 30))
        ageing = float(np.clip(((age - 18) / 78) ** 1.3 + rng.normal(0, 0.05), 0, 1))
        dementia = DEMENTIA[cdr or 0.0]  # no draw: the demographics stay those of one seed
        sex = str(rng.choice(["F", "M"], p=[0.6, 0.4]))
        etiv = 1480 * SEX_SCALE ** (1.5 if sex == "M" else -1.5) * math.exp(rng.normal(0, 0.1))
        nwbv = float(np.clip(0.87 - 0.1 * ageing - 0.08 * dementia + rng.normal(0, 0.01), 0.6, 0.9))
        subject = Subject(
            subject=f"OAS1_{i + 1:04d}",
            index=i,
            disc=1 + i * n_discs // n_subjects,
            sex=sex,
            age=age,
            educ=educ,
            ses=ses,
            mmse=mmse,
            cdr=cdr,
            ageing=ageing,
            dementia=dementia,
            etiv=round(float(np.clip(etiv, 1120, 2000))),
            nwbv=nwbv,
        )
        sessions.append(Session(subject, "MR1", int(variants[i])))
        if i == 1:
            sessions.append(
                Session(subject, "MR2", int(variants[n_subjects]), delay=int(rng.integers(1, 90)))
            )
    return sessions


def write_csv(path: Path, sessions: list[Session]) -> None:
    """Write ``oasis_cross-sectional.csv`` (blank clinical scores under 60, ``N/A`` delay)."""

    def fmt(value: float | int | None) -> str:
        return "" if value is None else f"{value:g}"

    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for s in sessions:
            sub = s.subject
            writer.writerow(
                [
                    s.session_id,
                    sub.sex,
                    "R",
                    sub.age,
                    fmt(sub.educ),
                    fmt(sub.ses),
                    fmt(sub.mmse),
                    fmt(sub.cdr),
                    sub.etiv,
                    f"{sub.nwbv:.3f}",
                    f"{1755 / sub.etiv:.3f}",
                    "N/A" if s.delay is None else s.delay,
                ]
            )


# --------------------------------------------------------------------------- template


def template_folder() -> Path:
    """nilearn's packaged template folder, located without importing nilearn (slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed; it provides the MNI152 template")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def save_template_maps(folder: Path, step: int) -> None:
    """Precompute the template maps every worker needs and save them as ``.npy``.

    Maps (template grid, block-averaged by ``step``): ``t1`` (max 1); ``fields``, the four
    maps warped together (:func:`_warp`): ``gm``, ``wm`` (probabilities inside the brain),
    ``depth`` (mm from the nearest non-parenchyma voxel, drives grey-matter thinning) and
    the distance to the lateral/third ventricles in mm minus :data:`_FAR_MM` (so that
    outside the template, where sampling gives 0, it reads far); ``affine`` (voxel → MNI
    mm), ``centre`` (MNI mm of the brain's bounding-box centre).

    Args:
        folder: created; one ``<name>.npy`` per map.
        step: block size of the downsampling (1 = full 1 mm template).
    """
    folder.mkdir(parents=True)
    images = {k: nib.load(template_folder() / f) for k, f in TEMPLATE_FILES.items()}
    affine = images["t1"].affine @ np.diag([step, step, step, 1.0])
    affine[:3, 3] += images["t1"].affine[:3, :3] @ np.full(3, (step - 1) / 2)
    maps = {}
    for name, img in images.items():
        data = img.get_fdata(dtype=np.float32)
        data /= data.max()
        maps[name] = block_reduce(data, (step,) * 3, np.mean) if step > 1 else data
    voxel_mm = float(abs(affine[0, 0]))
    brain = maps["t1"] > 0.05
    maps["gm"] *= brain
    maps["wm"] *= brain
    parenchyma = (maps["gm"] + maps["wm"]) > 0.5
    maps["depth"] = ndi.distance_transform_edt(parenchyma, sampling=voxel_mm).astype(np.float32)
    ventricles = _ventricles(maps["t1"], brain, affine, voxel_mm)
    ventricle = ndi.distance_transform_edt(~ventricles, sampling=voxel_mm) - _FAR_MM
    fields = np.stack([maps.pop("gm"), maps.pop("wm"), maps.pop("depth"), ventricle])
    maps["fields"] = fields.astype(np.float32)
    maps["affine"] = affine
    corners = np.argwhere(brain)
    maps["centre"] = affine[:3, :3] @ ((corners.min(0) + corners.max(0)) / 2) + affine[:3, 3]
    for name, value in maps.items():
        np.save(folder / f"{name}.npy", value)


def _ventricles(
    t1: np.ndarray, brain: np.ndarray, affine: np.ndarray, voxel_mm: float
) -> np.ndarray:
    """Lateral and third ventricles: dark, deep, central components of at least 1 cm³."""
    depth = ndi.distance_transform_edt(brain, sampling=voxel_mm)
    ijk = np.indices(t1.shape, dtype=np.float32).reshape(3, -1)
    x, y, z = (affine[:3, :3] @ ijk + affine[:3, 3:]).reshape((3, *t1.shape))
    central = (np.abs(x) < 32) & (y > -50) & (y < 40) & (z > -10) & (z < 40)
    dark = (t1 < 0.45) & brain & (depth > 12) & central
    labels, n = ndi.label(dark)
    sizes = ndi.sum_labels(dark, labels, np.arange(1, n + 1)) * voxel_mm**3
    return np.isin(labels, 1 + np.flatnonzero(sizes >= 1000))


@functools.lru_cache(maxsize=1)
def _load_maps(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p, mmap_mode="r") for p in sorted(folder.glob("*.npy"))}


def _warp(volume: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear values of template maps at voxel coordinates, zero outside the template.

    scipy's ``map_coordinates`` takes one map per call, about 0.4 s per map and session
    here; torch's ``grid_sample`` samples all maps in one pass, several times faster.

    Args:
        volume: (C, X, Y, Z) maps on the template grid.
        points: (3, N) template voxel coordinates (x, y, z).

    Returns:
        (C, N) float32.
    """
    data = torch.from_numpy(np.array(volume, dtype=np.float32))[None]
    # grid_sample reads (x, y, z) as (W, H, D): reversed axes, normalised to [-1, 1]
    grid = np.empty((points.shape[1], 3), dtype=np.float32)
    for axis, n in enumerate(volume.shape[1:]):
        np.multiply(points[axis], 2 / (n - 1), out=grid[:, 2 - axis], casting="unsafe")
    grid -= 1
    out = F.grid_sample(data, torch.from_numpy(grid)[None, :, None, None], align_corners=True)
    return out[0, :, :, 0, 0].numpy()


# --------------------------------------------------------------------------- synthesis


def _write_session(
    session: Session,
    *,
    root: Path,
    maps_dir: Path,
    cfg: DemoConfig,
    seed: int,
    shape: tuple[int, int, int],
) -> None:
    """Synthesise one session and write its T88 image and FSL_SEG pair under ``root``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each worker process of the pool takes one core
    try:
        image, seg = synthesise_session(session, _load_maps(maps_dir), cfg, seed, shape)
    finally:
        torch.set_num_threads(threads)
    voxel = OASIS_SHAPE[0] / shape[0]
    folder = session.folder(root) / "PROCESSED" / "MPRAGE"
    write_analyze(folder / "T88_111" / f"{session.image_stem()}.hdr", image, voxel)
    write_analyze(folder.parent.parent / "FSL_SEG" / f"{session.image_stem()}_fseg.hdr", seg, voxel)


def write_analyze(path: Path, data_ras: np.ndarray, voxel_mm: float) -> None:
    """Write a RAS volume as an OASIS-style Analyze 7.5 pair (x-flipped, ``X x Y x Z x 1``).

    Analyze stores no orientation; readers (nibabel included) assume the radiological
    x-flip, so the array is stored left-right reversed and reads back as RAS through
    :func:`nibabel.as_closest_canonical`. The header's ``descrip`` says it is a stand-in.

    Args:
        path: the ``.hdr`` path (the ``.img`` is written next to it).
        data_ras: (X, Y, Z) array in RAS order; its dtype is kept (int16 / uint8).
        voxel_mm: isotropic voxel size.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = np.array(data_ras.shape)
    affine = np.diag([-voxel_mm, voxel_mm, voxel_mm, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((shape - 1) / 2)
    img = nib.AnalyzeImage(np.ascontiguousarray(data_ras[::-1, :, :, None]), affine)
    img.header.set_zooms((voxel_mm,) * 3 + (1.0,))
    img.header["descrip"] = STAND_IN_LABEL
    nib.save(img, path)


def synthesise_session(
    session: Session,
    maps: dict[str, np.ndarray],
    cfg: DemoConfig,
    seed: int,
    shape: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Synthesise one session on the output grid.

    Args:
        session: which subject/session (seeds its anatomy and scan).
        maps: template maps from :func:`save_template_maps`.
        cfg: warp, noise and bias strengths.
        seed: cohort seed.
        shape: output grid (X, Y, Z), RAS, covering the OASIS-1 T88 field of view.

    Returns:
        ``(image, seg)``: (X, Y, Z) int16 skull-stripped T1 (white matter ≈ 1000, zero
        background) and uint8 FSL-style labels (0 background, 1 CSF, 2 GM, 3 WM).
    """
    subject = session.subject
    anatomy = np.random.default_rng([seed, 2, subject.index])
    scan = np.random.default_rng([seed, 3, subject.index, int(session.session[2:])])
    voxel = OASIS_SHAPE[0] / shape[0]
    coarse = tuple(max(3, math.ceil(n * voxel / _COARSE_MM) + 1) for n in shape)

    rotation = _rotation(anatomy.uniform(-1, 1, 3) * cfg.rotation_deg + scan.normal(0, 1, 3))
    scale = anatomy_scale(subject.sex, anatomy)
    shift = anatomy.normal(0, 3, 3) + scan.normal(0, 1, 3)
    elastic = _displacement(anatomy, coarse) * cfg.elastic_mm
    cortex = min(1.0, subject.dementia + _AGEING_THINNING * subject.ageing)
    thinning = cortex * _MAX_THINNING_MM * (0.5 + _unit_field(anatomy, coarse))
    growth = subject.ageing * _MAX_VENTRICLE_MM * (0.6 + 0.8 * _unit_field(anatomy, coarse))
    bias = np.exp(cfg.bias_field * (2 * _unit_field(scan, coarse, sigma=1.5) - 1))

    # Template voxel coordinates of each coarse node, then trilinear upsampling.
    nodes = np.stack(
        np.meshgrid(
            *[np.linspace(0, n - 1, c) for n, c in zip(shape, coarse, strict=True)], indexing="ij"
        )
    )
    out_mm = (nodes - ((np.array(shape) - 1) / 2)[:, None, None, None]) * voxel
    linear = (rotation / scale[None, :]) @ out_mm.reshape(3, -1)
    template_mm = linear.reshape(out_mm.shape) + (maps["centre"] + shift)[:, None, None, None]
    inverse = np.linalg.inv(maps["affine"])
    template_vox = np.einsum("ij,j...->i...", inverse[:3, :3], template_mm + elastic)
    coords = _upsample(template_vox + inverse[:3, 3, None, None, None], shape)

    # Everything after the T1 warp runs on the brain voxels only (a third of the grid).
    t1_grid = _warp(maps["t1"][None], coords.reshape(3, -1))[0].reshape(shape)
    brain = t1_grid > 0.05
    points = coords[:, brain]
    del coords
    t1 = t1_grid[brain]
    gm, wm, depth, ventricle = _warp(maps["fields"], points)
    ventricle += _FAR_MM
    thinning, growth, bias = _upsample(np.stack([thinning, growth, bias]), shape)[:, brain]
    to_csf = np.clip(
        gm * np.clip(thinning - depth + 0.5, 0, 1) + np.clip(growth - ventricle + 0.5, 0, 1), 0, 1
    )
    csf_level = _WM_LEVEL * anatomy.uniform(0.25, 0.35)
    value = t1 * (1 - to_csf) + csf_level * to_csf
    value *= 1 - _MAX_WM_DARKENING * subject.dementia * wm * np.exp(-ventricle / 8)
    value = _WM_LEVEL * (value / _WM_LEVEL).clip(0) ** scan.uniform(0.9, 1.1) * bias
    noise = scan.standard_normal((2, value.size), dtype=np.float32) * (cfg.noise * _WM_LEVEL)
    value = np.sqrt((value + noise[0]) ** 2 + noise[1] ** 2) * (_OUTPUT_WM / _WM_LEVEL)
    image = np.zeros(shape, dtype=np.int16)
    image[brain] = np.clip(np.rint(value), 0, np.iinfo(np.int16).max)

    gm, wm = gm * (1 - to_csf), wm * (1 - to_csf)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[brain] = np.where(
        wm >= np.maximum(gm, 1 - gm - wm), 3, np.where(gm >= 1 - gm - wm, 2, 1)
    )
    return image, labels


def anatomy_scale(sex: str | None, rng: np.random.Generator) -> np.ndarray:
    """Per-axis scale of a subject's anatomy relative to the template (> 1 = larger brain).

    A random part, ``exp(N(0, 0.03) + N(0, 0.02) per axis)`` clipped to ±6 %, times the
    deterministic :func:`sex_scale` (M 5 % larger than F); overall within 0.90-1.062.

    Args:
        sex: ``M``, ``F`` or None (no sex effect).
        rng: the subject's anatomy generator (draws 4 normals).

    Returns:
        (3,) float64 scale along (x, y, z).
    """
    random = np.exp(np.clip(rng.normal(0, 0.03) + rng.normal(0, 0.02, 3), -0.06, 0.06))
    return random * sex_scale(sex)


def _rotation(degrees: np.ndarray) -> np.ndarray:
    """Rotation matrix from angles (degrees) about x, y, z."""
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _displacement(rng: np.random.Generator, coarse: tuple[int, int, int]) -> np.ndarray:
    """(3, *coarse) smooth random displacement, unit standard deviation per component."""
    field = ndi.gaussian_filter(rng.standard_normal((3, *coarse)), sigma=(0, 1, 1, 1))
    return field / field.std(axis=(1, 2, 3), keepdims=True)


def _unit_field(
    rng: np.random.Generator, shape: tuple[int, int, int], sigma: float = 1.0
) -> np.ndarray:
    """Smooth random field rescaled to [0, 1]."""
    field = ndi.gaussian_filter(rng.standard_normal(shape), sigma)
    return (field - field.min()) / (field.max() - field.min())


def _upsample(coarse: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Trilinear upsampling with aligned corners (exact for affine maps), separably.

    Args:
        coarse: (..., cx, cy, cz) values on a regular grid spanning the output grid.
        shape: output (X, Y, Z).

    Returns:
        (..., X, Y, Z) float32.
    """
    out = coarse.astype(np.float32)
    for axis, n in enumerate(shape):
        weights = _linear_weights(n, coarse.shape[axis - 3])
        out = np.moveaxis(np.tensordot(out, weights, axes=([axis - 3], [1])), -1, axis - 3)
    return np.ascontiguousarray(out)


def _linear_weights(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation matrix with the end points aligned."""
    position = np.linspace(0, n_in - 1, n_out)
    left = np.minimum(np.floor(position).astype(int), n_in - 2)
    frac = (position - left).astype(np.float32)
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    weights[np.arange(n_out), left] = 1 - frac
    weights[np.arange(n_out), left + 1] = frac
    return weights
