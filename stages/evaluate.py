"""DVC stage ``evaluate``: every model's figures on the test split.

Usage::

    python -m stages.evaluate

Reads ``params.yaml`` (evaluate, autoencoder.kinds, prepare.n_slices, seed, device),
``data/prepared/{train,test}`` and ``models/{ae_vqvae,ae_vaegan,pixelcnn,ldm,zprobe}.pt``;
writes ``reports/metrics.json`` (a DVC metric, layout in :mod:`pipeline.evaluation.evaluate`),
``reports/per_z/*.csv`` (per-z curves, a DVC plot), ``reports/eval_per_z.png``,
``reports/c2st_strength.png`` and ``reports/novelty_{ldm,pixelcnn}.png``.
"""

from __future__ import annotations

from pipeline.core.config import GENERATORS, load_params
from pipeline.core.device import resolve_device
from pipeline.core.identity import stage_identity
from pipeline.core.registry import link_models
from pipeline.core.stage import main
from pipeline.core.tracking import StageRun
from pipeline.evaluation.evaluate import EvaluatePaths, evaluate


def run() -> None:
    """Evaluate every model and write the metrics."""
    params = load_params()
    device = resolve_device(params.device)
    paths = EvaluatePaths.standard(params.data.prepared_dir)
    with StageRun("evaluate", stage_identity(params, "evaluate"), run_name="evaluate") as tracking:
        tracking.log_datasets(params.data.prepared_dir, ("train", "test"))
        # figures of each model (metrics "<section>.*") are attached to its registered version
        sections = [*GENERATORS, *(f"ae_{kind}" for kind in params.autoencoder.kinds), "zprobe"]
        link_models(tracking, {name: paths.models / f"{name}.pt" for name in sections})
        evaluate(params, run=tracking, device=device, paths=paths)


if __name__ == "__main__":
    main(run)
