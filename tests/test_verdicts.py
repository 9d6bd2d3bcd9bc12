"""Verdicts: each bar judged against its real reference, on hand-made metrics."""

from __future__ import annotations

import pytest

from pipeline.evaluation.verdicts import BARS, Bar, judge, lookup, model_verdicts, threshold

METRICS = {
    "real": {
        "zprobe_mae": 0.7,
        "split_halves": {"fd_alex": 10.0, "precision": 0.9, "recall": 0.95},
        "other_subjects": {"fd_alex": 6.0, "precision": 0.83, "recall": 0.81},
        "c2st": {"raw": {"auc": 0.52}, "blur": {"auc": 0.49}},
        "novelty": {"copy_like_fraction": 0.02},
        "noise_sigma": 0.02,
    },
    "ldm": {
        "fd_alex": 15.0,  # 1.5 x 10: exactly at the bar
        "precision": 0.79,
        "recall": 0.8,
        "zprobe_mae": 1.2,
        "c2st": {"raw": {"auc": 0.99}, "blur": {"auc": 0.6}},
        "novelty": {"copy_like_fraction": 0.0},
        "noise_sigma": 0.03,  # 1.5 x the real noise: a texture judge fooled by noise
    },
    "ae_vaegan": {
        "c2st": {"raw": {"auc": 0.97}, "blur": {"auc": 0.55}},
        "other_subjects": {"fd_alex": 6.5, "precision": 0.84, "recall": 0.78},
    },
}


def test_every_ldm_bar_is_judged_against_its_reference() -> None:
    rows = {row.label: row for row in model_verdicts(METRICS, "ldm")}
    assert [r.label for r in model_verdicts(METRICS, "ldm")] == [b.label for b in BARS["ldm"]]
    anatomy = rows["realism, anatomy (C2ST AUC, blurred)"]
    assert (anatomy.value, anatomy.reference, anatomy.ceiling, anatomy.passed) == (
        0.6,
        0.49,
        0.55,
        True,
    )
    assert rows["realism, texture (C2ST AUC, raw)"].passed is False
    noise = rows["texture, noise level (σ in the brain)"]
    assert (noise.reference, noise.passed) == (0.02, False)  # 0.03 > 1.25 x 0.02
    assert rows["fd_alex"].passed is True and rows["fd_alex"].reference == 10.0
    # the same figure against real slices of other subjects at the generator's set size
    same_size = rows["fd_alex, same set size (real: other subjects)"]
    assert (same_size.reference, same_size.passed) == (6.0, False)  # 15 > 1.5 x 6
    assert rows["precision"].reference == 0.83
    assert rows["precision"].passed is False  # 0.79 < 0.8
    assert rows["recall"].passed is True  # 0.8 >= 0.8
    assert rows["z fidelity (z-probe MAE, slices)"].passed is False  # 1.2 > 1.5 x 0.7
    assert rows["novelty (copy-like fraction)"].passed is True


def test_a_missing_figure_or_reference_is_not_measured_never_pass() -> None:
    rows = model_verdicts({"pixelcnn": {"fd_alex": 1.0}}, "pixelcnn")
    assert {r.label: r.passed for r in rows}["fd_alex"] is None  # ratio without a reference
    assert all(r.passed is None for r in rows)
    assert model_verdicts({}, "ldm") == []


@pytest.mark.parametrize(
    ("rule", "value", "reference", "expected"),
    [
        ("max_abs", 0.65, None, True),
        ("max_abs", 0.651, None, False),
        ("min_abs", 0.8, None, True),
        ("min_abs", 0.79, None, False),
        ("max_ratio", 3.0, 2.0, True),
        ("max_ratio", 3.01, 2.0, False),
        ("max_ratio", 1.0, None, None),
    ],
)
def test_judge_rules(
    rule: str, value: float, reference: float | None, expected: bool | None
) -> None:
    bound = 1.5 if rule == "max_ratio" else (0.65 if rule == "max_abs" else 0.8)
    assert judge(Bar("x", "x", rule, bound), value, reference) is expected  # type: ignore[arg-type]


def test_lookup_reads_numbers_only() -> None:
    assert lookup(METRICS, "real.split_halves.fd_alex") == 10.0
    assert lookup(METRICS, "real.split_halves") is None
    assert lookup(METRICS, "real.nothing.here") is None
    assert lookup({"flag": True}, "flag") is None
    assert lookup(METRICS, None) is None


def test_a_label_bar_whose_probe_reads_nothing_on_real_slices_is_not_judged() -> None:
    def labels(real_age: float, real_cdr: float) -> dict:
        return {
            "ldm": {
                "labels": {
                    "real": {"age_mae": real_age, "cdr_auc": real_cdr},
                    "matched": {"age_mae": 13.0, "cdr_auc": 0.9},
                    "chance": {"age_mae": 14.0, "cdr_auc": 0.5},
                }
            }
        }

    age, cdr = "age from the image (probe MAE, years)", "CDR > 0 from the image (probe AUC)"
    at_chance = {r.label: r for r in model_verdicts(labels(13.8, 0.56), "ldm")}
    assert at_chance[age].passed is None and "chance" in at_chance[age].note
    assert at_chance[cdr].passed is None and "0.56 vs chance 0.5" in at_chance[cdr].note
    reading = {r.label: r for r in model_verdicts(labels(9.0, 0.8), "ldm")}
    assert reading[age].passed is True and reading[age].note is None  # 13 <= 1.5 x 9
    assert reading[cdr].passed is True  # 0.9 >= 0.9 x 0.8


def test_a_covariate_is_obeyed_only_when_the_shuffled_control_is_clearly_worse() -> None:
    labels = {
        "real": {"age_mae": 9.0, "cdr_auc": 0.8},
        "chance": {"age_mae": 14.0, "cdr_auc": 0.5},
        "matched": {"age_mae": 12.0, "cdr_auc": 0.75},
        "shuffled": {"age_mae": 12.5, "cdr_auc": 0.6},
    }
    rows = {r.label: r for r in model_verdicts({"ldm": {"labels": labels}}, "ldm")}
    age = rows["age obeyed (matched vs shuffled control, MAE)"]
    assert (age.reference, age.passed, age.bar) == (12.5, False, "≤ 0.9 × shuffled")  # 12 > 11.25
    assert rows["CDR obeyed (matched vs shuffled control, AUC)"].passed is True  # 0.75 >= 0.66
    labels["real"]["cdr_auc"] = 0.55  # the probe reads nothing: not judged, whatever matched is
    rows = {r.label: r for r in model_verdicts({"ldm": {"labels": labels}}, "ldm")}
    assert rows["CDR obeyed (matched vs shuffled control, AUC)"].passed is None


def test_same_size_bars_carry_the_reconstructions_as_ceiling_and_say_when_it_is_short() -> None:
    rows = {row.label: row for row in model_verdicts(METRICS, "ldm")}
    same_size = rows["fd_alex, same set size (real: other subjects)"]
    assert (same_size.ceiling, same_size.ceiling_passed) == (6.5, True)  # 6.5 <= 1.5 x 6
    assert (rows["precision"].ceiling, rows["precision"].ceiling_passed) == (0.84, True)
    assert (rows["recall"].ceiling, rows["recall"].ceiling_passed) == (0.78, False)  # < 0.8
    assert rows["realism, texture (C2ST AUC, raw)"].ceiling_passed is False  # 0.97 > 0.8
    assert rows["z fidelity (z-probe MAE, slices)"].ceiling_passed is None  # no ceiling


def test_threshold_is_where_judge_flips() -> None:
    metrics = {"real": {"zprobe_mae": 0.8}}
    (zbar,) = [b for b in BARS["ldm"] if b.figure == "zprobe_mae"]
    line = threshold(zbar, metrics, "ldm")
    assert line == pytest.approx(1.2)
    assert judge(zbar, line - 1e-9, 0.8) is True and judge(zbar, line + 1e-9, 0.8) is False
    assert threshold(zbar, {}, "ldm") is None  # no reference: no line
    (blur,) = [b for b in BARS["ldm"] if b.figure == "c2st.blur.auc"]
    assert threshold(blur, {}, "ldm") == 0.65
