"""Paired bootstrap and Holm on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import InputError
from pipeline.metrics.paired import holm, paired_bootstrap


def test_identical_arms_give_exactly_zero() -> None:
    effect = paired_bootstrap(np.zeros((5, 6)))
    assert (effect.mean, effect.low, effect.high, effect.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_a_clear_shift_is_found_and_its_ci_covers_it() -> None:
    rng = np.random.default_rng(0)
    delta = 0.05 + rng.normal(0, 0.01, size=(5, 8))
    effect = paired_bootstrap(delta, seed=1)
    assert effect.low < 0.05 < effect.high and effect.low > 0.03
    assert effect.p_value < 0.01 and effect.mean == pytest.approx(delta.mean())


def test_noise_around_zero_is_not_significant() -> None:
    delta = np.random.default_rng(3).normal(0, 0.02, size=(5, 8))
    effect = paired_bootstrap(delta, seed=1)
    assert effect.low < 0 < effect.high and effect.p_value > 0.05


def test_the_ci_widens_with_fewer_subjects() -> None:
    rng = np.random.default_rng(4)
    delta = rng.normal(0.01, 0.03, size=(5, 40))
    wide = paired_bootstrap(delta[:, :4], seed=0)
    narrow = paired_bootstrap(delta, seed=0)
    assert wide.high - wide.low > narrow.high - narrow.low


def test_holm_known_answers() -> None:
    # m = 4: thresholds 0.0125, 0.0167, 0.025, 0.05
    assert holm({"a": 0.01, "b": 0.015, "c": 0.03, "d": 0.04}) == {
        "a": True, "b": True, "c": False, "d": False,
    }  # fmt: skip
    assert holm({"a": 0.02, "b": 0.001}) == {"a": True, "b": True}  # 0.001 <= .025, .02 <= .05
    assert holm({"a": 0.03, "b": 0.04}) == {"a": False, "b": False}  # 0.03 > 0.025 stops
    assert holm({}) == {}


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros((0, 3)), np.array([[np.nan]])])
def test_bad_tables_are_refused(bad) -> None:
    with pytest.raises(InputError):
        paired_bootstrap(bad)


def test_a_difference_no_draw_crosses_has_the_smallest_p_not_zero() -> None:
    delta = np.full((5, 6), 0.3) + np.random.default_rng(0).normal(0, 0.01, (5, 6))
    effect = paired_bootstrap(delta, n_boot=999, seed=0)
    assert effect.low > 0 and effect.p_value == pytest.approx(2 / 1000)
