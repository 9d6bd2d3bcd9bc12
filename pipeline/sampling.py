"""The one sampling entry point for both generators (latent diffusion and PixelCNN prior).

``load_generator(path)`` reads ``models/ldm.pt`` or ``models/pixelcnn.pt`` together with the
first-stage autoencoder named in its metadata; ``sample(generator, z, n_per_z, seed)``
returns decoded slices in [0, 1] and the z of each. The result is a pure function of
(model files, z, n_per_z, seed and the sampling settings).

Model files (``{"kind", "modules", "config", "metadata"}``, see ``pipeline.checkpoint``):

- ``kind="ldm"``: ``modules.unet``; ``config`` is the ``ldm`` section; ``metadata`` holds
  ``autoencoder`` (path) and ``autoencoder_sha256``, ``scale_factor``, ``scheduler``
  (:func:`~pipeline.diffusion.scheduler_config`), ``conditioning`` and ``latent_shape``
  (C, h, w).
- ``kind="pixelcnn"``: ``modules.prior``; ``config`` is the ``prior`` section; ``metadata``
  holds ``autoencoder``, ``autoencoder_sha256``, ``conditioning``, ``num_codes`` and
  ``code_shape`` (h, w).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from monai.networks.schedulers import Scheduler
from pydantic import ValidationError
from torch import nn

from pipeline.checkpoint import CheckpointError, load_checkpoint
from pipeline.conditioning import check_z
from pipeline.config import ConditioningConfig, LDMConfig, PriorConfig, Sampler
from pipeline.diffusion import build_scheduler, guided_sample
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.unet import ZConditionedUNet

logger = logging.getLogger(__name__)

#: Slices generated per network batch (the guided UNet batch is twice this).
CHUNK = 64


class StaleModelError(CheckpointError):
    """The autoencoder file changed after the generator was trained on its latents."""


@dataclass
class GeneratorModel:
    """A loaded generator: its network, the first stage and default sampling settings.

    Attributes:
        kind: ``ldm`` or ``pixelcnn``.
        network: the diffusion UNet or the PixelCNN prior (eval mode).
        autoencoder: the first stage whose latents/codes the network generates.
        latent_shape: (C, h, w) latent (ldm) or (h, w) code grid (pixelcnn).
        device: where everything runs.
        config: the model's config section (``LDMConfig`` or ``PriorConfig``), whose
            sampling settings are the defaults.
        metadata: the model file's metadata.
        scheduler: the DDIM schedule (ldm only).
        scale_factor: latent scale used in training (ldm only; decoding divides by it).
    """

    kind: Literal["ldm", "pixelcnn"]
    network: nn.Module
    autoencoder: Autoencoder
    latent_shape: tuple[int, ...]
    device: torch.device
    config: LDMConfig | PriorConfig
    metadata: dict[str, Any]
    scheduler: Scheduler | None = None
    scale_factor: float = 1.0


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def decode_latents(
    autoencoder: Autoencoder, latent: torch.Tensor, z: torch.Tensor, scale_factor: float
) -> torch.Tensor:
    """Decode scaled diffusion latents to slices.

    Args:
        autoencoder: first stage with ``decode_from_latent(latent, z)``.
        latent: (B, C, h, w) latents in the scaled space the UNet works in.
        z: (B,) slice positions in [0, 1].
        scale_factor: the factor the latents were multiplied with for training.

    Returns:
        (B, 1, H, W) intensities clamped to [0, 1].
    """
    return autoencoder.decode_from_latent(latent / scale_factor, z).clamp(0, 1)


def _autoencoder_for(path: Path, metadata: dict[str, Any], device: torch.device) -> Autoencoder:
    """Load the generator's first stage, checking it is the file the generator was trained on."""
    from pipeline.first_stage import load_autoencoder

    ae_path = Path(metadata["autoencoder"])
    if not ae_path.is_file() and (path.parent / ae_path.name).is_file():
        ae_path = path.parent / ae_path.name
    expected = metadata.get("autoencoder_sha256")
    if expected and ae_path.is_file() and file_sha256(ae_path) != expected:
        raise StaleModelError(
            f"{ae_path} changed after {path} was trained on its latents (sha256 differs); "
            f"re-run encode_latents and the generator's training stage (dvc repro)"
        )
    autoencoder, _ = load_autoencoder(ae_path, device)
    return autoencoder


def _load_ldm(ckpt: dict[str, Any]) -> dict[str, Any]:
    meta = ckpt["metadata"]
    config = LDMConfig.model_validate(ckpt["config"])
    conditioning = ConditioningConfig.model_validate(meta["conditioning"])
    shape = tuple(int(s) for s in meta["latent_shape"])
    unet = ZConditionedUNet(config, conditioning, shape[0])
    unet.load_state_dict(ckpt["modules"]["unet"])
    return {
        "network": unet,
        "latent_shape": shape,
        "scheduler": build_scheduler(meta["scheduler"], "ddim"),
        "scale_factor": float(meta["scale_factor"]),
        "config": config,
    }


def _load_pixelcnn(ckpt: dict[str, Any]) -> dict[str, Any]:
    from pipeline.models.pixelcnn import GatedPixelCNN

    meta = ckpt["metadata"]
    config = PriorConfig.model_validate(ckpt["config"])
    conditioning = ConditioningConfig.model_validate(meta["conditioning"])
    state = ckpt["modules"]["prior"]
    codebook = torch.zeros_like(state["input_codes.codebook"])  # the state dict fills it
    prior = GatedPixelCNN(int(meta["num_codes"]), config, conditioning, codebook)
    prior.load_state_dict(state)
    return {
        "network": prior,
        "latent_shape": tuple(int(s) for s in meta["code_shape"]),
        "config": config,
    }


_LOADERS = {"ldm": _load_ldm, "pixelcnn": _load_pixelcnn}


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
    ckpt = load_checkpoint(path, map_location=device)
    kind = ckpt.get("kind")
    if kind not in _LOADERS:
        raise CheckpointError(
            f"{path} is not a generator file (kind={kind!r}); pass models/ldm.pt or "
            f"models/pixelcnn.pt written by the train_ldm / train_prior stages"
        )
    try:
        parts = _LOADERS[kind](ckpt)
    except (KeyError, ValidationError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else repr(err)
        raise CheckpointError(
            f"{path} does not match this braingen's {kind} model ({type(err).__name__}: "
            f"{first}); re-run its training stage"
        ) from None
    parts["network"] = parts["network"].to(device).eval()
    autoencoder = _autoencoder_for(path, ckpt["metadata"], device)
    return GeneratorModel(
        kind=kind,
        autoencoder=autoencoder,
        device=device,
        metadata=dict(ckpt["metadata"]),
        **parts,
    )


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate slices at the requested positions.

    Args:
        generator_model: from :func:`load_generator`.
        z: slice positions in [0, 1] (fractional values interpolate between levels).
        n_per_z: samples per position (>= 1).
        seed: seeds every random draw; the same arguments give the same slices.
        steps: sampling steps (ldm; default ``ldm.sample_steps`` of the model's config).
        guidance: classifier-free guidance weight (ldm; default ``ldm.guidance``).
        temperature: sampling temperature > 0 (pixelcnn; default ``prior.temperature``).
        top_k: sample among the k most likely codes (pixelcnn; default ``prior.top_k``).
        sampler: ``ddim`` or ``pndm`` (ldm; default ``ldm.sampler``).

    Returns:
        ``(images, z)``: (N, 1, H, W) slices in [0, 1] on the CPU with N = len(z) * n_per_z
        (each position repeated ``n_per_z`` times, in order), and their (N,) positions.

    Raises:
        ValueError: z outside [0, 1], ``n_per_z < 1`` or an invalid sampling setting.
    """
    levels = check_z(z).flatten()
    if n_per_z < 1:
        raise ValueError(f"n_per_z must be >= 1, got {n_per_z}")
    foreign = {"ldm": ("temperature", "top_k"), "pixelcnn": ("steps", "guidance", "sampler")}
    given = {
        "steps": steps,
        "guidance": guidance,
        "temperature": temperature,
        "top_k": top_k,
        "sampler": sampler,
    }
    for name in foreign[generator_model.kind]:
        if given[name] is not None:
            raise ValueError(
                f"{name}={given[name]!r} does not apply to a {generator_model.kind} model; "
                f"leave it unset"
            )
    if guidance is not None and guidance < 0:
        raise ValueError(f"guidance must be >= 0 (1 = conditional only), got {guidance}")
    all_z = levels.repeat_interleave(n_per_z)
    gm, cfg = generator_model, generator_model.config
    gen = torch.Generator(device=gm.device).manual_seed(seed)
    images = []
    for zb in all_z.split(CHUNK):
        zb = zb.to(gm.device)
        if gm.kind == "ldm":
            latent = guided_sample(
                gm.network,
                gm.metadata["scheduler"],
                zb,
                gm.latent_shape,
                sampler=cfg.sampler if sampler is None else sampler,
                steps=cfg.sample_steps if steps is None else steps,
                guidance=cfg.guidance if guidance is None else guidance,
                generator=gen,
            )
            out = decode_latents(gm.autoencoder, latent, zb, gm.scale_factor)
        else:
            from pipeline.autoregressive import sample_codes

            codes = sample_codes(
                gm.network,
                zb,
                gm.latent_shape,
                temperature=cfg.temperature if temperature is None else temperature,
                top_k=cfg.top_k if top_k is None else top_k,
                generator=gen,
            )
            out = gm.autoencoder.decode_indices(codes, zb).clamp(0, 1)
        images.append(out.float().cpu())
    return torch.cat(images), all_z
