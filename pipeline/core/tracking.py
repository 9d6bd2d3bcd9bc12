"""MLflow tracking: one run per stage, tagged with the pipeline run it belongs to.

By default runs go to a sqlite store ``mlflow.db`` with artifacts in ``mlartifacts/`` at the
project root; ``MLFLOW_TRACKING_URI`` overrides this (e.g. a shared ``mlflow server``).
A tracking server that is down or dies mid-run never stops training: the first failure is
warned about once, and every later call is appended to a local JSON-lines file
(``reports/tracking_offline/<stage>.jsonl``) so nothing is lost. MLflow's own HTTP defaults
(7 retries with exponential backoff, 120 s timeout) would stall a stage for minutes before
that first failure; :data:`HTTP_DEFAULTS` shortens them unless the environment sets them.

Usage::

    with StageRun("train_autoencoder", params, run_name="vqvae") as run:
        run.log_metrics({"loss": 0.1}, step=10)
        run.log_image(grid, "grids/recon_000100.png")
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

EXPERIMENT = "braingen"
#: MLflow HTTP client settings used unless set in the environment: a server that refuses
#: connections fails within seconds, one that never answers within about a minute.
HTTP_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # pipeline/core/tracking.py -> the project


def project_root() -> Path:
    """The folder holding ``params.yaml`` (the current directory when it has one)."""
    cwd = Path.cwd()
    return cwd if (cwd / "params.yaml").is_file() else PROJECT_ROOT


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys: ``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def params_hash(params: Mapping[str, Any]) -> str:
    """Short sha256 of the parameters, stable across key order."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def git_commit() -> str:
    """Short commit of the project checkout, or ``"nogit"`` outside a repository."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=project_root(),
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "nogit"
    return out.stdout.strip() or "nogit"


def pipeline_id(params: Mapping[str, Any]) -> str:
    """Identifier shared by every stage of one ``dvc repro``: ``<commit>-<params hash>``."""
    return f"{git_commit()}-{params_hash(params)}"


def to_uint8_image(image: np.ndarray) -> np.ndarray:
    """Convert a (H, W) or (H, W, C) array with values in [0, 1] to uint8."""
    return (np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


class StageRun:
    """Context manager for the MLflow run of one stage.

    Args:
        stage: DVC stage name, e.g. ``"prepare"`` or ``"train_autoencoder"``.
        params: the stage's parameters (nested mapping); logged flattened and hashed.
        run_name: optional run name (defaults to ``stage``), e.g. the autoencoder kind.
        enabled: False on non-main DDP ranks: every call becomes a no-op.
    """

    def __init__(
        self,
        stage: str,
        params: Mapping[str, Any],
        *,
        run_name: str | None = None,
        enabled: bool = True,
    ) -> None:
        self.stage = stage
        self.params = dict(params)
        self.run_name = run_name or stage
        self.enabled = enabled
        self.run_id: str | None = None
        self._mlflow: Any = None
        self._offline_path = (
            project_root() / "reports" / "tracking_offline" / f"{self.run_name}.jsonl"
        )
        self._offline = False

    def __enter__(self) -> StageRun:
        if not self.enabled:
            return self
        tags = {
            "stage": self.stage,
            "pipeline_id": pipeline_id(self.params),
            "git_commit": git_commit(),
            "params_hash": params_hash(self.params),
        }
        self._call(self._start, tags)
        self.log_params(flatten(self.params))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if not self.enabled or self._mlflow is None:
            return
        status = "FINISHED" if exc_type is None else "FAILED"
        self._call(lambda: self._mlflow.end_run(status=status))

    def _start(self, tags: dict[str, str]) -> None:
        import mlflow

        self._mlflow = mlflow
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        user_uri = os.environ.get("MLFLOW_TRACKING_URI")
        local_store = not user_uri
        mlflow.set_tracking_uri(tracking_uri())
        if local_store:  # set_tracking_uri exports the variable; keep the user's environment
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        if mlflow.get_experiment_by_name(EXPERIMENT) is None:
            location = (project_root() / "mlartifacts").as_uri() if local_store else None
            mlflow.create_experiment(EXPERIMENT, artifact_location=location)
        mlflow.set_experiment(EXPERIMENT)
        run = mlflow.start_run(run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id

    def _call(self, fn: Any, *args: Any) -> None:
        """Run one MLflow call; on failure warn once and switch to the offline log."""
        if self._offline:
            self._record_offline(fn.__name__ if hasattr(fn, "__name__") else "call", args)
            return
        try:
            fn(*args)
        except Exception as err:  # any tracking failure must not stop training
            self._offline = True
            logger.warning(
                "MLflow tracking at %s failed (%s: %s); continuing and recording to %s",
                tracking_uri(),
                type(err).__name__,
                str(err).splitlines()[0][:200] if str(err) else "",
                self._offline_path,
            )
            self._record_offline(getattr(fn, "__name__", "call"), args)

    def _record_offline(self, kind: str, args: tuple[Any, ...]) -> None:
        self._offline_path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"time": time.time(), "kind": kind, "args": args}
        with self._offline_path.open("a") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")

    @property
    def offline(self) -> bool:
        """True once a tracking call has failed and calls go to the local file."""
        return self._offline

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (values stringified, truncated to MLflow's 6000-char limit)."""
        if not self.enabled:
            return
        clean = {k: str(v)[:6000] for k, v in params.items()}

        def log_params(p: dict[str, str]) -> None:
            self._mlflow.log_params(p)

        self._call(log_params, clean)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics at ``step``; non-finite values are logged as they are."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}

        def log_metrics(m: dict[str, float], s: int | None) -> None:
            self._mlflow.log_metrics(m, step=s)

        self._call(log_metrics, clean, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (e.g. the final checkpoint) under ``artifact_path``."""
        if not self.enabled:
            return

        def log_artifact(p: str, ap: str | None) -> None:
            self._mlflow.log_artifact(p, artifact_path=ap)

        self._call(log_artifact, str(path), artifact_path)

    def log_image(self, image: np.ndarray | Image.Image, name: str) -> None:
        """Log an image artifact.

        Args:
            image: PIL image, or array (H, W) / (H, W, 3) with values in [0, 1] or uint8.
            name: artifact file name with folders, e.g. ``"grids/recon_000500.png"``.
        """
        if not self.enabled:
            return
        if not isinstance(image, Image.Image):
            arr = np.asarray(image)
            image = Image.fromarray(arr if arr.dtype == np.uint8 else to_uint8_image(arr))
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(name).name
            image.save(local)
            folder = str(Path(name).parent) if Path(name).parent != Path(".") else None
            self.log_artifact(local, folder)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        """Log a JSON artifact (e.g. a stage's report)."""
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / Path(name).name
            local.write_text(json.dumps(data, indent=2, default=str))
            folder = str(Path(name).parent) if Path(name).parent != Path(".") else None
            self.log_artifact(local, folder)


def iter_offline(path: str | Path) -> Iterator[dict[str, Any]]:
    """Read back the calls recorded while the tracking server was unreachable."""
    with Path(path).open() as fh:
        for line in fh:
            yield json.loads(line)
