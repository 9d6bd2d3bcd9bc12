"""The novelty (near-copy) check: known cases of the measures, the reference thresholds and
the any-measure rule, and ``generate --novelty`` re-sampling planted copies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.ndimage import gaussian_filter
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.config import NoveltyConfig
from pipeline.core.errors import InputError
from pipeline.data.manifests import read_manifest
from pipeline.data.slice_files import read_slice
from pipeline.inference import generate as generate_module
from pipeline.inference.generate import (
    NOVELTY_COLUMNS,
    NoveltySettings,
    attempt_seed,
    generate,
    level_seed,
    reference_split,
)
from pipeline.metrics import novelty
from pipeline.metrics.novelty import MEASURES, RULE_MEASURES, NearestTraining
from pipeline.metrics.quality import alex_features, ssim

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, LEVELS = 32, 8
SPLITS = {"train": 3, "val": 2, "test": 1}  # subjects per split


def _subject(rng: np.random.Generator) -> np.ndarray:
    """(LEVELS, 1, SIZE, SIZE) slices of one synthetic subject in [0, 1].

    A textured ellipse whose size follows the level; the subject draws its own shape,
    texture and noise, so subjects resemble each other the way brains do, without copies.
    """
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    a, b = rng.uniform(0.8, 1.2, 2)
    fx, fy = rng.uniform(1.5, 4, 2)
    px, py = rng.uniform(0, 6, 2)
    out = []
    for z in range(LEVELS):
        r = SIZE * (0.2 + 0.25 * np.sin(np.pi * (z + 0.5) / LEVELS))
        inside = (yy / (a * r)) ** 2 + (xx / (0.8 * b * r)) ** 2 < 1
        texture = 0.6 + 0.25 * np.sin(xx / fx + px + z) * np.cos(yy / fy + py)
        out.append(np.clip(inside * (texture + rng.normal(0, 0.03, (SIZE, SIZE))), 0, 1))
    return np.stack(out)[:, None].astype(np.float32)


@pytest.fixture(scope="module")
def splits() -> dict[str, np.ndarray]:
    """Split → (n, 1, 32, 32) slices of :data:`SPLITS` subjects, 8 levels each."""
    rng = np.random.default_rng(0)
    return {split: np.concatenate([_subject(rng) for _ in range(n)]) for split, n in SPLITS.items()}


@pytest.fixture(scope="module")
def train_features(splits) -> np.ndarray:
    return alex_features(splits["train"])


@pytest.fixture(scope="module")
def reference(splits, train_features) -> NearestTraining:
    """The held-out (val) slices' nearest training slices."""
    return novelty.nearest_training(
        splits["val"], splits["train"], candidates=4, train_features=train_features
    )


@pytest.fixture
def prepared(splits, tmp_path) -> Path:
    """The splits written as ``prepare`` writes them (slices, manifest)."""
    for split, images in splits.items():
        folder = tmp_path / "prepared" / split
        folder.mkdir(parents=True)
        np.save(folder / "slices.npy", images.astype(np.float16))
        z_index = np.tile(np.arange(LEVELS), len(images) // LEVELS)
        pd.DataFrame({"z_index": z_index, "z": z_index / (LEVELS - 1)}).to_csv(
            folder / "manifest.csv", index=False
        )
    return tmp_path / "prepared"


def _nearest(**similarity: list[float]) -> NearestTraining:
    """A hand-made :class:`NearestTraining` (index 0 everywhere)."""
    sims = {m: np.asarray(v, dtype=np.float64) for m, v in similarity.items()}
    return NearestTraining(sims, {m: np.zeros(len(v), np.int64) for m, v in sims.items()})


# --- the measures ---------------------------------------------------------------------


def test_a_copied_training_slice_is_copy_like_and_found(splits, train_features, reference) -> None:
    train = splits["train"]
    copies = train[[5, 17]]
    found = novelty.nearest_training(copies, train, candidates=4, train_features=train_features)
    limits = novelty.thresholds(reference, 0.99)
    for m in MEASURES:
        np.testing.assert_allclose(found.similarity[m], 1.0, atol=1e-5)
        np.testing.assert_array_equal(found.index[m], [5, 17])
        assert limits[m] < 0.9999  # real held-out slices are never that close
    assert novelty.copy_like(found, limits).all()


def test_a_shifted_held_out_slice_is_not_copy_like(splits, train_features, reference) -> None:
    """Real slices the model never saw, moved by 2 px, stay below the thresholds."""
    shifted = np.roll(splits["val"], 2, axis=-1)
    found = novelty.nearest_training(
        shifted, splits["train"], candidates=4, train_features=train_features
    )
    assert not novelty.copy_like(found, novelty.thresholds(reference, 0.99)).any()


def test_pixel_corr_is_pearson_and_blind_to_contrast(splits, train_features) -> None:
    train = splits["train"]
    rescaled = 0.5 * train[3:4] + 0.2  # another brightness and contrast, same pixels
    held_out = splits["val"][3:4]
    found = novelty.nearest_training(
        np.concatenate([rescaled, np.full_like(rescaled, 0.5), held_out]),
        train,
        candidates=4,
        train_features=train_features,
    )
    assert found.similarity["pixel_corr"][0] == pytest.approx(1.0, abs=1e-5)
    assert found.index["pixel_corr"][0] == 3
    assert found.similarity["pixel_corr"][1] == 0.0  # a constant image correlates with nothing
    pearson = max(np.corrcoef(held_out.ravel(), t.ravel())[0, 1] for t in train)
    assert found.similarity["pixel_corr"][2] == pytest.approx(pearson, abs=1e-5)


def test_ssim_against_every_candidate_is_the_exhaustive_search(splits, train_features) -> None:
    images, train = splits["test"], splits["train"]
    m = len(train)
    pairs = ssim(np.repeat(train[None], len(images), 0).reshape(-1, 1, SIZE, SIZE),
                 np.repeat(images, m, 0)).view(len(images), m)  # fmt: skip
    exhaustive = novelty.nearest_training(
        images, train, candidates=m, train_features=train_features
    )
    np.testing.assert_allclose(exhaustive.similarity["ssim"], pairs.max(1).values, atol=1e-6)
    np.testing.assert_array_equal(exhaustive.index["ssim"], pairs.argmax(1))
    one = novelty.nearest_training(images, train, candidates=1, train_features=train_features)
    np.testing.assert_array_equal(one.index["ssim"], one.index["pixel_corr"])
    assert (one.similarity["ssim"] <= exhaustive.similarity["ssim"] + 1e-9).all()


def test_bad_inputs_are_named(splits) -> None:
    train = splits["train"]
    with pytest.raises(InputError, match="same slice size"):
        novelty.nearest_training(np.zeros((1, 1, 40, 40), np.float32), train)
    with pytest.raises(InputError, match="candidates must be"):
        novelty.nearest_training(train[:1], train, candidates=0)
    with pytest.raises(InputError, match="train_features must have shape"):
        novelty.nearest_training(train[:1], train, train_features=np.zeros((3, 256)))
    with pytest.raises(InputError, match=r"images must hold finite intensities in \[0, 1\]"):
        novelty.nearest_training(train[:1] + 2, train)


def test_relative_pixel_distance_is_one_minus_d1_over_d2(splits, train_features) -> None:
    train = splits["train"]
    images = np.concatenate([train[3:4], splits["test"][2:3]])
    found = novelty.nearest_training(images, train, candidates=2, train_features=train_features)
    x = torch.from_numpy(images[1]).flatten()
    corr = np.sort([np.corrcoef(x, torch.from_numpy(t).flatten())[0, 1] for t in train])[::-1]
    d1, d2 = 1 - corr[0], 1 - corr[1]
    assert found.similarity["pixel_relative"][0] == pytest.approx(1.0, abs=1e-5)  # a copy
    assert found.similarity["pixel_relative"][1] == pytest.approx(1 - d1 / d2, abs=1e-4)
    np.testing.assert_array_equal(found.index["pixel_relative"], found.index["pixel_corr"])
    one = novelty.nearest_training(images[1:], train[:1], candidates=1)  # no second slice
    assert one.similarity["pixel_relative"][0] == pytest.approx(
        one.similarity["pixel_corr"][0], abs=1e-5
    )


def test_averaged_and_blurred_slices_pass_pixel_corr_but_not_the_relative_distance(
    splits, train_features, reference
) -> None:
    """An average of training slices, or a blurred held-out slice, sits near many training
    slices at once: its pixel correlation passes the held-out slices' (so that measure is
    reported, not used to flag), its relative distance does not. A training slice with added
    noise still sits on one and is copy-like."""
    train, levels = splits["train"], np.arange(len(splits["train"])) % LEVELS
    means = np.stack([train[levels == z].mean(0) for z in range(LEVELS)])
    blurred = gaussian_filter(splits["val"], (0, 0, 1.5, 1.5))
    noise = np.random.default_rng(3).normal(0, 0.03, (3, 1, SIZE, SIZE))
    noisy = np.clip(train[[2, 12, 21]] + noise, 0, 1)
    limits = novelty.thresholds(reference, 0.99)

    def above(images: np.ndarray, measure: str) -> np.ndarray:
        found = novelty.nearest_training(
            images.astype(np.float32), train, candidates=4, train_features=train_features
        )
        return found.similarity[measure] > limits[measure]

    assert above(means, "pixel_corr").all()  # the alarm the plain correlation gave
    assert not above(means, "pixel_relative").any()
    assert not above(blurred, "pixel_relative").any()
    assert above(noisy, "pixel_relative").all()
    noisy_found = novelty.nearest_training(
        noisy.astype(np.float32), train, candidates=4, train_features=train_features
    )
    assert novelty.copy_like(noisy_found, limits).all()


# --- thresholds, the rule and the summary --------------------------------------------------


def test_thresholds_are_the_reference_quantile_and_any_measure_flags() -> None:
    rng = np.random.default_rng(1)
    ref = _nearest(**{m: rng.random(200) for m in MEASURES})
    limits = novelty.thresholds(ref, 0.9)
    assert limits == {m: pytest.approx(np.quantile(ref.similarity[m], 0.9)) for m in MEASURES}
    with pytest.raises(InputError, match="quantile"):
        novelty.thresholds(ref, 1.0)
    # each sample above exactly one measure's threshold, or none: every measure but
    # pixel_corr flags
    n = len(MEASURES) + 1
    above = {
        m: [limits[m] + 0.01 if i == k else 0.0 for i in range(n)] for k, m in enumerate(MEASURES)
    }
    flags = novelty.copy_like(_nearest(**above), limits)
    np.testing.assert_array_equal(flags, [m in RULE_MEASURES for m in MEASURES] + [False])
    assert "pixel_corr" not in RULE_MEASURES


def test_summary_reports_every_measure_and_both_fractions() -> None:
    ref = _nearest(**{m: np.linspace(0, 1, 101) for m in MEASURES})  # thresholds 0.9
    samples = _nearest(
        pixel_corr=[0.5, 0.5, 0.5, 0.95],  # reported, flags nothing
        pixel_relative=[0.95, 0.5, 0.5, 0.5],
        ssim=[0.95, 0.95, 0.5, 0.5],
        alex_cos=[0.5] * 4,
    )
    summary = novelty.novelty_summary(samples, ref, 0.9)
    assert summary["copy_like_fraction"] == 0.5
    assert summary["pixel_corr"]["copy_like_fraction"] == 0.25
    assert summary["pixel_relative"]["copy_like_fraction"] == 0.25
    assert summary["ssim"]["copy_like_fraction"] == 0.5
    assert summary["alex_cos"] == {
        "median": 0.5,
        "p95": 0.5,
        "reference_median": pytest.approx(0.5),
        "reference_p95": pytest.approx(0.95),
        "threshold": pytest.approx(0.9),
        "copy_like_fraction": 0.0,
    }
    assert (summary["n_samples"], summary["n_reference"], summary["quantile"]) == (4, 101, 0.9)
    # the reference against its own thresholds: 10 of 101 above 0.9 on every measure
    assert summary["reference_copy_like_fraction"] == pytest.approx(10 / 101)


def test_closest_pairs_figure_shows_the_closest_samples(splits, train_features) -> None:
    train = splits["train"]
    images = np.concatenate([splits["test"][:3], train[7:8]])
    found = novelty.nearest_training(images, train, candidates=2, train_features=train_features)
    two = novelty.closest_pairs_figure(images, train, found, k=2)
    four = novelty.closest_pairs_figure(images, train, found, k=8)  # only 4 samples
    assert two.dtype == np.uint8 and two.ndim == 3 and two.shape[2] == 3
    assert four.shape[1] > two.shape[1] and four.shape[0] == two.shape[0]
    with pytest.raises(InputError, match="k must be"):
        novelty.closest_pairs_figure(images, train, found, k=0)


# --- generate --novelty ---------------------------------------------------------------------


def test_reference_is_val_or_test_when_val_is_empty(prepared) -> None:
    assert reference_split(prepared) == prepared / "val"
    np.save(prepared / "val" / "slices.npy", np.zeros((0, 1, SIZE, SIZE), np.float16))
    assert reference_split(prepared) == prepared / "test"


def _planting(monkeypatch, copies: np.ndarray, *, every_call: bool) -> list[tuple[int, int]]:
    """Plant training slices in generate's samples.

    The first draw gets ``copies`` at rows 1, 2, ...; with ``every_call``, every re-draw of
    n slices is ``copies[:n]``.

    Returns:
        The (n, seed) of every sampler call, filled in as generate runs.
    """
    real = generate_module.sample_slices
    calls: list[tuple[int, int]] = []

    def planted(gm, z, seed, **settings):
        out = real(gm, z, seed, **settings)
        n = len(z)
        if not calls:
            out.images[1 : 1 + len(copies)] = torch.from_numpy(copies)
        elif every_call:
            out.images[:] = torch.from_numpy(copies[:n])
        calls.append((n, seed))
        return out

    monkeypatch.setattr(generate_module, "sample_slices", planted)
    return calls


def test_generate_replaces_a_planted_copy_and_records_similarity(
    tiny_generators, prepared, splits, reference, tmp_path, monkeypatch
) -> None:
    model = tiny_generators["ldm"]
    plain = generate(model, "1", 3, 0, tmp_path / "plain", progress=False, device="cpu")
    calls = _planting(monkeypatch, splits["train"][[9]], every_call=False)
    settings = NoveltySettings(prepared, NoveltyConfig(candidates=4, max_attempts=3))
    result = generate(
        model, "1", 3, 0, tmp_path / "novel", progress=False, device="cpu", novelty=settings
    )
    first = level_seed(0, 1 / 3)
    assert calls == [(3, first), (1, attempt_seed(first, 1))]  # only the copy is re-drawn

    rows = read_manifest(result.manifest)
    assert [r["novelty_attempts"] for r in rows] == ["0", "1", "0"]
    limits = novelty.thresholds(reference, 0.99)
    for row in rows:  # every kept slice is below every threshold that flags
        assert all(float(row[NOVELTY_COLUMNS[m]]) < limits[m] for m in RULE_MEASURES), row
    kept = [read_slice(path) for path in result.files]
    before = [read_slice(path) for path in plain.files]
    np.testing.assert_array_equal(kept[0], before[0])  # slices that were not copies stay
    np.testing.assert_array_equal(kept[2], before[2])
    assert np.abs(kept[1] - splits["train"][9, 0]).max() > 0.2  # the copy is gone
    columns = [*NOVELTY_COLUMNS.values(), "novelty_attempts"]
    assert {row[c] for row in read_manifest(plain.manifest) for c in columns} == {""}


def test_generate_gives_up_with_one_line_and_writes_nothing(
    tiny_generators, prepared, splits, tmp_path, monkeypatch
) -> None:
    calls = _planting(monkeypatch, splits["train"][[10, 20]], every_call=True)
    settings = NoveltySettings(prepared, NoveltyConfig(candidates=4, max_attempts=2))
    out = tmp_path / "out"
    with pytest.raises(
        InputError, match="level z000: 2 of 3 slices still copy-like after 2 re-samples"
    ) as err:
        generate(tiny_generators["ldm"], "0:1", 3, 0, out, progress=False, device="cpu",
                 novelty=settings)  # fmt: skip
    assert "\n" not in str(err.value) and "pixel_relative 1.0000 >" in str(err.value)
    assert len(calls) == 3  # the first draw and two re-samples of level 0; level 1 never ran
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_cli_novelty_errors_are_one_line(tiny_generators, tmp_path) -> None:
    result = CliRunner().invoke(
        app,
        ["generate", "--checkpoint", str(tiny_generators["ldm"]), "--z", "0", "--out",
         str(tmp_path / "syn"), "--device", "cpu", "--novelty", "--prepared-dir",
         str(tmp_path / "nowhere")],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nowhere/train/slices.npy not found" in lines[0], result.stderr
