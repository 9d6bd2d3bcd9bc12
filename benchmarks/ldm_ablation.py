"""Which LDM recipe lever moves realism: one change at a time, same budget, same seeds.

Every arm retrains the latent diffusion model on the committed latents
(``data/latents/<ldm.latent_source>``) with the demo profile plus one override, for the same
number of optimizer steps (by default the demo's ``ldm.train.steps``) and the same seed,
then samples as ``evaluate`` does (as many slices per z as the test split holds, on z alone,
the model's default sampler) and is scored like a generator in ``evaluate``: fd_alex,
precision/recall, the z-probe MAE, and the classifier two-sample test (raw and blurred,
:mod:`pipeline.metrics.c2st`, judge trained on the training split against
``evaluate.c2st.train_samples`` slices of the arm).

Sampling-only arms (``sample_overrides``) reuse the baseline's model file, so they cost no
training. A decoder check decodes the real test latents with added Gaussian noise: if a small
error in the latent already shows as mottled texture, the first stage, not the LDM, sets the
limit.

Usage::

    python -m benchmarks.ldm_ablation [--steps N] [--arms baseline,uniform_loss,...]
                                      [--out reports] [--work ablation]

Needs ``data/prepared``, ``data/latents`` and ``models/{ae_vaegan,zprobe}.pt`` from
``dvc repro``. Writes ``<out>/ldm_ablation.{json,md}`` and ``<out>/ldm_ablation.png`` (a
row per arm, labelled, under real test slices at the same levels); model files go
to ``<work>``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from pipeline.core.config import Params, load_params
from pipeline.core.device import resolve_device
from pipeline.core.figures import figure_image, grid, save_png
from pipeline.core.identity import stage_identity
from pipeline.core.io import write_json, write_text
from pipeline.core.stage import StagePaths
from pipeline.core.tracking import StageRun
from pipeline.data.datasets import EvalData
from pipeline.data.latents import latents_identity
from pipeline.evaluation.evaluate import (
    EvalContext,
    EvaluatePaths,
    generate_like,
    judge_jobs,
    run_judges,
    set_figures,
)
from pipeline.inference.sampling import load_generator, sample, sample_slices
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


def score(
    images: torch.Tensor,
    index: torch.Tensor,
    judge_fakes: torch.Tensor,
    ctx: dict[str, Any],
) -> dict[str, Any]:
    """evaluate's generator figures plus the C2ST AUCs of one arm's samples."""
    figures, _ = set_figures(ctx["real"], images, index, **ctx["scoring"])
    jobs = judge_jobs(
        "arm", ctx["train"].image, judge_fakes, ctx["real"].image, images, **ctx["judging"]
    )
    judged = {job.variant: r for job, r in zip(jobs, run_judges(jobs, ctx["device"]), strict=True)}
    return {
        **{k: figures[k] for k in ("fd_alex", "precision", "recall", "zprobe_mae")},
        "c2st_raw": judged["raw"].auc,
        "c2st_blur": judged["blur"].auc,
    }


def scoring_context(params: Params, device: torch.device) -> dict[str, Any]:
    """What scoring a model needs, from ``evaluate``'s own
    :class:`~pipeline.evaluation.evaluate.EvalContext`: the real test and training splits (and
    the test manifest), ``evaluate``'s settings (``measuring`` for :func:`real_figures`,
    ``scoring`` for :func:`set_figures`, ``judging`` for the judges), and the training rows
    the judges' synthetic slices are made at (``judge_rows``)."""
    ctx = EvalContext.build(params, EvaluatePaths.standard(params.data.prepared_dir), device)
    return {
        "real": ctx.real,
        "train": ctx.train,
        "test_manifest": ctx.test_manifest,
        "device": device,
        "n_slices": ctx.n_slices,
        "seed": ctx.seed,
        "judge_rows": ctx.judge_rows,
        "measuring": ctx.measuring,
        "scoring": ctx.scoring,
        "judging": ctx.judging,
    }


def train_arm(arm: Params, name: str, work: Path, device: torch.device) -> tuple[Path, float]:
    """Train the LDM of ``arm`` (tracking off) into ``<work>/ldm_<name>.pt``.

    Returns:
        (the model file, training seconds).
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
    started = time.perf_counter()
    with StageRun("ldm_ablation", identity, enabled=False) as run:
        train_ldm(arm, run=run, device=device, paths=paths, identity=identity)
    return paths.model, time.perf_counter() - started


def score_model(model: Path, ctx: dict[str, Any]) -> dict[str, Any]:
    """:func:`score` of a model file's slices, made as ``evaluate`` makes them on z alone:
    one per test slice, and one per judge training row."""
    real, train, n_slices, seed = ctx["real"], ctx["train"], ctx["n_slices"], ctx["seed"]
    generator = load_generator(model, ctx["device"])
    made, _ = generate_like(generator, real.z_index, n_slices, seed)
    fakes, _ = generate_like(generator, train.z_index[ctx["judge_rows"]], n_slices, seed + 1)
    return score(made.images, real.z_index, fakes.images, ctx)


def decoder_check(ctx: dict[str, Any], latents_dir: Path, params: Params) -> list[dict[str, Any]]:
    """fd_alex of real test latents decoded with added noise, by noise level."""
    gm = load_generator(ctx["model"], ctx["device"])
    latents = torch.from_numpy(np.load(latents_dir / "test" / "latents.npy"))
    real = ctx["real"]
    rows = []
    gen = torch.Generator().manual_seed(params.seed)
    for sigma in LATENT_NOISE:
        noisy = latents + sigma * torch.randn(latents.shape, generator=gen)
        with torch.no_grad():
            decoded = gm.codec.decode_stage_2_outputs(
                noisy.to(ctx["device"]), real.z.to(ctx["device"])
            )
        decoded = decoded.float().cpu().clamp(0, 1)
        rows.append(
            {
                "latent_noise": sigma,
                "fd_alex": fd_alex(ctx["scoring"]["real_features"], alex_features(decoded)),
            }
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


def main() -> None:
    """Train and score every arm; write the table, the JSON and the figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="default: ldm.train.steps")
    parser.add_argument("--arms", default=",".join([*ARMS, *SAMPLE_ARMS]))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--work", type=Path, default=Path("ablation"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    wanted = args.arms.split(",")
    unknown = sorted(set(wanted) - set(ARMS) - set(SAMPLE_ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {[*ARMS, *SAMPLE_ARMS]}")

    params = load_params()
    args.steps = args.steps or params.ldm.train.steps
    device = resolve_device(args.device)
    n_slices, seed = params.prepare.n_slices, params.seed
    ctx = scoring_context(params, device)
    real, train, judge_rows = ctx["real"], ctx["train"], ctx["judge_rows"]
    latents_dir = Path("data/latents") / params.ldm.latent_source
    results: dict[str, Any] = {"steps": args.steps, "seed": seed, "arms": {}}
    shown: dict[str, torch.Tensor] = {}
    levels = z_from_index(
        torch.tensor([round(f * (n_slices - 1)) for f in FIGURE_LEVELS]).float(), n_slices
    )
    console = Console()
    for name in [a for a in wanted if a in ARMS]:
        arm = arm_params(params, ARMS[name], args.steps)
        model, seconds = train_arm(arm, name, args.work, device)
        ctx["model"] = model
        results["arms"][name] = {"overrides": ARMS[name], "train_seconds": seconds}
        results["arms"][name] |= score_model(model, ctx)
        shown[name], _ = sample(load_generator(model, device), levels, 2, seed)
        console.print(name, results["arms"][name])
    base = args.work / "ldm_baseline.pt"
    for name in [a for a in wanted if a in SAMPLE_ARMS]:
        if not base.is_file():
            parser.error("sampling-only arms need the baseline arm (train it first)")
        gm = load_generator(base, device)
        over = SAMPLE_ARMS[name]
        pool = sample_slices(gm, z_from_index(real.z_index.float(), n_slices), seed, **over)
        judge_z = z_from_index(train.z_index[judge_rows].float(), n_slices)
        fakes = sample_slices(gm, judge_z, seed + 1, **over).images
        results["arms"][name] = {"sampling": over} | score(pool.images, real.z_index, fakes, ctx)
        shown[name], _ = sample(gm, levels, 2, seed, **over)
        console.print(name, results["arms"][name])
    if base.is_file():
        ctx["model"] = base
        results["decoder_check"] = decoder_check(ctx, latents_dir, params)

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "ldm_ablation.json", results)
    save_png(figure(shown, real, n_slices), args.out / "ldm_ablation.png")
    table = Table(title=f"LDM ablation ({args.steps} steps, seed {seed}; stand-in test split)")
    columns = (
        "fd_alex",
        "precision",
        "recall",
        "zprobe_mae",
        "c2st_raw",
        "c2st_blur",
        "train_seconds",
    )
    for col in ("arm", *columns):
        table.add_column(col)
    lines = [
        f"# LDM ablation: {args.steps} training steps per arm, seed {seed} (stand-in cohort)",
        "",
        "| arm | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for name, row in results["arms"].items():
        cells = [f"{row[c]:.3g}" if c in row else "-" for c in columns]
        table.add_row(name, *cells)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "decoder_check" in results:
        lines += ["", "Decoder check: real test latents + Gaussian noise (latent std units)", ""]
        lines += ["| latent noise | fd_alex |", "|---|---|"]
        lines += [
            f"| {r['latent_noise']:g} | {r['fd_alex']:.3g} |" for r in results["decoder_check"]
        ]
    write_text(args.out / "ldm_ablation.md", "\n".join(lines) + "\n")
    console.print(table)


if __name__ == "__main__":
    main()
