"""The shared z-embedding."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.config import ConditioningConfig
from pipeline.models.conditioning import Conditioner, check_z, sinusoidal_embedding


def test_check_z_accepts_fractions_and_rejects_out_of_range() -> None:
    assert check_z(0.25).tolist() == [0.25]
    assert check_z([0.0, 0.5, 1.0]).shape == (3,)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"z must lie in \[0, 1\]"):
            check_z(bad)


def test_sinusoidal_embedding_separates_neighbouring_slices() -> None:
    k = 32
    z = torch.arange(k) / (k - 1)
    emb = sinusoidal_embedding(z, 64)
    assert emb.shape == (k, 64)
    dists = torch.cdist(emb, emb)
    nearest = (dists + torch.eye(k) * 1e9).min(dim=1).values
    assert nearest.min() > 0.5


def test_zembedding_shapes_and_null_token() -> None:
    torch.manual_seed(0)
    cfg = ConditioningConfig(sinusoidal_dim=16, dim=24)
    emb = Conditioner(cfg, null_token=True)
    z = torch.tensor([0.0, 0.5, 1.0])
    out = emb(z)
    assert out.shape == (3, 24)
    dropped = emb(z, drop_mask=torch.tensor([True, False, True]))
    torch.testing.assert_close(dropped[0], emb.null)
    torch.testing.assert_close(dropped[1], out[1])
    with pytest.raises(ValueError, match="null token"):
        Conditioner(cfg)(z, drop_mask=torch.tensor([True, False, False]))
