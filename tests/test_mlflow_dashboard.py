"""The MLflow dashboard a reviewer expects (issue 19), against a real ``mlflow server``.

One pipeline run groups its stage runs under a parent; the experiment opens on training
runs; models are logged and registered, and ``generate --model models:/braingen-ldm/latest``
samples what the local file samples; datasets are inputs with DVC's hash; images have a
history of steps; ``evaluate`` is linked to the models it scored, ``generate`` to those it
sampled. A study's arms are child runs of its stage run (fast, on a local sqlite store).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from support import free_port, mlflow_server, write_ellipse_splits, write_tiny_generators
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core import tracking
from pipeline.core.identity import file_sha256
from pipeline.core.registry import link_generator, link_models, log_model
from pipeline.core.tracking import StageRun, dvc_dir_md5, iter_offline, pipeline_run_id


def test_dvc_dir_md5_is_the_hash_dvc_records(tmp_path: Path) -> None:
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    folder = write_ellipse_splits(tmp_path / "prepared", 16, 4) / "train"
    fs = LocalFileSystem()
    _, _, tree = build(HashFileDB(fs, str(tmp_path / "odb")), str(folder), fs, "md5")
    assert dvc_dir_md5(folder) == tree.hash_info.value


def test_pipeline_run_id_is_shared_and_follows_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(tracking.PIPELINE_RUN_ENV, raising=False)
    first = pipeline_run_id()
    assert pipeline_run_id() == first  # every stage of one repro agrees
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    assert pipeline_run_id() != first  # another repro
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "demo-1")
    assert pipeline_run_id() == "demo-1"


@pytest.fixture
def local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder as cwd whose runs go to its own ``mlflow.db`` (returned)."""
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "repro-2")
    return tmp_path / "mlflow.db"


def test_child_runs_nest_under_the_stage_run(local_store: Path) -> None:
    from mlflow.tracking import MlflowClient

    with StageRun("augment_study", {"a": 1}) as run:
        with run.child("arm 1x", params={"arm": {"ratio": 1.0}}, tags={"arm": "1x"}) as arm:
            arm.log_metrics({"dice": 0.8}, step=0)
            arm.log_metrics({"dice": 0.9}, step=1)
        with pytest.raises(RuntimeError), run.child("arm 2x") as failed:
            failed.log_metrics({"dice": 0.1})
            raise RuntimeError("the arm's training failed")
        run.log_metrics({"after": 1.0})  # the stage run is still the active run
    assert not run.offline

    client = MlflowClient(f"sqlite:///{local_store}")
    child = client.get_run(arm.run_id)
    assert child.info.run_name == "arm 1x" and child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == run.run_id
    assert child.data.tags["pipeline_run"] == "repro-2" and child.data.tags["arm"] == "1x"
    assert child.data.params == {"arm.ratio": "1.0"}
    assert [(m.step, m.value) for m in client.get_metric_history(arm.run_id, "dice")] == [
        (0, 0.8),
        (1, 0.9),
    ]
    assert client.get_run(failed.run_id).info.status == "FAILED"
    stage = client.get_run(run.run_id)
    assert stage.data.metrics == {"after": 1.0} and stage.info.status == "FINISHED"
    # three levels: pipeline run > stage run > arms; the arms stay out of the stage summary
    parent = client.get_run(stage.data.tags["mlflow.parentRunId"])
    assert parent.data.metrics == {"augment_study.after": 1.0}


def test_child_runs_without_tracking_do_nothing(
    local_store: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rank1 = StageRun("augment_study", {"a": 1}, enabled=False)  # a non-main DDP rank
    with rank1 as run, run.child("arm 1x", params={"ratio": 1.0}) as arm:
        arm.log_metrics({"dice": 0.8})
    assert arm.run_id is None and not local_store.exists()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # refused
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING),
        StageRun("augment_study", {"a": 1}) as run,
        run.child("arm 1x", params={"ratio": 1.0}) as arm,
    ):
        arm.log_metrics({"dice": 0.8}, step=3)
    assert time.monotonic() - started < 30
    assert run.offline and arm.run_id is None
    assert len([r for r in caplog.records if "MLflow tracking" in r.getMessage()]) == 1
    offline = local_store.parent / "reports" / "tracking_offline" / "augment_study.jsonl"
    recorded = list(iter_offline(offline))
    children = [(e["kind"], e["args"][0]) for e in recorded if e["kind"].endswith("child")]
    assert children == [("start_child", "arm 1x"), ("end_child", "arm 1x")]
    (metrics,) = [e["args"] for e in recorded if e["kind"] == "log_child_metrics"]
    assert metrics == ["arm 1x", {"dice": 0.8}, 3]


def _steps(client, run_id: str, key: str) -> set[int]:
    """The steps of one image-history key (MLflow stores ``images/<key with ~>+step+<n>+...``)."""
    stored = key.replace("/", "~")
    names = [Path(a.path).name for a in client.list_artifacts(run_id, "images")]
    return {
        int(m.group(1))
        for name in names
        if (m := re.match(rf"{re.escape(stored)}\+step\+(\d+)\+.*\.png$", name))
    }


@pytest.mark.slow
def test_dashboard_against_a_real_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    project = tmp_path / "project"
    prepared = write_ellipse_splits(project / "data" / "prepared", 16, 4)
    (project / "params.yaml").write_text("seed: 0\n")
    files = write_tiny_generators(tmp_path / "models")
    monkeypatch.chdir(project)
    monkeypatch.setenv(tracking.PIPELINE_RUN_ENV, "repro-1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.setenv("BRAINGEN_MODEL_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()

    with mlflow_server(tmp_path) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        with StageRun(
            "train_autoencoder", {"a": 1}, run_name="ae_vaegan", system_metrics=True
        ) as ae:
            ae.log_datasets(prepared)
            for step in (2, 4, 6):
                ae.log_image(np.full((8, 8), step / 10), "grids/recon", step=step)
            ae.log_metrics({"rec": 0.5}, step=6)
            time.sleep(2.5)  # two samples of system metrics
            log_model(ae, files["vaegan"])
        with StageRun("train_ldm", {"b": 2}, run_name="ldm") as ldm:
            log_model(ldm, files["ldm"])
        with StageRun("evaluate", {"c": 3}, run_name="evaluate") as ev:
            link_models(ev, {"ldm": files["ldm"], "ae_vaegan": files["vaegan"]})
            ev.log_metrics({"ldm.fd_alex": 1.5, "real.fd_alex": 0.1})
        with StageRun("generate", {"d": 4}) as gen:
            link_generator(gen, files["ldm"])
        assert not (ae.offline or ldm.offline or ev.offline or gen.offline)

        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name("braingen")
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        (parent,) = [r for r in runs.values() if r.data.tags.get("pipeline_role") == "parent"]
        for name in ("ae_vaegan", "ldm", "evaluate", "generate"):
            tags = runs[name].data.tags
            assert tags["mlflow.parentRunId"] == parent.info.run_id
            assert tags["pipeline_run"] == "repro-1"
        assert parent.data.metrics["ae_vaegan.rec"] == 0.5
        assert parent.data.metrics["evaluate.ldm.fd_alex"] == 1.5

        # training run: image history, system metrics, dataset inputs
        assert _steps(client, ae.run_id, "grids/recon") == {2, 4, 6}
        assert any(k.startswith("system/") for k in runs["ae_vaegan"].data.metrics)
        inputs = {d.dataset.name: d.dataset.digest for d in runs["ae_vaegan"].inputs.dataset_inputs}
        assert inputs == {
            f"data/prepared/{s}": dvc_dir_md5(prepared / s) for s in ("train", "val", "test")
        }

        # logged and registered models
        logged = {m.name: m for m in client.search_logged_models([experiment.experiment_id])}
        assert logged["ldm"].source_run_id == ldm.run_id
        assert logged["ldm"].tags["sha256"] == file_sha256(files["ldm"])
        assert logged["ldm"].tags["scale_factor"] == "0.5"
        assert logged["ldm"].tags["autoencoder_sha256"] == file_sha256(files["vaegan"])
        (version,) = client.search_model_versions("name = 'braingen-ldm'")
        assert version.tags["sha256"] == file_sha256(files["ldm"]) and version.tags["code_version"]
        link = json.loads(logged["ldm"].tags["mlflow.modelVersions"])  # the UI's link
        assert link == [{"name": "braingen-ldm", "version": version.version}]
        assert client.search_model_versions("name = 'braingen-ae-vaegan'")

        # evaluate is linked to what it scored
        evaluated = client.get_run(ev.run_id)
        assert logged["ldm"].model_id in {m.model_id for m in evaluated.inputs.model_inputs}
        assert evaluated.data.tags["scored.ldm"] == "braingen-ldm/1"
        model_metrics = {m.key for m in client.get_logged_model(logged["ldm"].model_id).metrics}
        assert model_metrics == {"ldm.fd_alex"}

        # generate is linked to the generator and the first stage it sampled
        generated = client.get_run(gen.run_id)
        assert {m.model_id for m in generated.inputs.model_inputs} == {
            logged["ldm"].model_id,
            logged["ae_vaegan"].model_id,
        }
        assert generated.data.tags["used.ldm"] == "braingen-ldm/1"
        assert generated.data.tags["used.ae_vaegan"] == "braingen-ae-vaegan/1"

        # generate from the registry = generate from the local file, same seed
        request = ["generate", "--z", "0,3", "--per-z", "2", "--seed", "3", "--device", "cpu"]
        local = runner.invoke(app, [*request, "--checkpoint", str(files["ldm"]), "--out", "a"])
        assert local.exit_code == 0, local.output
        shutil.move(
            tmp_path / "models", tmp_path / "elsewhere"
        )  # the first stage, too, comes from the registry
        uri = "models:/braingen-ldm/latest"
        remote = runner.invoke(app, [*request, "--model", uri, "--out", "b"])
        assert remote.exit_code == 0, remote.output
        pngs = sorted(p.name for p in Path("a").glob("*.png"))
        assert pngs and pngs == sorted(p.name for p in Path("b").glob("*.png"))
        for name in pngs:
            assert (Path("a") / name).read_bytes() == (Path("b") / name).read_bytes(), name

        # a registered file whose hash does not match is refused in one line
        client.set_model_version_tag("braingen-ldm", "1", "sha256", "0" * 64)
        refused = runner.invoke(app, [*request, "--model", "models:/braingen-ldm/1", "--out", "c"])
        assert refused.exit_code == 1
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: models:/braingen-ldm/1: "), lines
        unknown = runner.invoke(app, [*request, "--model", "models:/braingen-gan/latest"])
        assert unknown.exit_code == 1 and "no registered model 'braingen-gan'" in unknown.stderr
