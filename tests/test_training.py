"""The shared training loop: schedule, determinism, resume, non-finite guard."""

from __future__ import annotations

import pytest
import torch
from support import RecordingRun, quiet_fit
from torch import nn
from torch.utils.data import Dataset

from pipeline.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.core.config import TrainConfig
from pipeline.training.loop import (
    Optimization,
    TrainingDivergedError,
    TrainingTask,
    autocast_dtype,
    batch_indices,
    finish_resume,
    lr_factor,
)


class _Points(Dataset):
    def __init__(self, n: int = 64) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
        self.poison: set[int] = set()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        y = self.y[i] * (float("nan") if i in self.poison else 1.0)
        return {"x": self.x[i], "y": y}


class _Regression(TrainingTask):
    ema_module = "model"

    def __init__(self) -> None:
        torch.manual_seed(1)
        self.modules = {"model": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))}
        self.optimizers = {"model": torch.optim.AdamW(self.modules["model"].parameters(), lr=1e-2)}

    def train_step(self, batch, step, optim: Optimization) -> dict[str, float]:
        noise = torch.randn(batch["x"].shape) * 0.01  # exercises the RNG state on resume
        pred = self.modules["model"](batch["x"] + noise).squeeze(-1)
        loss = ((pred - batch["y"]) ** 2).mean()
        optim.step("model", loss)
        return {"loss": loss.item()}


def _cfg(**kw) -> TrainConfig:
    base = dict(
        steps=30,
        batch_size=8,
        lr=1e-2,
        warmup_steps=3,
        ckpt_every=10,
        eval_every=15,
        log_every=5,
        ema_decay=0.9,
    )
    base.update(kw)
    return TrainConfig(**base)


def _fit(task, data, cfg, tmp_path, **kw):
    return quiet_fit(task, data, cfg, tmp_path, **({"config_for_hash": {"a": 1}} | kw))


class _AutocastSpy(_Regression):
    """Records the CPU autocast state each training step ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.dtype | None] = []

    def train_step(self, batch, step, optim: Optimization) -> dict[str, float]:
        on = torch.is_autocast_enabled("cpu")
        self.seen.append(torch.get_autocast_dtype("cpu") if on else None)
        return super().train_step(batch, step, optim)


def test_autocast_dtype_bf16_on_cuda_and_on_a_native_bf16_cpu_when_asked(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype(cuda, _cfg()) is torch.bfloat16
    assert autocast_dtype(cpu, _cfg()) is None  # fp32 on the CPU by default
    monkeypatch.setattr("pipeline.training.loop.native_cpu_bf16", lambda: True)
    assert autocast_dtype(cpu, _cfg(cpu_bf16=True)) is torch.bfloat16
    monkeypatch.setattr("pipeline.training.loop.native_cpu_bf16", lambda: False)
    assert autocast_dtype(cpu, _cfg(cpu_bf16=True)) is None  # emulated bf16 would be slower


@pytest.mark.parametrize("native", [True, False])
def test_fit_runs_steps_under_cpu_bf16_only_where_native(tmp_path, monkeypatch, native) -> None:
    monkeypatch.setattr("pipeline.training.loop.native_cpu_bf16", lambda: native)
    task = _AutocastSpy()
    result = _fit(task, _Points(), _cfg(steps=6, cpu_bf16=True), tmp_path)
    assert result.step == 6
    assert task.seen == [torch.bfloat16 if native else None] * 6


def test_lr_schedule_warmup_and_decay() -> None:
    cfg = _cfg(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_batch_order_depends_only_on_step() -> None:
    full = batch_indices(20, 6, seed=3, start_step=0)
    first = [next(full) for _ in range(7)]
    resumed = batch_indices(20, 6, seed=3, start_step=4)
    assert [next(resumed) for _ in range(3)] == first[4:7]


def test_fit_lowers_loss_and_logs(tmp_path) -> None:
    task, data = _Regression(), _Points()
    run = RecordingRun()

    def evaluate(step, ema) -> dict[str, float]:
        return {"val": float(step)}

    result = quiet_fit(task, data, _cfg(steps=60), tmp_path, run=run, evaluate=evaluate)
    losses = run.values("loss")
    assert losses[-1] < losses[0] / 4
    assert result.step == 60 and result.ema is not None
    assert any("val" in m for _, m in run.metrics)


class _StepSpy(_Regression):
    """Records how many training steps ran before each call of a patched take_freed_cores."""

    def __init__(self) -> None:
        super().__init__()
        self.steps_run = 0

    def train_step(self, batch, step, optim: Optimization) -> dict[str, float]:
        self.steps_run += 1
        return super().train_step(batch, step, optim)


@pytest.mark.parametrize(
    ("join_at", "resume_from", "expected"), [(4, 0, [4]), (None, 0, []), (4, 10, [0])]
)
def test_fit_joins_the_freed_cores_once_at_the_configured_step(
    tmp_path, monkeypatch, join_at, resume_from, expected
) -> None:
    """``join_freed_cores_at``: the loop calls take_freed_cores once, before that step (at once
    on a resume past it), and never without the setting."""
    data = _Points()
    if resume_from:  # a run killed at 15, its checkpoint at 10
        with pytest.raises(KeyboardInterrupt):
            _fit(
                _Regression(),
                data,
                _cfg(),
                tmp_path,
                evaluate=lambda step, ema: (_ for _ in ()).throw(KeyboardInterrupt),
            )
    task = _StepSpy()
    calls: list[int] = []
    monkeypatch.setattr(
        "pipeline.training.loop.take_freed_cores", lambda: calls.append(task.steps_run)
    )
    result = _fit(task, data, _cfg(join_freed_cores_at=join_at), tmp_path)
    assert result.step == 30 and result.resumed_from == resume_from
    assert calls == expected


def test_resume_after_kill_matches_uninterrupted_run(tmp_path) -> None:
    data = _Points()
    straight = _Regression()
    _fit(straight, data, _cfg(), tmp_path / "a")

    killed = _Regression()
    with pytest.raises(KeyboardInterrupt):
        _fit(
            killed,
            data,
            _cfg(),
            tmp_path / "b",
            evaluate=lambda step, ema: (_ for _ in ()).throw(KeyboardInterrupt),
        )  # dies at 15
    assert load_checkpoint(tmp_path / "b" / "last.pt")["step"] == 10
    resumed = _Regression()
    result = _fit(resumed, data, _cfg(), tmp_path / "b")
    assert result.resumed_from == 10
    for a, b in zip(
        straight.modules["model"].parameters(), resumed.modules["model"].parameters(), strict=True
    ):
        torch.testing.assert_close(a, b)
    finish_resume(tmp_path / "b")
    assert not (tmp_path / "b" / "last.pt").exists()


def test_resume_ignores_checkpoint_of_other_config(tmp_path) -> None:
    data = _Points()
    _fit(_Regression(), data, _cfg(steps=10), tmp_path)
    result = _fit(_Regression(), data, _cfg(steps=10), tmp_path, config_for_hash={"a": 2})
    assert result.resumed_from == 0


def test_nan_batch_is_skipped_and_counted(tmp_path) -> None:
    data = _Points()
    data.poison = {5}
    cfg = _cfg(steps=20, max_bad_steps=5)
    order = batch_indices(len(data), cfg.batch_size, seed=0, start_step=0)
    poisoned = [step for step in range(cfg.steps) if 5 in next(order)]
    task = _Regression()
    before = [p.detach().clone() for p in task.modules["model"].parameters()]
    result = _fit(task, data, cfg, tmp_path)
    assert len(poisoned) >= 2 and result.skipped_steps == len(poisoned)
    assert result.step == 20
    after = list(task.modules["model"].parameters())
    assert all(torch.isfinite(p).all() for p in after)  # no NaN batch reached the weights
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # others did


def test_persistent_nan_stops_with_clear_error(tmp_path) -> None:
    data = _Points()
    data.poison = set(range(64))
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        _fit(_Regression(), data, _cfg(steps=20, max_bad_steps=2), tmp_path)


def test_checkpoint_refuses_pickled_code(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"version": 1, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)


def test_checkpoint_missing_and_corrupt(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    save_checkpoint(tmp_path / "ok.pt", {"step": 3, "w": torch.ones(3)})
    blob = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "bad.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "bad.pt")
    assert load_checkpoint(tmp_path / "ok.pt")["step"] == 3
