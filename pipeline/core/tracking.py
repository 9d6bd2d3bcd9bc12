"""MLflow tracking: one run per stage, grouped under the pipeline run it belongs to.

The experiment ``braingen`` is tagged as a model-development experiment
(:data:`EXPERIMENT_TAGS`), so the MLflow UI opens on its training runs. Every stage run is
tagged ``pipeline_run`` (:func:`pipeline_run_id`: the commit, the code's uncommitted changes and
``params.yaml``, or ``BRAINGEN_PIPELINE_RUN``); under ``dvc repro`` (``DVC_STAGE`` set) or with
``BRAINGEN_PIPELINE_RUN`` set, it is also a child of one parent run per pipeline run, which
collects each stage's last metric values (``<run name>.<metric>``) for comparing two repros.
A stage DVC skips (cached) starts no run, so nothing is duplicated. A sub-experiment of a
stage (one arm of a study) is a child run of the stage run (:meth:`StageRun.child`).

Training images go through :meth:`StageRun.log_image` with a step (MLflow's image history:
the UI's slider over one key); the prepared splits through :meth:`StageRun.log_datasets`
(digest: DVC's md5 of the folder, :func:`dvc_dir_md5`); training stages sample system
metrics (CPU, memory, disk, network; GPU through ``nvidia-ml-py`` when there is one) with
``system_metrics=True``.
Logged and registered models: :mod:`pipeline.core.registry`.

By default runs go to a sqlite store ``mlflow.db`` with artifacts in ``mlartifacts/`` at the
project root; ``MLFLOW_TRACKING_URI`` overrides this (e.g. a shared ``mlflow server``).
A tracking server that is down or dies mid-run never stops training: the first failure is
warned about once, and every later call is appended to a local JSON-lines file
(``reports/tracking_offline/<stage>.jsonl``) so nothing is lost. MLflow's own HTTP defaults
(7 retries with exponential backoff, 120 s timeout) would stall a stage for minutes before
that first failure; :data:`HTTP_DEFAULTS` shortens them unless the environment sets them.
Runs side by side share the sqlite store: a call that collides with a sibling's write
(:data:`TRANSIENT_STORE_ERRORS`) is repeated before the run gives up on the store.

Usage::

    with StageRun("train_autoencoder", params, run_name="vqvae") as run:
        run.log_metrics({"loss": 0.1}, step=10)
        run.log_image(grid, "samples/recon", step=100)      # image history (key, step)
        run.log_image(grid, "reports/ae_vqvae_recon.png")   # one image file
        with run.child("arm 1x", params={"synthetic": 1.0}) as arm:  # a nested run
            arm.log_metrics({"dice": 0.8})
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

EXPERIMENT = "braingen"
#: Experiment tags: ``mlflow.experimentKind`` makes the UI open on training runs.
EXPERIMENT_TAGS: dict[str, str] = {
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": "braingen: one parent run per `dvc repro` (tag pipeline_run), one "
    "child run per stage; models registered as braingen-*.",
}
#: Environment variable naming the pipeline run (default: :func:`pipeline_run_id`).
PIPELINE_RUN_ENV = "BRAINGEN_PIPELINE_RUN"
#: Environment variable that turns the system metrics of training runs off (``0``).
SYSTEM_METRICS_ENV = "BRAINGEN_SYSTEM_METRICS"
#: The context of each split when logged as a dataset input.
SPLIT_CONTEXT = {"train": "training", "val": "validation", "test": "test"}
#: The code whose uncommitted changes make another pipeline run (``dvc.lock`` and reports,
#: which DVC rewrites during a repro, are not in it).
CODE_PATHS = ("pipeline", "data_prep", "stages", "pyproject.toml")
#: Failures of a shared sqlite store that another process's write at the same moment causes
#: and that a repeat of the call does not meet: MLflow gets or inserts a dataset's row, so two
#: runs side by side (the VQ-VAE and the VAE-GAN) logging the same split at once collide on
#: its unique key, and a write can find the database locked. Such a call is repeated
#: (:data:`STORE_RETRIES` times, :data:`STORE_RETRY_PAUSE_S` apart) before the run goes
#: offline.
TRANSIENT_STORE_ERRORS = ("UNIQUE constraint failed", "database is locked")
STORE_RETRIES = 3
STORE_RETRY_PAUSE_S = 0.5
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


def _uncommitted_code_hash() -> str:
    """Short sha256 of ``git diff HEAD`` over :data:`CODE_PATHS` ("" when clean or no git)."""
    try:
        out = subprocess.run(
            ["git", "diff", "HEAD", "--", *CODE_PATHS],
            cwd=project_root(),
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return hashlib.sha256(out.stdout).hexdigest()[:8] if out.stdout else ""


def pipeline_run_id() -> str:
    """The identity shared by every stage of one pipeline run (one ``dvc repro``).

    ``BRAINGEN_PIPELINE_RUN`` if set, else ``<commit>[-dirty<hash>]-<params.yaml hash>``:
    stages that DVC runs as separate processes agree on it, and a repro after a change of
    code or parameters gets a new one. Re-running an unchanged repro (``dvc repro -f``)
    reuses it.
    """
    if os.environ.get(PIPELINE_RUN_ENV):
        return os.environ[PIPELINE_RUN_ENV]
    params_file = project_root() / "params.yaml"
    blob = params_file.read_bytes() if params_file.is_file() else b""
    dirty = _uncommitted_code_hash()
    return "-".join(
        part
        for part in (
            git_commit(),
            f"dirty{dirty}" if dirty else "",
            hashlib.sha256(blob).hexdigest()[:12],
        )
        if part
    )


def dvc_dir_md5(folder: str | Path) -> str:
    """DVC's content hash of a folder (``<md5>.dir``), as ``dvc.lock`` records it.

    The md5 of the JSON list ``[{"md5": <file md5>, "relpath": <posix path>}, ...]`` sorted
    by path (``dvc_data``'s ``Tree.as_bytes``).
    """
    root = Path(folder)
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.md5()
        with path.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
        entries.append({"md5": digest.hexdigest(), "relpath": path.relative_to(root).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


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
        system_metrics: sample CPU, memory, disk, network (and GPU) usage into the run
            (``system/*`` metrics, every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` s,
            default 10); ``BRAINGEN_SYSTEM_METRICS=0`` turns it off.
    """

    def __init__(
        self,
        stage: str,
        params: Mapping[str, Any],
        *,
        run_name: str | None = None,
        enabled: bool = True,
        system_metrics: bool = False,
    ) -> None:
        self.stage = stage
        self.params = dict(params)
        self.run_name = run_name or stage
        self.enabled = enabled
        self.system_metrics = system_metrics and os.environ.get(SYSTEM_METRICS_ENV) != "0"
        self.run_id: str | None = None
        #: The ``pipeline_run`` tag (set on entering).
        self.pipeline_run: str | None = None
        #: The parent run of the pipeline run (None outside ``dvc repro`` and without
        #: ``BRAINGEN_PIPELINE_RUN``).
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self._mlflow: Any = None
        self._monitor: Any = None
        self._offline_path = (
            project_root() / "reports" / "tracking_offline" / f"{self.run_name}.jsonl"
        )
        self._offline = False
        self._last_metrics: dict[str, float] = {}
        self._metric_models: dict[str, str] = {}  # metric-name prefix -> logged model id

    def __enter__(self) -> StageRun:
        if not self.enabled:
            return self
        self.pipeline_run = pipeline_run_id()
        tags = {
            "stage": self.stage,
            "pipeline_id": pipeline_id(self.params),
            "pipeline_run": self.pipeline_run,
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
        if self._monitor is not None and not self._offline:
            self._monitor.finish()
        self._call(self._summarise_in_parent)
        if self._offline:  # recorded; still close the run in the store if it answers now
            self._record_offline("end_run", (status,))
            with contextlib.suppress(Exception):
                self._mlflow.end_run(status=status)
            return
        self._call(lambda: self._mlflow.end_run(status=status))

    @property
    def mlflow(self) -> Any:
        """The ``mlflow`` module once the run has started (None before, or when disabled)."""
        return self._mlflow

    def guarded(self, fn: Any, *args: Any) -> None:
        """Call ``fn(*args)`` under the run's failure policy (warn once, then record offline)."""
        if self.enabled:
            self._call(fn, *args)

    @contextmanager
    def child(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[ChildRun]:
        """A run nested under this stage run, for one sub-experiment (a study's arm).

        The child is created with MLflow's client (the fluent active run stays the stage
        run), tagged ``mlflow.parentRunId`` = this run, the same ``stage`` and
        ``pipeline_run``, and ended ``FINISHED`` (``FAILED`` when the body raises). It follows
        the stage run's failure policy: disabled, it does nothing; offline (server down, or
        dead mid-run), its calls go to the stage's local file and never raise.

        Args:
            name: the child's run name, e.g. ``"arm 1x"``.
            params: its parameters (nested mappings are flattened).
            tags: extra tags.

        Yields:
            The child, with ``log_metrics`` and ``log_params``.
        """
        child = ChildRun(self, name)
        child_tags = {
            "stage": self.stage,
            "pipeline_run": self.pipeline_run or "",
            "mlflow.parentRunId": self.run_id or "",
            **(tags or {}),
        }
        child._start(child_tags)
        child.log_params(flatten(params or {}))
        try:
            yield child
        except BaseException:
            child._end("FAILED")
            raise
        child._end("FINISHED")

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
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            location = (project_root() / "mlartifacts").as_uri() if local_store else None
            experiment_id = mlflow.create_experiment(
                EXPERIMENT, artifact_location=location, tags=EXPERIMENT_TAGS
            )
        else:
            experiment_id = experiment.experiment_id
            for key, value in EXPERIMENT_TAGS.items():
                if key not in experiment.tags:  # experiments made before the tags existed
                    mlflow.MlflowClient().set_experiment_tag(experiment_id, key, value)
        self.experiment_id = experiment_id
        mlflow.set_experiment(experiment_id=experiment_id)
        if os.environ.get("DVC_STAGE") or os.environ.get(PIPELINE_RUN_ENV):
            self.parent_run_id = self._parent_run(tags["pipeline_run"])
            tags = tags | {"mlflow.parentRunId": self.parent_run_id}
        run = mlflow.start_run(run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        if self.system_metrics:
            self._start_system_metrics()

    def _parent_run(self, pipeline_run: str) -> str:
        """The id of the pipeline run's parent run, created by the first stage that runs.

        Two stages starting at once (the autoencoders side by side) may both create one:
        each then keeps the oldest and deletes its own.
        """
        client = self._mlflow.MlflowClient()
        query = f"tags.pipeline_run = '{pipeline_run}' and tags.pipeline_role = 'parent'"

        def oldest() -> Any:
            runs = client.search_runs([self.experiment_id], query, max_results=50)
            return min(runs, key=lambda r: (r.info.start_time, r.info.run_id), default=None)

        found = oldest()
        if found is not None:
            return found.info.run_id
        created = client.create_run(
            self.experiment_id,
            run_name=f"pipeline {pipeline_run}",
            tags={
                "pipeline_run": pipeline_run,
                "pipeline_role": "parent",
                "git_commit": git_commit(),
                "mlflow.note.content": "One pipeline run (dvc repro): its stages are the "
                "child runs; metrics <stage run>.<metric> are each stage's last values.",
            },
        )
        params_file = project_root() / "params.yaml"
        if params_file.is_file():
            client.log_artifact(created.info.run_id, str(params_file))
        client.set_terminated(created.info.run_id, "FINISHED")
        winner = oldest()
        if winner is not None and winner.info.run_id != created.info.run_id:
            client.delete_run(created.info.run_id)
            return winner.info.run_id
        return created.info.run_id

    def _start_system_metrics(self) -> None:
        """Start MLflow's system-metrics sampler; without psutil the run goes on without it."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, tracking_uri=tracking_uri())
            self._monitor.start()
        except Exception as err:  # e.g. psutil missing: metrics are optional
            logger.info("no system metrics (%s: %s)", type(err).__name__, err)
            self._monitor = None

    def _summarise_in_parent(self) -> None:
        """Copy the run's last metric values to the parent run as ``<run name>.<metric>``."""
        if self.parent_run_id is None:
            return
        client = self._mlflow.MlflowClient()
        summary = {
            f"{self.run_name}.{key}": value
            for key, value in self._last_metrics.items()
            if not key.startswith(("per_z.", "system/"))
        }
        items = list(summary.items())
        for start in range(0, len(items), 500):  # MLflow takes up to 1000 metrics a batch
            self._mlflow.log_metrics(dict(items[start : start + 500]), run_id=self.parent_run_id)
        client.set_terminated(self.parent_run_id, "FINISHED")

    def _call(self, fn: Any, *args: Any) -> None:
        """Run one MLflow call; on failure (after :data:`STORE_RETRIES` repeats of a
        :data:`TRANSIENT_STORE_ERRORS` one) warn once and switch to the offline log."""
        if self._offline:
            self._record_offline(fn.__name__ if hasattr(fn, "__name__") else "call", args)
            return
        for retry in range(STORE_RETRIES + 1):
            try:
                fn(*args)
                return
            except Exception as err:  # any tracking failure must not stop training
                failure = err
                if retry == STORE_RETRIES or not any(
                    text in str(err) for text in TRANSIENT_STORE_ERRORS
                ):
                    break
                time.sleep(STORE_RETRY_PAUSE_S)
        self._go_offline(fn, args, failure)

    def _go_offline(self, fn: Any, args: tuple[Any, ...], err: Exception) -> None:
        """Warn once and record this and every later call in the offline log."""
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

    def link_metrics(self, prefix: str, model_id: str) -> None:
        """Attach later metrics named ``<prefix>...`` to the logged model ``model_id``.

        They then also show on the model's page (``evaluate``: ``ldm.fd_alex`` → the LDM).
        """
        self._metric_models[prefix] = model_id

    def _model_of(self, key: str) -> str | None:
        return next((m for p, m in self._metric_models.items() if key.startswith(p)), None)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics at ``step``; non-finite values are logged as they are."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._last_metrics.update(clean)

        def log_metrics(m: dict[str, float], s: int | None) -> None:
            by_model: dict[str | None, dict[str, float]] = {}
            for key, value in m.items():
                by_model.setdefault(self._model_of(key), {})[key] = value
            for model_id, part in by_model.items():
                self._mlflow.log_metrics(part, step=s, model_id=model_id)

        self._call(log_metrics, clean, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (e.g. the final checkpoint) under ``artifact_path``."""
        if not self.enabled:
            return

        def log_artifact(p: str, ap: str | None) -> None:
            self._mlflow.log_artifact(p, artifact_path=ap)

        self._call(log_artifact, str(path), artifact_path)

    def log_image(
        self, image: np.ndarray | Image.Image, name: str, step: int | None = None
    ) -> None:
        """Log an image: one step of an image history, or one image file.

        Args:
            image: PIL image, or array (H, W) / (H, W, 3) with values in [0, 1] or uint8.
            name: with ``step``, the history's key (``"samples/ldm"``: letters, digits,
                ``_ - . /`` and spaces); without, the artifact file name with folders
                (``"reports/ldm_samples.png"``).
            step: the training step; the run's images page steps through a key's history.
        """
        if not self.enabled:
            return
        if not isinstance(image, Image.Image):
            arr = np.asarray(image)
            image = Image.fromarray(arr if arr.dtype == np.uint8 else to_uint8_image(arr))
        if step is not None:

            def log_image(img: Image.Image, key: str, s: int) -> None:
                self._mlflow.log_image(img, key=key, step=s)

            self._call(log_image, image, name, int(step))
            return
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

    def log_datasets(
        self, folder: str | Path, splits: tuple[str, ...] = tuple(SPLIT_CONTEXT)
    ) -> None:
        """Log each split folder ``<folder>/<split>`` that exists as a dataset input of the run.

        The dataset is named ``<folder>/<split>`` (``data/prepared/train``, relative to the
        project), its digest is DVC's content hash of the split folder (:func:`dvc_dir_md5`),
        its source the folder, its context ``training`` / ``validation`` / ``test``.
        """
        if not self.enabled:
            return
        root = Path(folder).resolve()
        found = [(split, root / split) for split in splits if (root / split).is_dir()]
        label = root.relative_to(project_root()) if root.is_relative_to(project_root()) else root

        def log_datasets(entries: list[tuple[str, Path]]) -> None:
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset

            for split, path in entries:
                with warnings.catch_warnings():  # MLflow registers the local source twice
                    warnings.simplefilter("ignore", UserWarning)
                    source = resolve_dataset_source(path.resolve().as_uri())
                dataset = MetaDataset(
                    source,
                    name=f"{label.as_posix()}/{split}",
                    digest=dvc_dir_md5(path),
                )
                context = SPLIT_CONTEXT.get(split, split)
                self._mlflow.log_input(dataset, context=context, tags={"split": split})

        self._call(log_datasets, found)


class ChildRun:
    """A run nested under a :class:`StageRun` (made by :meth:`StageRun.child`).

    Every call goes through the stage run's failure policy (:meth:`StageRun.guarded`):
    nothing when the stage run is disabled, the local file when it is offline.

    Args:
        stage_run: the stage run it is nested under.
        name: its run name.
    """

    def __init__(self, stage_run: StageRun, name: str) -> None:
        self.stage_run = stage_run
        self.name = name
        #: Its MLflow run id (None until created, and when disabled or offline).
        self.run_id: str | None = None

    def _start(self, tags: dict[str, str]) -> None:
        def start_child(name: str, t: dict[str, str]) -> None:
            client = self.stage_run.mlflow.MlflowClient()
            created = client.create_run(self.stage_run.experiment_id, run_name=name, tags=t)
            self.run_id = created.info.run_id

        self.stage_run.guarded(start_child, self.name, tags)

    def _end(self, status: str) -> None:
        def end_child(name: str, s: str) -> None:
            self.stage_run.mlflow.MlflowClient().set_terminated(self.run_id, s)

        self.stage_run.guarded(end_child, self.name, status)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (values stringified, truncated to MLflow's 6000-char limit)."""
        clean = {k: str(v)[:6000] for k, v in params.items()}

        def log_child_params(name: str, p: dict[str, str]) -> None:
            from mlflow.entities import Param

            entries = [Param(k, v) for k, v in p.items()]
            self.stage_run.mlflow.MlflowClient().log_batch(self.run_id, params=entries)

        if clean:
            self.stage_run.guarded(log_child_params, self.name, clean)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics at ``step`` (0 when None, as MLflow does)."""
        clean = {k: float(v) for k, v in metrics.items()}

        def log_child_metrics(name: str, m: dict[str, float], s: int | None) -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            entries = [Metric(k, v, now, s or 0) for k, v in m.items()]
            self.stage_run.mlflow.MlflowClient().log_batch(self.run_id, metrics=entries)

        self.stage_run.guarded(log_child_metrics, self.name, clean, step)


def iter_offline(path: str | Path) -> Iterator[dict[str, Any]]:
    """Read back the calls recorded while the tracking server was unreachable."""
    with Path(path).open() as fh:
        for line in fh:
            yield json.loads(line)
