"""DVC stage ``train_ldm``: train the z-conditioned latent diffusion model.

Usage::

    python -m stages.train_ldm

Reads ``params.yaml`` (ldm, conditioning, prepare.n_slices, seed, device),
``data/latents/<ldm.latent_source>`` and the autoencoder named in its meta.json; writes
``models/ldm.pt``, ``reports/ldm.json`` (final loss, sampling speed) and
``reports/ldm_samples.png`` (one row per z level).
"""

from __future__ import annotations

from pipeline.config import load_params
from pipeline.ldm_task import train_ldm
from pipeline.stage import StagePaths, main
from pipeline.tracking import StageRun
from pipeline.training import resolve_device


def run() -> None:
    """Train, export and time the latent diffusion model."""
    params = load_params()
    device = resolve_device(params.device)
    paths = StagePaths.standard("ldm", "ldm", "ldm_samples.png", params.ldm.latent_source)
    tracked = params.tracked("conditioning", "ldm")
    with StageRun("train_ldm", tracked, run_name="ldm") as tracking:
        train_ldm(params, run=tracking, device=device, paths=paths)


if __name__ == "__main__":
    main(run)
