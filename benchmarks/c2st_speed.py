"""Benchmark: milliseconds per training step of one network of the C2ST judge
(:mod:`pipeline.metrics.c2st`; a judge of ``evaluate.c2st.members`` networks takes that many
times as long).

Runs whole :func:`~pipeline.metrics.c2st.two_sample_auc` calls (sampling, shifts, forward,
backward, AdamW, the held-out AUC every ``curve_every`` steps) on random slices and divides
the wall time by the steps, for each thread count asked for. The machine's load average is
printed with it: on a shared CPU the figure moves with the other jobs.

Usage::

    python -m benchmarks.c2st_speed [--size 64] [--batch 64] [--steps 300] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import os
from time import perf_counter

import torch

from pipeline.core.config import C2STConfig
from pipeline.metrics.c2st import two_sample_auc


def main(argv: list[str] | None = None) -> dict[int, float]:
    """Run the benchmark and print one line per thread count.

    Args:
        argv: command-line arguments (``--size``, ``--batch``, ``--steps``, ``--threads``).

    Returns:
        Thread count → milliseconds per judge step.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.c2st_speed")
    parser.add_argument("--size", type=int, default=64, help="slice side in pixels (64)")
    parser.add_argument("--batch", type=int, default=64, help="slices per step (64)")
    parser.add_argument("--steps", type=int, default=300, help="judge steps per run (300)")
    parser.add_argument("--threads", default="1,2", help="torch thread counts (1,2)")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.rand(2, 512, 1, args.size, args.size, generator=gen)
    cfg = C2STConfig(
        members=1, steps=args.steps, curve_every=max(1, args.steps // 6), batch_size=args.batch
    )
    threads_before = torch.get_num_threads()
    results: dict[int, float] = {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        start = perf_counter()
        two_sample_auc(
            real[:384],
            fake[:384],
            real[384:],
            fake[384:],
            cfg=cfg,
            device=torch.device("cpu"),
            seed=0,
        )
        results[threads] = 1e3 * (perf_counter() - start) / args.steps
        print(
            f"{threads} thread(s): {results[threads]:.1f} ms/step "
            f"({args.size}x{args.size}, batch {args.batch}, {args.steps} steps; "
            f"load average {os.getloadavg()[0]:.2f})"
        )
    torch.set_num_threads(threads_before)
    return results


if __name__ == "__main__":
    main()
