"""The train_generators stage: the LDM and the prior as two child stages, side by side."""

from __future__ import annotations

import sys

import pytest
import torch

from stages import train_generators


def test_runs_each_child_stage_once_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list = []
    monkeypatch.setattr(
        train_generators, "run_side_by_side", lambda jobs, device: seen.append((jobs, device))
    )
    train_generators.run()
    ((jobs, device),) = seen
    assert [job.label for job in jobs] == ["ldm", "prior"]
    assert [job.argv for job in jobs] == [
        [sys.executable, "-m", "stages.train_ldm"],
        [sys.executable, "-m", "stages.train_prior"],
    ]
    assert isinstance(device, torch.device)
