"""The label probes: covariate probe (age, CDR > 0, sex) and tissue segmenter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from support import ROOT, RecordingRun, quiet_fit, stage_kwargs, write_ellipse_splits

from pipeline.core.checkpoint import CheckpointError, load_checkpoint
from pipeline.core.config import (
    CovariateProbeConfig,
    DataConfig,
    SegmenterConfig,
    TrainConfig,
    ZProbeConfig,
    load_params,
)
from pipeline.core.registry import REGISTERED_NAMES, model_tags
from pipeline.models.files import load_covariate_probe, load_segmenter, save_model
from pipeline.models.probes import CovariateProbe, tissue_segmenter
from pipeline.models.zprobe import ZProbe
from pipeline.training.probes import (
    CovariateLabels,
    CovariateProbeTask,
    LabelledSlices,
    ProbePaths,
    constant_covariate_scores,
    covariate_loss,
    dice_per_class,
    predict_tissue,
    score_covariates,
    train_probes,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_PROBE = CovariateProbeConfig(channels=(8, 16))
TINY_SEGMENTER = SegmenterConfig(features=(4, 4, 8, 8, 16, 4))


def _discs(age: np.ndarray, size: int = 16, seed: int = 0) -> torch.Tensor:
    """(N, 1, size, size) noisy discs whose radius grows with age (20..90 years)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    radius = 2.0 + 5.0 * (age - 20.0) / 70.0
    inside = (yy[None] ** 2 + xx[None] ** 2) < radius[:, None, None] ** 2
    images = inside * 0.8 + rng.normal(0, 0.05, inside.shape)
    return torch.from_numpy(np.clip(images, 0, 1)[:, None].astype(np.float32))


def test_zprobe_keeps_its_state_dict_keys_after_sharing_the_trunk() -> None:
    keys = list(ZProbe((8, 16)).state_dict())
    assert keys == [
        "features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
        "features.3.weight", "features.3.bias", "features.4.weight", "features.4.bias",
        "head.weight", "head.bias",
    ]  # fmt: skip
    probe = CovariateProbe((8, 16), ("age", "sex"))
    assert [k for k in probe.state_dict() if k.startswith("features.")] == keys[:-2]


def test_labels_from_the_manifest_treat_blank_cdr_as_unknown() -> None:
    manifest = pd.DataFrame(
        {
            "subject": ["a", "b", "c", "d"],
            "age": [23.0, np.nan, 75.0, 80.0],
            "sex": ["F", "M", "", "female"],
            "cdr": [np.nan, 0.0, 0.5, 2.0],
        }
    )
    labels = CovariateLabels.from_manifest(manifest)
    np.testing.assert_array_equal(labels.age, [23.0, np.nan, 75.0, 80.0])
    np.testing.assert_array_equal(labels.cdr_positive, [np.nan, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(labels.sex_male, [0.0, 1.0, np.nan, 0.0])
    assert labels.heads() == (("age", "cdr", "sex"), {})
    only_f = CovariateLabels.from_manifest(manifest.assign(sex="F", cdr=np.nan))
    heads, missing = only_f.heads()
    assert heads == ("age",)
    assert "only one class" in missing["sex"] and "no slice" in missing["cdr"]
    bare = CovariateLabels.from_manifest(pd.DataFrame({"z": [0.1, 0.2]}))  # e.g. PNG release
    assert bare.heads()[0] == () and bare.subject is None


def test_blank_labels_are_ignored_by_the_loss() -> None:
    torch.manual_seed(0)
    outputs = {h: torch.randn(6, requires_grad=True) for h in ("age", "cdr", "sex")}
    known = torch.tensor([True, False, True, True, False, True])
    batch = {}
    for head in outputs:
        batch[head] = torch.rand(6).round()
        batch[f"{head}_known"] = known
    loss, parts = covariate_loss(outputs, batch)
    # other values (even NaN) in the blank cells change nothing
    noisy = {k: v.clone() for k, v in batch.items()}
    for head in outputs:
        noisy[head][~known] = float("nan")
    torch.testing.assert_close(covariate_loss(outputs, noisy)[0], loss)
    # the same as the loss over the known rows alone
    kept = {h: o[known] for h, o in outputs.items()}
    only = {k: v[known] for k, v in batch.items()}
    torch.testing.assert_close(covariate_loss(kept, only)[0], loss)
    assert set(parts) == {"l1_age", "bce_cdr", "bce_sex"}
    loss.backward()
    for head, out in outputs.items():
        assert torch.all(out.grad[~known] == 0), head
    # a head without any known label adds 0
    none_known = {**batch, "sex_known": torch.zeros(6, dtype=torch.bool)}
    assert covariate_loss(outputs, none_known)[1]["bce_sex"] == 0.0


def test_the_probe_learns_age_far_below_the_constant_baseline(tmp_path: Path) -> None:
    """Disc radius encodes age, CDR > 0 is age > 60; a third of the labels are blank."""
    rng = np.random.default_rng(0)
    age = rng.uniform(20, 90, 192)
    cdr = (age > 60).astype(np.float64)
    blank = rng.random(192) < 0.33
    train_age, train_cdr = np.where(blank, np.nan, age), np.where(blank[::-1], np.nan, cdr)
    train = CovariateLabels(train_age[:128], train_cdr[:128], np.full(128, np.nan))
    heads, _ = train.heads()
    assert heads == ("age", "cdr")
    known_age = train.age[~np.isnan(train.age)]
    mean, std = float(known_age.mean()), float(known_age.std())
    images = _discs(age)
    data = LabelledSlices(
        [{"image": x} for x in images[:128]], train, heads, age_mean=mean, age_std=std
    )
    torch.manual_seed(0)
    task = CovariateProbeTask(
        TINY_PROBE, heads, age_mean=mean, age_std=std, device=torch.device("cpu")
    )
    cfg = TrainConfig(steps=300, batch_size=16, lr=3e-3, warmup_steps=10, log_every=100)
    quiet_fit(task, data, cfg, tmp_path / "resume")

    probe = task.modules["probe"]
    test = CovariateLabels(age[128:], cdr[128:], np.full(64, np.nan))
    scores = score_covariates(probe, images[128:], test.age, test.cdr_positive, test.sex_male)
    baseline = constant_covariate_scores(train, test)
    assert scores["age_mae"] < 0.3 * baseline["age_mae"], (scores, baseline)
    assert scores["cdr_auc"] > 0.9 and scores["age_n"] == scores["cdr_n"] == 64
    assert "sex_auc" in scores["skipped"]


def test_score_covariates_skips_one_class_metrics_with_a_reason() -> None:
    torch.manual_seed(0)
    probe = CovariateProbe((4, 8), ("age", "cdr"), age_mean=60.0, age_std=10.0)
    images = torch.rand(8, 1, 16, 16)
    cdr = np.array([0, 1, 0, 1, np.nan, 0, 1, 1], dtype=np.float64)
    subjects = np.array(["s0", "s0", "s1", "s1", "s2", "s3", "s3", "s4"])
    scores = score_covariates(probe, images, np.full(8, 70.0), cdr, np.zeros(8), subjects=subjects)
    assert 0 <= scores["cdr_auc"] <= 1 and scores["cdr_n"] == 7 and scores["cdr_n_positive"] == 4
    assert scores["cdr_n_subjects"] == 7  # s0, s1, s3 hold both labels: a group per label
    assert "age_mae" in scores and scores["n_images"] == 8
    assert scores["skipped"] == {
        "sex_auc": "the probe has no sex head (its training split lacked it)"
    }

    one_class = score_covariates(probe, images, None, np.zeros(8), None)
    assert "cdr_auc" not in one_class
    assert one_class["skipped"]["cdr_auc"].startswith("only one class (0) among the 8")
    assert one_class["skipped"]["age_mae"] == "no image has a known age label"
    with pytest.raises(ValueError, match="cdr_positive must hold one value per image"):
        score_covariates(probe, images, None, np.zeros(3), None)


def test_dice_per_class_on_known_arrays() -> None:
    target = torch.tensor([[[0, 1, 2, 3], [3, 3, 2, 1]]])  # (1, 2, 4)
    same = dice_per_class(target, target)
    assert same == {"dice_csf": 1.0, "dice_gm": 1.0, "dice_wm": 1.0, "dice_mean": 1.0}
    disjoint = dice_per_class(torch.tensor([[[0, 2, 3, 1], [1, 2, 3, 3]]]), target)
    assert disjoint == {"dice_csf": 0.0, "dice_gm": 0.0, "dice_wm": 0.0, "dice_mean": 0.0}
    # WM: one of the target's three pixels predicted, nothing else: 2 * 1 / (1 + 3)
    half = dice_per_class(torch.tensor([[[0, 1, 2, 3], [0, 0, 2, 1]]]), target)
    assert half["dice_csf"] == 1.0 and half["dice_gm"] == 1.0
    assert half["dice_wm"] == pytest.approx(2 * 1 / (1 + 3))
    assert half["dice_mean"] == pytest.approx((1 + 1 + 0.5) / 3)
    with pytest.raises(ValueError, match="labels must lie in"):
        dice_per_class(target + 1, target)


def test_model_files_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    probe = CovariateProbe(TINY_PROBE.channels, ("age", "sex"), age_mean=61.5, age_std=12.0)
    meta = {"heads": ["age", "sex"], "age_mean": 61.5, "age_std": 12.0, "n_train": 3}
    save_model(tmp_path / "covariate_probe.pt", "covariate_probe", probe, TINY_PROBE, meta)
    loaded, loaded_meta = load_covariate_probe(tmp_path / "covariate_probe.pt")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        want, got = probe.eval()(x), loaded(x)
    assert loaded.heads == ("age", "sex") and not loaded.training
    assert float(loaded.age_mean) == 61.5 and loaded_meta["age_std"] == 12.0
    for head in want:
        torch.testing.assert_close(got[head], want[head])

    segmenter = tissue_segmenter(TINY_SEGMENTER)
    seg_meta = {"classes": ["background", "CSF", "GM", "WM"], "trained": True}
    save_model(tmp_path / "segmenter.pt", "segmenter", segmenter, TINY_SEGMENTER, seg_meta)
    seg, meta = load_segmenter(tmp_path / "segmenter.pt")
    assert meta["trained"] is True
    images = torch.rand(3, 1, 32, 32)
    pred = predict_tissue(seg, images)
    assert pred.shape == (3, 32, 32) and pred.dtype == torch.int64
    torch.testing.assert_close(pred, predict_tissue(segmenter, images))

    save_model(tmp_path / "zprobe.pt", "zprobe", ZProbe((4,)), ZProbeConfig(channels=(4,)), {})
    with pytest.raises(CheckpointError, match="train_probes"):
        load_covariate_probe(tmp_path / "zprobe.pt")


def _labelled_splits(root: Path, size: int = 32) -> Path:
    """:func:`write_ellipse_splits` plus covariates in the manifests and a ``tissue.npy``
    (WM core, GM shell, CSF rim of each ellipse)."""
    write_ellipse_splits(root, size=size, k=8)
    covariates = {  # subject → (age, sex, cdr); train0's CDR is blank, as OASIS leaves it
        "train0": (25.0, "F", np.nan),
        "train1": (70.0, "M", 0.0),
        "train2": (82.0, "F", 1.0),
        "val0": (74.0, "M", 0.5),
        "test0": (78.0, "F", 0.0),
    }
    for split in ("train", "val", "test"):
        folder = root / split
        manifest = pd.read_csv(folder / "manifest.csv")
        rows = [covariates[s] for s in manifest["subject"]]
        manifest["age"], manifest["sex"], manifest["cdr"] = zip(*rows, strict=True)
        manifest.to_csv(folder / "manifest.csv", index=False)
        images = np.load(folder / "slices.npy").astype(np.float32)
        masks = np.load(folder / "masks.npy")
        tissue = np.where(masks > 0, np.where(images > 0.75, 3, np.where(images > 0.45, 2, 1)), 0)
        np.save(folder / "tissue.npy", tissue.astype(np.uint8))
    return root


def _tiny_params(prepared: Path):
    params = load_params(ROOT / "params.yaml", profile="tiny")
    return params.model_copy(update={"data": DataConfig(prepared_dir=str(prepared))})


def test_stage_trains_both_probes_and_reports_floors_and_baselines(tmp_path: Path) -> None:
    prepared = _labelled_splits(tmp_path / "prepared")
    paths = ProbePaths.standard(tmp_path)
    run = RecordingRun("probes")
    report = train_probes(_tiny_params(prepared), **stage_kwargs(paths, run))  # type: ignore[arg-type]

    assert json.loads(paths.report.read_text()) == json.loads(json.dumps(report))
    covariate, segmenter = report["covariate"], report["segmenter"]
    assert covariate["heads"] == ["age", "cdr", "sex"] and covariate["missing_heads"] == {}
    test = covariate["test"]
    assert test["age_n"] == 8 and test["age_mae"] >= 0
    # the test split is one F subject with CDR 0: the AUCs are skipped, with reasons
    assert set(test["skipped"]) == {"cdr_auc", "sex_auc"}
    assert covariate["baseline"]["age_mae"] == pytest.approx(78.0 - 70.0)  # training median
    assert segmenter["trained"] is True
    assert set(segmenter["test"]) == {"dice_csf", "dice_gm", "dice_wm", "dice_mean"}
    assert set(segmenter["baseline"]) == set(segmenter["test"])
    assert paths.figure.is_file() and "reports/probes.png" in run.images
    assert not any(a.startswith("model/") for a in run.artifacts)  # stored once: a logged model
    registered = {
        REGISTERED_NAMES[model_tags(p, load_checkpoint(p))["kind"]]
        for p in (paths.covariate_probe, paths.segmenter)
    }
    assert registered == {"braingen-covariate-probe", "braingen-segmenter"}
    assert run.values("covariate/loss") and run.values("segmenter/dice_ce")
    assert not (paths.resume_dir / "covariate" / "last.pt").exists()
    probe, meta = load_covariate_probe(paths.covariate_probe)
    assert probe.heads == ("age", "cdr", "sex") and meta["n_train"] == 24
    assert load_segmenter(paths.segmenter)[1]["trained"] is True


def test_stage_without_labels_saves_untrained_probes_and_says_why(tmp_path: Path) -> None:
    prepared = write_ellipse_splits(tmp_path / "prepared", size=32, k=8)  # no covariates, tissue
    paths = ProbePaths.standard(tmp_path)
    report = train_probes(_tiny_params(prepared), **stage_kwargs(paths))  # type: ignore[arg-type]
    assert report["covariate"]["heads"] == []
    assert set(report["covariate"]["missing_heads"]) == {"age", "cdr", "sex"}
    assert report["segmenter"] == {
        "trained": False,
        "skipped": "the training split has no tissue labels (tissue.npy)",
    }
    assert load_segmenter(paths.segmenter)[1]["trained"] is False


@pytest.mark.slow
def test_stage_module_runs_on_the_tiny_profile(tmp_path: Path) -> None:
    """``python -m stages.train_probes`` in a project folder: files, report, registry."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params |= {"profile": "tiny", "device": "cpu"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _labelled_splits(tmp_path / "data" / "prepared")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "stages.train_probes"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for path in ("models/covariate_probe.pt", "models/segmenter.pt", "reports/probes.png"):
        assert (tmp_path / path).is_file(), path
    report = json.loads((tmp_path / "reports" / "probes.json").read_text())
    assert report["covariate"]["heads"] == ["age", "cdr", "sex"]
    assert "registered braingen-segmenter" in done.stderr
