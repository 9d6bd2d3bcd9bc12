"""Using trained models.

Diffusion and autoregressive samplers, generator loading and sampling settings, encoding
slices to latents, ``generate`` and ``edit``.
"""
