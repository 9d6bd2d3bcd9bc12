"""DVC stage ``train_autoencoder@<kind>``: train the z-conditioned first stage of one kind.

Usage::

    python -m stages.train_autoencoder vqvae|vaegan

Reads ``params.yaml`` (autoencoder, conditioning, data, prepare, seed, device) and
``data/prepared/{train,val,test}``; writes ``models/ae_<kind>.pt``, ``reports/ae_<kind>.json``
(test-split metrics, per z and with a shuffled z) and ``reports/ae_<kind>_recon.png``.
"""

from __future__ import annotations

import argparse

from pipeline.config import load_params
from pipeline.first_stage import stage_params, train_first_stage
from pipeline.models.autoencoder import KINDS
from pipeline.stage import StagePaths, main
from pipeline.tracking import StageRun
from pipeline.training import resolve_device


def run() -> None:
    """Parse the kind, train, export and evaluate."""
    parser = argparse.ArgumentParser(prog="python -m stages.train_autoencoder")
    parser.add_argument("kind", choices=KINDS, help="autoencoder kind to train")
    kind = parser.parse_args().kind
    params = load_params()
    device = resolve_device(params.device)
    with StageRun("train_autoencoder", stage_params(params, kind), run_name=f"ae_{kind}") as run:
        train_first_stage(
            params,
            kind,
            run=run,
            device=device,
            paths=StagePaths.standard(f"ae_{kind}", f"ae_{kind}", f"ae_{kind}_recon.png"),
        )


if __name__ == "__main__":
    main(run)
