"""Multi-process training: torchrun + DDP on the CPU (gloo) against a one-process run.

The slow test launches ``tests/ddp_worker.py`` (a tiny VQ-VAE with its PatchGAN, adaptive
weight, EMA codebook and weight EMA through :func:`pipeline.training.loop.fit`) once in one process
and several times under ``torchrun --nproc_per_node 2``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.core import distributed

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_worker.py"


def test_helpers_are_no_ops_in_one_process() -> None:
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard([3, 1, 2]) == [3, 1, 2]
    assert distributed.all_true(torch.tensor(True)) and not distributed.all_true(False)
    assert distributed.mean_over_ranks({"a": 1.5}) == {"a": 1.5}
    t = torch.ones(2)
    assert distributed.sum_(t) is t and distributed.broadcast_(t) is t
    assert distributed.gather_objects("x") == ["x"]
    distributed.barrier()
    with distributed.session("cpu") as device:
        assert device == torch.device("cpu")


def test_relaunch_execs_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(os, "execv", lambda exe, cmd: calls.append(cmd))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv(distributed.NPROC_ENV, raising=False)
    distributed.relaunch_with_torchrun("stages.train_ldm", [])
    monkeypatch.setenv(distributed.NPROC_ENV, "1")
    distributed.relaunch_with_torchrun("stages.train_ldm", [])
    assert calls == []
    monkeypatch.setenv(distributed.NPROC_ENV, "2")
    distributed.relaunch_with_torchrun("stages.train_autoencoder", ["vqvae"])
    assert calls == [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "stages.train_autoencoder",
            "vqvae",
        ]
    ]
    monkeypatch.setenv("LOCAL_RANK", "0")  # already under torchrun: no second launch
    distributed.relaunch_with_torchrun("stages.train_ldm", [])
    assert len(calls) == 1
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv(distributed.NPROC_ENV, "two")
    with pytest.raises(ValueError, match="BRAINGEN_NPROC must be a positive integer"):
        distributed.relaunch_with_torchrun("stages.train_ldm", [])


def _launch(out: Path, nproc: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "MLFLOW_TRACKING_URI": f"sqlite:///{out}.db",
    }
    prefix = [sys.executable]
    if nproc > 1:
        prefix += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(
        [*prefix, str(WORKER), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def _losses(db: Path) -> dict[str, list[float]]:
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT key, value FROM metrics WHERE key IN ('loss', 'rec', 'vq', 'd_loss', "
            "'adaptive_weight') ORDER BY key, step"
        ).fetchall()
    out: dict[str, list[float]] = {}
    for key, value in rows:
        out.setdefault(key, []).append(value)
    return out


def _n_runs(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~240 s on a loaded 2-core machine
def test_two_gloo_processes_match_one_and_resume(tmp_path: Path) -> None:
    single, double, resumed, restarts = (tmp_path / n for n in ("one", "two", "res", "dead"))
    for out, nproc, args in ((single, 1, ()), (double, 2, ())):
        done = _launch(out, nproc, *args)
        assert done.returncode == 0, done.stderr[-3000:]

    # the loss after every step (the mean over both ranks' halves) matches the one-process run
    one, two = _losses(Path(f"{single}.db")), _losses(Path(f"{double}.db"))
    assert one.keys() == two.keys() and len(one["loss"]) == 6
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    ref, rank0, rank1 = (
        torch.load(p) for p in (single / "rank0.pt", *sorted(double.glob("rank*.pt")))
    )
    for key in ref:  # both ranks hold the same weights and codebook, those of one process
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], ref[key], rtol=1e-3, atol=1e-3)

    # rank 0 alone logged (one MLflow run), evaluated and wrote the one checkpoint
    assert _n_runs(Path(f"{double}.db")) == 1
    assert [p.name for p in (double / "checkpoints").iterdir()] == ["last.pt"]
    assert sorted(p.name for p in double.glob("evaluated_rank*")) == ["evaluated_rank0"]
    assert json.loads((double / "result.json").read_text())["world_size"] == 2

    # killed after the step-4 checkpoint, re-run: resumes and ends where the uninterrupted run did
    crashed = _launch(resumed, 2, "--crash-at", "5")
    assert crashed.returncode != 0
    done = _launch(resumed, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((resumed / "result.json").read_text())["resumed_from"] == 4
    after = torch.load(resumed / "rank0.pt")
    for key in rank0:
        assert torch.equal(after[key], rank0[key]), key

    # dead-code restarts (random picks) still leave identical codebooks on both ranks
    done = _launch(restarts, 2, "--dead-code", "0.5")
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(p) for p in sorted(restarts.glob("rank*.pt")))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
