"""Data the models train on and write: datasets over the prepared slices and encoded latents, slice files (PNG/NIfTI), the synthetic-set manifest, real + synthetic training sets."""
