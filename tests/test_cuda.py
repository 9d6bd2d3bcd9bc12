"""On a CUDA device: bf16 training steps, resume across devices, and sampling.

Skipped where no GPU is visible (CI, the CPU development machine); run on a workstation with
``pytest tests/test_cuda.py``. ``benchmarks.workstation_smoke`` runs these first.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import LinearTask, RecordingRun, quiet_fit
from test_generate import _png

from pipeline.core.checkpoint import load_checkpoint
from pipeline.core.config import TrainConfig
from pipeline.core.device import resolve_device
from pipeline.inference.generate import generate
from pipeline.training.loop import autocast_dtype

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


class _Points(torch.utils.data.Dataset):
    """y = x · w on 64 fixed points (x: (4,), y: scalar)."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=gen)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def _cfg(steps: int) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=16,
        lr=0.1,
        warmup_steps=2,
        ckpt_every=10,
        eval_every=20,
        log_every=5,
    )


def _cuda_task() -> LinearTask:
    task = LinearTask()
    task.modules["model"].to(CUDA)
    task.optimizers["model"] = torch.optim.AdamW(task.modules["model"].parameters(), lr=5e-2)
    return task


def test_auto_resolves_to_cuda_and_training_autocasts_to_bf16() -> None:
    assert resolve_device("auto").type == "cuda"
    assert autocast_dtype(CUDA, _cfg(10)) is torch.bfloat16


def test_fit_on_cuda_learns_in_bf16_and_keeps_fp32_weights(tmp_path) -> None:
    task = _cuda_task()
    run = RecordingRun()
    quiet_fit(task, _Points(), _cfg(150), tmp_path / "resume", device=CUDA, run=run)
    weight = task.modules["model"].weight
    assert weight.is_cuda and weight.dtype == torch.float32  # autocast, not a bf16 model
    losses = run.values("loss")
    assert losses[-1] < 0.1 * losses[0]
    np.testing.assert_allclose(
        weight.detach().cpu().numpy().ravel(), [1.0, -2.0, 0.5, 3.0], atol=0.15
    )


def test_a_run_killed_on_cuda_resumes_on_the_cpu(tmp_path) -> None:
    """A run killed on the GPU finishes on a CPU-only machine from its ``last.pt``."""
    resume = tmp_path / "resume"
    with pytest.raises(KeyboardInterrupt):
        quiet_fit(
            _cuda_task(),
            _Points(),
            _cfg(40),
            resume,
            device=CUDA,
            config_for_hash={"a": 1},
            evaluate=lambda step, ema: (_ for _ in ()).throw(KeyboardInterrupt),
        )  # dies at its first evaluation, step 20, after the checkpoint of step 10
    assert load_checkpoint(resume / "last.pt")["step"] == 10
    task = LinearTask()
    result = quiet_fit(task, _Points(), _cfg(40), resume, config_for_hash={"a": 1})
    assert result.resumed_from == 10 and result.step == 40
    weight = task.modules["model"].weight
    assert weight.device.type == "cpu" and torch.isfinite(weight).all()


def test_generate_on_cuda_is_deterministic_and_not_blank(tiny_generators, tmp_path) -> None:
    for name in ("ldm", "pixelcnn"):
        model = tiny_generators[name]
        a = generate(model, "0:3", 2, 5, tmp_path / f"{name}_a", progress=False, device="cuda")
        b = generate(model, "0:3", 2, 5, tmp_path / f"{name}_b", progress=False, device="cuda")
        assert len(a.files) == 8, name  # 4 levels x 2
        for pa, pb in zip(a.files, b.files, strict=True):
            image = _png(pa)
            np.testing.assert_array_equal(image, _png(pb))
            assert image.max() > 0, (name, pa.name)
