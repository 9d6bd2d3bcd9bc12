"""Which LDM recipe lever moves realism: one change at a time, same budget, same seeds.

Every arm retrains the latent diffusion model on the committed latents
(``data/latents/<ldm.latent_source>``) with the demo profile plus one override, for the same
number of optimizer steps (by default the demo's ``ldm.train.steps``) and the same training
seed, then is scored exactly as ``evaluate`` scores the demo LDM, over several sampling seeds
(:func:`benchmarks.scoring.score_seeds`: slices at the test slices' own z and covariates,
fd_alex, precision / recall, the z-probe, the raw and blurred judges, the copy-like fraction
and the label probes, each seed judged against the report's bars). So every row reads on the
scale of ``reports/metrics.json``, and the baseline row at the demo's steps is the demo LDM's
figures up to the training run's own numerics.

Sampling-only arms (``SAMPLE_ARMS``) reuse the baseline's model file, so they cost no
training. A decoder check decodes the real test latents with added Gaussian noise: if a small
error in the latent already shows as mottled texture, the first stage, not the LDM, sets the
limit.

Nothing is lost when a run is killed: the report is rewritten after every arm, an arm whose
model file, training report and settings hash are in ``<work>`` is scored without training
again, and a killed training resumes from its checkpoint.

Usage::

    python -m benchmarks.ldm_ablation [--steps N] [--arms baseline,uniform_loss,...]
                                      [--seeds 0,1,2] [--out reports] [--work ablation]

Needs ``data/prepared``, ``data/latents``, ``models/`` and ``reports/metrics.json`` from
``dvc repro``. Writes ``<out>/ldm_ablation.{json,md}`` and ``<out>/ldm_ablation.png`` (a row
per arm, labelled, under real test slices at the same levels); model files go to ``<work>``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from rich.console import Console

from benchmarks.scoring import Scoring, score_seeds, scoring, scoring_arguments, table
from pipeline.core.config import Params
from pipeline.core.errors import InputError
from pipeline.core.figures import figure_image, grid, save_png
from pipeline.core.identity import stage_identity
from pipeline.core.io import write_json, write_text
from pipeline.core.stage import StagePaths
from pipeline.core.stage import main as run_command
from pipeline.core.tracking import StageRun, params_hash
from pipeline.data.datasets import EvalData
from pipeline.data.latents import latents_identity
from pipeline.evaluation.evaluate import EvalContext
from pipeline.inference.sampling import GeneratorModel, load_generator, sample
from pipeline.metrics.quality import alex_features, fd_alex
from pipeline.models.conditioning import z_from_index
from pipeline.training.ldm import train_ldm

#: Training arms: name -> ``ldm`` overrides (one change from the baseline each).
ARMS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "uniform_loss": {"loss_weighting": "uniform"},  # the demo's weighting is min-SNR-γ
    "zero_terminal_snr": {"zero_terminal_snr": True, "sampler": "ddim", "sample_steps": 50},
    "mirror": {"mirror_latents": True},
    # The latents the UNet learns: the posterior means (decoded with the full posterior std
    # added) instead of the demo's posterior samples.
    "posterior_means": {"posterior_samples": False, "decode_posterior_std": 1.0},
    "epsilon": {"prediction_type": "epsilon"},
    # Capacity at the same number of steps (each step costs more: see train_seconds).
    "res_blocks_2": {"num_res_blocks": 2},
    "attention_all": {"attention_levels": (True, True, True)},
    # The transformer blocks of the UNet before (cross-attention to the one condition token
    # and a feed-forward; 1.6-1.7x the time per step): the demo has self-attention blocks.
    "cross_attention": {"cross_attention": True},
    # The first stage: diffuse the VQ-VAE's quantised latents (8 channels) instead.
    "vqvae_latents": {"latent_source": "vqvae"},
    # The UNet also sees its own previous clean-latent estimate (Chen et al. 2023).
    "self_condition": {"self_condition": True},
}
#: Sampling-only arms on the baseline model: name -> sampling overrides.
SAMPLE_ARMS: dict[str, dict[str, Any]] = {
    "ddim_50": {"sampler": "ddim", "steps": 50},
    "guidance_1": {"guidance": 1.0},
    "guidance_4": {"guidance": 4.0},
}
#: Standard deviations (latent units, the LDM's unit-variance scale) of the decoder check.
LATENT_NOISE = (0.0, 0.1, 0.2, 0.4)
#: Levels (rows' z indices as fractions of K - 1) shown in the figure.
FIGURE_LEVELS = (0.3, 0.5, 0.7)
#: Width (px) of the figure's left margin, where the row names go.
LABEL_MARGIN = 140


def arm_params(params: Params, overrides: dict[str, Any], steps: int) -> Params:
    """The demo params with ``ldm`` overrides and ``steps`` training steps."""
    train = params.ldm.train.model_copy(update={"steps": steps, "eval_every": steps})
    ldm = params.ldm.model_copy(update={**overrides, "train": train})
    return params.model_copy(update={"ldm": type(params.ldm).model_validate(ldm.model_dump())})


def train_arm(arm: Params, name: str, work: Path, device: torch.device) -> tuple[Path, float]:
    """Train the LDM of ``arm`` (tracking off) into ``<work>/ldm_<name>.pt``, or reuse it.

    An arm already trained in ``<work>`` with the same settings (its model file, its training
    report and ``ldm_<name>.hash``, the hash of the stage's identity, all present and the hash
    equal) is not trained again: a killed run resumes where it stopped.

    Returns:
        (the model file, training seconds, from the training report).
    """
    latents_dir = Path("data/latents") / arm.ldm.latent_source
    paths = StagePaths(
        model=work / f"ldm_{name}.pt",
        report=work / f"ldm_{name}.json",
        grid=work / f"ldm_{name}.png",
        resume_dir=work / "checkpoints" / name,
        latents=latents_dir,
    )
    identity = stage_identity(arm, "train_ldm", **latents_identity(latents_dir))
    stamp, digest = work / f"ldm_{name}.hash", params_hash(identity)
    done = paths.model.is_file() and paths.report.is_file() and stamp.is_file()
    if not (done and stamp.read_text().strip() == digest):
        stamp.unlink(missing_ok=True)
        with StageRun("ldm_ablation", identity, enabled=False) as run:
            train_ldm(arm, run=run, device=device, paths=paths, identity=identity)
        stamp.write_text(digest + "\n")
    return paths.model, float(json.loads(paths.report.read_text())["train_seconds"])


def score_arm(generator: GeneratorModel, run: Scoring) -> dict[str, Any]:
    """One arm scored as ``evaluate`` scores the LDM, on each of ``run.seeds``
    (:func:`benchmarks.scoring.score_seeds`): ``{seeds, summary}``."""
    return score_seeds("ldm", generator, run.seeds, ctx=run.ctx, metrics=run.metrics)


def figure_levels(n_slices: int) -> torch.Tensor:
    """(len(FIGURE_LEVELS),) z of the levels the figure shows."""
    index = torch.tensor([round(f * (n_slices - 1)) for f in FIGURE_LEVELS]).float()
    return z_from_index(index, n_slices)


def decoder_check(model: Path, ctx: EvalContext, latents_dir: Path, seed: int) -> list[dict]:
    """fd_alex of the real test latents decoded with added noise, by noise level.

    Args:
        model: an LDM file (its codec decodes).
        ctx: the scoring context (the test split, its AlexNet features).
        latents_dir: ``data/latents/<source>`` (its ``test/latents.npy``: (N, C, h, w)).
        seed: seeds the added noise.
    """
    codec = load_generator(model, ctx.device).codec
    latents = torch.from_numpy(np.load(latents_dir / "test" / "latents.npy"))
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for sigma in LATENT_NOISE:
        noisy = latents + sigma * torch.randn(latents.shape, generator=gen)
        with torch.no_grad():
            decoded = codec.decode_stage_2_outputs(noisy.to(ctx.device), ctx.real.z.to(ctx.device))
        decoded = decoded.float().cpu().clamp(0, 1)
        rows.append(
            {"latent_noise": sigma, "fd_alex": fd_alex(ctx.real_features, alex_features(decoded))}
        )
    return rows


def figure(rows: dict[str, torch.Tensor], real: EvalData, n_slices: int) -> np.ndarray:
    """Real test slices (top row) then one row per arm, each labelled with its name.

    Args:
        rows: arm -> (2 * len(FIGURE_LEVELS), 1, H, W) samples, two per level in order.
        real: the real test split.
        n_slices: K.

    Returns:
        (H', W', 3) uint8 array: the tiles at full resolution (one figure pixel per image
        pixel, no resampling) with the row names in a left margin.
    """
    levels = [round(f * (n_slices - 1)) for f in FIGURE_LEVELS]
    real_row = torch.cat([real.image[real.z_index == level][:2] for level in levels])
    tiles = grid(torch.cat([real_row, *rows.values()]), ncol=len(real_row))
    names = ["real test", *rows]
    margin, dpi = LABEL_MARGIN, 100
    height, width = tiles.shape
    fig = Figure(figsize=((width + margin) / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((margin / (width + margin), 0.0, width / (width + margin), 1.0))
    ax.imshow(tiles, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(i + 0.5) * height / len(names) for i in range(len(names))], names, fontsize=8)
    return figure_image(fig)


def markdown(results: Mapping[str, Any], seeds: Sequence[int]) -> str:
    """The report: what was run, the arms' table (means over seeds, ranges in brackets, the
    bars each arm fell short of), each arm's training time and the decoder check."""
    arms = results["arms"]
    lines = [
        f"# LDM ablation: {results['steps']} training steps per arm, training seed "
        f"{results['seed']} (stand-in cohort where the data is the demo's)",
        "",
        "One change from the demo recipe per arm (`benchmarks/ldm_ablation.py`), scored as "
        f"`evaluate` scores the LDM over sampling seeds {', '.join(map(str, seeds))}: the mean, "
        "with the range in brackets.",
        "",
        *table(arms, first="arm"),
        "",
        "| arm | change | training s |",
        "|---|---|---|",
    ]
    for name, row in arms.items():
        change = row.get("overrides", row.get("sampling"))
        seconds = f"{row['train_seconds']:.0f}" if "train_seconds" in row else "(baseline model)"
        lines.append(f"| {name} | `{change}` | {seconds} |")
    if "decoder_check" in results:
        lines += ["", "Decoder check: real test latents + Gaussian noise (latent std units)", ""]
        lines += ["| latent noise | fd_alex |", "|---|---|"]
        lines += [
            f"| {r['latent_noise']:g} | {r['fd_alex']:.3g} |" for r in results["decoder_check"]
        ]
    return "\n".join(lines) + "\n"


def write_report(
    out: Path, results: Mapping[str, Any], shown: dict[str, torch.Tensor], run: Scoring
) -> None:
    """Write ``<out>/ldm_ablation.{json,md,png}`` (called after every arm)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "ldm_ablation.json", {**results, "seeds": run.seeds})
    write_text(out / "ldm_ablation.md", markdown(results, run.seeds))
    save_png(figure(shown, run.ctx.real, run.ctx.n_slices), out / "ldm_ablation.png")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train and score every arm; write the table, the JSON and the figure."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ldm_ablation")
    parser.add_argument("--steps", type=int, default=None, help="default: ldm.train.steps")
    parser.add_argument("--arms", default=",".join([*ARMS, *SAMPLE_ARMS]))
    parser.add_argument("--work", type=Path, default=Path("ablation"))
    scoring_arguments(parser, seeds="0,1,2")
    args = parser.parse_args(argv)
    wanted = args.arms.split(",")
    unknown = sorted(set(wanted) - set(ARMS) - set(SAMPLE_ARMS))
    if unknown:
        raise InputError(f"unknown arms {unknown}; choose from {[*ARMS, *SAMPLE_ARMS]}")
    base = args.work / "ldm_baseline.pt"
    if any(a in SAMPLE_ARMS for a in wanted) and "baseline" not in wanted and not base.is_file():
        raise InputError("sampling-only arms need the baseline arm (add baseline to --arms)")

    run = scoring(args)
    params, device, seed = run.params, run.ctx.device, run.params.seed
    steps = args.steps or params.ldm.train.steps
    results: dict[str, Any] = {"steps": steps, "seed": seed, "arms": {}}
    shown: dict[str, torch.Tensor] = {}
    levels = figure_levels(run.ctx.n_slices)
    console = Console()
    for name in [a for a in wanted if a in ARMS]:
        model, seconds = train_arm(arm_params(params, ARMS[name], steps), name, args.work, device)
        generator = load_generator(model, device)
        results["arms"][name] = {"overrides": ARMS[name], "train_seconds": seconds}
        results["arms"][name] |= score_arm(generator, run)
        shown[name], _ = sample(generator, levels, 2, seed)
        write_report(args.out, results, shown, run)
        console.print(name, results["arms"][name]["summary"]["figures"])
    for name in [a for a in wanted if a in SAMPLE_ARMS]:
        generator = load_generator(base, device).with_defaults(**SAMPLE_ARMS[name])
        results["arms"][name] = {"sampling": SAMPLE_ARMS[name]} | score_arm(generator, run)
        shown[name], _ = sample(generator, levels, 2, seed)
        write_report(args.out, results, shown, run)
        console.print(name, results["arms"][name]["summary"]["figures"])
    if base.is_file():
        latents_dir = Path("data/latents") / params.ldm.latent_source
        results["decoder_check"] = decoder_check(base, run.ctx, latents_dir, seed)
    write_report(args.out, results, shown, run)
    console.print(markdown(results, run.seeds))
    return results


if __name__ == "__main__":
    run_command(main)
