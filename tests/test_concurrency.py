"""Side-by-side child trainings: who gets which resources, and failure handling."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

from pipeline.training.concurrency import (
    ChildFailedError,
    Job,
    WorkerPool,
    parallel_setting,
    pool_workers,
    run_jobs,
    side_by_side_envs,
    take_freed_cores,
    usable_cores,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")

#: What :func:`_remember` stored in this process (a worker's own copy).
_SHARED: dict[str, int] = {}


def _remember(offset: int) -> None:
    _SHARED["offset"] = offset


def _job(x: int) -> tuple[int, int, int]:
    """(x + the shared offset, this process's torch threads, its pid)."""
    return x + _SHARED["offset"], torch.get_num_threads(), os.getpid()


def python(code: str, label: str) -> Job:
    return Job(label, [sys.executable, "-c", code])


@pytest.mark.parametrize(
    ("raw", "expected"), [("auto", None), ("", None), ("1", True), ("on", True), ("0", False)]
)
def test_parallel_setting(raw: str, expected: bool | None) -> None:
    assert parallel_setting({"BRAINGEN_PARALLEL": raw}) is expected
    assert parallel_setting({}) is None


def test_parallel_setting_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="BRAINGEN_PARALLEL must be auto, 1 or 0"):
        parallel_setting({"BRAINGEN_PARALLEL": "maybe"})


def test_cpu_cores_are_split_between_jobs() -> None:
    envs = side_by_side_envs(2, CPU, cores=2)
    assert envs == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "BRAINGEN_SIBLINGS": "1"}] * 2
    assert side_by_side_envs(2, CPU, cores=9)[0]["OMP_NUM_THREADS"] == "4"  # type: ignore[index]


def test_one_after_the_other_when_resources_are_short_or_asked() -> None:
    assert side_by_side_envs(2, CPU, cores=1) is None
    assert side_by_side_envs(1, CPU, cores=8) is None
    assert side_by_side_envs(2, CPU, cores=8, forced=False) is None
    assert side_by_side_envs(2, CPU, cores=8, nproc=4) is None  # torchrun spans the machine
    assert side_by_side_envs(2, CUDA, gpus=["0"]) is None  # one GPU: take turns


def test_forced_side_by_side_shares_what_there_is() -> None:
    assert side_by_side_envs(2, CPU, cores=1, forced=True)[0]["OMP_NUM_THREADS"] == "1"  # type: ignore[index]
    assert side_by_side_envs(2, CUDA, gpus=["0"], forced=True) == [{}, {}]


def test_each_job_gets_its_own_gpu() -> None:
    envs = side_by_side_envs(2, CUDA, gpus=["2", "3", "5"])
    assert envs == [{"CUDA_VISIBLE_DEVICES": "2"}, {"CUDA_VISIBLE_DEVICES": "3"}]


def test_side_by_side_jobs_run_at_once_with_their_env(tmp_path) -> None:
    code = (
        "import os, pathlib, time; time.sleep(1); "
        f"pathlib.Path(r'{tmp_path}', os.environ['NAME']).write_text("
        "os.environ['TQDM_POSITION'] + ' ' + os.environ['OMP_NUM_THREADS'])"
    )
    jobs = [
        Job(name, [sys.executable, "-c", code], {"NAME": name, "OMP_NUM_THREADS": "1"})
        for name in ("a", "b")
    ]
    started = time.monotonic()
    run_jobs(jobs, side_by_side=True)
    assert time.monotonic() - started < 1.9  # both slept their second at the same time
    assert (tmp_path / "a").read_text() == "0 1"
    assert (tmp_path / "b").read_text() == "1 1"


def test_a_failure_stops_the_others(tmp_path) -> None:
    survivor = tmp_path / "survivor"
    jobs = [
        python("import sys; sys.exit(3)", "ae_vqvae"),
        python(f"import time, pathlib; time.sleep(60); pathlib.Path(r'{survivor}').touch()", "b"),
    ]
    started = time.monotonic()
    with pytest.raises(
        ChildFailedError, match=r"ae_vqvae failed \(exit code 3\); stopped the others \(b\)"
    ):
        run_jobs(jobs, side_by_side=True)
    assert time.monotonic() - started < 30
    assert not survivor.exists()


def test_one_after_the_other_stops_at_the_first_failure(tmp_path) -> None:
    later = tmp_path / "later"
    jobs = [
        python("import sys; sys.exit(2)", "first"),
        python(f"import pathlib; pathlib.Path(r'{later}').touch()", "second"),
    ]
    with pytest.raises(ChildFailedError, match="first failed"):
        run_jobs(jobs, side_by_side=False)
    assert not later.exists()
    run_jobs(jobs[1:], side_by_side=False)
    assert later.exists()


def test_a_child_keeps_its_thread_count_when_its_sibling_finishes(tmp_path) -> None:
    """CPU results depend on the thread count, so no core hand-over mid-run."""
    threads = tmp_path / "threads"
    slow = (
        "import time, torch, pathlib; time.sleep(3); "
        f"pathlib.Path(r'{threads}').write_text(str(torch.get_num_threads()))"
    )
    jobs = [
        Job("quick", [sys.executable, "-c", "pass"], {"OMP_NUM_THREADS": "1"}),
        Job("slow", [sys.executable, "-c", slow], {"OMP_NUM_THREADS": "1"}),
    ]
    run_jobs(jobs, side_by_side=True)
    assert threads.read_text() == "1"


def test_a_later_phase_takes_the_cores_once_every_sibling_has_finished(tmp_path) -> None:
    """take_freed_cores waits for the sibling (so the thread count never depends on timing),
    then uses every core."""
    sibling_end, out = tmp_path / "sibling_end", tmp_path / "out"
    sibling = f"import time, pathlib; time.sleep(3); pathlib.Path(r'{sibling_end}').touch()"
    waiting = (
        "import torch, pathlib; "
        "from pipeline.training.concurrency import take_freed_cores; "
        "n = take_freed_cores(); "
        f"pathlib.Path(r'{out}').write_text(f'{{n}} {{torch.get_num_threads()}}')"
    )
    env = {"OMP_NUM_THREADS": "1", "BRAINGEN_SIBLINGS": "1"}
    jobs = [
        Job("sibling", [sys.executable, "-c", sibling], env),
        Job("phased", [sys.executable, "-c", waiting], env),
    ]
    run_jobs(jobs, side_by_side=True)
    assert out.stat().st_mtime_ns >= sibling_end.stat().st_mtime_ns  # it waited
    taken, threads = out.read_text().split()
    assert int(taken) == int(threads) == usable_cores()


def test_take_freed_cores_does_nothing_outside_side_by_side_cpu_children() -> None:
    before = torch.get_num_threads()
    assert take_freed_cores({}) is None
    assert take_freed_cores({"BRAINGEN_SIBLINGS": "1"}) is None  # no parent marking siblings
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_pool_keeps_order_and_shares_data(workers: int) -> None:
    with WorkerPool(workers, _remember, (100,)) as pool:
        out = pool.map(_job, list(range(8)), desc="test", unit="job")
    assert [value for value, _, _ in out] == [100 + x for x in range(8)]
    if workers > 1:  # other processes, one thread each
        assert all(pid != os.getpid() for _, _, pid in out)
        assert {threads for _, threads, _ in out} == {1}
    else:
        assert {pid for _, _, pid in out} == {os.getpid()}


def test_pool_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.training.concurrency.usable_cores", lambda: 4)
    monkeypatch.delenv("BRAINGEN_PARALLEL", raising=False)
    assert pool_workers(CPU) == 4
    assert pool_workers(CUDA) == 1
    monkeypatch.setenv("BRAINGEN_PARALLEL", "0")
    assert pool_workers(CPU) == 1
