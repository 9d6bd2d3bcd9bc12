"""The augmentation study: arms, subsets, paired effects, bad input, a tiny run end to end."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support import RecordingRun

from pipeline.core.config import (
    CovariateProbeConfig,
    Params,
    SegmenterConfig,
    StudyConfig,
    TrainConfig,
)
from pipeline.data.datasets import EvalData, SliceDataset
from pipeline.evaluation.augmentation import (
    REBALANCED,
    Arm,
    Conventional,
    QuietRun,
    StudyData,
    Training,
    Trainings,
    conclusion,
    effects,
    log_arms,
    pool_counts,
    rebalancing,
    run_study,
    study_arms,
    subject_subset,
    training_set,
)
from pipeline.inference.generate import generate
from pipeline.training.probes import CovariateLabels

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TRAIN = TrainConfig(steps=3, batch_size=4, warmup_steps=1, ckpt_every=3, eval_every=3)
TINY_STUDY = StudyConfig(
    tasks=("segmentation", "age", "cdr"),
    seeds=2,
    ratios=(1.0,),
    fractions=(0.5, 1.0),
    pool_ratio=1.0,
    n_boot=200,
    segmenter=SegmenterConfig(features=(4, 4, 8, 8, 8, 4), train=TINY_TRAIN),
    covariate_net=CovariateProbeConfig(channels=(4, 8), train=TINY_TRAIN),
)


def _split(root: Path, subjects: int, seed: int, size: int = 32) -> Path:
    """A labelled size x size split (size >= 24): 4 slices per subject, ages 30 + 10 i, CDR 0
    for even i and 0.5 for odd i, tissue squares."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    n = 4 * subjects
    tissue = np.zeros((n, 1, size, size), np.uint8)
    tissue[:, :, 8:24, 8:24] = 3
    tissue[:, :, 12:20, 12:20] = 1
    images = (tissue / 3 + rng.normal(0, 0.02, tissue.shape)).clip(0, 1)
    np.save(root / "slices.npy", images.astype(np.float16))
    np.save(root / "tissue.npy", tissue)
    np.save(root / "masks.npy", (tissue > 0).astype(np.uint8))
    z_index = np.tile(np.arange(4), subjects)
    pd.DataFrame(
        {
            "subject": np.repeat([f"S{seed}{i:02d}" for i in range(subjects)], 4),
            "z_index": z_index,
            "z": z_index / 3,
            "age": np.repeat(30.0 + 10 * np.arange(subjects), 4),
            "sex": np.repeat(["F", "M"] * subjects, 2)[:n],
            "cdr": np.repeat([0.5 * (i % 2) for i in range(subjects)], 4),
        }
    ).to_csv(root / "manifest.csv", index=False)
    return root


@pytest.fixture(scope="module")
def study_data(labelled_generators, tmp_path_factory) -> StudyData:
    root = tmp_path_factory.mktemp("study")
    train = SliceDataset(_split(root / "train", 4, 0))
    test_set = SliceDataset(_split(root / "test", 3, 1))
    pool = root / "pool"
    generate(labelled_generators["ldm"], "0:3", 4, 0, pool, progress=False, device="cpu",
             covariates={"age": "30:60", "cdr": "0,0.5"}, masks=True)  # fmt: skip
    return StudyData(
        train,
        EvalData.from_dataset(test_set),
        test_set.manifest["subject"].astype(str).to_numpy(),
        CovariateLabels.from_manifest(test_set.manifest),
        pool,
    )


def test_arms_and_their_baselines() -> None:
    names = [(a.name, a.baseline) for a in study_arms(TINY_STUDY, "segmentation", 1.0)]
    assert names == [
        ("real", None),
        ("real + 1x synthetic", "real"),
        ("50% real", "real"),
        ("50% real + 1x synthetic", "50% real"),
        ("synthetic only", "real"),
        ("conventional", "real"),
        ("conventional + 1x synthetic", "real"),
    ]
    cdr = [(a.name, a.baseline) for a in study_arms(TINY_STUDY, "cdr")]
    assert (REBALANCED, "real") in cdr and REBALANCED not in dict(names)


def test_subject_subsets_are_nested_and_whole_subjects() -> None:
    manifest = pd.DataFrame({"subject": np.repeat([f"s{i}" for i in range(8)], 3)})
    quarter, half = subject_subset(manifest, 0.25, 0), subject_subset(manifest, 0.5, 0)
    assert len(quarter) == 6 and len(half) == 12 and set(quarter) <= set(half)
    assert len(subject_subset(manifest, 0.01, 0)) == 3  # at least one subject


def test_identical_arms_differ_by_exactly_zero(study_data, tmp_path) -> None:
    params = Params(study=TINY_STUDY)
    arm = study_arms(TINY_STUDY, "segmentation")[0]
    with Trainings(params, study_data, torch.device("cpu"), tmp_path, workers=1) as trainings:
        done: dict = {}
        trainings.arms("segmentation", [arm], done)
        first = np.stack([s.per_subject for s in done["real"]])
        rerun = trainings.run([Training("segmentation", arm, seed) for seed in (0, 1)])
        again = np.stack([s.per_subject for s in rerun])
    np.testing.assert_array_equal(first, again)  # same seeds, same data: same scores
    table = effects({"real": first, "copy": again}, [arm, type(arm)("copy", baseline="real")],
                    TINY_STUDY, True)  # fmt: skip
    e = table["copy"]
    assert (e["mean"], e["low"], e["high"], e["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert not e["survives_holm"] and "no arm differs" in conclusion(
        "segmentation", table, TINY_STUDY
    )


def test_side_by_side_trainings_score_as_one_after_the_other(study_data, tmp_path) -> None:
    params = Params(study=TINY_STUDY)
    arm = study_arms(TINY_STUDY, "cdr")[1]  # real + 1x synthetic
    jobs = [Training(task, arm, seed) for task in ("segmentation", "cdr") for seed in (0, 1)]
    cpu = torch.device("cpu")
    with Trainings(params, study_data, cpu, tmp_path / "one", workers=1) as trainings:
        alone = trainings.run(jobs)  # this process: one thread (the one_thread fixture)
    with Trainings(params, study_data, cpu, tmp_path / "two", workers=2) as trainings:
        pooled = trainings.run(jobs)
    for a, b in zip(alone, pooled, strict=True):
        np.testing.assert_array_equal(a.per_subject, b.per_subject)
        assert a.summary == b.summary


def test_conventional_augmentation_moves_image_and_tissue_together(study_data) -> None:
    item = {"image": torch.zeros(1, 32, 32), "tissue": torch.zeros(32, 32, dtype=torch.long)}
    item["image"][0, 4:10, 2:6] = 1.0
    item["tissue"][4:10, 2:6] = 3
    moved = [Conventional([item], seed)[0] for seed in range(6)]
    for out in moved:
        assert out["tissue"].dtype == torch.int64 and out["image"].shape == (1, 32, 32)
        # where the (binary) image is bright the tissue is WM, and vice versa
        agree = ((out["image"][0] > 0.5) == (out["tissue"] == 3)).float().mean()
        assert agree > 0.97
    assert any(not torch.equal(o["tissue"], item["tissue"]) for o in moved)


def test_a_tiny_study_runs_and_a_task_without_labels_says_why(
    study_data, tiny_generators, tmp_path
) -> None:
    params = Params(study=TINY_STUDY)
    cpu = torch.device("cpu")
    results = run_study(params, study_data, device=cpu)
    seg, age, cdr = results["segmentation"], results["age"], results["cdr"]
    assert set(seg["arms"]) == {a.name for a in study_arms(TINY_STUDY, "segmentation", 1.0)}
    assert np.asarray(seg["arms"]["real"]["scores"]).shape == (2, 3)  # seeds x test subjects
    assert set(seg["effects"]) == set(seg["arms"]) - {"real"}
    assert seg["conclusion"].startswith("segmentation: ") and "conclusion" in age
    assert set(cdr["arms"]) == {a.name for a in study_arms(TINY_STUDY, "cdr", 1.0)}
    real = cdr["arms"]["real"]
    assert np.asarray(real["scores"]).shape == (2, 3) and len(real["auc"]) == 2
    assert all(0 <= b <= 1 for b in np.ravel(real["scores"]))  # Brier score of each subject
    assert cdr["arms"][REBALANCED]["settings"]["rebalance"] is True
    run = RecordingRun("augment_study")
    log_arms(run, results)  # one MLflow child run per (task, arm), nested under the stage run
    children = {c.run_name: c for c in run.children}
    assert set(children) == {f"{t}: {a}" for t, r in results.items() for a in r["arms"]}
    rebalanced = children[f"cdr: {REBALANCED}"]
    assert rebalanced.params["rebalance"] is True and rebalanced.tags == {"study_task": "cdr"}
    logged = rebalanced.metrics[0][1]
    assert logged["delta_mean"] == cdr["effects"][REBALANCED]["mean"] and "auc" in logged
    assert run.last("segmentation/real/mean") == seg["arms"]["real"]["mean"]
    assert run.last("segmentation/50pct_real_plus_1x_synthetic/mean") == pytest.approx(
        seg["arms"]["50% real + 1x synthetic"]["mean"]
    )
    mlflow_name = re.compile(r"^[A-Za-z0-9_\-. :/]+$")  # what MLflow accepts as a metric name
    names = [k for _, m in run.metrics for k in m] + [
        k for c in run.children for _, m in c.metrics for k in m
    ]
    assert names and all(mlflow_name.match(k) for k in names), names
    plain = tmp_path / "plain"  # unlabelled slices without masks: neither task can use them
    generate(tiny_generators["ldm"], "0:3", 2, 0, plain, progress=False, device="cpu")
    data = StudyData(
        study_data.train, study_data.test, study_data.test_subjects, study_data.test_labels, plain
    )
    skipped = run_study(params, data, device=cpu)
    assert "without masks" in skipped["segmentation"]["skipped"]
    assert "generated with an age" in skipped["age"]["skipped"]
    assert "generated with a CDR" in skipped["cdr"]["skipped"]


def test_a_folder_without_a_manifest_is_one_line(tmp_path) -> None:
    from pipeline.core.errors import InputError
    from pipeline.evaluation.augmentation import StudyPaths, augment_study

    with pytest.raises(InputError, match=r"has no manifest\.csv: give a folder written by"):
        augment_study(
            Params(study=TINY_STUDY),
            device=torch.device("cpu"),
            run=QuietRun(),
            paths=StudyPaths.standard(tmp_path),
            synthetic_dir=tmp_path / "nowhere",
        )


def test_slices_of_another_size_stop_the_study_before_any_training(
    study_data, tmp_path, monkeypatch
) -> None:
    from pipeline.core.errors import InputError
    from pipeline.evaluation import augmentation
    from pipeline.evaluation.augmentation import StudyPaths, augment_study

    def no_training(*_: object, **__: object) -> None:
        raise AssertionError("the study started training on slices of the wrong size")

    monkeypatch.setattr(augmentation, "run_study", no_training)
    prepared = tmp_path / "prepared"  # 48x48 real slices; the pool was generated at 32x32
    _split(prepared / "train", 4, 0, size=48)
    _split(prepared / "test", 3, 1, size=48)
    with pytest.raises(InputError, match=r"are 32x32 but the real slices in .* are 48x48"):
        augment_study(
            Params(study=TINY_STUDY, data={"prepared_dir": str(prepared)}),
            device=torch.device("cpu"),
            run=QuietRun(),
            paths=StudyPaths.standard(tmp_path),
            synthetic_dir=study_data.synthetic_dir,
        )


def test_report_tables_lead_with_the_conclusion() -> None:
    from pipeline.evaluation.report import augmentation_html

    effect = {"baseline": "real", "mean": 0.01, "low": -0.02, "high": 0.04, "p_value": 0.4,
              "survives_holm": False}  # fmt: skip
    study = {"tasks": {
        "segmentation": {"conclusion": "segmentation: no arm differs", "arms": {
            "real": {"mean": 0.8}, "real + 1x synthetic": {"mean": 0.81}},
            "effects": {"real + 1x synthetic": effect}},
        "age": {"skipped": "age: the test split has no known ages"},
    }}  # fmt: skip
    page = augmentation_html(study)
    assert page.index("no arm differs") < page.index("<table")
    assert "age: the test split has no known ages" in page and "[-0.02, +0.04]" in page
    assert "not produced" in augmentation_html({})


def test_rebalancing_adds_only_the_minority_class(study_data) -> None:
    # slices of subjects 0, 1, 2: CDR 0, 0.5, 0 → 8 CDR-0 slices against 4 CDR > 0
    minority, count = rebalancing(study_data, np.arange(12))
    assert (minority, count) == ("CDR > 0", 4)
    arm = Arm("rebalanced", fraction=0.75, rebalance=True)  # 3 of the 4 subjects: unbalanced
    minority, count = rebalancing(study_data, subject_subset(study_data.train.manifest, 0.75, 0))
    assert count == 4
    items = training_set(arm, study_data, "cdr", seed=0, study_seed=0)
    assert len(items) == 12 + 4 and set(items[0]) == {"image", "cdr"}
    cdr = np.asarray([float(items[i]["cdr"]) for i in range(len(items))])
    assert (cdr > 0).sum() == (cdr == 0).sum() == 8  # balanced by the minority class only


def test_pool_counts_spread_a_fractional_ratio_over_the_rows() -> None:
    half = pool_counts(11, 0.5, seed=0)
    assert half.sum() == 6 and set(half.tolist()) == {0, 1}
    assert (pool_counts(11, 0.5, seed=0) == half).all()  # seeded
    assert not (pool_counts(11, 0.5, seed=1) == half).all()
    assert (pool_counts(4, 2.0, seed=0) == 2).all()
    one_and_a_half = pool_counts(10, 1.5, seed=0)
    assert one_and_a_half.sum() == 15 and set(one_and_a_half.tolist()) == {1, 2}


def test_synthetic_only_takes_the_whole_pool_when_it_is_smaller(study_data, tmp_path) -> None:
    pool = len(pd.read_csv(study_data.synthetic_dir / "manifest.csv").query("type == 'slice'"))
    bigger = SliceDataset(_split(tmp_path / "train", 12, 0))  # 48 real slices
    assert pool < 48 and len(study_data.train) < pool
    data = StudyData(bigger, study_data.test, study_data.test_subjects,
                     study_data.test_labels, study_data.synthetic_dir)  # fmt: skip
    arm = Arm("synthetic only", synthetic_only=True)
    assert len(training_set(arm, data, "segmentation", seed=0, study_seed=0)) == pool
    assert len(training_set(arm, study_data, "segmentation", seed=0, study_seed=0)) == 16
