"""DVC stage ``encode_latents``: encode the prepared slices with the trained first stages.

Usage::

    python -m stages.encode_latents

Reads ``params.yaml`` (autoencoder.kinds, data.prepared_dir, device), ``models/ae_<kind>.pt``
for every configured kind whose file exists and ``data/prepared/{train,val,test}``; writes
``data/latents/<kind>/`` (latents, VQ codes for vqvae, manifests, meta.json with the scale
factor).
"""

from __future__ import annotations

from pipeline.core.config import load_params
from pipeline.core.device import resolve_device
from pipeline.core.identity import stage_identity
from pipeline.core.stage import main
from pipeline.core.tracking import StageRun
from pipeline.inference.encode import encode_all


def run() -> None:
    """Encode every available autoencoder kind and log the meta files."""
    params = load_params()
    device = resolve_device(params.device)
    with StageRun("encode_latents", stage_identity(params, "encode_latents")) as tracking:
        tracking.log_datasets(params.data.prepared_dir)
        for kind, meta in encode_all(params, device).items():
            tracking.log_dict(meta, f"latents/{kind}_meta.json")


if __name__ == "__main__":
    main(run)
