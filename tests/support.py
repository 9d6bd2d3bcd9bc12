r"""Helpers shared by the tests: tiny model configurations and files, a recording stand-in
for the tracking run, a quiet ``fit``, project copies and real ``mlflow server``\ s."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.core.config import (
    AutoencoderConfig,
    ConditioningConfig,
    KLConfig,
    LDMConfig,
    PriorConfig,
    VQConfig,
)
from pipeline.core.labels import Covariate, Schema, schema_to_meta
from pipeline.training.loop import Optimization, TrainingTask, fit

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = Path(sys.executable).with_name("mlflow")
CPU = torch.device("cpu")

# ------------------------------------------------------------------ tiny configurations

#: The z-embedding of the tiny models.
TINY_COND = ConditioningConfig(sinusoidal_dim=16, dim=16)
#: Both first-stage kinds for 32x32 slices: downsampling factor 4, latents (3, 8, 8).
TINY_AE = AutoencoderConfig(
    channels=(8, 16, 16),
    norm_groups=4,
    vq=VQConfig(num_codes=16, code_dim=3),
    kl=KLConfig(latent_channels=3),
)
#: A VQ-VAE without attention that downsamples by 2 (8x8 slices → 4x4 codes).
TINY_AE_X2 = AutoencoderConfig(
    channels=(8, 8), norm_groups=4, attention=False, vq=VQConfig(num_codes=16, code_dim=3)
)
#: The PixelCNN prior over :data:`TINY_AE`'s 16 codes.
TINY_PRIOR = PriorConfig(channels=8, n_layers=2, kernel_size=3)
#: The latents of :data:`TINY_AE` on 32x32 slices.
TINY_LATENT_SHAPE = (3, 8, 8)


def tiny_ldm(**overrides: Any) -> LDMConfig:
    """The tiny UNet (channels 16, 32; attention at the second level), 2 sampling steps."""
    base = {
        "channels": (16, 32),
        "attention_levels": (False, True),
        "num_head_channels": 8,
        "norm_groups": 8,
        "sample_steps": 2,
    }
    return LDMConfig(**(base | overrides))


TINY_LDM = tiny_ldm()


# ------------------------------------------------------------------ tiny model files


def save_tiny_autoencoder(
    path: Path, kind: str, *, n_slices: int = 4, seed: int = 0, tissue: bool = False
) -> Path:
    """An untrained :data:`TINY_AE` of ``kind`` saved as ``ae_<kind>`` (32x32 slices); with
    ``tissue``, with a tissue head marked as trained on tissue labels."""
    from pipeline.models.autoencoder import Autoencoder
    from pipeline.models.files import save_model

    torch.manual_seed(seed)
    cfg = TINY_AE.model_copy(update={"tissue_weight": 1.0}) if tissue else TINY_AE
    model = Autoencoder(cfg, TINY_COND, kind)  # type: ignore[arg-type]
    meta = {"data": {"image_size": 32, "n_slices": n_slices}, "tissue_labels": tissue}
    save_model(path, f"ae_{kind}", model, cfg, meta, TINY_COND)
    return path


def save_tiny_ldm(
    path: Path,
    autoencoder: Path,
    *,
    scale_factor: float = 0.5,
    n_slices: int = 4,
    config: LDMConfig = TINY_LDM,
    schema: Schema = (),
    posterior_std: float | None = None,
    std_curve: dict[str, list[float]] | None = None,
) -> Path:
    """An untrained tiny UNet over ``autoencoder``'s latents, saved as an ``ldm`` file
    (conditioned on ``schema``'s covariates besides z; ``posterior_std`` and ``std_curve``, a
    ``StdCurve.as_meta()``, recorded when given, else absent, as in a file made before
    them)."""
    from pipeline.core.identity import file_sha256
    from pipeline.inference.diffusion import scheduler_config
    from pipeline.models.files import save_model
    from pipeline.models.unet import ZConditionedUNet

    torch.manual_seed(0)
    unet = ZConditionedUNet(config, TINY_COND, TINY_LATENT_SHAPE[0], schema)
    meta = {
        "covariates": schema_to_meta(schema),
        "covariate_reference": TINY_REFERENCE if schema else [],
        "autoencoder": str(autoencoder),
        "autoencoder_sha256": file_sha256(autoencoder),
        "scale_factor": scale_factor,
        "latent_shape": list(TINY_LATENT_SHAPE),
        "n_slices": n_slices,
        "scheduler": scheduler_config(config),
    }
    if posterior_std is not None:
        meta["posterior_std"] = posterior_std
    if std_curve is not None:
        meta["posterior_std_curve"] = std_curve
    save_model(path, "ldm", unet, config, meta, TINY_COND)
    return path


def save_tiny_pixelcnn(
    path: Path,
    autoencoder: Path,
    *,
    n_slices: int = 4,
    config: PriorConfig = TINY_PRIOR,
    schema: Schema = (),
) -> Path:
    """An untrained PixelCNN over ``autoencoder``'s 8x8 grids of 16 codes (conditioned on
    ``schema``'s covariates besides z)."""
    from pipeline.core.identity import file_sha256
    from pipeline.models.files import save_model
    from pipeline.models.pixelcnn import GatedPixelCNN

    torch.manual_seed(0)
    meta = {
        "autoencoder": str(autoencoder),
        "autoencoder_sha256": file_sha256(autoencoder),
        "num_codes": 16,
        "code_shape": list(TINY_LATENT_SHAPE[1:]),
        "n_slices": n_slices,
        "covariates": schema_to_meta(schema),
        "covariate_reference": TINY_REFERENCE if schema else [],
    }
    prior = GatedPixelCNN(16, config, TINY_COND, schema=schema)
    save_model(path, "pixelcnn", prior, config, meta, TINY_COND)
    return path


def write_tiny_generators(root: Path, n_slices: int = 4) -> dict[str, Path]:
    """Untrained but complete model files under ``root``: both autoencoders, LDM, PixelCNN.

    32x32 slices, ``n_slices`` levels (in the metadata), latents (3, 8, 8).

    Returns:
        ``{"vqvae", "vaegan", "ldm", "pixelcnn"}`` → file.
    """
    root.mkdir(parents=True, exist_ok=True)
    ae = {
        kind: save_tiny_autoencoder(root / f"ae_{kind}.pt", kind, n_slices=n_slices)
        for kind in ("vqvae", "vaegan")
    }
    return {
        "ldm": save_tiny_ldm(root / "ldm.pt", ae["vaegan"], n_slices=n_slices),
        "pixelcnn": save_tiny_pixelcnn(root / "pixelcnn.pt", ae["vqvae"], n_slices=n_slices),
        **ae,
    }


#: The covariates of the labelled tiny generators (OASIS-like ranges).
TINY_SCHEMA: Schema = (
    Covariate("age", "continuous", 18.0, 96.0),
    Covariate("sex", "categorical", categories=("F", "M")),
    Covariate("cdr", "categorical", categories=("0", "0.5", "1"), ordered=True),
)


#: Training subjects of the labelled tiny generators (what ``match`` draws from).
TINY_REFERENCE: list[dict[str, Any]] = [
    {"age": 25.0, "sex": "F", "cdr": None},
    {"age": 71.0, "sex": "M", "cdr": "0"},
    {"age": 78.0, "sex": "F", "cdr": "1"},
    {"age": 84.0, "sex": "M", "cdr": "1"},
]


def write_labelled_generators(root: Path, n_slices: int = 4) -> dict[str, Path]:
    """Like :func:`write_tiny_generators`, but the generators condition on
    :data:`TINY_SCHEMA` and the autoencoders have tissue heads (masks)."""
    root.mkdir(parents=True, exist_ok=True)
    ae = {
        kind: save_tiny_autoencoder(root / f"ae_{kind}.pt", kind, n_slices=n_slices, tissue=True)
        for kind in ("vqvae", "vaegan")
    }
    return {
        "ldm": save_tiny_ldm(root / "ldm.pt", ae["vaegan"], n_slices=n_slices, schema=TINY_SCHEMA),
        "pixelcnn": save_tiny_pixelcnn(
            root / "pixelcnn.pt", ae["vqvae"], n_slices=n_slices, schema=TINY_SCHEMA
        ),
        **ae,
    }


# ------------------------------------------------------------------ training


class RecordingRun:
    """A stand-in for :class:`pipeline.core.tracking.StageRun` that records what is logged.

    Usable as a context manager, like a ``StageRun``.

    Attributes:
        run_name: the run's name (a stage's name when it stands in for ``StageRun(stage, ...)``).
        params: the parameters it was opened with.
        metrics: every ``(step, {name: value})`` logged.
        images: logged images by name; a step of an image history (``log_image(image,
            "grids/recon", step=6)``) as ``"grids/recon_000006.png"``.
        dicts: logged dicts by name.
        artifacts: the bytes of each logged file, by where MLflow would store it
            (``"<artifact_path>/<file name>"``, or the file name alone).
        children: the runs opened with :meth:`child`, in order (their ``tags`` set).
    """

    def __init__(self, run_name: str = "test", params: Mapping[str, Any] | None = None) -> None:
        self.run_name = run_name
        self.params = dict(params or {})
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.images: dict[str, Any] = {}
        self.dicts: dict[str, Any] = {}
        self.artifacts: dict[str, bytes] = {}
        self.children: list[RecordingRun] = []
        self.tags: dict[str, str] = {}

    def __enter__(self) -> RecordingRun:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_image(self, image: Any, name: str, step: int | None = None) -> None:
        # an image-history step (key, step) is recorded as "<key>_<step:06d>.png"
        self.images[name if step is None else f"{name}_{step:06d}.png"] = image

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self.dicts[name] = data

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        name = Path(path).name
        self.artifacts[f"{artifact_path}/{name}" if artifact_path else name] = Path(
            path
        ).read_bytes()

    @contextmanager
    def child(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[RecordingRun]:
        """A nested run (``StageRun.child``), recorded in :attr:`children`."""
        child = RecordingRun(name, params)
        child.tags = dict(tags or {})
        self.children.append(child)
        yield child

    def values(self, key: str) -> list[float]:
        """Every value logged under ``key``, in order."""
        return [m[key] for _, m in self.metrics if key in m]

    def last(self, key: str) -> float:
        """The last value logged under ``key``."""
        return self.values(key)[-1]


def stage_kwargs(paths, run: RecordingRun | None = None, identity: dict | None = None) -> dict:
    """Keyword arguments of a ``train_*`` stage function for a quiet CPU test run."""
    return {
        "run": run or RecordingRun(),
        "device": CPU,
        "paths": paths,
        "identity": identity or {},
        "progress": False,
    }


def quiet_fit(task: TrainingTask, data, cfg, resume_dir: Path, **kwargs: Any):
    """:func:`pipeline.training.loop.fit` on the CPU, seed 0, no progress bar, and a
    :class:`RecordingRun` unless ``run`` is given; other keywords are passed on."""
    defaults = {"run": RecordingRun(), "seed": 0, "device": CPU, "progress": False}
    return fit(task, data, cfg, resume_dir=resume_dir, **(defaults | kwargs))


class LinearTask(TrainingTask):
    """``nn.Linear(n_in, 1)`` (seed 0) fitted to ``batch["y"]``, or pushed to 0 without it.

    Args:
        n_in: input features (``batch["x"]`` is (B, n_in)).
        sgd_lr: train with SGD at this rate instead of AdamW at 0.05.
    """

    def __init__(self, n_in: int = 4, sgd_lr: float | None = None) -> None:
        torch.manual_seed(0)
        model = nn.Linear(n_in, 1)
        self.modules = {"model": model}
        optimizer = (
            torch.optim.SGD(model.parameters(), lr=sgd_lr)
            if sgd_lr is not None
            else torch.optim.AdamW(model.parameters(), lr=0.05)
        )
        self.optimizers = {"model": optimizer}

    def train_step(self, batch, step, optim: Optimization) -> dict[str, float]:
        pred = self.modules["model"](batch["x"]).squeeze(-1)
        loss = (pred - batch["y"] if "y" in batch else pred).pow(2).mean()
        optim.step("model", loss)
        return {"loss": loss.item()}


# ------------------------------------------------------------------ projects and servers


def project_files() -> list[str]:
    """The project's files as git sees them: tracked, and untracked but not ignored."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def copy_project(dest: Path) -> Path:
    """Copy :func:`project_files` into ``dest``; returns ``dest``."""
    for rel in project_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return dest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MlflowServer:
    """A running ``mlflow server``: its URL, process (own process group) and sqlite store."""

    url: str
    proc: subprocess.Popen
    store: Path


@contextmanager
def mlflow_server(
    tmp_path: Path,
    start_timeout_s: float = 180,
    *,
    database: Path | None = None,
    artifacts: Path | None = None,
) -> Iterator[MlflowServer]:
    """``mlflow server`` on a free 127.0.0.1 port, sqlite store and artifacts in ``tmp_path``
    (or the given ``database`` file and ``artifacts`` folder); its log in ``tmp_path``.

    The server runs in its own process group so that it stops with its workers; it is
    killed on exit if still alive. RuntimeError (a failed test) if it does not answer
    ``/health`` in time.
    """
    port, store = free_port(), database or tmp_path / "server.db"
    artifacts = artifacts or tmp_path / "server-artifacts"
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{store}",
             "--artifacts-destination", str(artifacts)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {log_path.read_text()}")
                time.sleep(0.3)
            yield MlflowServer(url, proc, store)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def write_ellipse_splits(root: Path, size: int = 32, k: int = 8) -> Path:
    """Tiny prepared splits under ``root`` (train 3, val 1, test 1 volumes of ``k`` levels).

    Each slice is a textured ellipse whose size follows z, so a model can learn z from it.
    Writes ``<split>/{slices.npy, masks.npy, manifest.csv}`` as the prepare stage does.
    """
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    for split, volumes in (("train", 3), ("val", 1), ("test", 1)):
        folder = root / split
        folder.mkdir(parents=True)
        images, masks, rows = [], [], []
        for v in range(volumes):
            for z in range(k):
                radius = size * (0.2 + 0.25 * np.sin(np.pi * (z + 0.5) / k))
                inside = (yy / radius) ** 2 + (xx / (0.8 * radius)) ** 2 < 1
                images.append(inside * (0.6 + 0.3 * np.sin(xx / (2 + v)) * np.cos(yy / 2)))
                masks.append(inside)
                rows.append({"subject": f"{split}{v}", "z_index": z, "z": z / (k - 1)})
        np.save(folder / "slices.npy", np.stack(images)[:, None].astype(np.float16))
        np.save(folder / "masks.npy", np.stack(masks)[:, None].astype(np.uint8))
        pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return root
