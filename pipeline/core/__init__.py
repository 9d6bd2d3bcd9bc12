"""Infrastructure every layer uses.

Typed params, errors, atomic I/O, resume checkpoints, device, torchrun/DDP, MLflow
tracking, run identity, figures and stage entry points.
"""
