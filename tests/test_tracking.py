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


@pytest.mark.parametrize(
    ("message", "calls", "offline"),
    [
        ("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id", 2, False),
        ("(sqlite3.OperationalError) no such table: datasets", 1, True),
    ],
)
def test_a_collision_with_a_sibling_run_is_repeated_other_failures_go_offline(
    project: Path, monkeypatch: pytest.MonkeyPatch, message: str, calls: int, offline: bool
) -> None:
    """Two runs side by side logging one split at once collide on the dataset's unique key
    (seen in a demo: the VAE-GAN's run then went offline for good); the call is repeated and
    the run stays on the store. Any other failure goes offline at once, and the run is
    still ended in the store if it answers."""
    import mlflow

    split = project / "data" / "prepared" / "train"
    split.mkdir(parents=True)
    (split / "slices.npy").write_bytes(b"0")
    monkeypatch.setattr(tracking, "STORE_RETRY_PAUSE_S", 0.0)
    made: list[int] = []
    with StageRun("train", {"a": 1}) as run:
        log_input = mlflow.log_input

        def colliding(*args: object, **kwargs: object) -> None:
            made.append(1)
            if len(made) == 1:
                raise mlflow.exceptions.MlflowException(message)
            log_input(*args, **kwargs)

        monkeypatch.setattr(mlflow, "log_input", colliding)
        run.log_datasets("data/prepared", ("train",))
        run.log_metrics({"loss": 1.0})
    assert len(made) == calls and run.offline is offline
    got = mlflow.tracking.MlflowClient(tracking.tracking_uri()).get_run(run.run_id)
    assert got.info.status == "FINISHED"  # an offline run is still closed where the store answers
    if not offline:
        assert [d.dataset.name for d in got.inputs.dataset_inputs] == ["data/prepared/train"]
        assert got.data.metrics["loss"] == 1.0
