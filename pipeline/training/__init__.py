"""Training: the one loop, the losses, one task module per model, side-by-side runs."""
