"""benchmarks.run: the table's arithmetic and a smoke run on tiny synthetic data."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from benchmarks import ldm_ablation
from benchmarks.latent_spectrum import pooled, spectrum
from benchmarks.ldm_ablation import ARMS, FIGURE_LEVELS, LABEL_MARGIN, arm_params, figure, train_arm
from benchmarks.ldm_ablation import main as ablation_main
from benchmarks.measure import PeakMemory, Row, interleaved
from benchmarks.monai_models import closest_width
from benchmarks.real_start import RealStarts, start_timestep
from benchmarks.rows import autocast
from benchmarks.run import fmt, main, markdown
from benchmarks.sampling_steps import read_recommendation
from benchmarks.sampling_sweep import markdown as sweep_markdown
from benchmarks.sampling_sweep import parse_settings, setting_name
from benchmarks.scoring import bar_lines, curve_figure
from benchmarks.workstation_smoke import main as smoke_main
from benchmarks.workstation_smoke import shorten, smoke_params
from pipeline.core.config import TrainConfig, load_params, params_from_dict
from pipeline.core.errors import InputError
from pipeline.evaluation.seeds import seed_row, summarise
from pipeline.inference.diffusion import scheduler_config
from pipeline.models.unet import ZConditionedUNet
from pipeline.training import loop


def test_ratio_is_in_our_favour_above_one() -> None:
    assert Row("a", "slices/s", 30.0, 10.0).ratio == pytest.approx(3.0)
    assert Row("a", "LPIPS", 0.1, 0.2, better="lower").ratio == pytest.approx(2.0)
    assert math.isnan(Row("a", "x", 1.0, 0.0).ratio)
    assert Row("a", "x", 2.0, 1.0).as_dict()["ratio"] == pytest.approx(2.0)
    assert (fmt(math.nan), fmt(0.12345), fmt(12345.0)) == ("-", "0.123", "12,345")


def test_markdown_lists_every_row_with_its_note() -> None:
    meta = {
        "date": "d",
        "machine": "m",
        "device": "cpu",
        "torch_threads": 1,
        "load_average": "0.0",
        "data": "x",
        "profile": "tiny",
        "mode": "quick",
        "budget_s": 1.0,
    }
    text = markdown([Row("LDM", "slices/s", 2.0, 1.0, note="why")], meta)
    assert "| 1 | LDM | slices/s | 2 | 1 | 2 |" in text and "1. why" in text


def test_closest_width_matches_parameter_count() -> None:
    width, net = closest_width(lambda w: nn.Linear(w, w), target=1100, widths=range(8, 200, 8))
    assert width == 32 and isinstance(net, nn.Linear)


def test_peak_memory_and_interleaved_budget() -> None:
    with PeakMemory(torch.device("cpu")).measure() as idle:
        pass
    with PeakMemory(torch.device("cpu")).measure() as mem:
        block = torch.ones(4 * 2**20)  # 16 MiB, every page written
        block += 1
    assert mem.method == idle.method and mem.method in ("rss", "ru_maxrss")
    if mem.method == "rss":  # the peak is reset at the start: the block shows in full
        assert 15.5 < mem.mib < 24 and idle.mib < 8
    else:  # a high-water mark misses peaks below an earlier one: only bounded above
        assert 0 <= mem.mib < 24
    calls: list[tuple[str, int]] = []

    def step(name: str) -> Callable[[int], int]:
        return lambda i: calls.append((name, i)) or 2

    out = interleaved({"a": step("a"), "b": step("b")}, seconds=0.0, device=torch.device("cpu"))
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3)]
    assert out["a"].iterations == 3 and out["a"].slices == 6 and out["a"].slices_per_s > 0


def _tiny_prepared(root: Path) -> Path:
    """32x32 synthetic slices (8 levels) in the prepared layout."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    disc = ((yy - 16) ** 2 + (xx - 16) ** 2 < 100).astype(np.float32)
    for split, n in (("train", 16), ("test", 8)):
        folder = root / split
        folder.mkdir(parents=True)
        x = (disc * rng.uniform(0.3, 1.0, (n, 1, 32, 32))).astype(np.float16)
        np.save(folder / "slices.npy", x)
        np.save(folder / "masks.npy", (x > 0).astype(np.uint8))
        z_index = np.arange(n) % 8
        pd.DataFrame({"z_index": z_index, "z": z_index / 7}).to_csv(
            folder / "manifest.csv", index=False
        )
    return root


def _steps_report(path: Path, fastest: dict[str, Any] | None) -> Path:
    """A ``sampling_steps.json`` whose study recommends ``fastest``."""
    path.write_text(json.dumps({"summary": {"recommended": {"pndm": 3, "fastest": fastest}}}))
    return path


def test_matched_setting_is_read_from_the_sampling_steps_study(tmp_path: Path) -> None:
    found = _steps_report(tmp_path / "a.json", {"sampler": "pndm", "steps": 20})
    assert read_recommendation(found) == ("pndm", 20)
    assert read_recommendation(_steps_report(tmp_path / "b.json", None)) is None
    unknown = _steps_report(tmp_path / "c.json", {"sampler": "euler", "steps": 20})
    assert read_recommendation(unknown) is None
    assert read_recommendation(tmp_path / "missing.json") is None
    (tmp_path / "d.json").write_text('{"rows": []}')
    with pytest.raises(InputError, match="not a report of"):
        read_recommendation(tmp_path / "d.json")
    truncated = _steps_report(tmp_path / "e.json", {"sampler": "pndm"})
    with pytest.raises(InputError, match="not a report of"):
        read_recommendation(truncated)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~210 s on a loaded 2-core machine
def test_smoke_run_writes_the_table(tmp_path: Path) -> None:
    data = _tiny_prepared(tmp_path / "prepared")
    out = tmp_path / "out"
    study = _steps_report(tmp_path / "sampling_steps.json", {"sampler": "pndm", "steps": 3})
    args = ["--profile", "tiny", "--data", str(data), "--budget", "0.5", "--samples", "2"]
    args += ["--matched", str(study), "--out", str(out), "--device", "cpu"]
    report = main([*args, "--rows", "first_stage,ldm,prior"])
    names = [(r["benchmark"], r["metric"]) for r in report["rows"]]
    assert ("VQ-VAE training", "slices/s") in names
    assert ("KL autoencoder reconstruction", "test LPIPS") in names
    assert ("LDM guided DDIM sampling", "slices/s") in names
    matched = next(r for r in report["rows"] if r["benchmark"] == "LDM sampling at matched quality")
    assert matched["extra"] == {
        "ours_sampler": "pndm",
        "ours_steps": 3,
        "reference_steps": 50,
        "quality_matched": True,
    }
    assert "ours pndm 3 steps" in matched["note"]
    assert ("prior sampling", "slices/s") in names
    for row in report["rows"]:
        assert row["ours"] > 0 and row["reference"] > 0 and math.isfinite(row["ratio"]), row
    assert json.loads((out / "benchmarks.json").read_text())["meta"]["profile"] == "tiny"
    assert "| prior sampling |" in (out / "benchmarks.md").read_text()


def test_bar_lines_place_each_columns_first_bar_and_skip_unknown_references() -> None:
    metrics = {"real": {"split_halves": {"fd_alex": 10.0}, "zprobe_mae": 0.8}}
    lines = bar_lines(metrics, "ldm")
    assert lines["fd_alex"] == pytest.approx(15.0)  # 1.5 x the real halves, not other subjects
    assert lines["z-probe MAE"] == pytest.approx(1.2)
    assert lines["judge blurred"] == 0.65 and lines["judge raw"] == 0.8
    assert lines["precision"] == lines["recall"] == 0.8 and lines["copy-like"] == 0.05
    # no real CDR figure: no line, and never the shuffled control's bar in its place
    with_shuffled = {**metrics, "ldm": {"labels": {"shuffled": {"cdr_auc": 0.6}}}}
    assert "CDR AUC" not in bar_lines(with_shuffled, "ldm")
    with_real = {"ldm": {"labels": {"real": {"cdr_auc": 0.8}}}}
    assert bar_lines(with_real, "ldm")["CDR AUC"] == pytest.approx(0.72)


def test_curve_figure_draws_one_panel_per_column() -> None:
    from benchmarks.ldm_scaling import PANELS

    def summary(value: float) -> dict[str, Any]:
        figure = {"mean": value, "min": value - 0.1, "max": value + 0.1}
        return {"figures": {column: figure for column, _ in PANELS if column != "CDR AUC"}}

    image = curve_figure(
        [5.0, 10.0], [summary(1.0), summary(0.5)], PANELS, xlabel="min", bars={"fd_alex": 0.8}
    )
    assert image.ndim == 3 and image.dtype == np.uint8
    assert len(PANELS) == 8 and image.shape[:2] == (2 * 320, 4 * 400)  # two rows of four
    three = curve_figure([1.0], [summary(1.0)], PANELS[:3], xlabel="min", bars={})
    assert three.shape[:2] == (320, 3 * 400)


def test_trained_arm_is_reused_only_with_the_same_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed ablation or scaling run resumes: an arm whose model, training report and
    settings hash are in the work folder is scored without training; another step count, or
    a model without its hash (killed before the end), trains again."""
    monkeypatch.chdir(tmp_path)
    latents = tmp_path / "data" / "latents" / "vaegan"
    latents.mkdir(parents=True)
    (latents / "meta.json").write_text(
        json.dumps({"autoencoder": "models/ae.pt", "autoencoder_sha256": "a", "scale_factor": 1})
    )
    trained: list[int] = []

    def fake_train(arm: Any, *, run: Any, device: Any, paths: Any, identity: Any) -> None:
        trained.append(arm.ldm.train.steps)
        paths.model.write_bytes(b"model")
        paths.report.write_text(json.dumps({"train_seconds": 60.0 * arm.ldm.train.steps}))

    monkeypatch.setattr(ldm_ablation, "train_ldm", fake_train)
    params = load_params(Path(__file__).parents[1] / "params.yaml")
    work, cpu = tmp_path / "work", torch.device("cpu")
    work.mkdir()
    model, seconds = train_arm(arm_params(params, {}, 3), "a", work, cpu)
    assert trained == [3] and seconds == 180.0 and model == work / "ldm_a.pt"
    assert train_arm(arm_params(params, {}, 3), "a", work, cpu) == (model, 180.0)
    assert trained == [3]  # reused
    train_arm(arm_params(params, {}, 4), "a", work, cpu)
    assert trained == [3, 4]  # other settings: trained again
    (work / "ldm_a.hash").unlink()
    train_arm(arm_params(params, {}, 4), "a", work, cpu)
    assert trained == [3, 4, 4]  # no hash: the last run did not finish


def test_ablation_refuses_unknown_arms_and_sampling_arms_without_a_baseline(
    tmp_path: Path,
) -> None:
    with pytest.raises(InputError, match="unknown arms"):
        ablation_main(["--arms", "baseline,nonsense"])
    with pytest.raises(InputError, match="baseline"):
        ablation_main(["--arms", "ddim_50", "--work", str(tmp_path)])


def test_scaling_refuses_budgets_that_are_not_whole_positive_numbers() -> None:
    from benchmarks.ldm_scaling import main as scaling_main

    for steps in ("1200,abc", "0,100", ","):
        with pytest.raises(InputError, match="--steps"):
            scaling_main(["--steps", steps])


@pytest.mark.parametrize("name", [a for a in ARMS if a != "baseline"])
def test_ablation_arm_changes_only_its_settings_and_builds(name: str) -> None:
    params = load_params(Path(__file__).parents[1] / "params.yaml")
    arm = arm_params(params, ARMS[name], steps=7)
    before, after = params.ldm.model_dump(), arm.ldm.model_dump()
    changed = {k for k, v in after.items() if v != before[k] and k != "train"}
    assert changed <= set(ARMS[name]) and arm.ldm.train.steps == 7
    assert all(after[k] == v for k, v in ARMS[name].items())
    unet = ZConditionedUNet(arm.ldm, arm.conditioning, 4)
    out = unet(torch.randn(2, 4, 16, 16), torch.tensor([1, 500]), torch.tensor([0.2, 0.8]))
    assert out.shape == (2, 4, 16, 16)


def test_ablation_figure_keeps_full_resolution_and_adds_a_label_margin() -> None:
    n_slices, size, per_row = 11, 16, 2 * len(FIGURE_LEVELS)
    z_index = torch.arange(n_slices).repeat_interleave(2)
    real = SimpleNamespace(image=torch.rand(len(z_index), 1, size, size), z_index=z_index)
    rows = {
        "baseline": torch.zeros(per_row, 1, size, size),
        "mirror": torch.ones(per_row, 1, size, size),
    }
    image = figure(rows, real, n_slices)
    tiles_h, tiles_w = 3 * (size + 2) + 2, per_row * (size + 2) + 2
    assert image.dtype == np.uint8 and image.shape == (tiles_h, tiles_w + LABEL_MARGIN, 3)
    # the last row (the all-ones arm) is white at full resolution, the one above it black
    assert image[-size // 2 - 2, -size // 2 - 2].min() == 255
    assert image[-size - 2 - size // 2 - 2, -size // 2 - 2].max() == 0


@pytest.mark.parametrize(
    ("cpu_bf16", "native", "train", "expected"),
    [
        (True, True, True, torch.bfloat16),
        (True, False, True, None),
        (False, True, True, None),
        (True, True, False, None),
    ],
)
def test_measured_steps_run_under_the_training_loops_autocast(
    monkeypatch: pytest.MonkeyPatch,
    cpu_bf16: bool,
    native: bool,
    train: bool,
    expected: torch.dtype | None,
) -> None:
    """A training row's steps run as ``fit`` runs them (bf16 on a native-bf16 CPU where
    ``train.cpu_bf16``); a sampling row (no train settings) stays fp32 on the CPU."""
    monkeypatch.setattr(loop, "native_cpu_bf16", lambda: native)
    cfg = TrainConfig(steps=1, batch_size=1, lr=1e-3, cpu_bf16=cpu_bf16)
    with autocast(torch.device("cpu"), cfg if train else None):
        enabled = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu")
    assert (dtype if enabled else None) == expected
    assert not torch.is_autocast_enabled("cpu")


def test_sweep_settings_parse_and_refuse_malformed_pairs() -> None:
    parsed = parse_settings("guidance=3,temperature=0.9; guidance=1.5 ;; top_k=4,sampler=ddim")
    assert parsed == [
        {"guidance": 3.0, "temperature": 0.9},
        {"guidance": 1.5},
        {},
        {"top_k": 4, "sampler": "ddim"},
    ]
    assert [setting_name(s) for s in parsed] == [
        "guidance=3, temperature=0.9",
        "guidance=1.5",
        "defaults",
        "top_k=4, sampler=ddim",
    ]
    assert parse_settings("") == [{}]
    assert parse_settings("guidance=2; guidance=2") == [{"guidance": 2.0}]
    with pytest.raises(InputError, match="key=value"):
        parse_settings("guidance")
    with pytest.raises(InputError, match="twice"):
        parse_settings("guidance=1,guidance=2")


def test_sweep_judges_each_seed_against_the_report_bars_and_counts_them() -> None:
    metrics = {
        "real": {"split_halves": {"fd_alex": 10.0}, "other_subjects": {"fd_alex": 6.0}},
        "ae_vqvae": {"c2st": {"blur": {"auc": 0.6}}},
    }
    same_size = "fd_alex, same set size (real: other subjects)"
    good = seed_row({"fd_alex": 11.0, "c2st": {"blur": {"auc": 0.7}}}, metrics, "pixelcnn")
    poor = seed_row({"fd_alex": 13.0, "c2st": {"blur": {"auc": 0.9}}}, metrics, "pixelcnn")
    assert good["short"] == [] and same_size in good["passed"]  # 11 <= 2 x 6
    assert set(poor["short"]) == {same_size, "realism, anatomy (C2ST AUC, blurred)"}
    assert good["figures"]["fd_alex"] == 11.0 and good["figures"]["CDR AUC"] is None
    summary = summarise([good, poor])
    assert summary["all_bars_met"] == 1 and summary["n_seeds"] == 2
    assert summary["figures"]["fd_alex"] == {"mean": 12.0, "min": 11.0, "max": 13.0}
    assert "CDR AUC" not in summary["figures"]  # never measured: no column figure
    assert {"bar": same_size, "seeds": 1} in summary["short"] and len(summary["short"]) == 2
    assert summary["judged"] == 3  # fd_alex twice and the blurred judge; the rest unmeasured
    text = sweep_markdown("pixelcnn", {"guidance=1.5": {"summary": summary}}, [0, 1])
    assert "| guidance=1.5 | 1 of 2 | 12.00 (11.00–13.00) |" in text
    assert f"{same_size} (1)" in text


def test_workstation_smoke_params_keep_the_profile_and_cut_every_training_block() -> None:
    raw = yaml.safe_load(Path("params.yaml").read_text())
    params = params_from_dict(smoke_params(raw, "workstation", 200, "cuda"), source="smoke")
    full = load_params(profile="workstation")
    assert params.device == "cuda" and params.prepare.image_size == full.prepare.image_size == 128
    assert (
        params.autoencoder.channels == full.autoencoder.channels
    )  # the networks are the profile's
    blocks = [params.autoencoder.train, params.prior.train, params.ldm.train, params.zprobe.train]
    for block in blocks:
        assert block.steps == 200 and 50 <= block.eval_every <= 200, block
        assert 50 <= block.ckpt_every <= 200 and 1 <= block.warmup_steps < 200
    assert params.autoencoder.discriminator.start_step == 100
    assert params.evaluate.c2st.steps == 200
    # a block already shorter than the cut is left alone
    assert shorten({"steps": 80, "eval_every": 20}, 200) == {"steps": 80, "eval_every": 20}
    with pytest.raises(SystemExit, match="no profile 'gpu'"):
        smoke_params(raw, "gpu", 200, "cuda")


def test_workstation_smoke_runs_stages_in_a_scratch_folder_and_keeps_each_stage_row(
    tmp_path: Path,
) -> None:
    """Two real stages on the tiny profile: one row per stage, written after each, and the
    project's own data, models and reports untouched."""
    out = tmp_path / "out"
    rc = smoke_main(
        [
            "--profile=tiny",
            "--device=cpu",
            "--steps=2",
            "--stages=make_demo,prepare",
            f"--workdir={tmp_path / 'work'}",
            f"--out={out}",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "workstation_smoke.json").read_text())
    assert [row["stage"] for row in summary["stages"]] == ["make_demo", "prepare"]
    assert all(row["rc"] == 0 and row["seconds"] > 0 for row in summary["stages"])
    assert (tmp_path / "work" / "data" / "prepared" / "test" / "slices.npy").is_file()
    assert "| prepare | 0 |" in (out / "workstation_smoke.md").read_text()
    assert "===== prepare =====" in (out / "workstation_smoke.log").read_text()
    with pytest.raises(SystemExit, match="unknown stages"):
        smoke_main(["--stages=prepare,train_everything"])


def _starts(with_stds: bool) -> RealStarts:
    """Four training latents per level of 4, each filled with its level (and its row / 100)."""
    levels = np.repeat(np.arange(4), 4)
    latents = (levels + np.arange(16) / 100)[:, None, None, None] * np.ones((16, 2, 3, 3))
    stds = np.full((16, 2, 3, 3), 0.5, np.float32) if with_stds else None
    return RealStarts(latents.astype(np.float32), stds, levels, n_slices=4)


def test_real_starts_draw_a_training_latent_at_the_nearest_level_seeded() -> None:
    starts = _starts(with_stds=False)
    z = torch.tensor([0.0, 1 / 3, 0.7, 1.0])  # 0.7 x 3 = 2.1: level 2
    drawn = starts.draw(z, torch.Generator().manual_seed(0))
    assert drawn.shape == (4, 2, 3, 3)
    assert drawn[:, 0, 0, 0].floor().tolist() == [0, 1, 2, 3]
    assert ((drawn - drawn[:, :1, :1, :1]) == 0).all()  # a stored latent, not a blend
    again = starts.draw(z, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)
    rows = {
        tuple(starts.draw(z, torch.Generator().manual_seed(s))[:, 0, 0, 0].tolist())
        for s in range(8)
    }
    assert len(rows) > 1  # the seed picks among each level's slices
    many = z.repeat(50)
    noisy = _starts(with_stds=True).draw(many, torch.Generator().manual_seed(0))
    clean = starts.draw(many, torch.Generator().manual_seed(0))  # the same slices
    assert abs(float((noisy - clean).std()) - 0.5) < 0.05  # a posterior sample, std 0.5
    with pytest.raises(InputError, match="level 3"):
        RealStarts(starts.latents[:12], None, starts.levels[:12], 4).draw(z, None)


def test_real_start_sampler_keeps_the_real_latent_at_low_t_and_not_at_full_strength() -> None:
    params = load_params()
    schedule = scheduler_config(params.ldm)
    zero = lambda x, t, z, drop: torch.zeros_like(x)  # noqa: E731  # v = 0: x0 = sqrt(ᾱ) x
    starts = _starts(with_stds=False)
    z = torch.tensor([0.0, 1.0])
    real = starts.draw(z, torch.Generator().manual_seed(0))
    kwargs = {"sampler": "pndm", "steps": 10, "guidance": 1.0, "guidance_min_t": 0}
    early = starts.sampler(0.002)(
        zero, schedule, z, (2, 3, 3), generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert start_timestep(0.002, 1000) == 2 and start_timestep(1.0, 1000) == 999
    assert torch.allclose(early, real, atol=0.3)  # t = 2: the real latent, barely noised
    full = starts.sampler(1.0)(
        zero, schedule, z, (2, 3, 3), generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert not torch.allclose(full, real, atol=0.5)  # t = 999: the start is gone


def test_latent_spectrum_tells_white_noise_from_an_image() -> None:
    gen = np.random.default_rng(0)
    white = gen.standard_normal((64, 4, 16, 16))
    noise = spectrum(white)
    assert noise.high_frequency_share == pytest.approx(1 - math.pi / 16, abs=0.02)
    assert abs(noise.neighbour_correlation) < 0.03
    # the same noise smoothed over a few pixels, as an image's power falls with frequency
    kernel = np.ones(4) / 4
    smooth = np.apply_along_axis(np.convolve, -1, white, kernel, mode="same")
    smooth = np.apply_along_axis(np.convolve, -2, smooth, kernel, mode="same")
    image = spectrum(smooth)
    assert image.high_frequency_share < 0.2
    assert image.neighbour_correlation > 0.6
    # what every slice shares is removed: a constant template adds nothing
    template = spectrum(white + 5 * np.sin(np.arange(16))[None, None, :, None])
    assert template.high_frequency_share == pytest.approx(noise.high_frequency_share)
    assert template.neighbour_correlation == pytest.approx(noise.neighbour_correlation)


def test_latent_spectrum_pools_slices_and_refuses_bad_input() -> None:
    slices = np.arange(2 * 8 * 8, dtype=float).reshape(2, 8, 8)
    small = pooled(slices, (2, 2))
    assert small.shape == (2, 1, 2, 2)
    assert small[0, 0, 0, 0] == pytest.approx(slices[0, :4, :4].mean())
    with pytest.raises(InputError, match="pool"):
        pooled(slices, (3, 3))
    with pytest.raises(InputError, match="N >= 2"):
        spectrum(np.zeros((1, 1, 4, 4)))
    with pytest.raises(InputError, match="vary"):
        spectrum(np.ones((3, 1, 4, 4)))
