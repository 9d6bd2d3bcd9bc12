"""SDEdit and inpainting of a user's own slice with the latent diffusion model.

The input (PNG of any bit depth or colour type, or a single-slice NIfTI oriented by its
affine; read by :func:`data_prep.images.read_slice`, the reader ``prepare`` uses, and
normalised as ``prepare`` normalises) is brought to the model's resolution the way
``prepare`` does it (zero-padded to a square, resized to ``image_size``), encoded with the
model's autoencoder, edited in latent space by :func:`pipeline.inference.diffusion.sdedit`
/ :func:`pipeline.inference.diffusion.inpaint`, decoded as ``generate`` decodes (a posterior
sample around the edited latent, :meth:`pipeline.models.codec.LatentCodec.decode_stage_2_outputs`)
and written as a 16-bit PNG at the model's resolution.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_prep.files import file_kind
from data_prep.volume import square_resize
from pipeline.core.device import resolve_device
from pipeline.core.errors import InputError
from pipeline.data.slice_files import OutputExistsError, publish, read_mask, read_slice, write_png16
from pipeline.inference.diffusion import BoundCovariates, build_scheduler, inpaint, sdedit
from pipeline.inference.requests import parse_z, single_codes
from pipeline.inference.sampling import (
    POSTERIOR_SEED_OFFSET,
    GeneratorModel,
    SamplingSettings,
    load_generator,
)


@dataclass
class _Input:
    """A loaded model with one input slice at its resolution.

    Attributes:
        gm: the latent diffusion generator.
        image: (1, 1, S, S) input intensities in [0, 1] on the model's device.
        z: (1,) target position in [0, 1].
        latent: (1, C, h, w) scaled latent of ``image``.
        shape: (H, W) of the original file (masks must match it).
        network: the UNet, with the requested covariates bound
            (:class:`~pipeline.inference.diffusion.BoundCovariates`) for a covariate model.
    """

    gm: GeneratorModel
    image: torch.Tensor
    z: torch.Tensor
    latent: torch.Tensor
    shape: tuple[int, int]
    network: nn.Module


def _check_output(out_path: Path, overwrite: bool) -> None:
    if file_kind(out_path) != "png":
        raise InputError(f"output {out_path} must be a .png file")
    if out_path.exists() and not overwrite:
        raise OutputExistsError(f"{out_path} already exists; pass --overwrite to replace it")


@torch.no_grad()
def _load(
    model_path: Path,
    image_path: Path,
    z: str,
    device: str | torch.device,
    covariates: Mapping[str, str | None] | None,
) -> _Input:
    """Load the ldm model and the input slice, resize it and encode it; bind the
    covariates (one value each, checked against the model's schema before any work)."""
    gm = load_generator(model_path, resolve_device(device) if isinstance(device, str) else device)
    if gm.kind != "ldm":
        raise InputError(
            f"{model_path} is a {gm.kind} model; sdedit and inpaint need the latent diffusion "
            "model (--model ldm)"
        )
    levels = parse_z(z, gm.n_slices)
    if len(levels) != 1:
        raise InputError(f"--z {z}: give exactly one slice position, got {len(levels)}")
    codes = single_codes(gm.schema, covariates or {})
    network = gm.network
    if gm.schema:
        network = BoundCovariates(gm.network, torch.tensor([codes], device=gm.device))
    raw = read_slice(image_path)
    size = gm.latent_shape[-1] * gm.codec.autoencoder.downsample_factor
    resized = np.clip(square_resize(raw[None], size, nearest=False), 0.0, 1.0)
    image = torch.from_numpy(resized[None]).float().to(gm.device)
    zt = torch.tensor([levels[0].z], device=gm.device)
    latent = gm.codec.encode_stage_2_inputs(image, zt)
    return _Input(gm, image, zt, latent, (int(raw.shape[0]), int(raw.shape[1])), network)


def _ddim_settings(
    gm: GeneratorModel, steps: int | None, guidance: float | None
) -> SamplingSettings:
    """Edits run partial DDIM schedules: DDIM steps (the model's own only if it samples with
    DDIM, else :data:`~pipeline.inference.sampling.REFERENCE_DDIM_STEPS`) and its guidance."""
    return SamplingSettings.resolve(gm, sampler="ddim", steps=steps, guidance=guidance)


def _decode(gm: GeneratorModel, latent: torch.Tensor, z: torch.Tensor, seed: int) -> torch.Tensor:
    """An edited (1, C, h, w) latent → a (1, 1, S, S) slice, decoded as a posterior sample."""
    posterior = torch.Generator().manual_seed(seed + POSTERIOR_SEED_OFFSET)
    return gm.codec.decode_stage_2_outputs(latent, z, generator=posterior)


def _save(image: torch.Tensor, out_path: Path, overwrite: bool) -> Path:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    array = image[0, 0].float().cpu().numpy()
    return publish(out_path, lambda tmp: write_png16(array, tmp), overwrite=overwrite)


@torch.no_grad()
def sdedit_file(
    model_path: str | Path,
    image_path: str | Path,
    out_path: str | Path,
    z: str,
    strength: float = 0.5,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    overwrite: bool = False,
    covariates: Mapping[str, str | None] | None = None,
) -> Path:
    """Re-imagine a slice at position ``z`` (SDEdit, Meng et al. 2022).

    Args:
        model_path: the ldm model file.
        image_path: the user's slice (PNG or NIfTI).
        out_path: output ``.png`` (16-bit, the model's resolution).
        z: target position in ``--z`` syntax, one level (slice index ``17`` or ``0.55``).
        strength: in [0, 1]; 0 keeps the input's latent, 1 ignores the input.
        steps: DDIM steps of a full schedule (default: the model's ``sample_steps`` if it
            samples with DDIM, else 50).
        guidance: classifier-free guidance weight (default the model's).
        seed: seeds the added noise.
        device: ``auto``, ``cpu`` or ``cuda``.
        overwrite: replace an existing output.
        covariates: one value per covariate to condition on (``{"age": "80"}``); others
            unconditioned.

    Returns:
        ``out_path``.

    Raises:
        CheckpointError: missing or unusable model file.
        FileNotFoundError: missing input file.
        ValueError: not an ldm model, bad z, strength, input or output name.
        OutputExistsError: the output exists and ``overwrite`` is False.
    """
    out_path = Path(out_path)
    _check_output(out_path, overwrite)
    if not 0.0 <= strength <= 1.0:
        raise InputError(f"strength must be in [0, 1], got {strength}")
    inp = _load(Path(model_path), Path(image_path), z, device, covariates)
    gm = inp.gm
    s = _ddim_settings(gm, steps, guidance)
    gen = torch.Generator(device=gm.device).manual_seed(seed)
    scheduler = build_scheduler(gm.schedule, "ddim")
    latent = sdedit(
        inp.network,
        scheduler,
        inp.latent,
        inp.z,
        strength,
        s.steps,
        s.guidance,
        gen,
        guidance_min_t=s.guidance_min_t,  # type: ignore[arg-type]
    )
    return _save(_decode(gm, latent, inp.z, seed), out_path, overwrite)


@torch.no_grad()
def inpaint_file(
    model_path: str | Path,
    image_path: str | Path,
    mask_path: str | Path,
    out_path: str | Path,
    z: str,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    overwrite: bool = False,
    covariates: Mapping[str, str | None] | None = None,
) -> Path:
    """Regenerate the masked region of a slice, keeping the rest (RePaint-style).

    The mask is taken to latent resolution by max-pooling (a latent cell is regenerated if
    any of its pixels is masked). After decoding, pixels outside the mask are copied from
    the (resized) input, so only the masked region changes.

    Args:
        model_path: the ldm model file.
        image_path: the user's slice (PNG or NIfTI).
        mask_path: same size as the input; non-zero pixels mark the region to regenerate.
        out_path: output ``.png`` (16-bit, the model's resolution).
        z: position in ``--z`` syntax, one level.
        steps: DDIM steps (default: the model's ``sample_steps`` if it samples with DDIM,
            else 50).
        guidance: classifier-free guidance weight (default the model's).
        seed: seeds the generated region.
        device: ``auto``, ``cpu`` or ``cuda``.
        overwrite: replace an existing output.
        covariates: one value per covariate to condition on; others unconditioned.

    Returns:
        ``out_path``.

    Raises:
        CheckpointError: missing or unusable model file.
        FileNotFoundError: missing input or mask file.
        ValueError: not an ldm model, bad z, empty mask, mask size differing from the input,
            bad output name.
        OutputExistsError: the output exists and ``overwrite`` is False.
    """
    out_path = Path(out_path)
    _check_output(out_path, overwrite)
    mask_raw = read_mask(mask_path)
    inp = _load(Path(model_path), Path(image_path), z, device, covariates)
    if mask_raw.shape != inp.shape:
        raise InputError(
            f"mask {mask_path} is {mask_raw.shape[0]}x{mask_raw.shape[1]} but the image "
            f"{image_path} is {inp.shape[0]}x{inp.shape[1]}; they must match"
        )
    gm, size = inp.gm, inp.image.shape[-1]
    resized = square_resize(mask_raw[None].astype(np.float32), size, nearest=True)
    mask = torch.from_numpy(resized[None] > 0.5).float().to(gm.device)  # (1, 1, S, S)
    if not bool(mask.any()):
        raise InputError(f"mask {mask_path} vanishes at the model's {size}x{size} resolution")
    latent_mask = F.adaptive_max_pool2d(mask, inp.latent.shape[-2:])
    s = _ddim_settings(gm, steps, guidance)
    gen = torch.Generator(device=gm.device).manual_seed(seed)
    scheduler = build_scheduler(gm.schedule, "ddim")
    latent = inpaint(
        inp.network,
        scheduler,
        inp.latent,
        latent_mask,
        inp.z,
        s.steps,
        s.guidance,
        gen,
        guidance_min_t=s.guidance_min_t,  # type: ignore[arg-type]
    )
    decoded = _decode(gm, latent, inp.z, seed)
    return _save(mask * decoded + (1 - mask) * inp.image, out_path, overwrite)
