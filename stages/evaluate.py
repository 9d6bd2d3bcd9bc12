"""DVC stage ``evaluate``: every model's figures on the test split.

Usage::

    python -m stages.evaluate

Reads ``params.yaml`` (evaluate, autoencoder.kinds, prepare.n_slices, seed, device),
``data/prepared/test`` and ``models/{ae_vqvae,ae_vaegan,pixelcnn,ldm,zprobe}.pt``; writes
``reports/metrics.json`` (a DVC metric, layout in :mod:`pipeline.evaluate`),
``reports/per_z/*.csv`` (per-z curves, a DVC plot) and ``reports/eval_per_z.png``.
"""

from __future__ import annotations

from pipeline.config import load_params
from pipeline.evaluate import EvaluatePaths, evaluate
from pipeline.stage import main
from pipeline.tracking import StageRun
from pipeline.training import resolve_device


def run() -> None:
    """Evaluate every model and write the metrics."""
    params = load_params()
    device = resolve_device(params.device)
    paths = EvaluatePaths.standard(params.data.prepared_dir)
    tracked = params.tracked("evaluate") | {"n_slices": params.prepare.n_slices}
    with StageRun("evaluate", tracked, run_name="evaluate") as tracking:
        evaluate(params, run=tracking, device=device, paths=paths)


if __name__ == "__main__":
    main(run)
