"""Measuring tools of the benchmarks: peak memory, timed loops, parameter counts, result rows."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import math
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def n_params(*modules: nn.Module) -> int:
    """Number of parameters of ``modules`` together."""
    return sum(p.numel() for m in modules for p in m.parameters())


def _status_kib(key: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), None where unavailable."""
    with contextlib.suppress(OSError):
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    return None


def _release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``).

    Without this, memory freed by an earlier measurement is reused without raising the
    resident set, and the later measurement looks smaller than it is.
    """
    gc.collect()
    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident set (Linux ``clear_refs`` 5); True on success."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@dataclass
class PeakMemory:
    """Peak memory of a block of code, in MiB (filled in when the block exits).

    On CUDA: ``torch.cuda.max_memory_allocated`` (the peak of tensors on the device). On the
    CPU: the rise of the process's peak resident set size above its size at the start, after
    freed heap pages are returned to the OS; the peak is reset first where Linux allows it
    (``/proc/self/clear_refs``), else the ``ru_maxrss`` high-water mark is used, which misses
    peaks below an earlier one.

    Attributes:
        device: where the measured work runs.
        mib: peak memory in MiB (NaN until the block exits).
        method: ``cuda``, ``rss`` or ``ru_maxrss``.
    """

    device: torch.device
    mib: float = math.nan
    method: str = ""

    @contextlib.contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        """Measure the enclosed block."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
            self.method = "cuda"
            return
        _release_freed_memory()
        start_kib = _status_kib("VmRSS")
        if start_kib is not None and _reset_peak_rss():
            yield self
            peak = _status_kib("VmHWM") or start_kib
            self.mib, self.method = max(0, peak - start_kib) / 1024, "rss"
            return
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        yield self
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.mib, self.method = (after - before) / 1024, "ru_maxrss"


def sync(device: torch.device) -> None:
    """Wait for queued device work (so timings cover it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Iterations, slices and seconds spent in one side's steps."""

    iterations: int = 0
    slices: int = 0
    seconds: float = 0.0

    @property
    def slices_per_s(self) -> float:
        """Throughput."""
        return self.slices / self.seconds if self.seconds else math.nan


def interleaved(
    steps: Mapping[str, Callable[[int], int]],
    *,
    seconds: float,
    device: torch.device,
    warmup: int = 1,
    min_iterations: int = 3,
) -> dict[str, Timing]:
    """Give every side the same wall-clock budget, alternating one step of each.

    Alternating makes the sides share whatever else the machine is doing at the time, so a
    shared or throttling machine biases neither. A side stops once it has used ``seconds``
    and run ``min_iterations`` timed steps.

    Args:
        steps: side name -> ``step(i)`` that runs iteration i and returns the slices it used.
        seconds: budget per side.
        device: synchronised around every step.
        warmup: untimed first steps per side (lazy initialisation); they still train.
        min_iterations: timed steps per side at least.

    Returns:
        The :class:`Timing` of each side.
    """
    for step in steps.values():
        for i in range(warmup):
            step(i)
    out = {name: Timing() for name in steps}
    while True:
        running = [
            n for n, t in out.items() if t.seconds < seconds or t.iterations < min_iterations
        ]
        if not running:
            return out
        for name in running:
            timing = out[name]
            slices, elapsed = timed(
                lambda n=name, t=timing: steps[n](warmup + t.iterations), device
            )
            timing.iterations += 1
            timing.slices += slices
            timing.seconds += elapsed


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run ``fn`` once; return its result and the wall-clock seconds it took."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


Better = Literal["higher", "lower"]


@dataclass
class Row:
    """One line of the benchmark table: our figure, the reference's, and their ratio.

    Attributes:
        benchmark: what is measured, e.g. ``"VQ-VAE training"``.
        metric: the unit, e.g. ``"slices/s"`` or ``"test SSIM"``.
        ours: our figure.
        reference: the reference figure (MONAI's, or ours with 1 worker for ``prepare``).
        better: whether higher or lower values are better.
        ours_mib: peak memory of our measurement, MiB.
        reference_mib: peak memory of the reference measurement, MiB.
        note: recipes, sizes and caveats.
        behind: why we would lose this row and what would close the gap (shown only when
            the ratio is below 1).
        extra: further numbers kept in the JSON (parameter counts, steps, seconds).
    """

    benchmark: str
    metric: str
    ours: float
    reference: float
    better: Better = "higher"
    ours_mib: float = math.nan
    reference_mib: float = math.nan
    note: str = ""
    behind: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """> 1 is in our favour: ours / reference (higher is better) or reference / ours."""
        num, den = (
            (self.ours, self.reference)
            if self.better == "higher"
            else (
                self.reference,
                self.ours,
            )
        )
        return num / den if den else math.nan

    def as_dict(self) -> dict[str, Any]:
        """JSON-able dict including the ratio."""
        return {**asdict(self), "ratio": self.ratio}
