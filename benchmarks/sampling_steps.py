"""How few sampling steps keep the LDM's quality: the study behind ``ldm.sample_steps``.

For every sampler and step count, the trained LDM generates as many slices per z level as
the test split holds, from the same seed (so the same initial noise), and is scored as the
``evaluate`` stage scores it: ``fd_alex`` against the real test slices and the z-probe MAE.
The reference is guided DDIM with the most steps (50). Per sampler, the study finds the
fewest steps whose ``fd_alex`` and z-probe MAE are both within ``--tolerance`` (5 %) of the
reference's, and recommends the fastest of those settings as the default.

Samplers: our guided DDIM (:func:`pipeline.inference.diffusion.ddim_sample`) and MONAI's
``PNDMScheduler`` (PLMS, :func:`pipeline.inference.diffusion.pndm_sample`) driven by the same
one-forward guided output; the default of ``ldm.sampler`` comes from this table.

Usage::

    python -m benchmarks.sampling_steps [--steps 10,15,20,30,50] [--samplers ddim,pndm]
                                        [--models models] [--data data/prepared] [--out reports]

Needs ``models/ldm.pt`` (and its autoencoder) and ``models/zprobe.pt`` from ``dvc repro``.
Writes ``<out>/sampling_steps.md`` and ``<out>/sampling_steps.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from pipeline.core.config import SAMPLERS, Sampler, load_params
from pipeline.core.device import resolve_device
from pipeline.core.errors import InputError
from pipeline.core.io import write_json, write_text
from pipeline.data.datasets import EvalData, SliceDataset
from pipeline.evaluation.evaluate import zprobe_errors
from pipeline.inference.sampling import GeneratorModel, load_generator, sample
from pipeline.metrics.quality import alex_features, fd_alex
from pipeline.models.files import load_probe


def generate(
    model: GeneratorModel, sampler: str, z: torch.Tensor, steps: int, guidance: float, seed: int
) -> tuple[torch.Tensor, float]:
    """(slices (N, 1, H, W), seconds) for one sampler setting at positions ``z``."""
    started = time.perf_counter()
    images, _ = sample(model, z, 1, seed, steps=steps, guidance=guidance, sampler=sampler)
    return images, time.perf_counter() - started


def within(row: dict[str, Any], ref: dict[str, Any], tolerance: float) -> bool:
    """Whether ``row``'s fd_alex and z-probe MAE are both within ``tolerance`` of ``ref``'s."""
    return bool(
        row["fd_alex"] <= ref["fd_alex"] * (1 + tolerance)
        and row["zprobe_mae"] <= ref["zprobe_mae"] * (1 + tolerance)
    )


def recommend(rows: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """Per sampler, the fewest steps within ``tolerance`` of the most-step DDIM row; and the
    fastest (highest slices/s) of those settings.

    Returns:
        ``{"<sampler>": steps or None, ..., "fastest": {"sampler", "steps"} or None}``.
    """
    ref = max((r for r in rows if r["sampler"] == "ddim"), key=lambda r: r["steps"])
    out: dict[str, Any] = {}
    good = []
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        ok = sorted(
            (r for r in rows if r["sampler"] == sampler and within(r, ref, tolerance)),
            key=lambda r: r["steps"],
        )
        out[sampler] = ok[0]["steps"] if ok else None
        good += ok[:1]
    best = max(good, key=lambda r: r["slices_per_s"]) if good else None
    out["fastest"] = {"sampler": best["sampler"], "steps": best["steps"]} if best else None
    return out


def read_recommendation(path: Path) -> tuple[Sampler, int] | None:
    """The fastest quality-matched setting a written study recommends.

    Args:
        path: a ``sampling_steps.json`` this module wrote.

    Returns:
        ``(sampler, steps)``, or None when the file is missing, no setting was within the
        tolerance, or its sampler is not one of ours.

    Raises:
        InputError: the file is not such a report.
    """
    if not path.is_file():
        return None
    try:
        fastest = json.loads(path.read_text())["summary"]["recommended"]["fastest"]
        if not fastest or fastest["sampler"] not in SAMPLERS:
            return None
        return fastest["sampler"], int(fastest["steps"])
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{path} is not a report of benchmarks.sampling_steps") from None


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The study as a Markdown table plus its conclusion."""
    lines = [
        "# LDM sampling steps (demo stand-in cohort, test-split z levels)",
        "",
        f"Reference: DDIM, {summary['reference_steps']} steps; tolerance "
        f"{summary['tolerance']:.0%}; guidance {summary['guidance']}; "
        f"{summary['n_samples']} slices per setting; device {summary['device']}.",
        "",
        "| sampler | steps | fd_alex | vs ref | z-probe MAE | vs ref | slices/s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['sampler']} | {r['steps']} | {r['fd_alex']:.2f} | {r['fd_ratio']:.3f} "
        f"| {r['zprobe_mae']:.3f} | {r['zprobe_ratio']:.3f} | {r['slices_per_s']:.2f} |"
        for r in rows
    ]
    rec = summary["recommended"]
    lines += [
        "",
        "Fewest steps within the tolerance: "
        + ", ".join(f"{k} {v}" for k, v in rec.items() if k != "fastest"),
        "",
    ]
    if rec["fastest"]:
        fastest = rec["fastest"]
        lines += [
            f"Fastest of those: **`ldm.sampler: {fastest['sampler']}`, "
            f"`ldm.sample_steps: {fastest['steps']}`**",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    """Run the study and write the tables."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampling_steps")
    parser.add_argument("--steps", default="10,15,20,30,50", help="step counts (comma list)")
    parser.add_argument("--samplers", default="ddim,pndm", help=f"any of {','.join(SAMPLERS)}")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    steps = sorted(int(s) for s in args.steps.split(","))
    samplers = [s for s in args.samplers.split(",") if s]
    unknown = set(samplers) - set(SAMPLERS)
    if unknown or "ddim" not in samplers:
        parser.error(f"--samplers must include ddim and only name {SAMPLERS}; got {samplers}")

    params = load_params()
    device = resolve_device(args.device)
    model = load_generator(args.models / "ldm.pt", device)
    probe, _ = load_probe(args.models / "zprobe.pt", device)
    real = EvalData.from_dataset(SliceDataset(args.data / "test"))
    real_features = alex_features(real.image, device=device)
    guidance = model.config.guidance
    n_slices = params.prepare.n_slices
    z = real.z.float()
    rows: list[dict[str, Any]] = []
    console = Console()
    for sampler in samplers:
        for n in steps:
            images, seconds = generate(model, sampler, z, n, guidance, args.seed)
            rows.append(
                {
                    "sampler": sampler,
                    "steps": n,
                    "fd_alex": fd_alex(real_features, alex_features(images, device=device)),
                    "zprobe_mae": float(zprobe_errors(probe, images, z, n_slices).mean()),
                    "slices_per_s": len(z) / seconds,
                }
            )
            console.log(rows[-1])
    ref = max((r for r in rows if r["sampler"] == "ddim"), key=lambda r: r["steps"])
    for r in rows:
        r["fd_ratio"] = r["fd_alex"] / ref["fd_alex"]
        r["zprobe_ratio"] = r["zprobe_mae"] / ref["zprobe_mae"]
    summary = {
        "reference_steps": ref["steps"],
        "tolerance": args.tolerance,
        "guidance": guidance,
        "n_samples": len(z),
        "device": str(device),
        "recommended": recommend(rows, args.tolerance),
        "real_zprobe_mae": float(zprobe_errors(probe, real.image, z, n_slices).mean()),
        "real_split_halves_fd_alex": fd_alex(real_features[::2], real_features[1::2]),
    }
    table = Table(title="LDM sampling steps")
    for col in ("sampler", "steps", "fd_alex", "vs ref", "z-probe MAE", "vs ref", "slices/s"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["sampler"],
            str(r["steps"]),
            f"{r['fd_alex']:.2f}",
            f"{r['fd_ratio']:.3f}",
            f"{r['zprobe_mae']:.3f}",
            f"{r['zprobe_ratio']:.3f}",
            f"{r['slices_per_s']:.2f}",
        )
    console.print(table)
    console.print(f"recommended: {summary['recommended']}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "sampling_steps.json", {"summary": summary, "rows": rows})
    write_text(args.out / "sampling_steps.md", markdown(rows, summary))


if __name__ == "__main__":
    main()
