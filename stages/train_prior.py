"""DVC stage ``train_prior``: train the z-conditioned PixelCNN prior over the VQ-VAE codes.

Usage::

    python -m stages.train_prior

Reads ``params.yaml`` (prior, conditioning, seed, device), ``data/latents/vqvae`` and the
autoencoder named in its meta.json; writes ``models/pixelcnn.pt``, ``reports/prior.json``
(test NLL in bits per code, sampling speed) and ``reports/prior_samples.png``.
"""

from __future__ import annotations

from pipeline.config import load_params
from pipeline.prior_task import train_prior
from pipeline.stage import StagePaths, main
from pipeline.tracking import StageRun
from pipeline.training import resolve_device


def run() -> None:
    """Train, export and evaluate the prior."""
    params = load_params()
    device = resolve_device(params.device)
    paths = StagePaths.standard("pixelcnn", "prior", "prior_samples.png", latents="vqvae")
    tracked = params.tracked("conditioning", "prior")
    with StageRun("train_prior", tracked, run_name="prior") as tracking:
        train_prior(params, run=tracking, device=device, paths=paths)


if __name__ == "__main__":
    main(run)
