"""The one sampling entry point for both generators (latent diffusion and PixelCNN prior).

``load_generator(path)`` reads ``models/ldm.pt`` or ``models/pixelcnn.pt`` (see
:mod:`pipeline.models.files`) together with the first-stage autoencoder named in its
metadata; ``sample(generator, z, n_per_z, seed)`` returns decoded slices in [0, 1] and the z
of each. The result is a pure function of (model files, z, n_per_z, seed and the sampling
settings). Sampling settings are resolved in one place, :meth:`SamplingSettings.resolve`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pipeline.core.checkpoint import CheckpointError
from pipeline.core.config import GENERATORS, LDMConfig, PriorConfig, Sampler
from pipeline.core.errors import InputError
from pipeline.core.identity import file_sha256
from pipeline.core.labels import Schema
from pipeline.inference.autoregressive import sample_codes
from pipeline.inference.diffusion import BoundCovariates, guided_sample
from pipeline.inference.texture import Texture, finish
from pipeline.models.codec import LatentCodec, StdCurve
from pipeline.models.conditioning import check_z
from pipeline.models.files import load_autoencoder, load_model, model_schema

logger = logging.getLogger(__name__)

#: Slices generated per network batch (the guided UNet batch is twice this).
CHUNK = 64
#: DDIM steps when the model's own default steps are for another sampler: the reference of
#: the sampling-steps study (``python -m benchmarks.sampling_steps``), 50 DDIM steps.
REFERENCE_DDIM_STEPS = 50
#: The scan-noise draws use ``seed + TEXTURE_SEED_OFFSET`` (independent of the sampler's draws).
TEXTURE_SEED_OFFSET = 7919
#: The posterior-sample draws of the LDM's decode use ``seed + POSTERIOR_SEED_OFFSET``.
POSTERIOR_SEED_OFFSET = 104729


class StaleModelError(CheckpointError):
    """The autoencoder file changed after the generator was trained on its latents."""


@dataclass
class GeneratorModel:
    """A loaded generator: its network, the first-stage codec and default sampling settings.

    Attributes:
        kind: ``ldm`` or ``pixelcnn``.
        network: the diffusion UNet or the PixelCNN prior (eval mode).
        codec: the first stage whose latents/codes the network generates, with the latents'
            scale factor (1.0 for the PixelCNN, which models codes).
        latent_shape: (C, h, w) latent (ldm) or (h, w) code grid (pixelcnn).
        device: where everything runs.
        config: the model's config section (``LDMConfig`` or ``PriorConfig``), whose
            sampling settings are the defaults.
        metadata: the model file's metadata (``metadata["scheduler"]`` is the LDM's noise
            schedule, the one representation samplers build their scheduler from).
        tissue_labels: the first stage's tissue head was trained on tissue labels, so
            slices can come with masks.
    """

    kind: Literal["ldm", "pixelcnn"]
    network: nn.Module
    codec: LatentCodec
    latent_shape: tuple[int, ...]
    device: torch.device
    config: LDMConfig | PriorConfig
    metadata: dict[str, Any]
    tissue_labels: bool = False

    @property
    def schedule(self) -> dict[str, Any]:
        """The LDM's noise schedule (:func:`pipeline.inference.diffusion.scheduler_config`)."""
        return self.metadata["scheduler"]

    @property
    def texture(self) -> Texture:
        """How decoded slices are finished: the scan noise added and the background floor
        cleared (intensity units; 0 for what a file made before the calibration lacks)."""
        return Texture.from_meta(self.metadata)

    @property
    def schema(self) -> Schema:
        """The covariates the model conditions on besides z (() for a z-only model)."""
        return model_schema(self.metadata)

    def with_defaults(self, **settings: Any) -> GeneratorModel:
        """The same generator whose default sampling settings are ``settings`` (the network
        and codec shared, not copied): a sweep over settings scores each through the code
        that samples with the defaults, controls included.

        Args:
            settings: any of :meth:`SamplingSettings.resolve`'s keywords that apply to this
                kind (ldm: ``sampler``, ``steps``, ``guidance``, ``guidance_min_t``; pixelcnn:
                ``guidance``, ``temperature``, ``top_k``).

        Raises:
            InputError: an unknown setting, one of the other kind, or an invalid value.
        """
        known = set(asdict(SamplingSettings()))
        unknown = sorted(set(settings) - known)
        if unknown:
            raise InputError(f"unknown sampling setting(s) {unknown}; known: {sorted(known)}")
        resolved = SamplingSettings.resolve(self, **settings).as_dict()
        fields = {("sample_steps" if k == "steps" else k): v for k, v in resolved.items()}
        try:
            config = type(self.config).model_validate(self.config.model_dump() | fields)
        except ValueError as err:
            raise InputError(f"invalid sampling setting(s) {settings}: {err}") from None
        return replace(self, config=config)

    @property
    def covariate_reference(self) -> list[dict[str, Any]]:
        """The training subjects' covariates (``match`` requests draw from them); [] for a
        file made before they were stored."""
        return list(self.metadata.get("covariate_reference") or [])

    @property
    def n_slices(self) -> int | None:
        """K, the number of slice levels the model was trained on (None if not recorded)."""
        k = self.metadata.get("n_slices")
        return None if k is None else int(k)


@dataclass(frozen=True)
class SamplingSettings:
    """Every sampling knob, resolved once against a model's defaults.

    Attributes:
        sampler: ``ddim`` or ``pndm`` (ldm; None for pixelcnn).
        steps: sampling steps (ldm).
        guidance: classifier-free guidance weight (ldm: on z and the covariates; pixelcnn: on
            the covariates, :func:`~pipeline.inference.autoregressive.sample_codes`).
        guidance_min_t: first guided timestep (ldm; the model's ``guidance_min_t``).
        temperature: sampling temperature (pixelcnn).
        top_k: sample among the k most likely codes, None for all (pixelcnn).
    """

    sampler: Sampler | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_min_t: int | None = None
    temperature: float | None = None
    top_k: int | None = None

    @classmethod
    def resolve(
        cls,
        model: GeneratorModel,
        *,
        sampler: Sampler | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        guidance_min_t: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
    ) -> SamplingSettings:
        """The given values, else the model's defaults.

        The model's ``sample_steps`` belong to its ``sampler``: asking for another sampler
        without steps takes :data:`REFERENCE_DDIM_STEPS` (e.g. SDEdit, which runs partial
        DDIM schedules, on a model whose default is 10 PNDM steps).

        Raises:
            InputError: a setting of the other generator kind, or an invalid value.
        """
        given = {
            "sampler": sampler,
            "steps": steps,
            "guidance": guidance,
            "guidance_min_t": guidance_min_t,
            "temperature": temperature,
            "top_k": top_k,
        }
        foreign = {
            "ldm": ("temperature", "top_k"),
            "pixelcnn": ("steps", "guidance_min_t", "sampler"),
        }
        for name in foreign[model.kind]:
            if given[name] is not None:
                raise InputError(
                    f"{name}={given[name]!r} does not apply to a {model.kind} model; leave it unset"
                )
        if guidance is not None and guidance < 0:
            raise InputError(f"guidance must be >= 0 (1 = conditional only), got {guidance}")
        if guidance_min_t is not None and guidance_min_t < 0:
            raise InputError(f"guidance_min_t must be >= 0 (0 = every step), got {guidance_min_t}")
        cfg = model.config
        if isinstance(cfg, LDMConfig):
            chosen = cfg.sampler if sampler is None else sampler
            default_steps = cfg.sample_steps if chosen == cfg.sampler else REFERENCE_DDIM_STEPS
            return cls(
                sampler=chosen,
                steps=default_steps if steps is None else steps,
                guidance=cfg.guidance if guidance is None else guidance,
                guidance_min_t=cfg.guidance_min_t if guidance_min_t is None else guidance_min_t,
            )
        return cls(
            guidance=cfg.guidance if guidance is None else guidance,
            temperature=cfg.temperature if temperature is None else temperature,
            top_k=cfg.top_k if top_k is None else top_k,
        )

    def as_dict(self) -> dict[str, Any]:
        """The settings that apply (the others are None), e.g. for a manifest row."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def _autoencoder_for(
    path: Path, metadata: dict[str, Any], device: torch.device
) -> tuple[Any, dict[str, Any]]:
    """Load the generator's first stage (and its metadata), checking it is the file the
    generator was trained on."""
    ae_path = Path(metadata["autoencoder"])
    expected = metadata.get("autoencoder_sha256")
    beside = path.parent / ae_path.name
    if (
        beside != ae_path
        and beside.is_file()
        and (not ae_path.is_file() or (expected and file_sha256(beside) == expected))
    ):  # e.g. a registry download: the first stage is saved next to the generator
        ae_path = beside
    if expected and ae_path.is_file() and file_sha256(ae_path) != expected:
        raise StaleModelError(
            f"{ae_path} changed after {path} was trained on its latents (sha256 differs); "
            f"re-run encode_latents and the generator's training stage (dvc repro)"
        )
    return load_autoencoder(ae_path, device)


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> GeneratorModel:
    """Load ``models/ldm.pt`` or ``models/pixelcnn.pt`` and its first-stage autoencoder.

    The autoencoder path stored in the file is tried as given (relative to the working
    directory), then next to the generator file.

    Args:
        path: the generator's model file.
        device: where to put the networks.

    Returns:
        A :class:`GeneratorModel` in eval mode.

    Raises:
        CheckpointError: missing or corrupt file, not a generator file, a file that does not
            match this code's architecture, or an autoencoder that changed since training
            (:class:`StaleModelError`).
    """
    path, device = Path(path), torch.device(device)
    loaded = load_model(path, device, GENERATORS, "a generator")
    meta = loaded.metadata
    try:
        if loaded.kind == "ldm":
            shape = tuple(int(s) for s in meta["latent_shape"])
            scale = float(meta["scale_factor"])
            posterior_std = float(meta.get("posterior_std") or 0.0)  # 0 in older files
            std_curve = StdCurve.from_meta(meta.get("posterior_std_curve"))  # None: isotropic
            if "scheduler" not in meta:
                raise KeyError("scheduler")
        else:
            shape, scale, posterior_std = tuple(int(s) for s in meta["code_shape"]), 1.0, 0.0
            std_curve = None
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path} lacks its {loaded.kind} metadata ({err}); re-run its training stage"
        ) from None
    autoencoder, ae_meta = _autoencoder_for(path, meta, device)
    codec = LatentCodec(autoencoder, scale, posterior_std, std_curve)
    return GeneratorModel(
        kind=loaded.kind,  # type: ignore[arg-type]
        network=loaded.network,
        codec=codec,
        latent_shape=shape,
        device=device,
        config=loaded.config,  # type: ignore[arg-type]
        metadata=meta,
        tissue_labels=bool(ae_meta.get("tissue_labels")) and autoencoder.has_tissue_head,
    )


@dataclass
class Samples:
    """Generated slices with their labels.

    Attributes:
        images: (N, 1, H, W) slices in [0, 1] on the CPU.
        z: (N,) positions in [0, 1].
        covariates: (N, n) covariate codes asked for (NaN = unconditioned), or None.
        tissue: (N, H, W) int64 tissue labels (0 background, 1 CSF, 2 GM, 3 WM) decoded with
            each image, or None when masks were not asked for.
    """

    images: torch.Tensor
    z: torch.Tensor
    covariates: torch.Tensor | None = None
    tissue: torch.Tensor | None = None


def check_masks(generator_model: GeneratorModel) -> None:
    """Refuse masks from a generator whose first stage cannot make them.

    Raises:
        InputError: one line: the first stage has no tissue head, or its head never saw
            tissue labels (the cohort had no segmentations).
    """
    if not generator_model.tissue_labels:
        raise InputError(
            f"this {generator_model.kind} model has no masks: its autoencoder has no tissue "
            "head trained on tissue labels (autoencoder.tissue_weight 0, or a cohort without "
            "tissue segmentations, so prepare wrote no tissue.npy)"
        )


@torch.no_grad()
def sample_slices(
    generator_model: GeneratorModel,
    z: torch.Tensor,
    seed: int,
    *,
    covariates: torch.Tensor | None = None,
    masks: bool = False,
    steps: int | None = None,
    guidance: float | None = None,
    guidance_min_t: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    sampler: Sampler | None = None,
    texture: bool = True,
) -> Samples:
    """Generate one slice per entry of ``z`` (and of ``covariates``).

    Args:
        generator_model: from :func:`load_generator`.
        z: (N,) slice positions in [0, 1] (fractional values interpolate between levels).
        seed: seeds every random draw; the same arguments give the same slices.
        covariates: (N, n) codes of the model's covariate schema
            (:func:`pipeline.core.labels.covariate_codes`; NaN = unconditioned), or None
            (z alone). A model without covariates accepts only None or n = 0.
        masks: also decode each slice's tissue labels (:func:`check_masks` refuses a model
            that cannot).
        steps, guidance, guidance_min_t, temperature, top_k, sampler: overrides of the model's
            defaults, resolved by :meth:`SamplingSettings.resolve`.
        texture: decode and finish slices like the data they imitate: the LDM's latents
            are decoded as posterior samples (the decoder's training input:
            :meth:`~pipeline.models.codec.LatentCodec.decode_stage_2_outputs` with the model
            file's ``posterior_std``), then :func:`pipeline.inference.texture.finish` with
            the model file's calibration clears the background haze the first stage leaves
            and adds the scan noise it removes. False returns the decoder's output for the
            sampled latent itself.

    Raises:
        InputError: z outside [0, 1], covariates of the wrong shape, masks from a model that
            has none, or an invalid sampling setting.
    """
    gm = generator_model
    all_z = check_z(z).flatten()
    n_cov = len(gm.schema)
    if covariates is not None and covariates.numel() and covariates.shape != (len(all_z), n_cov):
        raise InputError(
            f"covariates must be ({len(all_z)}, {n_cov}) for this model "
            f"(it conditions on {n_cov} covariates), got {tuple(covariates.shape)}"
        )
    if masks:
        check_masks(gm)
    s = SamplingSettings.resolve(
        gm,
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        guidance_min_t=guidance_min_t,
        temperature=temperature,
        top_k=top_k,
    )
    cov = covariates if covariates is not None and n_cov else None
    gen = torch.Generator(device=gm.device).manual_seed(seed)
    posterior = torch.Generator().manual_seed(seed + POSTERIOR_SEED_OFFSET) if texture else None
    images, tissue = [], []
    for i in range(0, len(all_z), CHUNK):
        zb = all_z[i : i + CHUNK].to(gm.device)
        cb = None if cov is None else cov[i : i + CHUNK].to(gm.device).float()
        if gm.kind == "ldm":
            network = gm.network if cb is None else BoundCovariates(gm.network, cb)
            latent = guided_sample(
                network,
                gm.schedule,
                zb,
                gm.latent_shape,  # type: ignore[arg-type]
                sampler=s.sampler,  # type: ignore[arg-type]
                steps=s.steps,  # type: ignore[arg-type]
                guidance=s.guidance,  # type: ignore[arg-type]
                generator=gen,
                guidance_min_t=s.guidance_min_t,  # type: ignore[arg-type]
            )
            decode = partial(gm.codec.decode_stage_2_outputs, generator=posterior)
            decode_with_tissue = partial(gm.codec.decode_stage_2_with_tissue, generator=posterior)
        else:
            latent = sample_codes(
                gm.network,
                zb,
                gm.latent_shape,  # type: ignore[arg-type]
                temperature=s.temperature,  # type: ignore[arg-type]
                top_k=s.top_k,
                generator=gen,
                covariates=cb,
                guidance=s.guidance,  # type: ignore[arg-type]
            )
            decode, decode_with_tissue = gm.codec.decode_codes, gm.codec.decode_codes_with_tissue
        if masks:  # the tissue map comes from the same decoder pass as the image
            out, labels = decode_with_tissue(latent, zb)
            tissue.append(labels.cpu())
        else:
            out = decode(latent, zb)
        images.append(out.float().cpu())
    result = torch.cat(images)
    if texture and not gm.texture.is_identity:
        noise_gen = torch.Generator().manual_seed(seed + TEXTURE_SEED_OFFSET)
        result = finish(result, gm.texture, noise_gen)
    return Samples(result, all_z, cov, torch.cat(tissue) if masks else None)


@torch.no_grad()
def sample(
    generator_model: GeneratorModel,
    z: float | Sequence[float] | torch.Tensor,
    n_per_z: int,
    seed: int,
    steps: int | None = None,
    guidance: float | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    sampler: Sampler | None = None,
    texture: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n_per_z`` slices at each requested position, on z alone
    (:func:`sample_slices` with each position repeated; covariates unconditioned).

    Args:
        generator_model: from :func:`load_generator`.
        z: slice positions in [0, 1] (fractional values interpolate between levels).
        n_per_z: samples per position (>= 1).
        seed: seeds every random draw; the same arguments give the same slices.
        steps, guidance, temperature, top_k, sampler, texture: as :func:`sample_slices`.

    Returns:
        ``(images, z)``: (N, 1, H, W) slices in [0, 1] on the CPU with N = len(z) * n_per_z
        (each position repeated ``n_per_z`` times, in order), and their (N,) positions.

    Raises:
        ValueError: z outside [0, 1], ``n_per_z < 1`` or an invalid sampling setting.
    """
    levels = check_z(z).flatten()
    if n_per_z < 1:
        raise InputError(f"n_per_z must be >= 1, got {n_per_z}")
    out = sample_slices(
        generator_model,
        levels.repeat_interleave(n_per_z),
        seed,
        steps=steps,
        guidance=guidance,
        temperature=temperature,
        top_k=top_k,
        sampler=sampler,
        texture=texture,
    )
    return out.images, out.z
