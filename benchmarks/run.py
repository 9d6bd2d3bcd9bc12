"""Benchmarks side by side with MONAI: one table, every figure measured in this process.

Rows (each: our figure, the reference's, the ratio; ratio > 1 is in our favour):

1. first-stage training throughput (slices/s), ours vs MONAI ``VQVAE`` and ``AutoencoderKL``
   (+ ``PatchDiscriminator``) in their tutorial settings scaled to our parameter counts;
2. test-split SSIM / LPIPS of those runs after the same wall-clock budget;
3. LDM training step and guided DDIM sampling vs ``LatentDiffusionInferer`` with ``cfg``, at
   equal steps and with our default sampler against DDIM at the steps it matches in quality;
4. prior sampling: our batched PixelCNN vs ``VQVAETransformerInferer`` on the same code grid;
5. ``prepare`` throughput with 2 workers against 1;
6. peak memory of each side of each row.

Usage::

    python -m benchmarks.run [--quick] [--out reports] [--data data/prepared] [--budget S]
                             [--profile NAME] [--rows first_stage,ldm,prior,prepare]
                             [--matched reports/sampling_steps.json]

Uses ``data/prepared`` when it holds train and test splits, otherwise builds a small cohort
on the ``tiny`` profile in a temporary folder. The matched-quality sampling row runs our
sampler at the setting ``benchmarks.sampling_steps`` recommends (``--matched``; run that study
on the trained models first). Writes ``<out>/benchmarks.md`` and
``<out>/benchmarks.json``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.measure import Row
from benchmarks.rows import ROWS, Bench
from benchmarks.sampling_steps import read_recommendation
from pipeline.core.config import Params, load_params
from pipeline.core.device import resolve_device
from pipeline.core.io import write_json, write_text
from pipeline.core.stage import main as run_command
from pipeline.data.datasets import EvalData, SliceDataset

logger = logging.getLogger(__name__)

#: (training budget in seconds, slices per sampling measurement, prepare subjects).
QUICK, FULL = (30.0, 4, 4), (300.0, 32, 8)
ROOT = Path(__file__).resolve().parents[1]


def _has_splits(folder: Path) -> bool:
    return all((folder / s / "slices.npy").is_file() for s in ("train", "test"))


def _build_tiny(tmp: Path) -> tuple[Path, Params]:
    """A tiny-profile stand-in cohort prepared in ``tmp``; returns (prepared dir, params)."""
    from data_prep.demo_cohort import build_demo_cohort
    from data_prep.prepare import prepare_dataset

    params = load_params(ROOT / "params.yaml", profile="tiny")
    logger.info("no prepared data; building a tiny stand-in cohort in %s", tmp)
    build_demo_cohort(tmp / "raw", params.demo, seed=params.seed)
    prepare_dataset(
        tmp / "raw", tmp / "prepared", params.prepare, seed=params.seed, report_dir=tmp / "reports"
    )
    return tmp / "prepared", params


def fmt(value: float) -> str:
    """A figure with three significant digits (``-`` for NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def table(rows: list[Row], title: str) -> Table:
    """The rich table printed to the terminal."""
    out = Table(title=title, show_lines=False)
    for name in ("benchmark", "metric", "ours", "MONAI / ref.", "ratio", "MiB ours", "MiB ref."):
        out.add_column(name, justify="left" if name in ("benchmark", "metric") else "right")
    for row in rows:
        style = "green" if row.ratio >= 1 else "red"
        out.add_row(
            row.benchmark,
            row.metric,
            fmt(row.ours),
            fmt(row.reference),
            f"[{style}]{fmt(row.ratio)}[/{style}]",
            fmt(row.ours_mib),
            fmt(row.reference_mib),
        )
    return out


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    """The report: the table, the notes per row and how it was measured."""
    lines = [
        "# Benchmarks: braingen vs MONAI",
        "",
        f"Measured {meta['date']} on {meta['machine']} ({meta['device']}, "
        f"{meta['torch_threads']} torch threads, load average {meta['load_average']}), "
        f"data: {meta['data']} (profile `{meta['profile']}`; the demo data is a synthetic "
        f"stand-in, not OASIS). Ratio > 1 is in our favour (ours / MONAI for higher-is-better "
        f"figures, MONAI / ours for LPIPS). Mode: {meta['mode']}, training budget "
        f"{meta['budget_s']:.0f} s per model.",
        "",
        "| # | benchmark | metric | ours | MONAI / ref. | ratio | MiB ours | MiB ref. |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for i, row in enumerate(rows, 1):
        lines.append(
            f"| {i} | {row.benchmark} | {row.metric} | {fmt(row.ours)} | {fmt(row.reference)} "
            f"| {fmt(row.ratio)} | {fmt(row.ours_mib)} | {fmt(row.reference_mib)} |"
        )
    lines += ["", "## Notes", ""]
    for i, row in enumerate(rows, 1):
        why = f" **Ratio below 1:** {row.behind}" if row.ratio < 1 and row.behind else ""
        lines.append(f"{i}. {row.note}{why}")
    lines += [
        "",
        "Peak memory: the rise of the process's peak resident set during the measurement on "
        "the CPU (Linux `clear_refs`), `torch.cuda.max_memory_allocated` on CUDA.",
        "The machine may be shared: figures are comparable within this table, not across runs.",
        "",
    ]
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="30 s budgets, few samples")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output folder")
    parser.add_argument("--data", type=Path, default=Path("data/prepared"), help="prepared data")
    parser.add_argument("--budget", type=float, help="seconds of training per model")
    parser.add_argument("--samples", type=int, help="slices per sampling measurement")
    parser.add_argument("--profile", help="params.yaml profile (default: the file's)")
    parser.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"comma-separated subset of {','.join(ROWS)}",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: params")
    parser.add_argument(
        "--matched",
        type=Path,
        default=Path("reports/sampling_steps.json"),
        help="benchmarks.sampling_steps' report: its fastest quality-matched setting is our "
        "side of the matched-quality row (missing: the configured sampler, unverified)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {list(ROWS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmarks, print the table and write ``benchmarks.md`` / ``benchmarks.json``.

    Args:
        argv: command-line arguments (see the module docstring).

    Returns:
        The JSON report (``meta`` and ``rows``).
    """
    args = _parse(argv)
    budget, samples, subjects = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="braingen-bench-data-") as tmp:
        if _has_splits(args.data):
            data = args.data
            params = load_params(ROOT / "params.yaml", profile=args.profile)
        else:
            data, params = _build_tiny(Path(tmp))
        device = resolve_device(args.device or params.device)
        bench = Bench(
            params=params,
            device=device,
            train=EvalData.from_dataset(SliceDataset(data / "train")),
            test=EvalData.from_dataset(SliceDataset(data / "test")),
            budget=args.budget if args.budget is not None else budget,
            n_samples=args.samples or samples,
            prepare_subjects=subjects,
            seed=params.seed,
            matched=read_recommendation(args.matched),
        )
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "device": str(device),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
            "data": f"{data} ({len(bench.train.image)} train / {len(bench.test.image)} test "
            f"slices of {bench.train.image.shape[-1]}px)",
            "profile": params.profile,
            "mode": "quick" if args.quick else "full",
            "budget_s": bench.budget,
        }
        rows: list[Row] = []
        for name in args.rows.split(","):
            logger.info("benchmark %s ...", name)
            rows += ROWS[name](bench)
    Console(width=None if sys.stdout.isatty() else 120).print(
        table(rows, f"braingen vs MONAI ({meta['device']}, {meta['mode']})")
    )
    report = {"meta": meta, "rows": [r.as_dict() for r in rows]}
    write_json(args.out / "benchmarks.json", report)
    write_text(args.out / "benchmarks.md", markdown(rows, meta))
    logger.info("wrote %s and %s", args.out / "benchmarks.md", args.out / "benchmarks.json")
    return report


if __name__ == "__main__":
    run_command(main)
