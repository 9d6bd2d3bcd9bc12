"""Model files in MLflow: logged models of their runs, registered under stable names.

Every model file a stage writes (:mod:`pipeline.models.files`) becomes an MLflow *logged
model* of its run (the Models column of the runs page) holding the file (the one copy MLflow
stores: it is not a run artifact too), with the file's metadata as tags and its config as
params, and a new version of the registered model :data:`REGISTERED_NAMES` ``[kind]`` whose
tags carry the file's ``sha256`` and ``code_version``. ``evaluate`` links its run (model
inputs, tags ``scored.<section>``) and its figures (metrics ``<section>.*`` attached to the
logged model) to the versions of the files it scored (:func:`link_models`); ``generate``
links its run to the versions of the generator and first stage it sampled
(:func:`link_generator`, tags ``used.<kind>``).

``braingen generate --model models:/braingen-ldm/latest`` (or ``/<version>``,
``@<alias>``) goes through :func:`fetch_model`: it downloads the version's file and the
first stage its metadata names (found in the registry by its sha256), checks both hashes
and the code release, and returns a local path for
:func:`pipeline.inference.sampling.load_generator` (``torch.load(weights_only=True)``).

Usage::

    with model_run("train_ldm", identity, run_name="ldm", datasets=latents, model=path) as run:
        ...                                     # train; the model file is logged and
                                                # registered (braingen-ldm) at the end
    path = fetch_model("models:/braingen-ldm/latest")
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core import distributed
from pipeline.core.checkpoint import CheckpointError, load_checkpoint
from pipeline.core.errors import BraingenError
from pipeline.core.identity import code_version, file_sha256
from pipeline.core.tracking import HTTP_DEFAULTS, StageRun, flatten, tracking_uri

logger = logging.getLogger(__name__)

#: The registered model of each model-file kind.
REGISTERED_NAMES: dict[str, str] = {
    "ae_vqvae": "braingen-ae-vqvae",
    "ae_vaegan": "braingen-ae-vaegan",
    "pixelcnn": "braingen-pixelcnn",
    "ldm": "braingen-ldm",
    "zprobe": "braingen-zprobe",
    "covariate_probe": "braingen-covariate-probe",
    "segmenter": "braingen-segmenter",
}
#: What each registered model is (its description in the registry).
DESCRIPTIONS: dict[str, str] = {
    "ae_vqvae": "z-conditioned VQ-VAE first stage (slices <-> code grids)",
    "ae_vaegan": "z-conditioned VAE-GAN first stage (slices <-> latents)",
    "pixelcnn": "z-conditioned PixelCNN prior over the VQ-VAE's codes",
    "ldm": "z-conditioned latent diffusion UNet over the VAE-GAN's latents",
    "zprobe": "z-index probe: the judge of z-conditioning",
    "covariate_probe": "age / CDR / sex probe: the judge of covariate conditioning",
    "segmenter": "CSF / GM / WM segmenter: the judge of tissue-mask conditioning",
}
#: Folder of downloaded registry models (default ``~/.cache/braingen/models``).
CACHE_ENV = "BRAINGEN_MODEL_CACHE"
#: Metadata keys copied to the logged model's and the version's tags.
_META_TAGS = (
    "code_version",
    "scale_factor",
    "latent_shape",
    "latent_source",
    "code_shape",
    "num_codes",
    "n_slices",
    "autoencoder_sha256",
)


class RegistryError(BraingenError):
    """A registry model that cannot be used: unknown, tampered with, or from another release."""


def is_registry_uri(text: str) -> bool:
    """True for ``models:/<name>/<version|latest>`` and ``models:/<name>@<alias>``."""
    return text.startswith("models:/")


def model_tags(path: str | Path, ckpt: Mapping[str, Any]) -> dict[str, str]:
    """The tags describing a model file: kind, hashes, z schema and its metadata.

    Args:
        path: the model file.
        ckpt: its content (:func:`~pipeline.core.checkpoint.load_checkpoint`).
    """
    meta = ckpt.get("metadata", {})
    k = meta.get("n_slices") or meta.get("data", {}).get("n_slices")
    tags = {
        "kind": str(ckpt["kind"]),
        "sha256": file_sha256(path),
        "file": Path(path).name,
        "z_schema": f"z in [0, 1] = z_index / (K - 1), K = {k}" if k else "none",
        "covariates": "z",  # the only conditioning variable
    }
    if "conditioning" in meta:
        tags["conditioning"] = json.dumps(meta["conditioning"], sort_keys=True)
    if "data" in meta:
        tags["data"] = json.dumps(meta["data"], sort_keys=True)
    for key in _META_TAGS:
        if key in meta:
            value = meta[key]
            tags[key] = value if isinstance(value, str) else json.dumps(value)
    if "autoencoder" in meta:
        tags["autoencoder_file"] = Path(str(meta["autoencoder"])).name
    return tags


def log_model(run: StageRun, path: str | Path) -> None:
    """Log a model file as a logged model of ``run`` and register it as a new version.

    Args:
        run: the stage's run (nothing happens when it is disabled; offline, the call is
            recorded in its local file).
        path: the model file the stage wrote.
    """
    if not run.enabled:
        return
    ckpt = load_checkpoint(path)
    tags = model_tags(path, ckpt)
    params = {k: str(v)[:6000] for k, v in flatten(ckpt.get("config", {})).items()}
    run.guarded(_log_and_register, run, str(path), tags, params)


@contextmanager
def model_run(
    stage: str,
    identity: Mapping[str, Any],
    *,
    run_name: str,
    datasets: str | Path,
    model: str | Path | Sequence[str | Path],
) -> Iterator[StageRun]:
    """The run of a training stage: rank 0 alone tracks, with system metrics; the split
    folders under ``datasets`` are its inputs, and the ``model`` file it wrote (or each of
    several files) is logged and registered (:func:`log_model`) when the body ends without
    an error.
    """
    with StageRun(
        stage, identity, run_name=run_name, enabled=distributed.is_main(), system_metrics=True
    ) as run:
        run.log_datasets(datasets)
        yield run
        for path in [model] if isinstance(model, str | Path) else model:
            log_model(run, path)


def _log_and_register(
    run: StageRun, path: str, tags: dict[str, str], params: dict[str, str]
) -> None:
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.exceptions import MlflowException

    client = run.mlflow.MlflowClient()
    kind = tags["kind"]
    extra = {"pipeline_run": client.get_run(run.run_id).data.tags.get("pipeline_run", "")}
    model = client.create_logged_model(
        run.experiment_id,
        name=kind,
        source_run_id=run.run_id,
        tags=tags | extra,
        params=params,
        model_type="braingen",
    )
    client.log_model_artifact(model.model_id, path)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run.run_id, [LoggedModelOutput(model.model_id, 0)])
    name = REGISTERED_NAMES[kind]
    try:
        client.create_registered_model(name, description=DESCRIPTIONS[kind])
    except MlflowException as err:
        if "ALREADY_EXISTS" not in err.error_code:
            raise
    version = client.create_model_version(
        name,
        f"models:/{model.model_id}",
        run_id=run.run_id,
        tags=tags | extra,
        description=f"{DESCRIPTIONS[kind]}; {tags['file']} sha256 {tags['sha256'][:12]}",
        await_creation_for=0,
        model_id=model.model_id,
    )
    # as mlflow.register_model does: the logged models page then names the version
    link = json.dumps([{"name": name, "version": version.version}])
    client.set_logged_model_tags(model.model_id, {"mlflow.modelVersions": link})
    logger.info("registered %s version %s (logged model %s)", name, version.version, model.model_id)


def _version_with_sha(client: Any, names: list[str], sha: str) -> Any:
    """The newest registered version among ``names`` whose ``sha256`` tag is ``sha``."""
    found = []
    for name in names:
        found += client.search_model_versions(f"name = '{name}' and tags.sha256 = '{sha}'")
    return max(found, key=lambda v: int(v.version), default=None)


def _model_id(version: Any) -> str | None:
    source = str(version.source)
    return version.model_id or (
        source.removeprefix("models:/") if source.startswith("models:/m-") else None
    )


def link_models(run: StageRun, files: Mapping[str, str | Path]) -> None:
    """Link ``run`` to the registered versions of the model files it scores.

    Each file found in the registry (by sha256) becomes a model input of the run, a tag
    ``scored.<section>`` = ``<registered name>/<version>``, and the run's later metrics
    ``<section>.*`` are attached to its logged model (so they show on the model's page).

    Args:
        run: the ``evaluate`` run.
        files: ``{section of metrics.json: model file}``; missing files are skipped.
    """
    if not run.enabled:
        return
    shas = {section: file_sha256(p) for section, p in files.items() if Path(p).is_file()}
    run.guarded(_link, run, shas)


def _link(run: StageRun, shas: dict[str, str]) -> None:
    client = run.mlflow.MlflowClient()
    versions = {
        section: _version_with_sha(client, list(REGISTERED_NAMES.values()), sha)
        for section, sha in shas.items()
    }
    for section, model_id in _log_model_inputs(run, versions, "scored").items():
        run.link_metrics(f"{section}.", model_id)


def _log_model_inputs(run: StageRun, versions: Mapping[str, Any], tag: str) -> dict[str, str]:
    """Log the logged models of ``versions`` as model inputs of ``run``, each with a tag
    ``<tag>.<section>`` = ``<registered name>/<version>``.

    Args:
        run: the run that used or scored them.
        versions: ``{section: model version}``; None (not registered) is skipped.
        tag: the tags' prefix (``scored``, ``used``).

    Returns:
        The logged model id of each section linked.
    """
    from mlflow.entities import LoggedModelInput

    linked, tags = {}, {}
    for section, version in versions.items():
        model_id = None if version is None else _model_id(version)
        if model_id is not None:
            linked[section] = model_id
            tags[f"{tag}.{section}"] = f"{version.name}/{version.version}"
    if linked:
        client = run.mlflow.MlflowClient()
        client.log_inputs(run.run_id, models=[LoggedModelInput(m) for m in linked.values()])
        run.mlflow.set_tags(tags)
    return linked


def link_generator(run: StageRun, path: str | Path) -> None:
    """Link ``run`` (``generate``) to the registered versions of the generator it samples.

    The generator file's version (found by sha256) and the version of the first stage it
    was trained on (by the version's ``autoencoder_sha256`` tag) become model inputs of the
    run, with tags ``used.<kind>`` = ``<registered name>/<version>``. A file not in the
    registry links nothing.

    Args:
        run: the ``generate`` run.
        path: the generator file (``models/ldm.pt``, ``models/pixelcnn.pt``).
    """
    if run.enabled and Path(path).is_file():
        run.guarded(_link_generator, run, file_sha256(path))


def _link_generator(run: StageRun, sha: str) -> None:
    client = run.mlflow.MlflowClient()
    generators = [REGISTERED_NAMES[k] for k in ("ldm", "pixelcnn")]
    version = _version_with_sha(client, generators, sha)
    if version is None:
        return
    versions = {version.tags["kind"]: version}
    ae_sha = version.tags.get("autoencoder_sha256")
    if ae_sha:
        first_stages = [n for k, n in REGISTERED_NAMES.items() if k.startswith("ae_")]
        ae_version = _version_with_sha(client, first_stages, ae_sha)
        if ae_version is not None:
            versions[ae_version.tags["kind"]] = ae_version
    _log_model_inputs(run, versions, "used")


# ------------------------------------------------------------------ resolving models:/ URIs


def _client() -> Any:
    import mlflow

    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # errors: one line
    return mlflow.MlflowClient(tracking_uri(), registry_uri=tracking_uri())


def _resolve_version(client: Any, uri: str) -> Any:
    """The model version a ``models:/`` URI names (``latest``: the highest version)."""
    from mlflow.exceptions import MlflowException

    rest = uri.removeprefix("models:/")
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, _, version = rest.partition("/")
        if version in ("", "latest"):
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise RegistryError(f"no registered model {name!r} at {tracking_uri()}")
            return max(versions, key=lambda v: int(v.version))
        return client.get_model_version(name, version)
    except MlflowException as err:
        raise RegistryError(
            f"{uri}: {str(err).splitlines()[0][:200]} (registry at {tracking_uri()})"
        ) from None


def _download(client: Any, version: Any, dest: Path) -> Path:
    """The version's model file under ``dest``, downloaded unless a copy with its sha is there."""
    import mlflow

    expected = version.tags.get("sha256")
    name = version.tags.get("file")
    if name and expected and (dest / name).is_file() and file_sha256(dest / name) == expected:
        return dest / name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{version.name}/{version.version}",
        dst_path=str(dest),
        tracking_uri=tracking_uri(),
    )
    files = sorted(dest.rglob("*.pt"))
    if len(files) != 1:
        raise RegistryError(
            f"models:/{version.name}/{version.version} holds {len(files)} .pt files, not one"
        )
    return files[0]


def _check(path: Path, version: Any) -> dict[str, Any]:
    """Refuse a file whose sha256 or code release differs from what was registered/runs here.

    Returns:
        The file's metadata.
    """
    where = f"models:/{version.name}/{version.version}"
    expected = version.tags.get("sha256")
    if not expected or file_sha256(path) != expected:
        raise RegistryError(
            f"{where}: the downloaded file's sha256 differs from the registered "
            f"{expected!r}; the registry entry or its artifact was altered"
        )
    try:
        meta = dict(load_checkpoint(path).get("metadata", {}))
    except CheckpointError as err:
        raise RegistryError(f"{where}: {err}") from None
    theirs, ours = str(meta.get("code_version", "")), code_version()
    if theirs.split("+")[0] != ours.split("+")[0]:
        raise RegistryError(
            f"{where} was written by braingen {theirs or 'of unknown version'}, this is "
            f"{ours}; install that release or retrain the model"
        )
    if theirs != ours:
        logger.warning("%s was written by braingen %s; this is %s", where, theirs, ours)
    return meta


def fetch_model(uri: str, cache: str | Path | None = None) -> Path:
    """Download a registered model (and the first stage it needs) and return its file.

    Args:
        uri: ``models:/<name>/<version>``, ``models:/<name>/latest`` or
            ``models:/<name>@<alias>`` in the registry of :func:`tracking_uri`.
        cache: download folder (default ``$BRAINGEN_MODEL_CACHE`` or
            ``~/.cache/braingen/models``); files are re-used when their sha256 matches.

    Returns:
        The local model file; a generator's first stage is saved next to it under the name
        its metadata gives, unless the file named there already has the right sha256.

    Raises:
        RegistryError: unknown model or version, a sha256 that differs from the registered
            one, a file from another braingen release, or a first stage not in the registry.
    """
    client = _client()
    version = _resolve_version(client, uri)
    root = Path(
        cache or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "braingen" / "models"
    )
    dest = root / version.name / f"v{version.version}"
    path = _download(client, version, dest)
    meta = _check(path, version)
    sha = meta.get("autoencoder_sha256")
    if not sha:
        return path
    named = Path(str(meta["autoencoder"]))
    beside = dest / named.name
    if any(p.is_file() and file_sha256(p) == sha for p in (named, beside)):
        return path
    names = [n for k, n in REGISTERED_NAMES.items() if k.startswith("ae_")]
    ae_version = _version_with_sha(client, names, sha)
    if ae_version is None:
        raise RegistryError(
            f"{uri} needs the first stage {named.name} with sha256 {sha[:12]}..., which is "
            f"neither at {named} nor registered as {' or '.join(names)}"
        )
    ae_path = _download(client, ae_version, dest / "autoencoder")
    _check(ae_path, ae_version)
    shutil.copyfile(ae_path, beside)
    return path
