"""Where along its sampling trajectory the LDM loses the anatomy: sampling started from real slices.

``evaluate``'s blurred judge tells the demo LDM's slices from real ones although the latents
it samples have the statistics of real latents (docs/realism_log.md, "Where the LDM loses the
anatomy").
This finds the noise levels at which the anatomy is lost. Each slice ``evaluate`` asks for (at
a test slice's z and covariates) is made not from pure noise but from the latent of a real
training slice at the same level: a posterior sample, as the LDM trains on, noised to
t = strength x (T - 1) and denoised by the LDM with DDIM on its own step spacing
(:func:`pipeline.inference.diffusion.sdedit`, ``round(strength x sample_steps)`` steps, the
model's guidance). Above t the anatomy is a real slice's; below it the model's own steps
draw it. At strength 1 the real latent keeps a weight of sqrt(ᾱ) = 0.01 in the start: plain
DDIM sampling from noise, the reference row. Each strength is scored as ``evaluate`` scores a
generator (:func:`benchmarks.sampling_sweep.score_seeds`), judges included, so the blurred
judge's column reads how far down from t the model's steps keep a real slice's anatomy.

A low strength returns a training slice almost as it is: its copy-like fraction is near 1 by
design, and only the judges matter there. DDIM at eta 0 ends on a smoother latent than the
model's default PNDM sampler (the raw judge sees it), so compare each row with the strength-1
row, not with ``metrics.json``.

Usage::

    python -m benchmarks.real_start [--strengths 0.3,0.5,0.7,1] [--seeds 0,1,2]

Needs what ``benchmarks.sampling_sweep`` needs (``dvc repro`` outputs) and the LDM's
training latents (``data/latents/<ldm.latent_source>/train``). Writes
``<out>/real_start.{json,md,png}``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import patch

import numpy as np
import torch
from rich.console import Console
from torch import nn
from tqdm import tqdm

from benchmarks.scoring import (
    bar_lines,
    curve_figure,
    score_seeds,
    scoring,
    scoring_arguments,
    table,
)
from pipeline.core.errors import InputError
from pipeline.core.figures import save_png
from pipeline.core.io import write_json, write_text
from pipeline.core.stage import main as run_command
from pipeline.data.latents import LatentDataset
from pipeline.inference import sampling
from pipeline.inference.diffusion import build_scheduler, sdedit

#: Columns drawn against the start timestep: (column of the sweep table, panel title).
PANELS = (
    ("judge blurred", "judge AUC, blurred (anatomy)"),
    ("judge raw", "judge AUC, raw (texture)"),
    ("recall", "recall"),
    ("copy-like", "copy-like fraction"),
)


@dataclass
class RealStarts:
    """Real training latents to start sampling from, drawn at the level each request asks for.

    Attributes:
        latents: (N, C, h, w) scaled posterior means of the training slices.
        stds: (N, C, h, w) their posterior stds (scaled), or None (a VQ-VAE's latents).
        levels: (N,) slice index of each, 0..n_slices-1.
        n_slices: levels per volume.
    """

    latents: np.ndarray
    stds: np.ndarray | None
    levels: np.ndarray
    n_slices: int

    @classmethod
    def from_split(cls, split_dir: Path) -> RealStarts:
        """Read ``data/latents/<source>/train`` (``encode_latents``' output)."""
        data = LatentDataset(split_dir)
        return cls(
            np.asarray(data.latents, dtype=np.float32),
            None if data.stds is None else np.asarray(data.stds, dtype=np.float32),
            data.manifest["z_index"].to_numpy(),
            int(data.manifest["n_slices"].iloc[0]),
        )

    def draw(self, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """One posterior sample of a random training slice at each position's nearest level.

        Args:
            z: (B,) positions in [0, 1].
            generator: seeds the choice and the posterior noise (one draw from it).

        Returns:
            (B, C, h, w) scaled latents on z's device.

        Raises:
            InputError: a level without training slices.
        """
        device = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=device))
        rng = np.random.default_rng(seed)
        wanted = np.rint(z.detach().cpu().numpy() * (self.n_slices - 1)).astype(int)
        rows = []
        for level in wanted:
            candidates = np.flatnonzero(self.levels == level)
            if not len(candidates):
                raise InputError(f"no training latent at level {level} to start from")
            rows.append(rng.choice(candidates))
        start = self.latents[rows]
        if self.stds is not None:
            start = start + self.stds[rows] * rng.standard_normal(start.shape, dtype=np.float32)
        return torch.from_numpy(start).to(z.device)

    def sampler(self, strength: float) -> Callable[..., torch.Tensor]:
        """A stand-in for :func:`pipeline.inference.diffusion.guided_sample` that starts each
        sample from :meth:`draw` noised to t = ``strength`` x (T - 1) and denoises it with
        DDIM (:func:`~pipeline.inference.diffusion.sdedit`) at the model's steps and guidance;
        the sampler asked for is not used."""

        def sample(
            unet: nn.Module,
            schedule: dict[str, Any],
            z: torch.Tensor,
            shape: tuple[int, int, int],
            *,
            sampler: str,
            steps: int,
            guidance: float,
            generator: torch.Generator | None,
            guidance_min_t: int = 0,
        ) -> torch.Tensor:
            del shape, sampler  # the start's shape; DDIM whatever the model's default
            return sdedit(
                unet,
                build_scheduler(schedule, "ddim"),
                self.draw(z, generator),
                z,
                strength,
                steps,
                guidance,
                generator,
                guidance_min_t=guidance_min_t,
            )

        return sample


def start_timestep(strength: float, num_train_timesteps: int) -> int:
    """The timestep sampling starts from at ``strength`` (as :func:`sdedit` rounds it)."""
    return round(strength * (num_train_timesteps - 1))


def markdown(results: dict[str, dict[str, Any]], seeds: Sequence[int]) -> str:
    """The report: what was run, then the sweep table (one row per start timestep)."""
    heading = [
        "# Where along its sampling trajectory the LDM loses the anatomy",
        "",
        "Each slice starts from a real training slice's latent at the same level, noised to "
        "t, and is denoised by the LDM with DDIM (`benchmarks/real_start.py`). Scored as "
        "`evaluate` scores the model (stand-in test split where the data is the demo cohort), "
        f"over sampling seeds {', '.join(map(str, seeds))}: the mean, with the range in "
        "brackets. Low t copies training slices by design (copy-like); compare the judges "
        "with the t = 999 row (plain DDIM from noise), not with `metrics.json` (PNDM).",
        "",
    ]
    return "\n".join(heading + table(results, first="start")) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Score the LDM started from real latents at each strength (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_start")
    parser.add_argument("--strengths", default="0.3,0.5,0.7,1", help="comma list in (0, 1]")
    scoring_arguments(parser, seeds="0,1,2")
    args = parser.parse_args(argv)
    strengths = sorted({float(s) for s in args.strengths.split(",") if s.strip()})
    if not strengths or not all(0 < s <= 1 for s in strengths):
        raise InputError(f"--strengths must be numbers in (0, 1], got {args.strengths!r}")
    run = scoring(args)
    ctx, seeds = run.ctx, run.seeds
    generator = sampling.load_generator(run.models / "ldm.pt", ctx.device)
    starts = RealStarts.from_split(Path("data/latents") / run.params.ldm.latent_source / "train")
    total = generator.schedule["num_train_timesteps"]
    timesteps = {s: start_timestep(s, total) for s in strengths}
    rows: dict[float, dict[str, Any]] = {}
    with tqdm(total=len(strengths) * len(seeds), desc="strengths x seeds", unit="run") as bar:
        for strength in strengths:
            # sample_slices draws every LDM latent through sampling.guided_sample: swapping
            # it runs evaluate's scoring unchanged (slices, judges, probes) on real starts
            with patch.object(sampling, "guided_sample", starts.sampler(strength)):
                rows[strength] = score_seeds(
                    "ldm", generator, seeds, ctx=ctx, metrics=run.metrics, bar=bar
                )
    results = {f"t = {timesteps[s]}": rows[s] | {"strength": s} for s in strengths}
    write_json(args.out / "real_start.json", {"seeds": seeds, "results": results})
    figure = curve_figure(
        [timesteps[s] for s in strengths],
        [rows[s]["summary"] for s in strengths],
        PANELS,
        xlabel="t the model's own steps start from (of 1000)",
        bars=bar_lines(run.metrics, "ldm"),
    )
    save_png(figure, args.out / "real_start.png")
    report = markdown(results, seeds)
    write_text(args.out / "real_start.md", report)
    Console().print(report)
    return results


if __name__ == "__main__":
    run_command(main)
