"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from support import write_labelled_generators, write_tiny_generators

PHANTOM_SHAPE = (40, 48, 40)
#: pytest-timeout for a slow test that names no ``@pytest.mark.timeout`` of its own (the
#: default for every other test, ``timeout`` in pyproject.toml, is too short for them).
SLOW_TIMEOUT_S = 1800


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give slow tests without their own timeout marker :data:`SLOW_TIMEOUT_S`."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


def _phantom(seed: int = 0, shape: tuple[int, int, int] = PHANTOM_SHAPE) -> np.ndarray:
    """Skull-stripped brain-like volume in RAS order, asymmetric in every axis.

    An ellipsoid "brain" (white-matter core 1.0, grey-matter shell 0.6, a dark ventricle)
    with zero background, noise, and a bright marker in the left-anterior-superior part.
    ``seed`` varies the size and noise so phantoms of different subjects differ.

    Returns:
        (X, Y, Z) float32 array, values >= 0.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = (np.array(shape) - 1) / 2
    radii = np.array(shape) * (0.38 + 0.04 * rng.random(3))
    r = np.sqrt((((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0))
    volume = np.where(r < 1, 0.6, 0.0) + np.where(r < 0.75, 0.4, 0.0) - np.where(r < 0.2, 0.8, 0.0)
    x0, y0, z0 = (np.array(shape) * [0.3, 0.65, 0.6]).astype(int)
    volume[x0 - 2 : x0 + 2, y0 - 3 : y0 + 3, z0 - 2 : z0 + 2] = 1.5
    volume = volume + (volume > 0) * rng.normal(0, 0.02, shape)
    return np.clip(volume, 0, None).astype(np.float32)


@pytest.fixture
def phantom() -> Callable[..., np.ndarray]:
    """Factory ``phantom(seed=0, shape=(40, 48, 40))`` of asymmetric RAS brain phantoms."""
    return _phantom


def _write_analyze(path: Path, data: np.ndarray) -> None:
    """OASIS-style Analyze pair: int16, x-flipped (radiological), trailing singleton axis."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = np.rint(np.ascontiguousarray(data[::-1, :, :, None])).astype(np.int16)
    nib.save(nib.AnalyzeImage(stored, np.diag([-1.0, 1.0, 1.0, 1.0])), path)


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)


def _write_png_release(root: Path, cases: dict[str, dict[int, int]], size: int = 32) -> None:
    """``cases``: folder split → {case number: K}; images are discs, segs label them."""
    yy, xx = np.mgrid[:size, :size]
    for split, entries in cases.items():
        for case, k in entries.items():
            for z in range(k):
                disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
                image = (disc * (80 + 5 * z + (yy > size / 2) * 60)).astype(np.uint8)
                for kind, name, value in (("", "case", image), ("seg_", "seg", disc * 85)):
                    folder = root / f"keras_png_slices_{kind}{split}"
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(value.astype(np.uint8)).save(
                        folder / f"{name}_{case:03d}_slice_{z}.nii.png"
                    )


@pytest.fixture
def write_analyze() -> Callable[[Path, np.ndarray], None]:
    """``write_analyze(hdr_path, ras_data)``: OASIS-style Analyze 7.5 int16 pair."""
    return _write_analyze


@pytest.fixture
def write_nifti() -> Callable[..., None]:
    """``write_nifti(path, data, affine=identity)``."""
    return _write_nifti


@pytest.fixture
def write_png_release() -> Callable[..., None]:
    """``write_png_release(root, {split: {case: K}}, size=32)``: the 2D PNG release layout."""
    return _write_png_release


@pytest.fixture(scope="session")
def tiny_generators(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"ldm", "pixelcnn", "vqvae", "vaegan"}`` → untrained tiny model files (read-only).

    32x32 slices, K = 4 slice levels; the LDM samples with 2 DDIM steps by default.
    """
    return write_tiny_generators(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def labelled_generators(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """As :func:`tiny_generators`, conditioned on age, sex and CDR, with tissue heads."""
    return write_labelled_generators(tmp_path_factory.mktemp("labelled_models"))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread for the test (restored after it).

    Tiny nets run fastest on one thread, and do not spin against other jobs' cores. Use it
    module-wide with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
