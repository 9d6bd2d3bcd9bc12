"""Training script for tests/test_distributed.py: run directly (one process) or under torchrun.

Trains a tiny z-conditioned VQ-VAE with its PatchGAN (adversarial loss and VQGAN adaptive
weight from step 2, weight EMA) on fixed random slices through :func:`pipeline.training.loop.fit`.
Every rank writes ``rank<r>.pt`` (its parameters and codebook buffers) and the ranks that
evaluate write ``evaluated_rank<r>``; rank 0 writes ``result.json``.

Usage::

    python tests/ddp_worker.py OUT [--steps 6] [--crash-at K] [--dead-code 0.0]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from pipeline.core import distributed
from pipeline.core.config import (
    AutoencoderConfig,
    ConditioningConfig,
    DiscriminatorConfig,
    TrainConfig,
    VQConfig,
)
from pipeline.core.tracking import StageRun
from pipeline.training.autoencoder import AutoencoderTask
from pipeline.training.loop import fit


class Slices(Dataset):
    """32 fixed random 16x16 slices with their z."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.image = torch.rand(32, 1, 16, 16, generator=gen)
        self.z = torch.rand(32, generator=gen)

    def __len__(self) -> int:
        return len(self.z)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.image[i], "z": self.z[i]}


class CrashingTask(AutoencoderTask):
    """Raises at step ``crash_at`` on every rank (a killed run, for the resume test)."""

    crash_at = -1

    def train_step(self, batch, step, optim):  # type: ignore[no-untyped-def]
        if step == self.crash_at:
            raise RuntimeError(f"simulated crash at step {step}")
        return super().train_step(batch, step, optim)


def main() -> None:
    """Train, then write what the test compares."""
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--crash-at", type=int, default=-1)
    parser.add_argument("--dead-code", type=float, default=0.0)
    args = parser.parse_args()
    cfg = AutoencoderConfig(
        channels=(8, 8),
        norm_groups=4,
        perceptual_weight=0.0,
        vq=VQConfig(num_codes=16, code_dim=4, dead_code_threshold=args.dead_code),
        discriminator=DiscriminatorConfig(channels=8, n_layers=2, start_step=2, norm_groups=4),
        train=TrainConfig(
            steps=args.steps,
            batch_size=8,
            lr=1e-3,
            warmup_steps=1,
            ema_decay=0.9,
            ckpt_every=2,
            eval_every=3,
            log_every=1,
        ),
    )
    cond = ConditioningConfig(sinusoidal_dim=16, dim=16)
    with distributed.session("cpu") as device:
        rank = distributed.rank()
        torch.manual_seed(0)
        task = CrashingTask(cfg, cond, "vqvae", None, device)
        task.crash_at = args.crash_at

        def evaluate(step: int, _ema: torch.nn.Module | None) -> dict[str, float]:
            (args.out / f"evaluated_rank{rank}").touch()
            return {"val_dummy": float(step)}

        args.out.mkdir(parents=True, exist_ok=True)
        with StageRun("ddp_test", {"seed": 0}, enabled=distributed.is_main()) as run:
            result = fit(
                task,
                Slices(),
                cfg.train,
                run=run,
                resume_dir=args.out / "checkpoints",
                seed=0,
                device=device,
                evaluate=evaluate,
                config_for_hash={"test": 1},
                progress=False,
            )
        quantizer = task.model.quantizer
        assert quantizer is not None
        params = torch.cat(
            [p.detach().flatten() for m in task.modules.values() for p in m.parameters()]
        )
        torch.save(
            {
                "params": params,
                "codebook": quantizer.codebook,
                "cluster_size": quantizer.cluster_size,
            },
            args.out / f"rank{rank}.pt",
        )
        if distributed.is_main():
            summary = {
                "step": result.step,
                "resumed_from": result.resumed_from,
                "world_size": distributed.world_size(),
            }
            (args.out / "result.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
