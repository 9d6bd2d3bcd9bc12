"""DVC stage ``train_autoencoder@<kind>``: train the z-conditioned first stage of one kind.

Usage::

    python -m stages.train_autoencoder vqvae|vaegan
    torchrun --standalone --nproc_per_node N -m stages.train_autoencoder vqvae|vaegan
    BRAINGEN_NPROC=N python -m stages.train_autoencoder vqvae|vaegan   # same, via torchrun

Reads ``params.yaml`` (autoencoder, conditioning, data, prepare, seed, device) and
``data/prepared/{train,val,test}``; writes ``models/ae_<kind>.pt``, ``reports/ae_<kind>.json``
(test-split metrics, per z and with a shuffled z) and ``reports/ae_<kind>_recon.png``.
"""

from __future__ import annotations

import argparse

from pipeline import distributed
from pipeline.config import load_params
from pipeline.first_stage import stage_params, train_first_stage
from pipeline.models.autoencoder import KINDS
from pipeline.stage import StagePaths, main
from pipeline.tracking import StageRun


def run(kind: str) -> None:
    """Train, export and evaluate the autoencoder of ``kind`` (``vqvae`` or ``vaegan``)."""
    distributed.relaunch_with_torchrun("stages.train_autoencoder", [kind])
    params = load_params()
    paths = StagePaths.standard(f"ae_{kind}", f"ae_{kind}", f"ae_{kind}_recon.png")
    tracked = stage_params(params, kind)
    with (
        distributed.session(params.device) as device,
        StageRun(
            "train_autoencoder", tracked, run_name=f"ae_{kind}", enabled=distributed.is_main()
        ) as tracking,
    ):
        train_first_stage(params, kind, run=tracking, device=device, paths=paths)


def cli() -> None:
    """Parse the kind from the command line and run."""
    parser = argparse.ArgumentParser(prog="python -m stages.train_autoencoder")
    parser.add_argument("kind", choices=KINDS, help="autoencoder kind to train")
    run(parser.parse_args().kind)


if __name__ == "__main__":
    main(cli)
