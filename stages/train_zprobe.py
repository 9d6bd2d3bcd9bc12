"""DVC stage ``train_zprobe``: the z-index probe, the independent judge of z-conditioning.

Usage::

    python -m stages.train_zprobe

Reads ``params.yaml`` (zprobe, prepare.n_slices, seed, device) and ``data/prepared``; writes
``models/zprobe.pt`` and ``reports/zprobe.json`` (test MAE in slice units: the floor that
generated slices are compared with).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_params
from pipeline.stage import main
from pipeline.tracking import StageRun
from pipeline.training import resolve_device
from pipeline.zprobe import train_zprobe


def run() -> None:
    """Train the probe and report its floor."""
    params = load_params()
    device = resolve_device(params.device)
    stage = {"zprobe": params.zprobe.model_dump(mode="json"), "seed": params.seed}
    with StageRun("train_zprobe", stage, run_name="zprobe") as tracking:
        train_zprobe(
            params,
            run=tracking,
            device=device,
            model_path=Path("models/zprobe.pt"),
            report_path=Path("reports/zprobe.json"),
            resume_dir=Path("checkpoints/zprobe"),
        )


if __name__ == "__main__":
    main(run)
