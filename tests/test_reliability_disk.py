"""Full disk: a checkpoint that cannot be written fails clearly and keeps the previous one.

Three ways to run out of space: a write that fails with ENOSPC half-way (monkeypatched),
a real file-size limit (``RLIMIT_FSIZE`` in a child process, EFBIG), and a real 1 MiB
tmpfs (only as root, where ``mount`` is allowed).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from support import LinearTask, quiet_fit

from pipeline.core import checkpoint as checkpoint_mod
from pipeline.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.core.config import TrainConfig
from pipeline.core.stage import main as stage_main
from pipeline.training.loop import TrainingTask

ROOT = Path(__file__).resolve().parents[1]


def _payload(n_floats: int, step: int) -> dict:
    return {"step": step, "w": torch.arange(n_floats, dtype=torch.float32)}


def _assert_intact(folder: Path, step: int) -> None:
    """``last.pt`` still loads with the old step, and no temporary file is left behind."""
    assert load_checkpoint(folder / "last.pt")["step"] == step
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]


class _FullDisk:
    """A binary file that takes ``room`` bytes, then fails like a full disk (ENOSPC)."""

    def __init__(self, fh, room: int) -> None:
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.fh.write(data[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name: str):
        return getattr(self.fh, name)

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


@pytest.fixture
def disk_full_after(monkeypatch: pytest.MonkeyPatch):
    """``disk_full_after(n)``: temporary files opened from now on hold ``n`` bytes, then fail."""

    def arm(room: int) -> None:
        real_open = Path.open

        def open_(self: Path, mode: str = "r", *args, **kwargs):
            fh = real_open(self, mode, *args, **kwargs)
            return _FullDisk(fh, room) if "w" in mode and self.name.endswith(".tmp") else fh

        monkeypatch.setattr(Path, "open", open_)

    return arm


def test_enospc_midway_keeps_the_previous_checkpoint(tmp_path: Path, disk_full_after) -> None:
    save_checkpoint(tmp_path / "last.pt", _payload(1000, step=1))
    disk_full_after(2000)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(tmp_path / "last.pt", _payload(100_000, step=2))
    message = str(err.value)
    assert "last.pt" in message and "No space left" in message and "intact" in message
    assert "\n" not in message
    _assert_intact(tmp_path, step=1)


def _data() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=gen)
    return [{"x": x[i], "y": x[i].sum()} for i in range(32)]


def _fit(task: TrainingTask, folder: Path):
    cfg = TrainConfig(steps=12, batch_size=4, warmup_steps=0, ckpt_every=4, log_every=4)
    return quiet_fit(task, _data(), cfg, folder)


def test_disk_full_during_training_stops_with_one_line_then_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, disk_full_after
) -> None:
    straight = LinearTask()
    _fit(straight, tmp_path / "straight")

    real_save = checkpoint_mod.save_checkpoint
    calls = []

    def second_save_fails(path, payload):
        calls.append(payload["step"])
        if len(calls) == 2:
            disk_full_after(100)
        return real_save(path, payload)

    monkeypatch.setattr("pipeline.training.loop.save_checkpoint", second_save_fails)
    with pytest.raises(SystemExit) as exit_:
        stage_main(lambda: _fit(LinearTask(), tmp_path / "run"))
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not write checkpoint")
    _assert_intact(tmp_path / "run", step=4)

    monkeypatch.undo()  # space freed: the re-run resumes and ends where the straight run did
    resumed = LinearTask()
    assert _fit(resumed, tmp_path / "run").resumed_from == 4
    torch.testing.assert_close(
        resumed.modules["model"].state_dict(), straight.modules["model"].state_dict()
    )


_FSIZE_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    import torch
    from pipeline.core.checkpoint import CheckpointError, save_checkpoint

    folder, limit = sys.argv[1], int(sys.argv[2])
    save_checkpoint(f"{folder}/last.pt", {"step": 1, "w": torch.zeros(1000)})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        save_checkpoint(f"{folder}/last.pt", {"step": 2, "w": torch.zeros(200_000)})
        print(json.dumps({"error": None}))
    except CheckpointError as err:
        print(json.dumps({"error": str(err)}))
    """
)


def test_file_size_limit_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _FSIZE_CHILD, str(tmp_path), str(64 * 1024)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    error = json.loads(out.stdout.strip().splitlines()[-1])["error"]
    assert error and "could not write checkpoint" in error and "intact" in error
    _assert_intact(tmp_path, step=1)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 1 MiB tmpfs mounted at ``tmp_path / "disk"`` (skipped unless mount is allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE test covers the same path")
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"mount not allowed here: {mount.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_real_full_tmpfs_keeps_the_previous_checkpoint(tiny_tmpfs: Path) -> None:
    save_checkpoint(tiny_tmpfs / "last.pt", _payload(50_000, step=1))  # ~200 kB
    with pytest.raises(CheckpointError, match="No space left") as err:
        save_checkpoint(tiny_tmpfs / "last.pt", _payload(300_000, step=2))  # ~1.2 MB
    assert "intact" in str(err.value)
    _assert_intact(tiny_tmpfs, step=1)
    save_checkpoint(tiny_tmpfs / "last.pt", _payload(60_000, step=3))  # still usable
    _assert_intact(tiny_tmpfs, step=3)
