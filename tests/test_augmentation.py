"""The augmentation study: arms, subsets, paired effects, bad input, a tiny run end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core.config import (
    CovariateProbeConfig,
    Params,
    SegmenterConfig,
    StudyConfig,
    TrainConfig,
)
from pipeline.data.datasets import EvalData, SliceDataset
from pipeline.evaluation.augmentation import (
    Conventional,
    QuietRun,
    StudyData,
    _arm_scores,
    conclusion,
    effects,
    run_study,
    study_arms,
    subject_subset,
)
from pipeline.inference.generate import generate

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TRAIN = TrainConfig(steps=3, batch_size=4, warmup_steps=1, ckpt_every=3, eval_every=3)
TINY_STUDY = StudyConfig(
    tasks=("segmentation", "age"),
    seeds=2,
    ratios=(1.0,),
    fractions=(0.5, 1.0),
    pool_ratio=1.0,
    n_boot=200,
    segmenter=SegmenterConfig(features=(4, 4, 8, 8, 8, 4), train=TINY_TRAIN),
    regressor=CovariateProbeConfig(channels=(4, 8), train=TINY_TRAIN),
)


def _split(root: Path, subjects: int, seed: int) -> Path:
    """A labelled 32x32 split: 4 slices per subject, ages 30 + 10 i, tissue stripes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    n = 4 * subjects
    tissue = np.zeros((n, 1, 32, 32), np.uint8)
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
            "cdr": "",
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
             covariates={"age": "30:60"}, masks=True)  # fmt: skip
    return StudyData(
        train,
        EvalData.from_dataset(test_set),
        test_set.manifest["subject"].astype(str).to_numpy(),
        test_set.manifest["age"].to_numpy(float),
        pool,
    )


def test_arms_and_their_baselines() -> None:
    names = [(a.name, a.baseline) for a in study_arms(TINY_STUDY, best_ratio=1.0)]
    assert names == [
        ("real", None),
        ("real + 1x synthetic", "real"),
        ("50% real", "real"),
        ("50% real + 1x synthetic", "50% real"),
        ("synthetic only", "real"),
        ("conventional", "real"),
        ("conventional + 1x synthetic", "real"),
    ]


def test_subject_subsets_are_nested_and_whole_subjects() -> None:
    manifest = pd.DataFrame({"subject": np.repeat([f"s{i}" for i in range(8)], 3)})
    quarter, half = subject_subset(manifest, 0.25, 0), subject_subset(manifest, 0.5, 0)
    assert len(quarter) == 6 and len(half) == 12 and set(quarter) <= set(half)
    assert len(subject_subset(manifest, 0.01, 0)) == 3  # at least one subject


def test_identical_arms_differ_by_exactly_zero(study_data) -> None:
    params = Params(study=TINY_STUDY)
    arm = study_arms(TINY_STUDY)[0]
    kw = {"params": params, "data": study_data, "device": torch.device("cpu"), "run": QuietRun()}
    first = _arm_scores(
        "segmentation", arm, **kw, work_dir=Path(study_data.synthetic_dir).parent / "a"
    )
    again = _arm_scores(
        "segmentation", arm, **kw, work_dir=Path(study_data.synthetic_dir).parent / "b"
    )
    np.testing.assert_array_equal(first, again)  # same seeds, same data: same scores
    table = effects({"real": first, "copy": again}, [arm, type(arm)("copy", baseline="real")],
                    TINY_STUDY, True)  # fmt: skip
    e = table["copy"]
    assert (e["mean"], e["low"], e["high"], e["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert not e["survives_holm"] and "no arm differs" in conclusion(
        "segmentation", table, TINY_STUDY
    )


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
    results = run_study(params, study_data, device=cpu, run=QuietRun())
    seg, age = results["segmentation"], results["age"]
    assert set(seg["arms"]) == {a.name for a in study_arms(TINY_STUDY, 1.0)}
    assert np.asarray(seg["arms"]["real"]["scores"]).shape == (2, 3)  # seeds x test subjects
    assert set(seg["effects"]) == set(seg["arms"]) - {"real"}
    assert seg["conclusion"].startswith("segmentation: ") and "conclusion" in age
    plain = tmp_path / "plain"  # unlabelled slices without masks: neither task can use them
    generate(tiny_generators["ldm"], "0:3", 2, 0, plain, progress=False, device="cpu")
    data = StudyData(
        study_data.train, study_data.test, study_data.test_subjects, study_data.test_ages, plain
    )
    skipped = run_study(params, data, device=cpu, run=QuietRun())
    assert "without masks" in skipped["segmentation"]["skipped"]
    assert "generated with an age" in skipped["age"]["skipped"]


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
