"""Run a stage's independent trainings side by side (the VQ-VAE and the VAE-GAN; the LDM and
the PixelCNN prior; the evaluation's realism judges and the augmentation study's downstream
networks).

Small networks use two CPU cores poorly: one 12-image autoencoder step takes 0.28-0.38 s on
two threads and 0.46 s on one, so two trainings on one core each finish about 30 % sooner
than the same two one after the other on both cores. With as many GPUs as trainings, each
training gets a GPU of its own.

Each training is a child process (``python -m stages.<stage> <item>``) with its own
environment: on the CPU ``OMP_NUM_THREADS`` (cores // trainings), on CUDA
``CUDA_VISIBLE_DEVICES`` (one GPU each), and ``TQDM_POSITION`` so that the progress bars
stack instead of overwriting each other. ``BRAINGEN_PARALLEL`` chooses::

    BRAINGEN_PARALLEL=auto dvc repro   # default: side by side when there are enough cores/GPUs
    BRAINGEN_PARALLEL=0 dvc repro      # one after the other, each with the whole machine
    BRAINGEN_PARALLEL=1 dvc repro      # side by side even on one GPU or one core

It is an environment variable like ``BRAINGEN_NPROC``: it changes no parameter, so DVC's
cache stays valid. Under ``BRAINGEN_NPROC`` > 1 every training already spans all devices
through torchrun, and they run one after the other.

A child keeps its thread count within a training phase: the weights a CPU training produces
depend on it (oneDNN and the plain convolution kernels sum in different orders), so a child
that took the freed cores the moment its sibling finished would give results that depend on
which step that happened at. Between two phases of one training (the VAE-GAN's decoder-only
phase), or at a fixed step of one (``train.join_freed_cores_at``, for a training that
outlasts its sibling; no profile sets it now), a child may call :func:`take_freed_cores`: it
waits until every sibling has finished and then uses all the cores, so the rest of the
training always runs with the same thread count and the cores a finished sibling leaves do not
idle. The parent tells the children where it marks finished siblings (``BRAINGEN_DONE_DIR``)
and how many there are (``BRAINGEN_SIBLINGS``). The final thread count is recorded in the
model file's metadata (``torch_threads``).

If one child fails, the others are stopped (each resumes from its last checkpoint when the
stage is re-run); if this process is interrupted or terminated, so are they.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from pipeline.core.distributed import requested_processes
from pipeline.core.errors import BraingenError, InputError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Environment variable choosing side by side (1), one after the other (0) or auto.
PARALLEL_ENV = "BRAINGEN_PARALLEL"
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
#: How often the parent checks its children (and a waiting child its siblings), in seconds.
POLL_SECONDS = 0.5
#: Side-by-side CPU children: how many siblings each has, and the folder where the parent
#: marks each sibling that finished (:func:`take_freed_cores`).
SIBLINGS_ENV, DONE_DIR_ENV = "BRAINGEN_SIBLINGS", "BRAINGEN_DONE_DIR"


class ChildFailedError(BraingenError, RuntimeError):
    """A child training exited with a non-zero code (it has printed its own error)."""


@dataclass(frozen=True)
class Job:
    """One child training.

    Attributes:
        label: name in messages, e.g. ``"ae_vqvae"``.
        argv: the command, e.g. ``[sys.executable, "-m", "stages.train_autoencoder", "vqvae"]``.
        env: variables set on top of this process's environment.
    """

    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def parallel_setting(environ: Mapping[str, str] | None = None) -> bool | None:
    """Read ``BRAINGEN_PARALLEL``.

    Args:
        environ: the environment (default: ``os.environ``).

    Returns:
        True (forced on), False (forced off) or None (``auto``, the default).

    Raises:
        ValueError: any other value.
    """
    raw = (os.environ if environ is None else environ).get(PARALLEL_ENV, "auto").strip().lower()
    if raw in _ON:
        return True
    if raw in _OFF:
        return False
    if raw in ("", "auto"):
        return None
    raise InputError(f"{PARALLEL_ENV} must be auto, 1 or 0; got {raw!r}")


def side_by_side_envs(
    n_jobs: int,
    device: torch.device,
    *,
    forced: bool | None = None,
    cores: int | None = None,
    gpus: Sequence[str] | None = None,
    nproc: int = 1,
) -> list[dict[str, str]] | None:
    """Decide whether ``n_jobs`` trainings run at once, and with which resources each.

    Args:
        n_jobs: number of trainings.
        device: the resolved training device (``cpu`` or ``cuda``).
        forced: :func:`parallel_setting` (None = decide from the resources).
        cores: usable CPU cores (default: :func:`usable_cores`).
        gpus: visible GPU ids (default: ``CUDA_VISIBLE_DEVICES`` or ``0..count-1``).
        nproc: processes per training under torchrun (``BRAINGEN_NPROC``).

    Returns:
        One dict of environment variables per job when they run side by side, or None
        to run them one after the other.
    """
    if n_jobs < 2 or forced is False or (forced is None and nproc > 1):
        return None
    if device.type == "cuda":
        if gpus is None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpus = (
                visible.split(",") if visible else list(map(str, range(torch.cuda.device_count())))
            )
        if len(gpus) >= n_jobs:
            return [{"CUDA_VISIBLE_DEVICES": gpus[i].strip()} for i in range(n_jobs)]
        return [{} for _ in range(n_jobs)] if forced else None
    cores = usable_cores() if cores is None else cores
    if cores < n_jobs and not forced:
        return None
    threads = str(max(1, cores // n_jobs))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, SIBLINGS_ENV: str(n_jobs - 1)}
    return [dict(env) for _ in range(n_jobs)]


def take_freed_cores(environ: Mapping[str, str] | None = None) -> int | None:
    """In a side-by-side CPU child, between two training phases or at a fixed step of one: wait
    until every sibling has finished, then use all usable cores (module docstring).

    The wait makes the next phase's thread count the same on every run, whichever child
    finishes first. Outside a side-by-side CPU child (run alone, on CUDA, under torchrun) it
    returns at once and changes nothing.

    Args:
        environ: the environment (default: ``os.environ``).

    Returns:
        The new torch thread count, or None when nothing changed.
    """
    environ = os.environ if environ is None else environ
    if SIBLINGS_ENV not in environ or DONE_DIR_ENV not in environ:
        return None
    siblings, done = int(environ[SIBLINGS_ENV]), Path(environ[DONE_DIR_ENV])
    started = time.monotonic()
    while sum(1 for _ in done.iterdir()) < siblings:
        time.sleep(POLL_SECONDS)
    threads = usable_cores()
    torch.set_num_threads(threads)
    logger.info(
        "siblings finished (waited %.0f s); continuing on %d threads",
        time.monotonic() - started,
        threads,
    )
    return threads


def _stop(procs: Mapping[str, subprocess.Popen[bytes]], grace_seconds: float = 30.0) -> None:
    """Terminate the children still running; kill those that outlive ``grace_seconds``."""
    alive = [p for p in procs.values() if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + grace_seconds
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit so that ``finally`` stops the children."""
    raise SystemExit(128 + signum)


def run_jobs(jobs: Sequence[Job], side_by_side: bool) -> None:
    """Run the jobs, all at once or one after the other; fail as soon as one fails.

    Args:
        jobs: the child trainings.
        side_by_side: start them all at once (else each starts when the previous succeeded).

    Raises:
        ChildFailedError: a child exited with a non-zero code; the others were stopped
            (sequentially: the later ones were not started).
    """
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    done = tempfile.TemporaryDirectory(prefix="braingen-done-")
    try:
        waves = [list(jobs)] if side_by_side else [[job] for job in jobs]
        for wave in waves:
            for position, job in enumerate(wave):
                env = {**os.environ, **job.env}
                if side_by_side:
                    env["TQDM_POSITION"] = str(position)
                    env[DONE_DIR_ENV] = done.name
                logger.info("%s: %s", job.label, " ".join(job.argv[1:]))
                sys.stderr.flush()
                procs[job.label] = subprocess.Popen(job.argv, env=env)
            running = {job.label for job in wave}
            while running:
                time.sleep(POLL_SECONDS)
                for label in sorted(running):
                    code = procs[label].poll()
                    if code is None:
                        continue
                    running.discard(label)
                    if code == 0:
                        (Path(done.name) / label).touch()
                    else:
                        others = ", ".join(sorted(running)) or "none"
                        raise ChildFailedError(
                            f"{label} failed (exit code {code}); stopped the others ({others}),"
                            " which resume from their last checkpoints when the stage is re-run"
                        )
    finally:
        _stop(procs)
        done.cleanup()
        signal.signal(signal.SIGTERM, previous)


def run_side_by_side(jobs: Sequence[Job], device: torch.device) -> None:
    """Run independent trainings side by side when the machine allows it (module docstring).

    Args:
        jobs: the child trainings (their ``env`` is extended with the resources they get).
        device: the resolved training device.

    Raises:
        ChildFailedError: a child failed.
        ValueError: ``BRAINGEN_PARALLEL`` or ``BRAINGEN_NPROC`` is malformed.
    """
    envs = side_by_side_envs(
        len(jobs), device, forced=parallel_setting(), nproc=requested_processes()
    )
    if envs is None:
        run_jobs(jobs, side_by_side=False)
        return
    logger.info(
        "training %s side by side (%s)",
        ", ".join(job.label for job in jobs),
        "; ".join(" ".join(f"{k}={v}" for k, v in env.items()) or "shared" for env in envs),
    )
    run_jobs(
        [Job(j.label, j.argv, {**j.env, **env}) for j, env in zip(jobs, envs, strict=True)], True
    )


def pool_workers(device: torch.device) -> int:
    """Processes for many small independent trainings in one stage (:class:`WorkerPool`): one
    per usable CPU core on the CPU (one with ``BRAINGEN_PARALLEL=0``), one on a GPU (the
    trainings share it one after the other)."""
    if device.type != "cpu" or parallel_setting() is False:
        return 1
    return usable_cores()


def _init_single_thread(initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    if initializer is not None:
        initializer(*initargs)


class WorkerPool:
    """Independent jobs (small trainings) in ``workers`` processes of one CPU thread each.

    The in-stage counterpart of :func:`run_side_by_side`, for jobs too small and too many to
    be a child stage each: the augmentation study's downstream networks, the evaluation's
    realism judges. Processes are spawned (a fork of a process that has run torch's thread
    pool can deadlock) and started once; ``initializer(*initargs)`` runs once in each, so data
    every job shares is pickled once per process, not once per job. Each job keeps one
    thread, so its result does not depend on which process ran it, or when. With one worker
    everything runs in this process, on its own threads, without pickling.

    Args:
        workers: processes (:func:`pool_workers`).
        initializer: run once in each process (and once here with one worker), e.g. to
            store shared data in a module-level dict.
        initargs: its arguments.
    """

    def __init__(
        self,
        workers: int,
        initializer: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self.pool = None
        if workers > 1:
            self.pool = ProcessPoolExecutor(
                workers,
                mp_context=get_context("spawn"),
                initializer=_init_single_thread,
                initargs=(initializer, initargs),
            )
        elif initializer is not None:
            initializer(*initargs)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *_: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def map(self, fn: Callable[[T], R], jobs: Sequence[T], *, desc: str, unit: str) -> list[R]:
        """``[fn(job) for job in jobs]``, in order, with a progress bar; ``fn`` must be a
        module-level function (picklable) when there is more than one worker."""
        with tqdm(total=len(jobs), desc=desc, unit=unit, leave=False) as bar:
            if self.pool is None:
                out = []
                for job in jobs:
                    out.append(fn(job))
                    bar.update()
                return out
            futures = [self.pool.submit(fn, job) for job in jobs]
            for _ in as_completed(futures):
                bar.update()
            return [f.result() for f in futures]
