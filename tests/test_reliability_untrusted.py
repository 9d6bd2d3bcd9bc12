"""Untrusted files: a checkpoint can never run code; file names cannot leave their folder."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch
from support import LinearTask, quiet_fit

from pipeline.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.core.config import TrainConfig
from pipeline.inference.sampling import load_generator
from pipeline.models.files import load_autoencoder, load_probe

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


class _Payload:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a braingen checkpoint with a pickled callable inside."""
    torch.save(
        {
            "version": 1,
            "kind": "ae_vqvae",
            "step": 4,
            "modules": {"model": {"w": torch.zeros(2)}},
            "metadata": {"note": _Payload(marker)},
        },
        path,
    )
    return path


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    return _evil_checkpoint(tmp_path / "evil.pt", marker), marker


def test_the_payload_really_runs_when_unpickled_unsafely(evil: tuple[Path, Path]) -> None:
    """Control: the file is a real exploit (so the refusals below mean something)."""
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "loader",
    [
        load_checkpoint,
        load_autoencoder,
        load_generator,
        lambda p: load_probe(p, CPU),
    ],
    ids=["load_checkpoint", "load_autoencoder", "load_generator", "load_probe"],
)
def test_every_loader_refuses_a_pickled_callable(evil: tuple[Path, Path], loader) -> None:
    path, marker = evil
    with pytest.raises(CheckpointError, match="refused") as err:
        loader(path)
    assert not marker.exists()
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_planted_resume_file_is_ignored_not_executed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    _evil_checkpoint(tmp_path / "last.pt", marker)
    data = [{"x": torch.randn(2)} for _ in range(8)]
    cfg = TrainConfig(steps=4, batch_size=2, warmup_steps=0, ckpt_every=2, log_every=2)
    result = quiet_fit(LinearTask(2, sgd_lr=0.1), data, cfg, tmp_path)
    assert not marker.exists()
    assert result.resumed_from == 0 and result.step == 4
    assert any("refused" in r.getMessage() for r in caplog.records)
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4  # replaced by a clean one


def test_checkpoints_hold_only_plain_values(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pt", {"step": 1, "w": torch.ones(2), "meta": {"a": [1, "b"]}})
    assert load_checkpoint(tmp_path / "c.pt")["meta"] == {"a": [1, "b"]}
    save_checkpoint(tmp_path / "d.pt", {"obj": _Payload(tmp_path / "x")})  # torch pickles it
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "d.pt")
    assert not (tmp_path / "x").exists()


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    owner, attr = dotted.split(".")
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == attr
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == owner
    ]


def test_no_code_path_unpickles_without_restriction() -> None:
    """Every torch.load passes weights_only=True; no np.load allows pickles."""
    offenders = []
    for folder in ("pipeline", "data_prep", "stages"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for call in _calls(tree, "torch.load"):
                kw = {k.arg: k.value for k in call.keywords}
                value = kw.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{path.relative_to(ROOT)}:{call.lineno} torch.load")
            for call in _calls(tree, "np.load") + _calls(tree, "pickle.load"):
                kw = {k.arg: k.value for k in call.keywords}
                value = kw.get("allow_pickle")
                if call.func.value.id == "pickle" or (  # type: ignore[attr-defined]
                    isinstance(value, ast.Constant) and value.value is True
                ):
                    offenders.append(f"{path.relative_to(ROOT)}:{call.lineno} unpickles")
    assert offenders == []
