"""MLflow tracking: one run per stage with tags, and an unreachable server never stops work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import tracking
from pipeline.core.tracking import StageRun, flatten, iter_offline, pipeline_id


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_flatten_and_pipeline_id_are_stable() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}
    assert pipeline_id({"x": 1, "y": 2}) == pipeline_id({"y": 2, "x": 1})


def test_stage_run_writes_sqlite_store_and_artifacts(project: Path) -> None:
    import mlflow

    params = {"prepare": {"image_size": 64}}
    with StageRun("prepare", params) as run:
        run.log_metrics({"n_slices": 10.0}, step=1)
        run.log_image(np.linspace(0, 1, 64).reshape(8, 8), "grids/preview.png")
        run.log_dict({"ok": True}, "report.json")
    assert (project / "mlflow.db").is_file()
    client = mlflow.tracking.MlflowClient(tracking.tracking_uri())
    got = client.get_run(run.run_id)
    assert got.data.metrics["n_slices"] == 10.0
    assert got.data.params["prepare.image_size"] == "64"
    assert got.data.tags["stage"] == "prepare"
    assert got.data.tags["pipeline_id"] == pipeline_id(params)
    names = {a.path for a in client.list_artifacts(run.run_id, "grids")}
    assert names == {"grids/preview.png"}
    assert (project / "mlartifacts").is_dir()


def test_unreachable_server_warns_once_and_records_locally(
    project: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: refused
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with StageRun("train", {"a": 1}) as run:
        for step in range(3):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    assert run.offline
    warnings = [r for r in caplog.records if "MLflow tracking" in r.getMessage()]
    assert len(warnings) == 1
    entries = list(iter_offline(project / "reports" / "tracking_offline" / "train.jsonl"))
    logged = [e for e in entries if e["kind"] == "log_metrics"]
    assert [json.dumps(e["args"][0]) for e in logged][-1] == json.dumps({"loss": 1.0 / 3})


def test_disabled_run_does_nothing(project: Path) -> None:
    with StageRun("x", {}, enabled=False) as run:
        run.log_metrics({"a": 1.0})
    assert not (project / "mlflow.db").exists()
