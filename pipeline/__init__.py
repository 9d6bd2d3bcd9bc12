"""braingen's library: z-conditioned generative models of brain MRI slices, in layers.

A layer imports only the layers listed for it in :data:`LAYERS` (enforced by
``tests/test_architecture.py``); ``stages/`` and the ``braingen`` command sit on top and
nothing in ``pipeline`` imports ``stages``.

=============  ==========================================================================
layer          what lives there
=============  ==========================================================================
``core``       typed params (``config``), the project error type (``errors``), atomic
               writes (``io``), resume checkpoints (``checkpoint``), device and seeding
               (``device``), torchrun/DDP (``distributed``), MLflow (``tracking``), image
               grids (``figures``), stage entry points and file layout (``stage``)
``data``       datasets over the prepared memmaps and the latents (``datasets``,
               ``latents``), slice files (``slice_files``), the synthetic-set manifest
               (``manifests``), real + synthetic training sets (``augment``)
``models``     ``nn.Module``\\ s only (autoencoder, discriminator, PixelCNN, UNet, z-probe)
               and the one conditioning module (``conditioning``); the label probes
               (``probes``); model files (``files``: save, load, build every kind) and
               the first-stage codec (``codec``: encode/decode and the latent
               ``scale_factor``)
``metrics``    image and distribution measures (SSIM, PSNR, MS-SSIM, fd_alex, KID,
               precision/recall), LPIPS (``perceptual``), the realism judge (``c2st``)
               and the near-copy check (``novelty``)
``inference``  diffusion schedules and samplers (``diffusion``), the autoregressive
               sampler (``autoregressive``), generator loading and sampling settings
               (``sampling``), encoding slices to latents (``encode``), scan-noise
               texture (``texture``), ``generate`` (which uses ``metrics.novelty``),
               ``edit`` (SDEdit, inpainting)
``training``   the one training loop (``loop``), losses, one task module per model
               (``autoencoder``, ``prior``, ``ldm``, ``zprobe``, label ``probes``),
               side-by-side runs (``concurrency``)
``evaluation`` the ``evaluate`` stage's figures, the verdicts against real references
               (``verdicts``) and the HTML ``report``
``cli``        the ``braingen`` command (``pipeline/cli.py``)
=============  ==========================================================================

``data_prep/`` (readers, volume → slices, split, demo cohort) sits beside ``data`` and uses
``core`` only.

Vocabulary:

- **z**: the normalised axial slice position in [0, 1]; **z_index**: the integer slice
  level 0..K-1; **K** (``prepare.n_slices``): the number of levels, so
  ``z = z_index / (K - 1)``. The conversion lives in :mod:`pipeline.models.conditioning`.
- **scale factor**: the constant the first stage's latents are multiplied with before the
  LDM sees them (unit variance); owned by :class:`pipeline.models.codec.LatentCodec`.
- **model file** (``models/<name>.pt``): the exported weights and metadata a later stage or
  ``generate`` loads (:mod:`pipeline.models.files`). **resume checkpoint**
  (``checkpoints/<stage>/last.pt``): the full training state of a killed run
  (:mod:`pipeline.core.checkpoint`), removed once the model file is written.
"""

#: Each layer and the layers it may import (besides itself); the order is bottom to top.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": (),
    "data": ("core", "data_prep"),
    "models": ("core",),
    "metrics": ("core",),
    "inference": ("core", "data", "data_prep", "models", "metrics"),
    "training": ("core", "data", "data_prep", "models", "metrics", "inference"),
    "evaluation": ("core", "data", "data_prep", "models", "metrics", "inference", "training"),
}
