"""DVC stage ``train_prior``: train the z-conditioned PixelCNN prior over the VQ-VAE codes.

Usage::

    python -m stages.train_prior
    torchrun --standalone --nproc_per_node N -m stages.train_prior
    BRAINGEN_NPROC=N python -m stages.train_prior   # the same, via torchrun

Reads ``params.yaml`` (prior, conditioning, seed, device), ``data/latents/vqvae``, the
autoencoder named in its meta.json and (for ``prior.mirror_augment`` and
``prior.shift_augment_px``) the prepared training slices; writes ``models/pixelcnn.pt``,
``reports/prior.json`` (test NLL in bits per code, sampling speed) and
``reports/prior_samples.png``.
"""

from __future__ import annotations

from pipeline.core import distributed
from pipeline.core.config import load_params
from pipeline.core.identity import stage_identity
from pipeline.core.registry import model_run
from pipeline.core.stage import StagePaths, main
from pipeline.data.latents import latents_identity
from pipeline.training.prior import train_prior


def run() -> None:
    """Train, export and evaluate the prior."""
    distributed.relaunch_with_torchrun("stages.train_prior", [])
    params = load_params()
    paths = StagePaths.standard("pixelcnn", "prior", "prior_samples.png", latents="vqvae")
    identity = stage_identity(params, "train_prior", **latents_identity(paths.latents))
    with (
        distributed.session(params.device) as device,
        model_run(
            "train_prior", identity, run_name="prior", datasets=paths.latents, model=paths.model
        ) as tracking,
    ):
        train_prior(params, run=tracking, device=device, paths=paths, identity=identity)


if __name__ == "__main__":
    main(run)
