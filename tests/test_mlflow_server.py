"""MLflow for real: a tiny stage logs to an `mlflow server`; the REST client reads it back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = Path(sys.executable).with_name("mlflow")
K, SIZE = 8, 32

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a sqlite store and proxied artifacts in tmp_path."""
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(MLFLOW),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the workers stop with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def _write_prepared(root: Path) -> None:
    """Tiny prepared splits: textured ellipses whose size follows z, 32x32, K=8 levels."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    for split, volumes in (("train", 3), ("val", 1), ("test", 1)):
        folder = root / split
        folder.mkdir(parents=True)
        images, masks, rows = [], [], []
        for v in range(volumes):
            for z in range(K):
                radius = SIZE * (0.2 + 0.25 * np.sin(np.pi * (z + 0.5) / K))
                inside = (yy / radius) ** 2 + (xx / (0.8 * radius)) ** 2 < 1
                images.append(inside * (0.6 + 0.3 * np.sin(xx / (2 + v)) * np.cos(yy / 2)))
                masks.append(inside)
                rows.append({"subject": f"{split}{v}", "z_index": z, "z": z / (K - 1)})
        np.save(folder / "slices.npy", np.stack(images)[:, None].astype(np.float16))
        np.save(folder / "masks.npy", np.stack(masks)[:, None].astype(np.uint8))
        pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)


def test_tiny_stage_logs_metrics_grids_and_checkpoint_to_a_server(
    tmp_path: Path, server: str
) -> None:
    from mlflow.tracking import MlflowClient

    project = tmp_path / "project"
    _write_prepared(project / "prepared")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params |= {"profile": "tiny", "device": "cpu"}
    params["data"]["prepared_dir"] = "prepared"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": server,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "stages.train_autoencoder", "vqvae"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MLflow tracking" not in result.stderr  # never fell back to the offline log
    assert not (project / "mlflow.db").exists()

    client = MlflowClient(server)  # REST
    experiment = client.get_experiment_by_name("braingen")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "train_autoencoder"
    assert {"rec", "val_ssim", "test_ssim", "test_lpips"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "rec")) >= 2
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "grids")]
    assert grids and all(p.startswith("grids/recon_") and p.endswith(".png") for p in grids)
    models = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id, "model")}
    assert models.get("model/ae_vqvae.pt") == (project / "models" / "ae_vqvae.pt").stat().st_size

    local = Path(client.download_artifacts(run.info.run_id, grids[0], str(tmp_path / "dl")))
    from PIL import Image

    assert Image.open(local).size[0] > SIZE  # a grid of several 32x32 tiles
