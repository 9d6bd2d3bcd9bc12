"""Which sampling settings a trained generator should default to, judged over several seeds.

A generator's figures move between sampling seeds by more than the margins of its bars: on the
demo stand-in, one PixelCNN at one setting reads fd_alex 10.2-12.1 over five seeds against a
bar of 12.0, and its copy-like fraction 3.6-5.7 % against 5 %. A setting chosen on one seed is
chosen on noise. This scores a model file at each setting and seed exactly as ``evaluate``
does (:func:`pipeline.evaluation.evaluate.score_generator`: slices at the test slices' own z and
covariates, fd_alex, precision / recall, the z-probe, the raw and blurred judges, the copy-like
fraction, the label probes and the mask Dice), judges each seed against the report's bars
(:func:`pipeline.evaluation.verdicts.model_verdicts`, real references from
``reports/metrics.json``), and gives per setting the mean and range of each figure and how many
seeds meet each bar (:mod:`pipeline.evaluation.seeds`). At the model's own defaults, the mean
of the rows of seeds ``params.seed`` ... ``params.seed + evaluate.sampling_seeds - 1`` equals
``metrics.json``.

Usage::

    python -m benchmarks.sampling_sweep --model pixelcnn --seeds 0,1,2,3,4 \\
        --settings "guidance=3,temperature=0.9; guidance=1.5,temperature=1.2"

``--settings``: ``;`` between settings, ``,`` between ``key=value`` pairs; an empty setting
is the model's defaults. Keys: :meth:`~pipeline.inference.sampling.GeneratorModel.with_defaults`.
Needs ``data/prepared``, ``models/`` and ``reports/metrics.json`` from ``dvc repro``. Writes
``<out>/sampling_sweep_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from tqdm import tqdm

from benchmarks.scoring import score_seeds, scoring, scoring_arguments, table
from pipeline.core.config import GENERATORS
from pipeline.core.errors import InputError
from pipeline.core.io import write_json, write_text
from pipeline.core.stage import main as run_command
from pipeline.evaluation.evaluate import EvalContext
from pipeline.inference.sampling import load_generator


def parse_settings(text: str) -> list[dict[str, float | int | str]]:
    """``"guidance=3,temperature=0.9; guidance=1.5"`` -> one dict per setting.

    Values are numbers where they parse as one (``top_k`` and ``steps`` as integers), else
    strings (``sampler=ddim``). An empty setting (``""`` or ``";"`` alone) is the defaults.

    Raises:
        InputError: a pair without ``=``, or a key given twice in one setting.
    """
    settings: list[dict[str, float | int | str]] = []
    for chunk in text.split(";"):
        setting: dict[str, float | int | str] = {}
        for pair in filter(None, (p.strip() for p in chunk.split(","))):
            key, sep, value = (part.strip() for part in pair.partition("="))
            if not sep or not key or not value:
                raise InputError(f"setting {pair!r} is not key=value (e.g. guidance=1.5)")
            if key in setting:
                raise InputError(f"{key} given twice in one setting: {chunk.strip()!r}")
            setting[key] = _number(value, integer=key in ("top_k", "steps", "guidance_min_t"))
        settings.append(setting)
    unique = [s for i, s in enumerate(settings) if s not in settings[:i]]
    return unique or [{}]


def _number(value: str, *, integer: bool) -> float | int | str:
    try:
        return int(value) if integer else float(value)
    except ValueError:
        return value


def setting_name(setting: Mapping[str, Any]) -> str:
    """``guidance=1.5, temperature=1.2``; ``defaults`` for an empty setting."""
    return (
        ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())
        or "defaults"
    )


def markdown(model: str, results: Mapping[str, Mapping[str, Any]], seeds: Sequence[int]) -> str:
    """The report: a heading, then :func:`table` of the settings."""
    heading = [
        f"# Sampling settings of the {model} over sampling seeds {', '.join(map(str, seeds))}",
        "",
        "Scored as `evaluate` scores the model (stand-in test split where the data is the demo"
        " cohort); each cell is the mean over seeds, with the range in brackets.",
        "",
    ]
    return "\n".join(heading + table(results)) + "\n"


def sweep(
    model: str,
    settings: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    *,
    ctx: EvalContext,
    metrics: Mapping[str, Any],
    models: Path,
) -> dict[str, dict[str, Any]]:
    """Score ``model`` at every setting and seed.

    Returns:
        Per setting name: ``{setting, seeds: {seed: seed_row}, summary: summarise(...)}``.
    """
    base = load_generator(models / f"{model}.pt", ctx.device)
    generators = {setting_name(s): (dict(s), base.with_defaults(**s)) for s in settings}
    results: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(generators) * len(seeds), desc="settings x seeds", unit="run") as bar:
        for name, (setting, generator) in generators.items():
            results[name] = {"setting": setting} | score_seeds(
                model, generator, seeds, ctx=ctx, metrics=metrics, bar=bar
            )
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the sweep from the command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampling_sweep")
    parser.add_argument("--model", choices=GENERATORS, default="pixelcnn")
    parser.add_argument(
        "--settings", default="", help='e.g. "guidance=3; guidance=1.5,temperature=1.2"'
    )
    scoring_arguments(parser, seeds="0,1,2,3,4")
    args = parser.parse_args(argv)
    run = scoring(args)
    results = sweep(
        args.model,
        parse_settings(args.settings),
        run.seeds,
        ctx=run.ctx,
        metrics=run.metrics,
        models=run.models,
    )
    stem = args.out / f"sampling_sweep_{args.model}"
    write_json(
        stem.with_suffix(".json"), {"model": args.model, "seeds": run.seeds, "results": results}
    )
    report = markdown(args.model, results, run.seeds)
    write_text(stem.with_suffix(".md"), report)
    Console().print(report)
    return results


if __name__ == "__main__":
    run_command(main)
