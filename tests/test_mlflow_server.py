"""MLflow for real: a tiny stage logs to an `mlflow server`; the REST client reads it back."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support import mlflow_server, write_ellipse_splits

ROOT = Path(__file__).resolve().parents[1]
K, SIZE = 8, 32

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # ~140 s with the server start


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a sqlite store and proxied artifacts in tmp_path."""
    with mlflow_server(tmp_path) as running:
        yield running.url


def test_tiny_stage_logs_metrics_grids_and_checkpoint_to_a_server(
    tmp_path: Path, server: str
) -> None:
    from mlflow.tracking import MlflowClient

    project = tmp_path / "project"
    write_ellipse_splits(project / "prepared", SIZE, K)
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
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    grids = [p for p in images if p.startswith("images/grids~recon+step+") and p.endswith(".png")]
    assert grids  # the reconstruction grid's image history (log_image with a key and a step)
    # the model file is stored once: in the run's logged model, not as a run artifact
    assert not client.list_artifacts(run.info.run_id, "model")
    (logged,) = client.search_logged_models([experiment.experiment_id])
    assert logged.source_run_id == run.info.run_id
    files = client.list_logged_model_artifacts(logged.model_id)
    stored = {Path(a.path).name: a.file_size for a in files}
    assert stored == {"ae_vqvae.pt": (project / "models" / "ae_vqvae.pt").stat().st_size}

    local = Path(client.download_artifacts(run.info.run_id, grids[0], str(tmp_path / "dl")))
    from PIL import Image

    assert Image.open(local).size[0] > SIZE  # a grid of several 32x32 tiles
