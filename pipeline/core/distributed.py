"""Multi-process training on torch's own engine: ``torchrun`` + ``DistributedDataParallel``.

Everything is switched on by the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); without it every helper here is a no-op and
training runs in one process exactly as before. Two ways in::

    torchrun --standalone --nproc_per_node 2 -m stages.train_autoencoder vqvae
    BRAINGEN_NPROC=2 dvc repro          # each training stage re-launches itself under torchrun

How the work is split (see :func:`pipeline.training.loop.fit`):

- data: every rank builds the same seeded global batch of ``batch_size`` indices for a step
  and takes its own contiguous ``batch_size / world_size`` slice (:func:`shard`), so the
  global batch, the batch order and resume are those of a one-process run (no
  ``DistributedSampler``, whose order depends on the epoch rather than the step);
- gradients: the modules ``train_step`` calls are ``DistributedDataParallel`` wrappers
  (:func:`wrap`), which average gradients over the ranks during ``backward``;
- state that is not a gradient (the VQ-VAE's EMA codebook) is summed over the ranks where it
  is computed (:func:`sum_`, :func:`broadcast_`), so every rank holds the same buffers;
- I/O: rank 0 alone logs to MLflow, evaluates, writes checkpoints, model files and reports and
  shows progress; the others wait at :func:`barrier`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.core.device import resolve_device
from pipeline.core.errors import InputError

logger = logging.getLogger(__name__)

#: Processes a training stage runs on when started without torchrun (e.g. by ``dvc repro``).
NPROC_ENV = "BRAINGEN_NPROC"
#: How long a rank waits at a collective (e.g. while rank 0 evaluates) before giving up.
TIMEOUT = timedelta(hours=2)


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0: the one process that logs, evaluates and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank arrives here (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def _device_for_rank(device_name: str, local_rank: int) -> torch.device:
    """The device of one rank: ``cuda:<local_rank>`` when CUDA is requested or auto-detected."""
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                f"lower --nproc_per_node (or {NPROC_ENV})"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


@contextlib.contextmanager
def session(device_name: str) -> Iterator[torch.device]:
    """Join the process group torchrun describes (if any) for the duration of a stage.

    With ``WORLD_SIZE`` > 1 in the environment: the backend is NCCL on CUDA and gloo on the
    CPU, each rank takes ``cuda:<LOCAL_RANK>`` (CUDA) or the CPU, and ranks other than 0 log
    warnings only. The group is destroyed on exit. Without torchrun it only resolves the device.

    Args:
        device_name: ``auto``, ``cpu`` or ``cuda`` (the ``device`` parameter).

    Yields:
        This rank's device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield resolve_device(device_name)
        return
    device = _device_for_rank(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)
    logger.info("rank %d of %d on %s (%s)", rank(), world, device, backend)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def requested_processes() -> int:
    """Processes per training stage that ``BRAINGEN_NPROC`` asks for (1 when it is unset).

    Raises:
        ValueError: ``BRAINGEN_NPROC`` is not a positive integer.
    """
    raw = os.environ.get(NPROC_ENV, "").strip()
    if not raw:
        return 1
    if not raw.isdigit() or int(raw) < 1:
        raise InputError(f"{NPROC_ENV} must be a positive integer; got {raw!r}")
    return int(raw)


def relaunch_with_torchrun(module: str, argv: Sequence[str] | None = None) -> None:
    """Re-run this stage under torchrun when ``BRAINGEN_NPROC`` asks for more than one process.

    Does nothing when the variable is unset or 1, or when already running under torchrun.
    Otherwise the current process is replaced (``exec``) by
    ``python -m torch.distributed.run --standalone --nproc_per_node N -m <module> <args>``,
    so the caller (e.g. ``dvc repro``) sees torchrun's exit code.

    Args:
        module: the stage module, e.g. ``"stages.train_ldm"``.
        argv: the stage's arguments (default: ``sys.argv[1:]``).

    Raises:
        ValueError: ``BRAINGEN_NPROC`` is not a positive integer.
    """
    if "LOCAL_RANK" in os.environ:
        return
    nproc = requested_processes()
    if nproc == 1:
        return
    args = list(sys.argv[1:] if argv is None else argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(nproc), "-m", module, *args]
    logger.info("%s=%d: %s", NPROC_ENV, nproc, " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def shard(indices: Sequence[int]) -> list[int]:
    """This rank's contiguous part of a global batch.

    Args:
        indices: the global batch (the same list on every rank).

    Returns:
        ``indices[r * n : (r + 1) * n]`` with ``n = len(indices) / world_size``.

    Raises:
        ValueError: the batch does not split evenly over the ranks.
    """
    world = world_size()
    if world == 1:
        return list(indices)
    if len(indices) % world:
        raise InputError(
            f"batch_size={len(indices)} does not split evenly over {world} processes; "
            f"use a batch_size that is a multiple of {world}"
        )
    n = len(indices) // world
    return list(indices[rank() * n : (rank() + 1) * n])


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """The module ``train_step`` calls: a DDP wrapper under torchrun, else ``module`` itself.

    The wrapper averages gradients over the ranks in ``backward`` and broadcasts rank 0's
    buffers before each forward (``forward_sync_buffers``), a safety net on top of the buffers'
    own synchronisation. Checkpoints keep saving ``module``, never the wrapper.

    Args:
        module: a network of the task, already on ``device``, with trainable parameters.
        device: this rank's device.
    """
    if not is_distributed():
        return module
    # A conv with one input channel gets weight gradients whose strides differ from the
    # bucket's in the size-1 dimension only (same memory order); DDP warns but copies fine.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=True)


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (no-op in one process); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` with rank ``src``'s values, in place (no-op in one process)."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def all_true(flag: bool | torch.Tensor) -> bool:
    """True when ``flag`` holds on every rank (each rank passes its own)."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([1.0 if bool(flag) else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def mean_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """Average scalar values over the ranks (each rank passes the same keys in the same order).

    Used for logged losses: the mean of the ranks' per-shard means is the mean over the global
    batch, what a one-process run logs.
    """
    if not is_distributed() or not values:
        return dict(values)
    stacked = torch.tensor(list(values.values()), dtype=torch.float64)
    stacked = stacked.to(_collective_device())
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
    means = (stacked / world_size()).tolist()
    return dict(zip(values.keys(), means, strict=True))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    """Where small tensors for collectives live: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
