"""Model files: the one place every model kind is saved, loaded and built.

A model file (``models/<name>.pt``) is what a later stage, ``evaluate`` or ``generate``
loads; it is not a resume checkpoint (``checkpoints/<stage>/last.pt``, see
:mod:`pipeline.core.checkpoint`). Every kind has the same layout, written atomically and
loaded with ``torch.load(weights_only=True)``::

    {"version": 1, "kind": "ae_vqvae" | "ae_vaegan" | "pixelcnn" | "ldm" | "zprobe",
     "modules": {<module name>: state_dict}, "config": <the params section>,
     "metadata": {"code_version": "0.1.0+<commit>", "torch_threads": 2,
                  "conditioning": {...} (conditioned kinds),
                  <what the kind needs to be rebuilt and checked>}}

The metadata a kind needs besides ``code_version`` and ``conditioning``:

- ``ae_*``: ``data`` (image_size, n_slices, percentiles, n_train), ``tissue_labels`` (the
  decoder's tissue head was trained on tissue labels, so it can make masks);
- ``pixelcnn``: ``autoencoder`` (path), ``autoencoder_sha256``, ``num_codes``,
  ``code_shape`` (h, w), ``n_slices``, ``covariates`` (the schema,
  :func:`~pipeline.core.labels.schema_to_meta`; absent in z-only files) and
  ``covariate_reference`` (the training subjects' covariates, no ids, that ``match``
  requests draw from: :func:`~pipeline.core.labels.covariate_reference`);
- ``ldm``: ``autoencoder``, ``autoencoder_sha256``, ``scale_factor``, ``latent_shape``
  (C, h, w), ``latent_source``, ``n_slices``, ``scheduler``, ``covariates``;
- ``zprobe``: ``n_slices``;
- ``covariate_probe``: ``heads`` (the covariates it predicts), ``age_mean`` and ``age_std``
  (years; the age head's normalisation), ``n_train``;
- ``segmenter``: ``classes`` (the tissue class of each output channel), ``trained`` (False:
  the training split had no tissue labels and the weights are the initial ones).

Files written before ``code_version`` was stored by every kind still load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from pipeline.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.core.config import (
    KINDS,
    AutoencoderConfig,
    ConditioningConfig,
    CovariateProbeConfig,
    LDMConfig,
    PriorConfig,
    SegmenterConfig,
    ZProbeConfig,
)
from pipeline.core.identity import code_version
from pipeline.core.labels import Schema, schema_from_meta

if TYPE_CHECKING:
    from pipeline.models.autoencoder import Autoencoder
    from pipeline.models.probes import CovariateProbe
    from pipeline.models.zprobe import ZProbe

#: Which stage writes each kind (named in errors).
WRITTEN_BY = {
    **{f"ae_{k}": "train_autoencoder" for k in KINDS},
    "pixelcnn": "train_prior",
    "ldm": "train_ldm",
    "zprobe": "train_zprobe",
}
#: The ``modules`` key of each kind's network (kept from the first file format).
MODULE_NAME = {**{f"ae_{k}": "model" for k in KINDS}, "pixelcnn": "prior", "ldm": "unet"}
MODULE_NAME["zprobe"] = "probe"
WRITTEN_BY |= {"covariate_probe": "train_probes", "segmenter": "train_probes"}
MODULE_NAME |= {"covariate_probe": "probe", "segmenter": "segmenter"}


@dataclass
class ModelFile:
    """A loaded model file.

    Attributes:
        kind: ``ae_vqvae``, ``ae_vaegan``, ``pixelcnn``, ``ldm`` or ``zprobe``.
        network: the network, in eval mode on the requested device.
        config: its params section (``AutoencoderConfig``, ``PriorConfig``, ``LDMConfig`` or
            ``ZProbeConfig``).
        metadata: the file's metadata block.
    """

    kind: str
    network: nn.Module
    config: BaseModel
    metadata: dict[str, Any]


def _conditioning(metadata: dict[str, Any]) -> ConditioningConfig:
    return ConditioningConfig.model_validate(metadata["conditioning"])


def model_schema(metadata: dict[str, Any]) -> Schema:
    """The covariates a second-stage model file conditions on (its ``covariates``
    metadata); () for a z-only file, including every file from before covariates."""
    return schema_from_meta(metadata.get("covariates"))


# Each builder imports its network's module itself: a stage that loads one kind does not pay
# for importing the others (the UNet pulls in MONAI, seconds of start-up).


def _build_autoencoder(kind: str, ckpt: dict[str, Any]) -> tuple[nn.Module, BaseModel]:
    from pipeline.models.autoencoder import Autoencoder

    cfg = AutoencoderConfig.model_validate(ckpt["config"])
    return Autoencoder(cfg, _conditioning(ckpt["metadata"]), kind.removeprefix("ae_")), cfg


def _build_pixelcnn(kind: str, ckpt: dict[str, Any]) -> tuple[nn.Module, BaseModel]:
    from pipeline.models.pixelcnn import GatedPixelCNN

    cfg = PriorConfig.model_validate(ckpt["config"])
    meta = ckpt["metadata"]
    shape = ckpt["modules"]["prior"]["input_codes.codebook"].shape  # filled by the state dict
    prior = GatedPixelCNN(
        int(meta["num_codes"]), cfg, _conditioning(meta), torch.zeros(shape), model_schema(meta)
    )
    return prior, cfg


def _build_ldm(kind: str, ckpt: dict[str, Any]) -> tuple[nn.Module, BaseModel]:
    from pipeline.models.unet import ZConditionedUNet

    cfg = LDMConfig.model_validate(ckpt["config"])
    meta = ckpt["metadata"]
    unet = ZConditionedUNet(
        cfg, _conditioning(meta), int(meta["latent_shape"][0]), model_schema(meta)
    )
    return unet, cfg


def _build_zprobe(kind: str, ckpt: dict[str, Any]) -> tuple[nn.Module, BaseModel]:
    from pipeline.models.zprobe import ZProbe

    cfg = ZProbeConfig.model_validate(ckpt["config"])
    return ZProbe(cfg.channels), cfg


def _build_covariate_probe(kind: str, ckpt: dict[str, Any]) -> tuple[nn.Module, BaseModel]:
    from pipeline.models.probes import CovariateProbe

    cfg = CovariateProbeConfig.model_validate(ckpt["config"])
    meta = ckpt["metadata"]
    probe = CovariateProbe(
        cfg.channels,
        tuple(meta["heads"]),
        age_mean=float(meta["age_mean"]),
        age_std=float(meta["age_std"]),
    )
    return probe, cfg


def _build_segmenter(kind: str, ckpt: dict[str, Any]) -> tuple[nn.Module, BaseModel]:
    from pipeline.models.probes import tissue_segmenter

    cfg = SegmenterConfig.model_validate(ckpt["config"])
    return tissue_segmenter(cfg), cfg


_BUILDERS: dict[str, Callable[[str, dict[str, Any]], tuple[nn.Module, BaseModel]]] = {
    **{f"ae_{k}": _build_autoencoder for k in KINDS},
    "pixelcnn": _build_pixelcnn,
    "ldm": _build_ldm,
    "zprobe": _build_zprobe,
}
_BUILDERS |= {"covariate_probe": _build_covariate_probe, "segmenter": _build_segmenter}


def save_model(
    path: str | Path,
    kind: str,
    network: nn.Module,
    config: BaseModel,
    metadata: dict[str, Any],
    conditioning: ConditioningConfig | None = None,
) -> None:
    """Write a model file atomically.

    Args:
        path: destination, e.g. ``models/ldm.pt``.
        kind: one of :data:`WRITTEN_BY`'s keys.
        network: the weights to save (the EMA copy where one is kept; never a DDP wrapper).
        config: the kind's params section, stored as ``config``.
        metadata: what the kind needs (see the module docstring); ``code_version`` and
            ``conditioning`` are added.
        conditioning: the z-embedding settings of a conditioned network.

    Raises:
        InputError: an unknown kind.
        CheckpointError: the file could not be written (the previous file is intact).
    """
    if kind not in _BUILDERS:
        raise CheckpointError(f"unknown model kind {kind!r}; known: {sorted(_BUILDERS)}")
    # CPU results depend on the thread count (kernel choice, summation order): keep it
    block = {**metadata, "code_version": code_version(), "torch_threads": torch.get_num_threads()}
    if conditioning is not None:
        block["conditioning"] = conditioning.model_dump(mode="json")
    save_checkpoint(
        path,
        {
            "kind": kind,
            "modules": {MODULE_NAME[kind]: network.state_dict()},
            "config": config.model_dump(mode="json"),
            "metadata": block,
        },
    )


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    kinds: tuple[str, ...] | None = None,
    what: str = "a braingen model",
) -> ModelFile:
    """Load and rebuild a model file (``weights_only``: no code from the file runs).

    Args:
        path: the model file.
        device: where to put the network.
        kinds: the kinds the caller accepts (default: any); another kind is refused.
        what: what the caller expects, for that error (``"an autoencoder"``).

    Returns:
        A :class:`ModelFile` with the network in eval mode.

    Raises:
        CheckpointError: missing, corrupt or foreign file, a kind the caller does not accept,
            or a file that does not match this code's architecture (one line naming the
            stage to re-run).
    """
    ckpt = load_checkpoint(path, map_location=device)
    kind = ckpt.get("kind")
    accepted = kinds or tuple(_BUILDERS)
    if kind not in accepted or kind not in _BUILDERS:
        wanted = " or ".join(f"models/{k}.pt" for k in accepted)
        raise CheckpointError(
            f"{path} is not {what} file (kind={kind!r}); pass {wanted} written by the "
            f"{' / '.join(sorted({WRITTEN_BY[k] for k in accepted if k in WRITTEN_BY}))} stage"
        )
    try:
        network, config = _BUILDERS[kind](kind, ckpt)
        network.load_state_dict(ckpt["modules"][MODULE_NAME[kind]])
    except (KeyError, ValidationError, RuntimeError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else repr(err)
        raise CheckpointError(
            f"{path} does not match this braingen's {kind} model ({type(err).__name__}: "
            f"{first}); re-run the {WRITTEN_BY[kind]} stage"
        ) from None
    return ModelFile(kind, network.to(device).eval(), config, dict(ckpt["metadata"]))


def load_probe(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[ZProbe, dict[str, Any]]:
    """Load ``models/zprobe.pt``: (probe in eval mode, metadata with ``n_slices``)."""
    loaded = load_model(path, device, ("zprobe",), "a z-probe")
    return loaded.network, loaded.metadata  # type: ignore[return-value]


def load_autoencoder(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[Autoencoder, dict[str, Any]]:
    """Load ``models/ae_vqvae.pt`` or ``models/ae_vaegan.pt``: (autoencoder, metadata)."""
    loaded = load_model(path, device, tuple(f"ae_{k}" for k in KINDS), "an autoencoder")
    return loaded.network, loaded.metadata  # type: ignore[return-value]


def load_covariate_probe(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[CovariateProbe, dict[str, Any]]:
    """Load ``models/covariate_probe.pt``: (probe in eval mode, metadata with ``heads``,
    ``age_mean`` and ``age_std``)."""
    loaded = load_model(path, device, ("covariate_probe",), "a covariate probe")
    return loaded.network, loaded.metadata  # type: ignore[return-value]


def load_segmenter(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``models/segmenter.pt``: (segmenter in eval mode, metadata with ``classes`` and
    ``trained``)."""
    loaded = load_model(path, device, ("segmenter",), "a tissue segmenter")
    return loaded.network, loaded.metadata
