"""DVC stage ``train_autoencoder``: train the z-conditioned first stage of every kind.

Usage::

    python -m stages.train_autoencoder                # every kind in autoencoder.kinds
    python -m stages.train_autoencoder vqvae|vaegan   # one kind
    torchrun --standalone --nproc_per_node N -m stages.train_autoencoder vqvae|vaegan
    BRAINGEN_NPROC=N python -m stages.train_autoencoder vqvae|vaegan   # same, via torchrun

Without a kind, each kind trains in a child process of its own, side by side when the
machine has a core (or GPU) per kind (:mod:`pipeline.training.concurrency`, ``BRAINGEN_PARALLEL``).

Reads ``params.yaml`` (autoencoder, conditioning, data, prepare, seed, device) and
``data/prepared/{train,val,test}``; writes ``models/ae_<kind>.pt``, ``reports/ae_<kind>.json``
(test-split metrics, per z and with a shuffled z) and ``reports/ae_<kind>_recon.png``.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core import distributed
from pipeline.core.config import KINDS, load_params
from pipeline.core.device import resolve_device
from pipeline.core.identity import stage_identity
from pipeline.core.registry import model_run
from pipeline.core.stage import StagePaths, main
from pipeline.training.concurrency import Job, run_side_by_side


def run(kind: str) -> None:
    """Train, export and evaluate the autoencoder of ``kind`` (``vqvae`` or ``vaegan``)."""
    # Imported here: the parent of run_all() only starts children, 7 s sooner without MONAI.
    from pipeline.training.autoencoder import train_first_stage

    distributed.relaunch_with_torchrun("stages.train_autoencoder", [kind])
    params = load_params()
    paths = StagePaths.standard(f"ae_{kind}", f"ae_{kind}", f"ae_{kind}_recon.png")
    identity = stage_identity(params, "train_autoencoder", kind=kind)
    with (
        distributed.session(params.device) as device,
        model_run(
            "train_autoencoder",
            identity,
            run_name=f"ae_{kind}",
            datasets=params.data.prepared_dir,
            model=paths.model,
        ) as tracking,
    ):
        train_first_stage(params, kind, run=tracking, device=device, paths=paths, identity=identity)


def run_all() -> None:
    """Train every kind in ``autoencoder.kinds``, each in a child process running :func:`run`."""
    params = load_params()
    jobs = [
        Job(f"ae_{kind}", [sys.executable, "-m", "stages.train_autoencoder", kind])
        for kind in params.autoencoder.kinds
    ]
    run_side_by_side(jobs, resolve_device(params.device))


def cli() -> None:
    """Parse the (optional) kind from the command line and run."""
    parser = argparse.ArgumentParser(prog="python -m stages.train_autoencoder")
    parser.add_argument(
        "kind", nargs="?", choices=KINDS, help="autoencoder kind to train (default: every kind)"
    )
    kind = parser.parse_args().kind
    run(kind) if kind else run_all()


if __name__ == "__main__":
    main(cli)
