"""Numerical faults: NaN/Inf batches, losses and gradients in the one training loop.

Faults are injected into :func:`pipeline.training.loop.fit` through the data (a NaN item), the
loss (a task that returns NaN at chosen steps) and the gradient (a NaN-gradient op). Each
faulty step must be skipped at once and counted in the logged ``skipped_steps``; a streak
of ``max_bad_steps`` restores the last good checkpoint with half the learning rate; a fault
that persists ends in :class:`TrainingDivergedError`, one line through ``pipeline.core.stage.main``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from support import TINY_COND, RecordingRun, quiet_fit
from torch import nn
from torch.utils.data import Dataset

from pipeline.core.config import AutoencoderConfig, DiscriminatorConfig, TrainConfig, VQConfig
from pipeline.core.stage import main as stage_main
from pipeline.training import loop as training
from pipeline.training.autoencoder import AutoencoderTask
from pipeline.training.loop import (
    Optimization,
    TrainingDivergedError,
    TrainingTask,
    batch_indices,
    lr_factor,
)


class _Points(Dataset):
    """y = x·w + noise; items listed in ``poison`` carry a NaN target."""

    def __init__(self, n: int = 64, poison: set[int] | None = None) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        self.poison = poison or set()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i] * (float("nan") if i in self.poison else 1.0)}


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad * float("nan")


class _Regression(TrainingTask):
    """A tiny MLP; ``faults`` maps a step to ``"loss"`` (NaN loss) or ``"grad"`` (NaN grad).

    Each fault fires once (a transient blow-up): a restored run replays the step cleanly.
    """

    def __init__(self, faults: dict[int, str] | None = None) -> None:
        torch.manual_seed(1)
        self.net_ = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.modules = {"model": self.net_}
        self.optimizers = {"model": torch.optim.AdamW(self.net_.parameters(), lr=1e-2)}
        self.faults = dict(faults or {})
        self.fired: list[tuple[int, str]] = []

    def train_step(self, batch, step, optim: Optimization) -> dict[str, float]:
        pred = self.net_(batch["x"]).squeeze(-1)
        fault = self.faults.pop(step, None)
        if fault == "grad":
            pred = _NanGrad.apply(pred)
        loss = ((pred - batch["y"]) ** 2).mean()
        if fault == "loss":
            loss = loss * float("inf") * 0.0  # NaN
        if fault is not None:
            self.fired.append((step, fault))
        optim.step("model", loss)
        return {"loss": loss.item()}


def _cfg(**kw) -> TrainConfig:
    base = dict(
        steps=24, batch_size=8, lr=1e-2, warmup_steps=0, ckpt_every=4, log_every=1, eval_every=99
    )
    return TrainConfig(**(base | kw))


def _fit(task, data, cfg, path: Path, run: RecordingRun | None = None):
    return quiet_fit(task, data, cfg, path, run=run or RecordingRun(), config_for_hash={"t": 1})


def _finite(module: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in module.state_dict().values())


def test_nan_batch_is_skipped_counted_and_logged(tmp_path: Path) -> None:
    cfg = _cfg()
    order = batch_indices(64, 8, seed=0, start_step=0)
    hit = [step for step in range(cfg.steps) if 5 in next(order)]
    run = RecordingRun()
    result = _fit(_Regression(), _Points(poison={5}), cfg, tmp_path, run)
    assert hit and result.skipped_steps == len(hit) and result.restores == 0
    assert run.last("skipped_steps") == len(hit)
    assert result.step == cfg.steps


def test_nan_batch_never_reaches_the_model(tmp_path: Path) -> None:
    """A NaN batch must not poison buffers updated in the forward pass (VQ codebook)."""
    cfg = AutoencoderConfig(
        channels=(8, 16, 16),
        norm_groups=4,
        perceptual_weight=0.0,
        vq=VQConfig(num_codes=16, code_dim=4),
        discriminator=DiscriminatorConfig(channels=8, n_layers=2, norm_groups=4, weight=0.0),
        train=_cfg(steps=6, batch_size=4, ckpt_every=2, max_bad_steps=2),
    )

    class Slices(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            image = torch.full((1, 32, 32), 0.5) * (float("nan") if i == 3 else 1.0)
            return {"image": image, "z": torch.tensor(i / 7)}

    torch.manual_seed(0)
    task = AutoencoderTask(cfg, TINY_COND, "vqvae", None, torch.device("cpu"))
    result = _fit(task, Slices(), cfg.train, tmp_path)
    assert result.skipped_steps >= 1 and result.step == 6
    assert _finite(task.model), "NaN batch poisoned the model's buffers"


@pytest.mark.parametrize("fault", ["loss", "grad"])
def test_single_nan_loss_or_grad_skips_one_step(tmp_path: Path, fault: str) -> None:
    task = _Regression({7: fault})
    before = {k: v.clone() for k, v in task.net_.state_dict().items()}
    result = _fit(task, _Points(), _cfg(), tmp_path)
    assert task.fired == [(7, fault)] and result.skipped_steps == 1 and result.restores == 0
    assert _finite(task.net_) and any(
        not torch.equal(before[k], v) for k, v in task.net_.state_dict().items()
    )


def test_streak_restores_last_good_checkpoint_with_half_lr(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(max_bad_steps=3)
    task = _Regression({9: "loss", 10: "grad", 11: "loss"})
    run = RecordingRun()
    with caplog.at_level(logging.WARNING, logger="pipeline.training.loop"):
        result = _fit(task, _Points(), cfg, tmp_path, run)
    assert result.restores == 1 and result.skipped_steps == 3 and result.step == cfg.steps
    assert any("restored step 8" in r.getMessage() for r in caplog.records)
    lr_logged = {step: m["lr"] for step, m in run.metrics if "lr" in m}
    # after the restore, step 9 onwards runs at half the scheduled rate
    assert lr_logged[cfg.steps] == pytest.approx(0.5 * cfg.lr * lr_factor(cfg.steps - 1, cfg))
    assert _finite(task.net_)


def test_streak_before_any_checkpoint_stops_with_clear_error(tmp_path: Path) -> None:
    task = _Regression({1: "loss", 2: "loss", 3: "loss"})
    with pytest.raises(TrainingDivergedError, match="non-finite steps in a row at step 3"):
        _fit(task, _Points(), _cfg(max_bad_steps=3), tmp_path)


def test_checkpoint_is_not_written_during_a_bad_streak(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps 7 and 8 fail (below max_bad_steps=3): step 8's checkpoint is not written."""
    task = _Regression({7: "loss", 8: "loss"})
    writes: list[int] = []
    real = training._Checkpointer.save

    def spy(self, step, *args, **kwargs):
        writes.append(step)
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(training._Checkpointer, "save", spy)
    _fit(task, _Points(), _cfg(max_bad_steps=3), tmp_path)
    assert 8 not in writes and {4, 12, 24} <= set(writes)


def test_persistent_nan_ends_in_one_line_through_stage_main(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    def stage() -> None:
        _fit(_Regression(), _Points(poison=set(range(64))), _cfg(max_bad_steps=2), tmp_path)

    with pytest.raises(SystemExit) as exit_:
        stage_main(stage)
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1
    assert "Traceback" not in "\n".join(err)
    assert "non-finite" in err[-1] and "test" in err[-1]
