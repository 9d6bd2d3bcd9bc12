"""DVC stage ``generate``: the default synthetic set (``braingen generate`` with params).

Usage::

    python -m stages.generate

Reads ``params.yaml`` (generate, device) and ``models/<generate.model>.pt``; writes
``<generate.out_dir>/`` (one file per slice and ``manifest.csv``). Existing files of the same
request are replaced (``dvc repro`` empties the folder first anyway).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_params
from pipeline.generate import generate
from pipeline.stage import main
from pipeline.tracking import StageRun


def run() -> None:
    """Generate the default request and log its size and speed."""
    params = load_params()
    cfg = params.generate
    with StageRun("generate", {"generate": cfg.model_dump(mode="json")}) as tracking:
        result = generate(
            Path("models") / f"{cfg.model}.pt",
            cfg.z,
            per_z=cfg.per_z,
            seed=cfg.seed,
            out_dir=cfg.out_dir,
            fmt=cfg.format,
            overwrite=True,
            device=params.device,
        )
        tracking.log_metrics(
            {
                "slices": result.slices,
                "seconds": result.seconds,
                "slices_per_s": result.slices / max(result.seconds, 1e-9),
            }
        )


if __name__ == "__main__":
    main(run)
