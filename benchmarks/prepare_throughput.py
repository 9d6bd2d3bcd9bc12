"""Benchmark: ``prepare`` throughput (volumes/s) with 1 and 2 workers.

Builds a small full-size demo cohort (OASIS-1 layout, 176x208x176 Analyze volumes) in a
temporary folder under /tmp (or takes an existing data folder with ``--raw``), then runs
the prepare library on it with default parameters and 1 and 2 worker processes. All
outputs go to the temporary folder.

Usage::

    python -m benchmarks.prepare_throughput [--subjects 8] [--raw data/raw/demo]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from time import perf_counter

from data_prep.demo_cohort import build_demo_cohort
from data_prep.prepare import prepare_dataset
from pipeline.core.config import DemoConfig, PrepareConfig


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark and print one line per measurement.

    Args:
        argv: command-line arguments (``--subjects N``, ``--raw FOLDER``).

    Returns:
        ``{"volumes": ..., "volumes_per_s_1": ..., "volumes_per_s_2": ...}`` and, when the
        cohort was built, ``"build_s"``.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prepare_throughput")
    parser.add_argument("--subjects", type=int, default=8, help="demo subjects (default 8)")
    parser.add_argument("--raw", type=Path, help="existing data folder (skips the build)")
    args = parser.parse_args(argv)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="braingen-bench-", dir="/tmp") as tmp:
        raw = args.raw or Path(tmp) / "raw"
        if args.raw is None:
            start = perf_counter()
            sessions = build_demo_cohort(raw, DemoConfig(n_subjects=args.subjects), seed=0)
            results["build_s"] = perf_counter() - start
            print(f"demo cohort: {len(sessions)} volumes built in {results['build_s']:.1f} s")
        for workers in (1, 2):
            start = perf_counter()
            report = prepare_dataset(
                raw,
                Path(tmp) / f"prepared_{workers}",
                PrepareConfig(workers=workers),
                report_dir=Path(tmp) / f"reports_{workers}",
            ).report
            results["volumes"] = report["total"]["volumes"]
            rate = results["volumes"] / (perf_counter() - start)
            results[f"volumes_per_s_{workers}"] = rate
            print(f"prepare, {workers} worker(s): {rate:.2f} volumes/s")
    return results


if __name__ == "__main__":
    main()
