"""DVC stage ``train_zprobe``: the z-index probe, the independent judge of z-conditioning.

Usage::

    python -m stages.train_zprobe
    torchrun --standalone --nproc_per_node N -m stages.train_zprobe
    BRAINGEN_NPROC=N python -m stages.train_zprobe   # the same, via torchrun

Reads ``params.yaml`` (zprobe, prepare.n_slices, seed, device) and ``data/prepared``; writes
``models/zprobe.pt``, ``reports/zprobe.json`` (test MAE in slice units: the floor that
generated slices are compared with) and ``reports/zprobe_scatter.png``.
"""

from __future__ import annotations

from pipeline.core import distributed
from pipeline.core.config import load_params
from pipeline.core.identity import stage_identity
from pipeline.core.registry import model_run
from pipeline.core.stage import StagePaths, main
from pipeline.training.zprobe import train_zprobe


def run() -> None:
    """Train the probe and report its floor."""
    distributed.relaunch_with_torchrun("stages.train_zprobe", [])
    params = load_params()
    paths = StagePaths.standard("zprobe", "zprobe", "zprobe_scatter.png")
    identity = stage_identity(params, "train_zprobe")
    with (
        distributed.session(params.device) as device,
        model_run(
            "train_zprobe",
            identity,
            run_name="zprobe",
            datasets=params.data.prepared_dir,
            model=paths.model,
        ) as tracking,
    ):
        train_zprobe(params, run=tracking, device=device, paths=paths, identity=identity)


if __name__ == "__main__":
    main(run)
