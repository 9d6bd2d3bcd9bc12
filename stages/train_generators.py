"""DVC stage ``train_generators``: train the two second stages, the latent diffusion model
(:mod:`stages.train_ldm`) and the PixelCNN prior (:mod:`stages.train_prior`).

Usage::

    python -m stages.train_generators   # both, side by side where the machine allows
    python -m stages.train_ldm          # one of them (the same code, the same outputs)
    python -m stages.train_prior

The two are independent (each reads its own autoencoder's latents), so each runs in a child
process of its own, side by side when the machine has a core (or GPU) per training, one
after the other otherwise (:mod:`pipeline.training.concurrency`, ``BRAINGEN_PARALLEL``), as
``train_autoencoder`` runs the two first stages. On two CPU cores side by side saves about a
fifth of the stage: a 24-grid PixelCNN step takes 0.74 s on two threads and 1.14 s on one, a
32-latent UNet step 0.47 s and 0.61-0.68 s. Each child is a stage of its own for MLflow (runs
``ldm`` and ``prior``, identities ``train_ldm`` and ``train_prior``) and resumes from its own
checkpoint after a kill.

Writes what the two children write: ``models/ldm.pt``, ``reports/ldm.json``,
``reports/ldm_samples.png``, ``reports/ldm_trajectory.{png,gif}``, ``models/pixelcnn.pt``,
``reports/prior.json`` and ``reports/prior_samples.png``.
"""

from __future__ import annotations

import sys

from pipeline.core.config import load_params
from pipeline.core.device import resolve_device
from pipeline.core.stage import main
from pipeline.training.concurrency import Job, run_side_by_side

#: The stage modules this stage runs as children (the longest first); their code is this
#: stage's code too (``tests/test_architecture.py`` holds ``dvc.yaml`` to it).
CHILD_STAGES = ("stages.train_ldm", "stages.train_prior")


def run() -> None:
    """Train the LDM and the prior, each in a child process running its own stage module."""
    params = load_params()
    jobs = [
        Job(module.rsplit(".", 1)[1].removeprefix("train_"), [sys.executable, "-m", module])
        for module in CHILD_STAGES
    ]
    run_side_by_side(jobs, resolve_device(params.device))


if __name__ == "__main__":
    main(run)
