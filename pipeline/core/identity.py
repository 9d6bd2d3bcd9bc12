"""What a run is: the code that ran, the files it read and the parameters that decide it.

:func:`stage_identity` is the one description of a stage run. The same dict is logged as the
MLflow run's params, hashed to decide whether a resume checkpoint belongs to the run, and its
parameter keys are the ones ``dvc.yaml`` lists for the stage (``tests/test_architecture.py``
checks that), so a change that re-runs the stage under DVC also refuses a stale resume file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import tomllib
from pathlib import Path
from typing import Any

from pipeline.core.config import Params
from pipeline.core.tracking import git_commit

#: The params keys (dotted) that decide each stage's outputs. ``device`` and ``profile`` are
#: DVC params too (they change where and with which profile a stage runs) but not part of the
#: identity: the profile's values are already merged into the sections named here.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "train_autoencoder": (
        "seed",
        "conditioning",
        "autoencoder",
        "prepare.image_size",
        "prepare.n_slices",
        "prepare.percentiles",
    ),
    "train_prior": ("seed", "conditioning", "prior", "data.prepared_dir"),
    "train_ldm": ("seed", "conditioning", "ldm", "prepare.n_slices"),
    "train_zprobe": ("seed", "zprobe", "prepare.n_slices"),
    "train_probes": ("seed", "probes", "prepare.n_slices"),
    "encode_latents": ("autoencoder.kinds", "data.prepared_dir", "ldm.posterior_samples"),
    "evaluate": ("seed", "evaluate", "prepare.n_slices", "autoencoder.kinds"),
    "generate": ("generate", "evaluate.novelty", "data.prepared_dir"),
    "augment_study": ("seed", "study", "data.prepared_dir"),
}


def package_version() -> str:
    """braingen's installed version; ``pyproject.toml``'s when run from a checkout that is not
    installed (``PYTHONPATH=<checkout>``), ``unknown`` without either."""
    try:
        return importlib.metadata.version("braingen")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        if not pyproject.is_file():
            return "unknown"
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])


def code_version() -> str:
    """``<package version>+<git commit>`` of the code that wrote a file."""
    return f"{package_version()}+{git_commit()}"


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _lookup(params: Params, dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def stage_identity(params: Params, stage: str, **inputs: Any) -> dict[str, Any]:
    """Everything that decides one stage run, as a JSON-able dict.

    Args:
        params: all parameters (the active profile applied).
        stage: a key of :data:`STAGE_PARAMS` (the DVC stage name).
        inputs: what else decides the run: the autoencoder kind, the sha256 of the model
            file the stage's inputs were made with, the latents' scale factor, ...

    Returns:
        ``{dotted key: value}`` for the stage's params, plus ``inputs``.

    Raises:
        KeyError: an unknown stage.
    """
    keys = STAGE_PARAMS[stage]
    return {key: _lookup(params, key) for key in keys} | dict(inputs)
