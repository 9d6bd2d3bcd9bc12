"""A generator over several sampling seeds: the mean section and the report's line."""

from __future__ import annotations

import math

from pipeline.evaluation.report import seeds_note, verdict_table
from pipeline.evaluation.seeds import mean_section
from pipeline.evaluation.verdicts import model_verdicts


def test_mean_section_averages_floats_and_keeps_the_rest_of_the_first_seed() -> None:
    a = {
        "fd_alex": 10.0,
        "n_samples": 384,
        "seed": 0,
        "latent_source": "vaegan",
        "c2st": {"blur": {"auc": 0.7, "curve": [[300, 0.6]]}},
        "novelty": {"copy_like_fraction": 0.02, "flag": True},
        "only_first": 1.5,
        "nan": math.nan,
    }
    b = {
        "fd_alex": 13.0,
        "n_samples": 384,
        "seed": 1,
        "latent_source": "vaegan",
        "c2st": {"blur": {"auc": 0.8, "curve": [[300, 0.9]]}},
        "novelty": {"copy_like_fraction": 0.05, "flag": False},
        "nan": 0.5,
    }
    mean = mean_section([a, b])
    assert mean["fd_alex"] == 11.5 and mean["c2st"]["blur"]["auc"] == 0.75
    assert mean["novelty"]["copy_like_fraction"] == 0.035
    assert mean["seed"] == 0 and mean["n_samples"] == 384  # integers are the first seed's
    assert mean["c2st"]["blur"]["curve"] == [[300, 0.6]] and mean["novelty"]["flag"] is True
    assert mean["only_first"] == 1.5  # missing from a seed: the first's value
    assert math.isnan(mean["nan"])
    assert mean_section([b]) == b


def test_the_verdict_table_says_how_many_seeds_met_every_bar() -> None:
    seeds = {
        "seeds": [0, 1, 2],
        "n_seeds": 3,
        "all_bars_met": 1,
        "short": [{"bar": "fd_alex", "seeds": 2}],
    }
    note = seeds_note(seeds)
    assert "mean over 3 sampling seeds (0, 1, 2)" in note
    assert "Every bar met on 1 of 3 seeds." in note and "with how many: fd_alex (2)." in note
    assert seeds_note({**seeds, "n_seeds": 1}) == "" and seeds_note(None) == ""
    metrics = {
        "real": {"split_halves": {"fd_alex": 10.0}, "zprobe_mae": 1.0},
        "pixelcnn": {"fd_alex": 11.0, "zprobe_mae": 1.2, "seeds": seeds},
    }
    table = verdict_table("pixelcnn", model_verdicts(metrics, "pixelcnn"), seeds)
    assert table.index("Every bar met on 1 of 3") < table.index("<table>")
