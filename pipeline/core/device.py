"""Where a run computes (``--device auto|cpu|cuda``) and how it is seeded."""

from __future__ import annotations

import torch

from pipeline.core.config import DEVICES
from pipeline.core.errors import InputError


def resolve_device(name: str) -> torch.device:
    """Map ``auto|cpu|cuda`` to a device; ``auto`` takes CUDA when available.

    Args:
        name: one of :data:`pipeline.core.config.DEVICES`.

    Raises:
        InputError: unknown name, or ``cuda`` requested on a machine without CUDA.
    """
    if name not in DEVICES:
        raise InputError(f"device must be one of {', '.join(DEVICES)}; got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device='cuda' requested but CUDA is not available; use --device auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA) for a deterministic run."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
