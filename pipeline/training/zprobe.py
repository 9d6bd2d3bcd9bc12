"""Training and use of the z-index probe (the independent judge of z-conditioning)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from pipeline.core import distributed
from pipeline.core.config import Params, ZProbeConfig
from pipeline.core.figures import figure_image, save_png
from pipeline.core.io import write_json
from pipeline.core.stage import StagePaths
from pipeline.core.tracking import StageRun
from pipeline.data.datasets import EvalData, SliceDataset
from pipeline.models.conditioning import index_from_z
from pipeline.models.files import save_model
from pipeline.models.zprobe import ZProbe
from pipeline.training.loop import Optimization, TrainingTask, adamw, finish_resume, fit


class ZProbeTask(TrainingTask):
    """L1 regression of z from the slice.

    Args:
        cfg: probe architecture and training settings.
        device: where the probe lives.
    """

    ema_module = None

    def __init__(self, cfg: ZProbeConfig, device: torch.device) -> None:
        probe = ZProbe(cfg.channels).to(device)
        self.modules = {"probe": probe}
        self.optimizers = {"probe": adamw(probe.parameters(), cfg.train.lr, cfg.train.weight_decay)}

    def train_step(
        self, batch: dict[str, torch.Tensor], step: int, optim: Optimization
    ) -> dict[str, float]:
        pred = self.net("probe")(batch["image"])
        loss = F.l1_loss(pred, batch["z"])
        optim.step("probe", loss)
        return {"l1_z": loss.item()}


@torch.no_grad()
def predict_z(probe: ZProbe, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted z for a stack of slices.

    Args:
        probe: trained probe (put in eval mode here).
        images: (N, 1, H, W) intensities in [0, 1], on any device.
        batch_size: slices per forward.

    Returns:
        (N,) predictions in [0, 1], on the CPU.
    """
    probe.eval()
    device = next(probe.parameters()).device
    out = [
        probe(images[i : i + batch_size].to(device).float()).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


def mae_in_slices(pred_z: torch.Tensor, z: torch.Tensor, n_slices: int) -> float:
    """Mean absolute z error in slice units: ``mean |pred - z| * (K - 1)``."""
    return float(index_from_z((pred_z - z).abs().mean(), n_slices))


def constant_mae_in_slices(train_z: torch.Tensor, z: torch.Tensor, n_slices: int) -> float:
    """MAE in slice units of the best constant guess (the training median) — the baseline."""
    return mae_in_slices(torch.full_like(z, float(train_z.median())), z, n_slices)


def train_zprobe(
    params: Params,
    *,
    run: StageRun,
    device: torch.device,
    paths: StagePaths,
    identity: dict[str, Any],
    progress: bool = True,
) -> dict[str, float]:
    """Train the probe on the real training slices and measure its floor on the test split.

    Args:
        params: all parameters (zprobe, data, prepare.n_slices, seed).
        run: the stage's tracking run.
        device: training device.
        paths: ``models/zprobe.pt``; ``reports/zprobe.json`` with ``test_mae`` (the floor,
            slice units), ``val_mae`` and ``constant_mae`` (a constant predictor, for
            comparison); the grid is a scatter of predicted against true slice index.
        identity: the run's :func:`~pipeline.core.identity.stage_identity` (resume hash).
        progress: show a progress bar.

    Returns:
        The report.
    """
    cfg, n_slices = params.zprobe, params.prepare.n_slices
    prepared = Path(params.data.prepared_dir)
    train = SliceDataset(prepared / "train")
    val = EvalData.from_dataset(SliceDataset(prepared / "val"))
    test = EvalData.from_dataset(SliceDataset(prepared / "test"))
    torch.manual_seed(params.seed)
    task = ZProbeTask(cfg, device)

    def evaluate(step: int, _ema: torch.nn.Module | None) -> dict[str, float]:
        return {
            "val_mae": mae_in_slices(predict_z(task.modules["probe"], val.image), val.z, n_slices)
        }

    result = fit(
        task,
        train,
        cfg.train,
        run=run,
        resume_dir=paths.resume_dir,
        seed=params.seed,
        device=device,
        evaluate=evaluate,
        config_for_hash=identity,
        progress=progress,
    )
    if not distributed.is_main():  # under torchrun rank 0 alone exports and reports
        return {}
    probe = task.modules["probe"]
    save_model(paths.model, "zprobe", probe, cfg, {"n_slices": n_slices})
    train_z = torch.as_tensor(np.asarray(train.manifest["z"], dtype=np.float32))
    test_pred = predict_z(probe, test.image)
    report = {
        "test_mae": mae_in_slices(test_pred, test.z, n_slices),
        "val_mae": mae_in_slices(predict_z(probe, val.image), val.z, n_slices),
        "constant_mae": constant_mae_in_slices(train_z, test.z, n_slices),
        "n_test": len(test.z),
    }
    write_json(paths.report, report)
    scatter = prediction_scatter(test_pred, test.z, n_slices)
    save_png(scatter, paths.grid)
    run.log_image(scatter, f"reports/{paths.grid.name}")
    run.log_metrics({f"test_{k}": float(v) for k, v in report.items()}, step=result.step)
    finish_resume(paths.resume_dir)
    return report


def prediction_scatter(pred_z: torch.Tensor, z: torch.Tensor, n_slices: int) -> np.ndarray:
    """Predicted against true slice index (the diagonal is perfect), as an RGB image.

    Args:
        pred_z: (N,) predicted z in [0, 1].
        z: (N,) true z in [0, 1].
        n_slices: K; indices are ``z * (K - 1)``.

    Returns:
        (H, W, 3) uint8 image.
    """
    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.subplots()
    true_index, pred_index = (
        index_from_z(z.numpy(), n_slices),
        index_from_z(pred_z.numpy(), n_slices),
    )
    ax.scatter(true_index, pred_index, s=6, alpha=0.5)
    ax.plot([0, n_slices - 1], [0, n_slices - 1], color="grey", linewidth=1)
    ax.set(xlabel="true slice index", ylabel="predicted slice index", title="z-probe, test split")
    fig.tight_layout()
    return figure_image(fig)
