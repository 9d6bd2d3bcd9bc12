"""Fork server for the kill tests: import the stages once, run each in a child to SIGKILL.

A stage started with ``python -m stages.<name>`` spends most of its time importing torch,
MONAI and MLflow; the kill tests run dozens of stage processes. This server imports the
stage modules once (before any torch computation or thread is started) and forks one child
per request; the child runs the stage module as ``__main__`` (what ``python -m`` does) and
the server SIGKILLs it at the requested moment.

Run it with the project copy as the working directory::

    python tests/reliability_harness.py train_autoencoder train_prior prepare

Protocol, one JSON object per line. Request on stdin::

    {"argv": ["train_autoencoder", "vqvae"], "kill_after": 1.25, "log": "/tmp/x.log",
     "after_change": "checkpoints/ae_vqvae/last.pt"}

``kill_after`` is seconds after the fork (``null``: run to completion), or, with
``after_change``, seconds after that file was first (re)written by the child. Reply::

    {"rc": 0, "killed": false, "seconds": 3.2}

``rc`` is the exit status (None when killed). The child's stdout and stderr go to ``log``.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))


def _child(argv: list[str], log: str) -> None:
    """Body of the forked stage process; never returns."""
    code = 0
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.argv = [f"stages.{argv[0]}", *argv[1:]]
        runpy.run_module(f"stages.{argv[0]}", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _stamp(path: Path | None) -> int | None:
    """Modification time of ``path`` in ns (None if absent)."""
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except FileNotFoundError:
        return None


def _serve(request: dict) -> dict:
    """Fork one stage run, kill it after ``kill_after`` seconds if it is still running."""
    argv = request["argv"]
    kill_after = request.get("kill_after")
    watched = Path(request["after_change"]) if request.get("after_change") else None
    first = _stamp(watched)
    start = time.monotonic()
    clock = None if watched is not None else start  # kill_after counts from here
    pid = os.fork()
    if pid == 0:
        _child(argv, request["log"])
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        now = time.monotonic()
        elapsed = now - start
        if done:
            return {"rc": os.waitstatus_to_exitcode(status), "killed": False, "seconds": elapsed}
        if clock is None and _stamp(watched) not in (first, None):
            clock = now
        if kill_after is not None and clock is not None and now - clock >= kill_after:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"rc": None, "killed": True, "seconds": elapsed}
        time.sleep(0.005)


def serve(stage_names: list[str]) -> None:
    """Import the stages (and what they import), then answer requests until stdin closes."""
    for name in stage_names:
        importlib.import_module(f"stages.{name}")
    import mlflow  # noqa: F401  (imported lazily by StageRun; import it once here)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_serve(json.loads(line))), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1:])
