"""Broken tracking server: training goes on, records locally, warns once, outputs complete.

Three servers: one that refuses connections from the start (no MLflow HTTP settings in
the environment, so braingen's fail-fast defaults apply), one that accepts connections but
never answers, and a real ``mlflow server`` on 127.0.0.1 that the test kills while a real
``train_autoencoder`` stage is running.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from support import LinearTask, free_port, mlflow_server, write_ellipse_splits

from pipeline.core.checkpoint import load_checkpoint
from pipeline.core.config import TrainConfig
from pipeline.core.tracking import HTTP_DEFAULTS, StageRun, iter_offline
from pipeline.training.loop import fit

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _train(project: Path) -> tuple[StageRun, float]:
    """A 12-step fit inside a StageRun; returns the run and the seconds it took."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=gen)
    data = [{"x": x[i], "y": x[i].sum()} for i in range(32)]
    cfg = TrainConfig(steps=12, batch_size=4, warmup_steps=0, ckpt_every=4, log_every=2)
    started = time.monotonic()
    with StageRun("train_test", {"a": 1}, run_name="line") as run:
        result = fit(
            LinearTask(),
            data,
            cfg,
            run=run,
            resume_dir=project / "ckpt",
            seed=0,
            device=CPU,  # type: ignore[arg-type]
            progress=False,
        )
    assert result.step == 12 and load_checkpoint(project / "ckpt" / "last.pt")["step"] == 12
    return run, time.monotonic() - started


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder as cwd; MLflow HTTP settings absent (restored after the test)."""
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    monkeypatch.chdir(tmp_path)
    for name in HTTP_DEFAULTS:
        monkeypatch.setenv(name, "0")  # remember the original state ...
        monkeypatch.delenv(name)  # ... then clear it, so the defaults apply
    return tmp_path


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "MLflow tracking" in r.getMessage()]


def _offline_steps(project: Path, run_name: str) -> list[int]:
    path = project / "reports" / "tracking_offline" / f"{run_name}.jsonl"
    return [e["args"][1] for e in iter_offline(path) if e["kind"] == "log_metrics"]


def test_server_down_from_the_start_fails_fast_and_records_locally(
    project: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING):
        run, seconds = _train(project)
    assert run.offline and len(_warnings(caplog)) == 1
    assert seconds < 30, f"a refused connection stalled the stage for {seconds:.0f} s"
    assert _offline_steps(project, "line") == [2, 4, 6, 8, 10, 12]


def test_server_that_never_answers_is_bounded_by_the_timeout(
    project: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the user's setting wins
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        with caplog.at_level(logging.WARNING):
            run, seconds = _train(project)
    assert run.offline and len(_warnings(caplog)) == 1
    assert seconds < 15, f"a silent server stalled the stage for {seconds:.0f} s"
    assert _offline_steps(project, "line") == [2, 4, 6, 8, 10, 12]


# ------------------------------------------------------------------ a real server dies


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """``(url, process, sqlite file)`` of an ``mlflow server`` on a free 127.0.0.1 port."""
    with mlflow_server(tmp_path) as running:
        yield running.url, running.proc, running.store


def _stage_project(root: Path, size: int = 32, k: int = 8) -> Path:
    """The project code with tiny prepared splits (ellipses whose size follows z)."""
    root.mkdir(parents=True)
    for folder in ("pipeline", "data_prep", "stages"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    write_ellipse_splits(root / "data" / "prepared", size, k)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params |= {"profile": "tiny", "device": "cpu"}
    tiny = params["profiles"]["tiny"]["autoencoder"]["train"]
    tiny |= {"steps": 16, "ckpt_every": 2, "log_every": 1, "eval_every": 8}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~180 s with the server start
def test_real_server_killed_mid_stage(tmp_path: Path, server) -> None:
    from mlflow.tracking import MlflowClient

    url, proc, store = server
    project = _stage_project(tmp_path / "project")
    env = {k: v for k, v in os.environ.items() if k not in HTTP_DEFAULTS}
    env |= {"MLFLOW_TRACKING_URI": url, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(project)}
    stage = subprocess.Popen(
        [sys.executable, "-m", "stages.train_autoencoder", "vqvae"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    resume = project / "checkpoints" / "ae_vqvae" / "last.pt"
    deadline = time.monotonic() + 600
    while not resume.exists() and stage.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed_at = load_checkpoint(resume)["step"]  # the first checkpoint: mid-run
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    t_kill = time.monotonic()
    _, stderr = stage.communicate(timeout=600)
    after_kill = time.monotonic() - t_kill

    assert stage.returncode == 0, stderr[-3000:]
    assert stderr.count("MLflow tracking at") == 1, stderr[-3000:]
    assert after_kill < 120
    # the stage's own outputs are complete
    model = load_checkpoint(project / "models" / "ae_vqvae.pt")
    assert model["kind"] == "ae_vqvae"
    assert (project / "reports" / "ae_vqvae.json").stat().st_size > 0
    assert (project / "reports" / "ae_vqvae_recon.png").stat().st_size > 0
    assert not resume.exists()
    # metrics before the kill are on the server, those after it in the local file
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("braingen")
    (run,) = client.search_runs([experiment.experiment_id])
    on_server = {m.step for m in client.get_metric_history(run.info.run_id, "rec")}
    offline = project / "reports" / "tracking_offline" / "ae_vqvae.jsonl"
    local = {
        e["args"][1]
        for e in iter_offline(offline)
        if e["kind"] == "log_metrics" and "rec" in e["args"][0]
    }
    assert set(range(1, killed_at + 1)) <= on_server
    assert on_server | local == set(range(1, 17)), (sorted(on_server), sorted(local))
    kinds = {e["kind"] for e in iter_offline(offline)}
    assert {"log_metrics", "log_artifact"} <= kinds
