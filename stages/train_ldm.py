"""DVC stage ``train_ldm``: train the z-conditioned latent diffusion model.

Usage::

    python -m stages.train_ldm
    torchrun --standalone --nproc_per_node N -m stages.train_ldm
    BRAINGEN_NPROC=N python -m stages.train_ldm   # the same, via torchrun

Reads ``params.yaml`` (ldm, conditioning, prepare.n_slices, seed, device),
``data/latents/<ldm.latent_source>`` and the autoencoder named in its meta.json; writes
``models/ldm.pt``, ``reports/ldm.json`` (final loss, sampling speed) and
``reports/ldm_samples.png`` (one row per z level).
"""

from __future__ import annotations

from pipeline.core import distributed
from pipeline.core.config import load_params
from pipeline.core.identity import stage_identity
from pipeline.core.registry import model_run
from pipeline.core.stage import StagePaths, main
from pipeline.data.latents import latents_identity
from pipeline.training.ldm import train_ldm


def run() -> None:
    """Train, export and time the latent diffusion model."""
    distributed.relaunch_with_torchrun("stages.train_ldm", [])
    params = load_params()
    paths = StagePaths.standard("ldm", "ldm", "ldm_samples.png", params.ldm.latent_source)
    identity = stage_identity(params, "train_ldm", **latents_identity(paths.latents))
    with (
        distributed.session(params.device) as device,
        model_run(
            "train_ldm", identity, run_name="ldm", datasets=paths.latents, model=paths.model
        ) as tracking,
    ):
        train_ldm(params, run=tracking, device=device, paths=paths, identity=identity)


if __name__ == "__main__":
    main(run)
