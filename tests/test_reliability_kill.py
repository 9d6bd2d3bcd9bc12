"""Killed runs: a stage killed at any point resumes (or restarts) and ends where an
uninterrupted run ends, and never leaves a half-written file that a later run would trust.

- ``prepare`` interrupted before and after each of its file operations (in process, every
  point enumerated) and SIGKILLed at random moments (in a stage process): each split is
  either without a manifest or complete and from one run; the re-run equals a clean run.
- ``train_autoencoder vqvae`` and ``train_prior`` SIGKILLed at random moments, several
  times in a row (seeded): each re-run resumes from the last complete checkpoint, and the
  final model file equals that of an uninterrupted run on CPU.

The stage processes are forked by ``tests/reliability_harness.py`` in a copy of the project
on the ``tiny`` profile (longer, so kills land inside training).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from support import LinearTask, copy_project, quiet_fit

from data_prep import prepare as prepare_mod
from data_prep.readers.base import SPLITS
from pipeline.core.checkpoint import CheckpointError, load_checkpoint
from pipeline.core.config import PrepareConfig
from pipeline.data.datasets import PreparedDataError, SliceDataset

ARRAYS = ("slices.npy", "masks.npy", "tissue.npy")
SPLIT_FILES = (*ARRAYS, "manifest.csv")
#: Kill points tried and survived, by test (read by the report; see the module docstring).
KILLS: dict[str, list[str]] = {}


@pytest.fixture(scope="module", autouse=True)
def kill_summary() -> Iterator[None]:
    """Print the kill points tried at the end of the module (shown with ``pytest -s``)."""
    yield
    for name, points in KILLS.items():
        print(f"\n{name}: {len(points)} kill points survived")
        for point in points:
            print(f"  {point}")


class _Killed(BaseException):
    """Stands in for SIGKILL at a chosen file operation (not caught by ``except Exception``)."""


# ------------------------------------------------------------------ prepare, every point


def _split_state(prepared: Path) -> dict[str, dict[str, bytes] | None]:
    """Per split, the bytes of its files (b"" for an absent one) if its manifest exists,
    else None."""
    out: dict[str, dict[str, bytes] | None] = {}
    for split in SPLITS:
        folder = prepared / split
        if (folder / "manifest.csv").is_file():
            out[split] = {
                f: (folder / f).read_bytes() if (folder / f).exists() else b"" for f in SPLIT_FILES
            }
        else:
            out[split] = None
    return out


def check_prepared(prepared: Path, runs: dict[str, dict[str, dict[str, bytes] | None]]) -> str:
    """Assert that what a later run would trust is complete and from one run.

    Args:
        prepared: the prepared folder after a kill.
        runs: complete states of the runs that may have written it (``{"old": ..., "new": ...}``).

    Returns:
        Which run the trusted splits come from (``"none"`` if no manifest is left).
    """
    state = _split_state(prepared)
    present = {s: files for s, files in state.items() if files is not None}
    for split in SPLITS:
        if split not in present:
            with pytest.raises(PreparedDataError):
                SliceDataset(prepared / split)
    if not present:
        return "none"
    sources = {
        name for name, full in runs.items() if all(full[s] == files for s, files in present.items())
    }
    assert sources, f"manifests {sorted(present)} vouch for files of no single complete run"
    for split in present:
        SliceDataset(prepared / split)  # what a training stage would open
    return sorted(sources)[0]


@pytest.fixture(scope="module")
def nifti_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five small brain-like volumes, one subject each."""
    raw = tmp_path_factory.mktemp("raw")
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (20, 24, 20)], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    for s in range(5):
        noise = np.random.default_rng(s).normal(0, 2, radius.shape)
        data = np.where(radius < 0.7 + 0.03 * s, 100 + 50 * (radius < 0.3) + noise, 0)
        nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), raw / f"s{s:02d}.nii.gz")
    return raw


def _prepare(raw: Path, out: Path, seed: int) -> None:
    prepare_mod.prepare_dataset(
        raw,
        out / "prepared",
        PrepareConfig(n_slices=4, image_size=16, workers=1),
        seed=seed,
        report_dir=out / "reports",
    )


def test_prepare_interrupted_at_every_file_operation(
    nifti_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _prepare(nifti_raw, tmp_path / "new", seed=0)
    _prepare(nifti_raw, tmp_path / "old", seed=3)  # another split: a stale previous run
    runs = {
        "old": _split_state(tmp_path / "old" / "prepared"),
        "new": _split_state(tmp_path / "new" / "prepared"),
    }
    assert runs["old"] != runs["new"]

    real_replace, real_unlink = os.replace, Path.unlink
    ops: list[str] = []
    kill_at: list[int] = [-1]

    def op(name: str) -> None:
        ops.append(name)
        if len(ops) - 1 == kill_at[0]:
            raise _Killed(name)

    def replace(src, dst) -> None:
        op(f"replace {Path(dst).name}")
        real_replace(src, dst)

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if not self.name.startswith("."):  # temporary files are not part of the state
            op(f"unlink {self.parent.name}/{self.name}")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    _prepare(nifti_raw, tmp_path / "count", seed=0)
    n_ops = len(ops)
    assert n_ops >= 3 * len(SPLIT_FILES)

    survived = []
    for k in range(n_ops + 1):  # k = n_ops: killed right after the last operation
        work = tmp_path / f"kill{k}"
        shutil.copytree(tmp_path / "old", work)
        ops.clear()
        kill_at[0] = k
        if k < n_ops:
            with pytest.raises(_Killed):
                _prepare(nifti_raw, work, seed=0)
        else:
            _prepare(nifti_raw, work, seed=0)
        source = check_prepared(work / "prepared", runs)
        kill_at[0] = -1
        _prepare(nifti_raw, work, seed=0)  # the re-run
        assert _split_state(work / "prepared") == runs["new"]
        survived.append(f"before op {k} -> trusted: {source}")
        shutil.rmtree(work)
    KILLS["prepare_ops"] = survived
    assert len(survived) == n_ops + 1


def test_resumed_at_the_end_still_gets_final_metrics(tmp_path: Path) -> None:
    """Killed after the last checkpoint, before the outputs: the re-run evaluates again."""
    from pipeline.core.config import TrainConfig

    data = [{"x": torch.full((2,), float(i))} for i in range(8)]
    cfg = TrainConfig(steps=4, batch_size=2, warmup_steps=0, ckpt_every=2, log_every=2)
    calls: list[int] = []

    def evaluate(step, ema) -> dict[str, float]:
        calls.append(step)
        return {"val": float(step)}

    def run() -> dict[str, float]:
        return quiet_fit(LinearTask(2, sgd_lr=0.1), data, cfg, tmp_path, evaluate=evaluate).history

    first = run()
    again = run()  # last.pt (step 4) still there: nothing to train
    assert calls == [4, 4]
    assert again == first and {"loss", "val", "lr"} <= set(again)


# ------------------------------------------------------------------ stage processes


class Harness:
    """Client of ``tests/reliability_harness.py`` running in a project copy."""

    def __init__(self, project: Path, stages: list[str]) -> None:
        self.project = project
        self.logs = project / "harness_logs"
        self.logs.mkdir(exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.proc = subprocess.Popen(
            [sys.executable, "tests/reliability_harness.py", *stages],
            cwd=project,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert json.loads(self._line())["ready"]
        self.n = 0

    def _line(self) -> str:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line, "reliability harness died"
        return line

    def run(
        self, *argv: str, kill_after: float | None = None, after_change: Path | None = None
    ) -> tuple[dict, str]:
        """Run a stage; returns (reply, the child's log).

        Args:
            argv: stage module name and its arguments.
            kill_after: SIGKILL after this many seconds (None: let it finish).
            after_change: count ``kill_after`` from the moment this file is (re)written.
        """
        self.n += 1
        log = self.logs / f"{self.n:03d}_{argv[0]}.log"
        request = {
            "argv": list(argv),
            "kill_after": kill_after,
            "log": str(log),
            "after_change": str(after_change) if after_change else None,
        }
        self.proc.stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        reply = json.loads(self._line())
        return reply, log.read_text() if log.exists() else ""

    def ok(self, *argv: str) -> dict:
        reply, text = self.run(*argv)
        assert reply["rc"] == 0, text[-3000:]
        return reply

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Harness, dict]]:
    """A tiny-profile project copy with demo data, prepared splits and reference outputs.

    Yields ``(project, harness, reference)`` where ``reference`` maps a stage to its
    uninterrupted run time and output bytes.
    """
    dest = copy_project(tmp_path_factory.mktemp("killproject"))
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params |= {"profile": "tiny", "device": "cpu"}
    params["autoencoder"]["kinds"] = ["vqvae"]
    params["prepare"]["workers"] = 1
    tiny = params["profiles"]["tiny"]
    tiny["autoencoder"]["train"] |= {"steps": 12, "ckpt_every": 3, "eval_every": 6}
    tiny["prior"]["train"] |= {"steps": 12, "ckpt_every": 3, "eval_every": 6}
    tiny["ldm"]["train"] |= {"steps": 12, "ckpt_every": 3, "eval_every": 6}
    tiny["zprobe"]["train"] |= {"steps": 12, "ckpt_every": 3, "eval_every": 6}
    params["ldm"]["latent_source"] = "vqvae"  # the only kind trained here
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    harness = Harness(
        dest,
        [
            "make_demo",
            "prepare",
            "train_autoencoder",
            "encode_latents",
            "train_prior",
            "train_ldm",
            "train_zprobe",
        ],
    )
    reference: dict = {}
    try:
        harness.ok("make_demo")
        harness.ok("prepare")  # the first stage run with tracking creates mlflow.db's tables
        for argv, outputs in (
            (("prepare",), [f"data/prepared/{s}/{f}" for s in SPLITS for f in SPLIT_FILES]),
            (("train_autoencoder", "vqvae"), ["models/ae_vqvae.pt", "reports/ae_vqvae.json"]),
            (("encode_latents",), ["data/latents/vqvae/meta.json"]),
            (("train_prior",), ["models/pixelcnn.pt", "reports/prior.json"]),
            (("train_ldm",), ["models/ldm.pt", "reports/ldm.json"]),
            (("train_zprobe",), ["models/zprobe.pt", "reports/zprobe.json"]),
        ):
            reply = harness.ok(*argv)
            reference[argv[0]] = {
                "seconds": reply["seconds"],
                "files": {
                    f: (dest / f).read_bytes() if (dest / f).exists() else b"" for f in outputs
                },
            }
        yield dest, harness, reference
    finally:
        harness.close()


def _tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a model file's modules, by ``<module>.<name>``."""
    return {f"{m}.{k}": v for m, sd in ckpt["modules"].items() for k, v in sd.items()}


def _resume_step(path: Path) -> int | None:
    """Step of a complete resume file, None if there is none; fails on a corrupt one."""
    if not path.exists():
        return None
    try:
        return int(load_checkpoint(path)["step"])
    except CheckpointError as err:  # a half-written file under the real name
        pytest.fail(f"killed run left an unreadable resume file: {err}")


def _kill_chain(
    project: tuple[Path, Harness, dict],
    argv: tuple[str, ...],
    model: str,
    report: str,
    resume_dir: str,
    seed: int,
    n_kills: int = 3,
) -> list[str]:
    """Kill a stage ``n_kills`` times at random moments, then let it finish; check it.

    A kill lands at a uniform time within an uninterrupted run's duration, or (one in two)
    up to 0.6 s after the resume file is next written, to hit training, evaluation and
    export rather than start-up. A run that finishes before its kill counts as an attempt;
    at most ``3 * n_kills`` attempts are made.
    """
    root, harness, reference = project
    ref = reference[argv[0]]
    rng = random.Random(seed)
    resume = root / resume_dir / "last.pt"
    for stale in (root / model, root / report, resume):  # dvc repro removes outputs first
        stale.unlink(missing_ok=True)
    points: list[str] = []
    attempts = 0
    while True:
        attempts += 1
        before = _resume_step(resume)
        after_change = resume if rng.random() < 0.5 else None
        if len(points) == n_kills:
            kill_after = None
        elif after_change is not None:
            kill_after = rng.uniform(0.0, 0.6)
        else:
            kill_after = rng.uniform(0.15, 0.9) * ref["seconds"]
        reply, log = harness.run(*argv, kill_after=kill_after, after_change=after_change)
        resumed = re.findall(r"resuming from step (\d+) ", log)
        assert resumed == ([] if before is None else [str(before)]) or (
            reply["killed"] and not resumed  # killed before fit started
        ), (before, resumed)
        after = _resume_step(resume)
        if (root / model).exists():
            load_checkpoint(root / model)  # never a half-written model file
        if not reply["killed"]:
            assert reply["rc"] == 0, log[-3000:]
            if kill_after is None:
                break
            continue
        assert after is None or after >= (before or 0)
        when = f"{kill_after:.2f}s" + (" after a checkpoint" if after_change else "")
        points.append(
            f"{argv[0]} killed {when}: resume file step {after} (was {before}),"
            f" model file {'present' if (root / model).exists() else 'absent'}"
        )
        assert attempts <= 3 * n_kills, f"only {len(points)} of {attempts} runs were killed"
    assert after is None, "resume file left after a finished run"
    expected = ref["files"]
    final = _tensors(load_checkpoint(root / model))
    want = _tensors(torch.load(io.BytesIO(expected[model]), weights_only=True))
    assert final.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(final[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    got_report = json.loads((root / report).read_text())
    want_report = json.loads(expected[report])
    _close(got_report, want_report, exclude={"train_seconds", "sampling"})
    return points


def _close(got, want, exclude: set[str], where: str = "") -> None:
    """Recursive approximate equality of two JSON values (timings excluded)."""
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            if key not in exclude:
                _close(got[key], want[key], exclude, f"{where}.{key}")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6, nan_ok=True), where
    else:
        assert got == want, where


@pytest.mark.slow
@pytest.mark.timeout(1200)  # each < 60 s; the first also builds the project (~65 s)
@pytest.mark.parametrize("seed", [0, 1])
def test_killed_autoencoder_resumes_to_the_same_weights(project, seed: int) -> None:
    root, _, reference = project
    points = _kill_chain(
        project,
        ("train_autoencoder", "vqvae"),
        "models/ae_vqvae.pt",
        "reports/ae_vqvae.json",
        "checkpoints/ae_vqvae",
        seed,
    )
    KILLS[f"train_autoencoder seed {seed}"] = points
    # the prior's inputs name this file by hash: put the reference bytes back
    (root / "models" / "ae_vqvae.pt").write_bytes(
        reference["train_autoencoder"]["files"]["models/ae_vqvae.pt"]
    )


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("seed", [0, 1])
def test_killed_prior_resumes_to_the_same_weights(project, seed: int) -> None:
    points = _kill_chain(
        project,
        ("train_prior",),
        "models/pixelcnn.pt",
        "reports/prior.json",
        "checkpoints/prior",
        seed + 10,
    )
    KILLS[f"train_prior seed {seed}"] = points
    assert (project[0] / "reports" / "prior_samples.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize(
    ("stage", "model", "report"),
    [("train_ldm", "ldm", "ldm"), ("train_zprobe", "zprobe", "zprobe")],
)
def test_killed_second_stage_and_probe_resume_to_the_same_weights(
    project, stage: str, model: str, report: str
) -> None:
    points = _kill_chain(
        project,
        (stage,),
        f"models/{model}.pt",
        f"reports/{report}.json",
        f"checkpoints/{report}",
        seed=20,
    )
    KILLS[f"{stage} seed 20"] = points


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_killed_prepare_stage_leaves_nothing_half_written(project) -> None:
    root, harness, reference = project
    prepared, params_file = root / "data" / "prepared", root / "params.yaml"
    files = reference["prepare"]["files"]
    old = {s: {f: files[f"data/prepared/{s}/{f}"] for f in SPLIT_FILES} for s in SPLITS}
    params_text = params_file.read_text()
    params = yaml.safe_load(params_text)
    params["seed"] = 5  # another subject split, so the two runs' files differ
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        harness.ok("prepare")
        new = _split_state(prepared)
        assert new != old
        _restore(root, files)
        rng = random.Random(7)
        points: list[str] = []
        for _ in range(12):
            kill_after = rng.uniform(0.3, 1.0) * reference["prepare"]["seconds"]
            reply, _ = harness.run("prepare", kill_after=kill_after)
            source = check_prepared(prepared, {"old": old, "new": new})
            if reply["killed"]:
                points.append(f"prepare killed at {kill_after:.2f}s: trusted files from {source}")
            if len(points) == 4:
                break
        assert len(points) == 4
        harness.ok("prepare")
        assert _split_state(prepared) == new
        KILLS["prepare stage"] = points
    finally:
        params_file.write_text(params_text)
        _restore(root, files)


def _restore(root: Path, files: dict[str, bytes]) -> None:
    """Put reference output bytes back in place (b"": the file did not exist)."""
    for rel, blob in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if blob:
            (root / rel).write_bytes(blob)
        else:
            (root / rel).unlink(missing_ok=True)
