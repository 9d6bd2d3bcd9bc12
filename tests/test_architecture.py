"""The layer order of ``pipeline/``, import cycles, and ``dvc.yaml`` deps against the imports.

The import graph is read from the source (every ``import`` statement, function-level ones
included), so these tests see what a run can load, not only what module import loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from pipeline import LAYERS
from pipeline.core.identity import STAGE_PARAMS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "data_prep", "stages")


@cache
def modules() -> dict[str, Path]:
    """Every project module by dotted name (packages under their ``__init__``)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (a module, or the module defining a symbol)."""
    while name:
        if name in modules():
            return name
        name = name.rpartition(".")[0]
    return None


@cache
def imports_of(module: str, parents: bool = True) -> frozenset[str]:
    """Project modules ``module`` imports anywhere in its source.

    Args:
        module: dotted name.
        parents: also the packages Python runs on the way (``a`` and ``a.b`` for ``a.b.c``);
            they load, but a submodule importing a sibling through its own package is not a
            cycle, so the cycle check leaves them out.
    """
    path = modules()[module]
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] or [base]
        for name in names:
            target = _resolve(name)
            if target and target != module:
                out.add(target)
                if parents:  # importing a.b.c runs a/__init__ and a/b/__init__
                    parts = target.split(".")
                    above = (".".join(parts[:i]) for i in range(1, len(parts)))
                    out.update(p for p in above if p in modules())
    out.discard(module)
    return frozenset(out)


def closure(module: str) -> set[str]:
    """``module`` and every project module it can import, transitively."""
    seen, todo = {module}, [module]
    while todo:
        for dep in imports_of(todo.pop()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def child_stages(module: str) -> tuple[str, ...]:
    """The stage modules ``module`` runs as child processes: its ``CHILD_STAGES`` tuple."""
    for node in ast.parse(modules()[module].read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "CHILD_STAGES" for t in node.targets
        ):
            return tuple(ast.literal_eval(node.value))
    return ()


def stage_closure(module: str) -> set[str]:
    """:func:`closure` of a stage module and of the stage modules it runs as children."""
    return closure(module).union(*(closure(child) for child in child_stages(module)))


def layer_of(module: str) -> str:
    """The layer name of a module: ``pipeline.<layer>`` or the top-level package."""
    parts = module.split(".")
    if parts[0] == "pipeline" and len(parts) > 1:
        return parts[1] if parts[1] in LAYERS else "cli" if parts[1] == "cli" else "pipeline"
    return parts[0]


def test_no_import_cycles() -> None:
    """No project module reaches itself through imports (function-level imports count)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in imports_of(node, parents=False):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in modules():
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_import_only_downwards() -> None:
    """Each ``pipeline`` layer imports only the layers below it (``pipeline.LAYERS``)."""
    wrong = []
    for module in modules():
        layer = layer_of(module)
        if layer not in LAYERS:
            continue
        allowed = {layer, *LAYERS[layer], "pipeline"}
        for dep in imports_of(module):
            if layer_of(dep) not in allowed:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def _imports_from(package: str) -> list[tuple[str, str]]:
    """Every (module, imported project module) edge leaving the modules of ``package``."""
    return [(m, d) for m in modules() if m.startswith(package) for d in imports_of(m)]


def test_data_prep_uses_only_the_core_layer() -> None:
    """``data_prep`` (readers, prepare) sits beside ``pipeline.data``: it uses ``core`` and the
    z convention of the conditioning module, nothing else of the library."""
    allowed = ("pipeline", "pipeline.models", "pipeline.models.conditioning")
    wrong = [
        f"{m} -> {d}"
        for m, d in _imports_from("data_prep")
        if d.startswith("pipeline") and layer_of(d) != "core" and d not in allowed
    ]
    assert not wrong, wrong


def test_pipeline_never_imports_stages() -> None:
    wrong = [f"{m} -> {d}" for m, d in _imports_from("pipeline") if d.startswith("stages")]
    assert not wrong, wrong


def test_layer_map_names_every_subpackage() -> None:
    """``pipeline.LAYERS`` lists every sub-package, and only layers it lists are allowed."""
    packages = {p.parent.name for p in (ROOT / "pipeline").glob("*/__init__.py")}
    assert packages == set(LAYERS)
    for layer, below in LAYERS.items():
        assert set(below) <= set(LAYERS) | {"data_prep"}, (layer, below)
        assert layer not in below


def test_the_graph_sees_function_level_imports() -> None:
    """Control: an import inside a function body is an edge (the cli's lazy imports)."""
    assert "pipeline.inference.generate" in imports_of("pipeline.cli")


def test_generate_loads_no_training_code_and_no_lpips() -> None:
    """Importing the modules that hold ``generate`` and ``edit`` loads no training, metric or
    evaluation code, and works without ``lpips`` (blocked here: MONAI's package import loads
    it when installed, through ``monai.losses.perceptual``, whatever we import)."""
    code = (
        "import sys; sys.modules['lpips'] = None;"
        "import pipeline.inference.generate, pipeline.inference.edit;"
        "print('\\n'.join(sorted(k for k, v in sys.modules.items() if v is not None)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    heavy = [
        m
        for m in loaded
        if m.startswith(("pipeline.training", "pipeline.metrics", "pipeline.evaluation", "lpips"))
    ]
    assert not heavy, heavy
    assert "pipeline.inference.sampling" in loaded  # control: the sampler is loaded


# --- dvc.yaml against the code each stage runs -----------------------------------------


@cache
def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]))
def test_dvc_deps_cover_the_code_each_stage_runs(stage: str) -> None:
    """Every project module a stage's command can import is a dep (file or folder) of it."""
    spec = dvc_stages()[stage]
    deps = [str(d) for d in spec.get("deps", [])]
    files = sorted(str(modules()[m].relative_to(ROOT)) for m in stage_closure(stage_module(stage)))
    missing = [f for f in files if not _covered(f, deps)]
    assert not missing, f"{stage}: dvc.yaml deps miss the code it runs: {missing}"
    assert "data/prepared" not in deps or spec.get("deps").count("${data.prepared_dir}") == 0, (
        f"{stage}: name the prepared folder as ${{data.prepared_dir}}, not literally"
    )


def test_dvc_deps_control_a_missing_sampler_is_caught() -> None:
    """Control: dropping the sampler module from generate's deps is reported as missing."""
    files = [str(modules()[m].relative_to(ROOT)) for m in closure("stages.generate")]
    assert "pipeline/inference/diffusion.py" in files
    deps = [d for d in dvc_stages()["generate"]["deps"] if "diffusion" not in d]
    assert not _covered("pipeline/inference/diffusion.py", deps) or any(
        d.endswith("inference") or d == "pipeline" for d in deps
    )


@pytest.mark.parametrize("stage", sorted(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]))
def test_dvc_params_name_only_the_active_profile(stage: str) -> None:
    """A stage depends on ``profiles.${profile}``, so editing another profile re-runs nothing."""
    params = [p for p in dvc_stages()[stage].get("params", []) if isinstance(p, str)]
    assert "profiles" not in params, f"{stage} depends on every profile"


def stage_module(stage: str) -> str:
    """The module a ``dvc.yaml`` stage's command runs (``python -m <module>``)."""
    return dvc_stages()[stage]["cmd"].split("-m", 1)[1].split()[0]


def identities(stage: str) -> list[str]:
    """The :data:`STAGE_PARAMS` names a DVC stage runs: its own, or its children's."""
    children = child_stages(stage_module(stage))
    return [child.rsplit(".", 1)[1] for child in children] if children else [stage]


@pytest.mark.parametrize(
    "stage", sorted(s for s in dvc_stages() if set(identities(s)) & set(STAGE_PARAMS))
)
def test_dvc_params_are_the_stage_identity(stage: str) -> None:
    """DVC re-runs a stage exactly when its identity (MLflow params, resume hash) changes; a
    stage that runs child stages has the union of their identities."""
    params = {p for p in dvc_stages()[stage].get("params", []) if isinstance(p, str)}
    expected = set().union(*(STAGE_PARAMS[name] for name in identities(stage)))
    assert params - {"device", "profile", "profiles.${profile}"} == expected


def test_every_stage_identity_is_run_by_a_dvc_stage() -> None:
    """Each identity in STAGE_PARAMS belongs to a DVC stage or to a child of one."""
    run = {name for stage in dvc_stages() for name in identities(stage)}
    assert set(STAGE_PARAMS) <= run, sorted(set(STAGE_PARAMS) - run)


def test_a_stage_running_child_stages_owns_their_code() -> None:
    """train_generators imports neither trainer; its CHILD_STAGES make their code its code."""
    assert child_stages("stages.train_generators") == ("stages.train_ldm", "stages.train_prior")
    assert "pipeline.training.ldm" not in closure("stages.train_generators")
    owned = stage_closure("stages.train_generators")
    assert {"pipeline.training.ldm", "pipeline.training.prior"} <= owned


def test_code_version_comes_from_pyproject_when_braingen_is_not_installed(monkeypatch) -> None:
    """A checkout run by ``PYTHONPATH`` (no ``pip install``) still writes model files."""
    import importlib.metadata

    from pipeline.core import identity

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    import tomllib

    version = tomllib.loads(Path("pyproject.toml").read_text())["project"]["version"]
    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert identity.package_version() == version
    assert identity.code_version().startswith(f"{version}+")
