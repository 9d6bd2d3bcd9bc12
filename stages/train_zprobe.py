"""DVC stage ``train_zprobe``: the z-index probe, the independent judge of z-conditioning.

Usage::

    python -m stages.train_zprobe

Reads ``params.yaml`` (zprobe, prepare.n_slices, seed, device) and ``data/prepared``; writes
``models/zprobe.pt``, ``reports/zprobe.json`` (test MAE in slice units: the floor that
generated slices are compared with) and ``reports/zprobe_scatter.png``.
"""

from __future__ import annotations

from pipeline.config import load_params
from pipeline.stage import StagePaths, main
from pipeline.tracking import StageRun
from pipeline.training import resolve_device
from pipeline.zprobe import train_zprobe


def run() -> None:
    """Train the probe and report its floor."""
    params = load_params()
    device = resolve_device(params.device)
    paths = StagePaths.standard("zprobe", "zprobe", "zprobe_scatter.png")
    with StageRun("train_zprobe", params.tracked("zprobe"), run_name="zprobe") as tracking:
        train_zprobe(params, run=tracking, device=device, paths=paths)


if __name__ == "__main__":
    main(run)
