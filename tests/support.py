"""Helpers shared by the slow tests that start real servers and stages."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

MLFLOW = Path(sys.executable).with_name("mlflow")


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
def mlflow_server(tmp_path: Path, start_timeout_s: float = 180) -> Iterator[MlflowServer]:
    """``mlflow server`` on a free 127.0.0.1 port, sqlite store and artifacts in ``tmp_path``.

    The server runs in its own process group so that it stops with its workers; it is
    killed on exit if still alive. Fails the test if it does not answer ``/health`` in time.
    """
    port, store = free_port(), tmp_path / "server.db"
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{store}",
             "--artifacts-destination", str(tmp_path / "server-artifacts")],
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
                    pytest.fail(f"mlflow server did not start: {log_path.read_text()}")
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


class RecordingRun:
    """A stand-in for :class:`pipeline.core.tracking.StageRun` that records what is logged.

    Attributes:
        metrics: every ``(step, {name: value})`` logged.
        images: names of logged images; ``artifacts``: file names of logged artifacts;
        dicts: names of logged dicts.
    """

    def __init__(self, run_name: str = "test") -> None:
        self.run_name = run_name
        self.metrics: list[tuple[int | None, dict]] = []
        self.images: list[str] = []
        self.artifacts: list[str] = []
        self.dicts: list[str] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_image(self, image, name) -> None:
        self.images.append(name)

    def log_artifact(self, path, artifact_path=None) -> None:
        self.artifacts.append(Path(path).name)

    def log_dict(self, data, name) -> None:
        self.dicts.append(name)


def stage_kwargs(paths, run: RecordingRun | None = None, identity: dict | None = None) -> dict:
    """Keyword arguments of a ``train_*`` stage function for a quiet CPU test run."""
    import torch

    return {
        "run": run or RecordingRun(),
        "device": torch.device("cpu"),
        "paths": paths,
        "identity": identity or {},
        "progress": False,
    }
