"""An ordered process-pool map with a progress bar, shared by ``make_demo`` and ``prepare``."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def _context() -> multiprocessing.context.BaseContext:
    """``fork`` where available: workers run numpy/nibabel code only, and a spawned worker
    would re-import the stage module (torch, mlflow) before doing any work."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def ordered_map(
    fn: Callable[[T], R], items: Sequence[T], *, workers: int, desc: str, unit: str
) -> Iterator[R]:
    """Yield ``fn(item)`` for each item, in order, using up to ``workers`` processes.

    With one worker (or one item) everything runs in this process. Closing the iterator
    early (e.g. on an error) cancels the pending items.

    Args:
        fn: a picklable function (module level, or a ``functools.partial`` of one).
        items: picklable inputs.
        workers: process count.
        desc: progress-bar label.
        unit: progress-bar unit.

    Yields:
        The results, in the order of ``items``.
    """
    workers = min(workers, len(items))
    pool = ProcessPoolExecutor(workers, mp_context=_context()) if workers > 1 else None
    results = pool.map(fn, items) if pool is not None else map(fn, items)
    try:
        yield from tqdm(results, total=len(items), desc=desc, unit=unit)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
