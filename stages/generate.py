"""DVC stage ``generate``: the default synthetic set (``braingen generate`` with params).

Usage::

    python -m stages.generate

Reads ``params.yaml`` (generate, device; with ``generate.novelty`` also evaluate.novelty and
data.prepared_dir) and ``models/<generate.model>.pt``; writes ``<generate.out_dir>/`` (one file
per slice and ``manifest.csv``). Existing files of the same request are replaced (``dvc repro``
empties the folder first anyway). The run lists the registered versions of the generator and
its first stage as model inputs (:func:`pipeline.core.registry.link_generator`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.config import load_params
from pipeline.core.identity import stage_identity
from pipeline.core.registry import link_generator
from pipeline.core.stage import main
from pipeline.core.tracking import StageRun
from pipeline.inference.generate import NoveltySettings, generate


def run() -> None:
    """Generate the default request and log its size and speed."""
    params = load_params()
    cfg = params.generate
    model = Path("models") / f"{cfg.model}.pt"
    with StageRun("generate", stage_identity(params, "generate")) as tracking:
        link_generator(tracking, model)
        result = generate(
            model,
            cfg.z,
            per_z=cfg.per_z,
            seed=cfg.seed,
            out_dir=cfg.out_dir,
            fmt=cfg.format,
            overwrite=True,
            device=params.device,
            novelty=(
                NoveltySettings(Path(params.data.prepared_dir), params.evaluate.novelty)
                if cfg.novelty
                else None
            ),
            masks=cfg.masks,
            spec=cfg.spec,
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
