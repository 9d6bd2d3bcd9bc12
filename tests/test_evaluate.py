"""The evaluate stage: metric sanity on real/identical/blurred sets and the metrics.json layout."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from support import TINY_AE, TINY_COND, TINY_LDM, RecordingRun, write_tiny_generators

from benchmarks.sampling_sweep import sweep
from pipeline.core.checkpoint import CheckpointError
from pipeline.core.config import (
    C2STConfig,
    EvaluateConfig,
    Params,
    ZProbeConfig,
    params_from_dict,
)
from pipeline.core.identity import file_sha256
from pipeline.data.datasets import EvalData, SliceDataset
from pipeline.evaluation import evaluate as evaluate_module
from pipeline.evaluation.evaluate import (
    BESIDE_SCALE,
    EvalContext,
    EvaluatePaths,
    beside_real_figure,
    beside_real_rows,
    ceiling_reconstructions,
    evaluate,
    judge_train_rows,
    numeric_metrics,
    other_subjects_rows,
    real_figures,
    set_figures,
    split_halves,
)
from pipeline.inference.sampling import GeneratorModel, load_generator
from pipeline.inference.texture import noise_sigma
from pipeline.metrics.c2st import blur
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.codec import LatentCodec
from pipeline.models.files import load_probe, save_model
from pipeline.models.zprobe import ZProbe

K, SIZE, VOLUMES = 8, 32, 5
PROBE = ZProbeConfig(channels=(8, 16))
EVAL = EvaluateConfig(
    kid_subsets=5,
    ms_ssim_pairs=20,
    c2st=C2STConfig(steps=4, curve_every=2, batch_size=8, train_samples=16),
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _slice(volume: int, level: int) -> tuple[np.ndarray, np.ndarray]:
    """A textured ellipse whose size follows the level, its texture the volume."""
    rng = np.random.default_rng(100 * volume + level)
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    radius = SIZE * (0.2 + 0.25 * np.sin(np.pi * (level + 0.5) / K))
    inside = (yy / radius) ** 2 + (xx / (0.8 * radius)) ** 2 < 1
    texture = 0.55 + 0.3 * np.sin(xx / (1.5 + volume % 3)) * np.cos(yy / 2.0)
    image = inside * np.clip(texture + rng.normal(0, 0.08, inside.shape), 0, 1)
    return image.astype(np.float16), inside.astype(np.uint8)


def _write_split(folder: Path) -> Path:
    folder.mkdir(parents=True)
    items = [(v, z) for v in range(VOLUMES) for z in range(K)]
    pairs = [_slice(v, z) for v, z in items]
    np.save(folder / "slices.npy", np.stack([p[0] for p in pairs])[:, None])
    np.save(folder / "masks.npy", np.stack([p[1] for p in pairs])[:, None])
    pd.DataFrame(
        {
            "subject": [f"S{v}" for v, _ in items],
            "z_index": [z for _, z in items],
            "z": [z / (K - 1) for _, z in items],
        }
    ).to_csv(folder / "manifest.csv", index=False)
    return folder


def _write_models(models: Path) -> None:
    """Untrained but loadable model files of every kind (numbers are meaningless)."""
    write_tiny_generators(models, n_slices=K)
    torch.manual_seed(0)
    save_model(models / "zprobe.pt", "zprobe", ZProbe(PROBE.channels), PROBE, {"n_slices": K})


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> EvalData:
    folder = _write_split(tmp_path_factory.mktemp("prepared") / "test")
    return EvalData.from_dataset(SliceDataset(folder))


def _score(real: EvalData, fake: torch.Tensor) -> dict[str, float]:
    torch.manual_seed(0)
    probe = ZProbe(PROBE.channels)
    figures, curves = set_figures(
        real, fake, real.z_index, probe=probe, n_slices=K, cfg=EVAL, device="cpu", seed=0
    )
    assert set(curves["intensity_distance"]) == set(range(K))
    return figures


def test_identical_set_scores_perfectly_and_blurred_set_worse(real: EvalData) -> None:
    same = _score(real, real.image.clone())
    assert same["fd_alex"] == pytest.approx(0.0, abs=1e-6)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["intensity_distance"] == pytest.approx(0.0, abs=1e-9)
    assert same["n_samples"] == len(real.image)
    assert same["noise_sigma"] == pytest.approx(noise_sigma(real.image))
    assert same["noise_sigma"] > 0

    blurred = _score(real, blur(real.image, 1.5))
    assert blurred["fd_alex"] > 1e-3
    assert blurred["kid"] > same["kid"]
    assert blurred["intensity_distance"] > 1e-3
    assert blurred["ms_ssim"] > same["ms_ssim"]  # blurring removes the texture that differs
    assert blurred["noise_sigma"] < 0.5 * same["noise_sigma"]  # and the noise with it


def test_blur_and_split_halves() -> None:
    x = torch.zeros(1, 1, 15, 15)
    x[..., 7, 7] = 1.0
    out = blur(x, 1.5)
    assert out.shape == x.shape and 0 < float(out.max()) < 1
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="sigma"):
        blur(x, 0.0)
    z = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    a, b = split_halves(z)
    assert sorted(torch.cat([a, b]).tolist()) == list(range(7))
    assert set(z[a].tolist()) == set(z[b].tolist()) == {0, 1, 2}


def test_other_subjects_rows_take_whole_volumes_at_random() -> None:
    manifest = pd.DataFrame(
        {
            "subject": [f"S{v}" for v in range(5) for _ in range(3)],
            "session": ["MR1"] * 15,
        }
    )
    rows = other_subjects_rows(manifest, 7, seed=0)
    assert len(rows) == 7
    volumes = [manifest.subject[int(r)] for r in rows]
    # two whole volumes, then the first rows of a third, each volume's rows together
    assert volumes[:3] == [volumes[0]] * 3 and volumes[3:6] == [volumes[3]] * 3
    assert len(set(volumes)) == 3 and volumes[6] not in volumes[:6]
    assert torch.equal(rows, other_subjects_rows(manifest, 7, seed=0))  # seeded
    orders = {tuple(other_subjects_rows(manifest, 15, seed=s).tolist()) for s in range(5)}
    assert len(orders) > 1  # the seed draws the volumes
    assert sorted(other_subjects_rows(manifest, 99, seed=0).tolist()) == list(range(15))


def test_real_figures_skip_split_halves_that_share_no_level(real: EvalData) -> None:
    one_volume = EvalData(*(t[:K] for t in (real.image, real.mask, real.z, real.z_index)))
    probe = ZProbe(PROBE.channels)
    kwargs = {"probe": probe, "n_slices": K, "cfg": EVAL, "device": "cpu", "seed": 0}
    figures, curves = real_figures(one_volume, **kwargs)
    assert figures["split_halves"] is None and figures["n_samples"] == K
    assert figures["noise_sigma"] == pytest.approx(noise_sigma(one_volume.image))
    assert set(curves["zprobe_mae"]) == set(range(K))
    figures, _ = real_figures(real, **kwargs)
    assert figures["split_halves"]["n_samples"] == len(real.z) // 2


def test_judge_rows_are_a_seeded_sorted_subset_of_the_training_split() -> None:
    rows = judge_train_rows(40, 12, seed=3)
    assert len(rows) == 12 and len(set(rows.tolist())) == 12
    assert torch.equal(rows, torch.sort(rows).values) and int(rows.max()) < 40
    assert torch.equal(rows, judge_train_rows(40, 12, seed=3))
    assert not torch.equal(rows, judge_train_rows(40, 12, seed=4))
    assert torch.equal(judge_train_rows(40, 10_000, seed=3), torch.arange(40))


@torch.no_grad()
def test_look_test_shows_real_ceiling_and_generated_slices_of_the_same_rows(
    real: EvalData,
) -> None:
    rows = beside_real_rows(real.z_index, K)
    levels = real.z_index[rows].tolist()
    # 0.3 .. 0.7 of K = 8 levels round to 2, 3, 4, 4, 5: each level once, two volumes each
    assert levels == [2, 2, 3, 3, 4, 4, 5, 5]
    volumes = rows // K  # the split is stored volume by volume
    assert all(volumes[i] != volumes[i + 1] for i in range(0, len(rows), 2))
    assert len(beside_real_rows(real.z_index, K, per_level=1)) == 4

    ceiling = torch.full_like(real.image, 0.25)
    generated = torch.full_like(real.image, 0.75)
    image = beside_real_figure(real.image, ceiling, generated, rows)
    tile = SIZE + 2  # each tile and its grey separator
    assert image.shape == ((3 * tile + 2) * BESIDE_SCALE, (len(rows) * tile + 2) * BESIDE_SCALE)
    plain = image[::BESIDE_SCALE, ::BESIDE_SCALE]  # each pixel a square block
    assert np.array_equal(np.kron(plain, np.ones((BESIDE_SCALE, BESIDE_SCALE))), image)
    for column, row in enumerate(rows.tolist()):
        x = 2 + column * tile
        real_tile = plain[2 : 2 + SIZE, x : x + SIZE]
        np.testing.assert_allclose(real_tile, real.image[row, 0].numpy(), atol=1e-6)
        assert (plain[2 + tile : 2 + tile + SIZE, x : x + SIZE] == 0.25).all()
        assert (plain[2 + 2 * tile : 2 + 2 * tile + SIZE, x : x + SIZE] == 0.75).all()


def test_ceiling_reconstructions_decode_as_the_generator_decodes() -> None:
    torch.manual_seed(0)
    ae = Autoencoder(TINY_AE, TINY_COND, "vaegan").eval()
    x, z = torch.rand(5, 1, 32, 32), torch.linspace(0, 1, 5)
    mean_codec = LatentCodec(ae, 0.5)
    assert torch.equal(
        ceiling_reconstructions(
            mean_codec, x, z, torch.device("cpu"), torch.Generator().manual_seed(1)
        ),
        mean_codec.decode_stage_2_outputs(mean_codec.encode_stage_2_inputs(x, z), z),
    )
    codec = LatentCodec(ae, 0.5, posterior_std=0.4)
    drawn = ceiling_reconstructions(
        codec, x, z, torch.device("cpu"), torch.Generator().manual_seed(1)
    )
    expected = codec.decode_stage_2_outputs(
        codec.encode_stage_2_inputs(x, z), z, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(drawn, expected)
    assert not torch.allclose(
        drawn, mean_codec.decode_stage_2_outputs(mean_codec.encode_stage_2_inputs(x, z), z)
    )
    # a generator trained on posterior samples: the stage-2 input is itself a posterior draw
    # (from the same generator, before the decode's own draw)
    on_samples = ceiling_reconstructions(
        codec, x, z, torch.device("cpu"), torch.Generator().manual_seed(1), posterior_samples=True
    )
    gen = torch.Generator().manual_seed(1)
    mean, std = codec.encode_stage_2_posterior(x, z)
    assert std is not None
    sampled = mean + std * torch.randn(std.shape, generator=gen)
    torch.testing.assert_close(on_samples, codec.decode_stage_2_outputs(sampled, z, generator=gen))
    assert not torch.allclose(on_samples, drawn)
    # a VQ-VAE has no posterior to draw from: the flag changes nothing
    vq_codec = LatentCodec(Autoencoder(TINY_AE, TINY_COND, "vqvae").eval())
    assert torch.equal(
        ceiling_reconstructions(
            vq_codec, x, z, torch.device("cpu"), torch.Generator(), posterior_samples=True
        ),
        vq_codec.decode_stage_2_outputs(vq_codec.encode_stage_2_inputs(x, z), z),
    )


def _stage_inputs(root: Path, **overrides: Any) -> tuple[Params, EvaluatePaths]:
    """Every split, untrained model files and the params of a CPU run under ``root``
    (``overrides``: of :data:`EVAL`)."""
    for split in ("test", "train", "val"):
        _write_split(root / "data" / "prepared" / split)
    _write_models(root / "models")
    params = params_from_dict(
        {
            "device": "cpu",
            "prepare": {"n_slices": K, "image_size": SIZE},
            "evaluate": EVAL.model_dump() | overrides,
        }
    )
    return params, EvaluatePaths.standard("data/prepared", root=root)


def test_stage_writes_metrics_json_layout_and_per_z_curves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[str] = []

    def counting_load(path: Path, device: torch.device) -> GeneratorModel:
        loads.append(Path(path).stem)
        return load_generator(path, device)

    monkeypatch.setattr(evaluate_module, "load_generator", counting_load)
    params, paths = _stage_inputs(tmp_path)
    run = RecordingRun("evaluate")
    metrics = evaluate(params, run=run, device=torch.device("cpu"), paths=paths)

    assert sorted(loads) == ["ldm", "pixelcnn"]  # each generator file is read once
    saved = json.loads(paths.metrics.read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert set(saved) == {"real", "blurred_real", "ldm", "pixelcnn", "ae_vqvae", "ae_vaegan"}
    n = VOLUMES * K
    generated = {"fd_alex", "kid", "kid_std", "ms_ssim", "precision", "recall", "zprobe_mae"}
    for name in ("blurred_real", "ldm", "pixelcnn"):
        assert generated | {"intensity_distance", "n_samples", "seed"} <= set(saved[name]), name
        assert saved[name]["n_samples"] == n
        assert saved[name]["zprobe_sha256"] == file_sha256(tmp_path / "models" / "zprobe.pt")
    for name, source in (("ldm", "vaegan"), ("pixelcnn", "vqvae")):
        assert saved[name]["checkpoint_sha256"] == file_sha256(tmp_path / "models" / f"{name}.pt")
        # what finishes its slices and its first stage's reconstructions (the judge's ceiling)
        assert saved[name]["latent_source"] == source
        assert saved[name]["texture"] == {  # not calibrated
            "texture_sigma": 0.0,
            "background_floor": 0.0,
            "texture_residual_std": 0.0,
        }
        assert saved[name]["posterior_std"] == 0.0
    assert saved["ldm"]["sampling"] == {
        "sampler": "ddim",
        "steps": 2,
        "guidance": TINY_LDM.guidance,
        "guidance_min_t": TINY_LDM.guidance_min_t,
    }
    assert saved["blurred_real"]["sigma_px"] == 1.5
    assert saved["real"]["n_samples"] == n
    # the real floor: the saved probe's mean |predicted z - z| on the test split, in slices
    probe, _ = load_probe(tmp_path / "models" / "zprobe.pt")
    real = EvalData.from_dataset(SliceDataset(paths.test))
    with torch.no_grad():
        expected_mae = float((probe(real.image) - real.z).abs().mean()) * (K - 1)
    assert saved["real"]["zprobe_mae"] == pytest.approx(expected_mae, rel=1e-5)
    assert 0 < saved["real"]["zprobe_mae"] < K - 1  # an untrained probe: neither 0 nor off-range
    assert {"fd_alex", "precision", "recall"} <= set(saved["real"]["split_halves"])
    assert {"fd_alex", "precision", "recall"} <= set(saved["real"]["other_subjects"])
    train_slices = len(SliceDataset(paths.train))
    assert saved["real"]["other_subjects"]["n_samples"] == min(n, train_slices)
    for kind in ("vqvae", "vaegan"):
        section = saved[f"ae_{kind}"]
        expected = {"ssim", "ssim_brain", "psnr", "lpips", "checkpoint_sha256", "n_samples"}
        assert expected <= set(section), kind
        # the second stage's ceiling at the generator's set size: the same real slices of
        # other subjects, reconstructed (an untrained first stage: not the real figure)
        ceiling, others = section["other_subjects"], saved["real"]["other_subjects"]
        assert set(ceiling) == set(others) | {"draws"}
        assert ceiling["n_samples"] == others["n_samples"]
        assert ceiling["draws"] == params.evaluate.sampling_seeds
        assert ceiling["fd_alex"] != others["fd_alex"]

    # the realism judge: controls, every generator and both autoencoders, raw and blurred;
    # each judge is evaluate.c2st.members networks, each member's own AUC kept
    for name in ("real", "ldm", "pixelcnn", "ae_vqvae", "ae_vaegan"):
        assert set(saved[name]["c2st"]) == {"raw", "blur"}, name
        for result in saved[name]["c2st"].values():
            assert 0 <= result["auc"] <= 1
            assert [step for step, _ in result["curve"]] == [2, 4]
            assert len(result["member_aucs"]) == params.evaluate.c2st.members == 3
    assert set(saved["blurred_real"]["c2st"]) == {"raw"}
    # novelty: the real test slices are the reference; each generator is scored against it
    for name in ("real", "ldm", "pixelcnn"):
        novelty = saved[name]["novelty"]
        assert 0 <= novelty["copy_like_fraction"] <= 1, name
        assert novelty["n_reference"] == n
    for name in ("ldm", "pixelcnn"):
        assert (paths.reports / f"novelty_{name}.png").stat().st_size > 0
        assert f"reports/novelty_{name}.png" in run.artifacts
    assert paths.c2st_png.stat().st_size > 0
    for name in ("ldm", "pixelcnn"):  # the look test, logged beside the copies
        look = paths.reports / f"beside_real_{name}.png"
        assert look.stat().st_size > 0
        assert run.artifacts[f"reports/{look.name}"] == look.read_bytes()

    zprobe = pd.read_csv(paths.per_z / "zprobe_mae.csv")
    assert list(zprobe.columns) == ["z_index", "real", "blurred_real", "ldm", "pixelcnn"]
    assert zprobe["z_index"].tolist() == list(range(K))
    ssim = pd.read_csv(paths.per_z / "ssim.csv")
    assert list(ssim.columns) == ["z_index", "ae_vqvae", "ae_vaegan"]
    assert paths.per_z_png.stat().st_size > 0

    summary = next(m for step, m in run.metrics if step is None)
    assert summary["ldm.fd_alex"] == pytest.approx(saved["ldm"]["fd_alex"])
    steps = [step for step, m in run.metrics if "per_z.zprobe_mae.ldm" in m]
    assert steps == list(range(K))
    assert run.artifacts["per_z/zprobe_mae.csv"] == (paths.per_z / "zprobe_mae.csv").read_bytes()
    assert "reports/eval_per_z.png" in run.images
    assert run.dicts["reports/metrics.json"] == metrics


def test_stage_refuses_a_probe_for_other_slice_levels(tmp_path: Path) -> None:
    _write_split(tmp_path / "data" / "prepared" / "test")
    _write_split(tmp_path / "data" / "prepared" / "train")
    _write_split(tmp_path / "data" / "prepared" / "val")
    models = tmp_path / "models"
    models.mkdir()
    save_model(models / "zprobe.pt", "zprobe", ZProbe(PROBE.channels), PROBE, {"n_slices": K + 1})
    params = params_from_dict({"prepare": {"n_slices": K, "image_size": SIZE}})
    paths = EvaluatePaths.standard("data/prepared", root=tmp_path)
    with pytest.raises(CheckpointError, match="re-run train_zprobe"):
        evaluate(params, run=RecordingRun("evaluate"), device=torch.device("cpu"), paths=paths)


def test_sampling_sweep_at_the_defaults_reproduces_metrics_json(tmp_path: Path) -> None:
    """The sweep scores through evaluate's own code: at the model's defaults and params.seed
    its row equals metrics.json; another setting changes the slices, not the references."""
    params, paths = _stage_inputs(tmp_path)
    cpu = torch.device("cpu")
    metrics = evaluate(params, run=RecordingRun("evaluate"), device=cpu, paths=paths)
    ctx = EvalContext.build(params, paths, cpu)
    results = sweep(
        "pixelcnn",
        [{}, {"temperature": 3.0}],
        [params.seed, params.seed + 1],
        ctx=ctx,
        metrics=metrics,
        models=paths.models,
    )
    assert list(results) == ["defaults", "temperature=3"]
    at_defaults = results["defaults"]["seeds"][params.seed]["figures"]
    saved = metrics["pixelcnn"]
    assert at_defaults["fd_alex"] == saved["fd_alex"]
    assert at_defaults["z-probe MAE"] == saved["zprobe_mae"]
    assert at_defaults["judge raw"] == saved["c2st"]["raw"]["auc"]
    assert at_defaults["judge blurred"] == saved["c2st"]["blur"]["auc"]
    assert at_defaults["copy-like"] == saved["novelty"]["copy_like_fraction"]
    other_seed = results["defaults"]["seeds"][params.seed + 1]["figures"]
    hotter = results["temperature=3"]["seeds"][params.seed]["figures"]
    assert other_seed["fd_alex"] != saved["fd_alex"] and hotter["fd_alex"] != saved["fd_alex"]
    summary = results["defaults"]["summary"]
    assert summary["n_seeds"] == 2
    fd = summary["figures"]["fd_alex"]
    assert fd["min"] <= saved["fd_alex"] <= fd["max"]
    assert fd["mean"] == pytest.approx((at_defaults["fd_alex"] + other_seed["fd_alex"]) / 2)


def test_several_sampling_seeds_are_judged_on_their_mean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``sampling_seeds: 2`` each generator's figures are the mean of the two seeds'
    (as the sweep scores each seed), and ``seeds`` counts the seeds that met every bar; each
    autoencoder's ceiling is the mean of two draws of its reconstructions."""
    params, paths = _stage_inputs(tmp_path, sampling_seeds=2)
    cpu = torch.device("cpu")
    scored: list[dict[str, Any]] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        result = set_figures(*args, **kwargs)
        scored.append(result[0])
        return result

    def drawn(*args: Any, **kwargs: Any) -> torch.Tensor:  # these files decode without noise
        out = ceiling_reconstructions(*args, **kwargs)
        return (out + 0.05 * torch.rand(out.shape, generator=args[4])).clamp(0, 1)

    jobs: list[evaluate_module.JudgeJob] = []
    run_judges, generate_like = evaluate_module.run_judges, evaluate_module.generate_like

    def judging(batch: list[evaluate_module.JudgeJob], device: torch.device) -> Any:
        jobs.extend(batch)
        return run_judges(batch, device)

    sampled: list[int] = []

    def sampling(*args: Any, **kwargs: Any) -> Any:
        sampled.append(args[3])
        return generate_like(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "set_figures", recording)
    monkeypatch.setattr(evaluate_module, "ceiling_reconstructions", drawn)
    monkeypatch.setattr(evaluate_module, "run_judges", judging)
    monkeypatch.setattr(evaluate_module, "generate_like", sampling)
    metrics = evaluate(params, run=RecordingRun("evaluate"), device=cpu, paths=paths)
    # one raw and one blurred judge per generator, read on both seeds' slices; the slices it
    # learns are drawn with a seed of their own
    per_section = {(job.section, job.variant): len(job.fake_tests) for job in jobs}
    assert len(jobs) == len(per_section) == 11
    assert all(per_section[(g, v)] == 2 for g in ("ldm", "pixelcnn") for v in ("raw", "blur"))
    assert per_section[("real", "blur")] == per_section[("ae_vaegan", "raw")] == 1
    judge_seed = params.seed + evaluate_module.JUDGE_SEED_OFFSET
    assert sampled == [params.seed, params.seed + 1, judge_seed] * 2
    ceiling = metrics["ae_vaegan"]["other_subjects"]  # the last kind: the last two scorings
    draws = [row["fd_alex"] for row in scored[-2:]]
    assert ceiling["draws"] == 2 and draws[0] != draws[1]
    assert ceiling["fd_alex"] == pytest.approx(sum(draws) / 2)
    seeds = [params.seed, params.seed + 1]
    results = sweep(
        "pixelcnn",
        [{}],
        seeds,
        ctx=EvalContext.build(params, paths, cpu),
        metrics=metrics,
        models=paths.models,
    )
    rows = [results["defaults"]["seeds"][s]["figures"] for s in seeds]
    saved = metrics["pixelcnn"]
    for column, value in (
        ("fd_alex", saved["fd_alex"]),
        ("z-probe MAE", saved["zprobe_mae"]),
        ("judge blurred", saved["c2st"]["blur"]["auc"]),
        ("copy-like", saved["novelty"]["copy_like_fraction"]),
    ):
        assert value == pytest.approx((rows[0][column] + rows[1][column]) / 2), column
    assert rows[0]["fd_alex"] != rows[1]["fd_alex"]  # two seeds, two sets of slices
    assert saved["seed"] == params.seed and saved["n_samples"] == VOLUMES * K
    block = saved["seeds"]
    assert block["seeds"] == seeds and block["n_seeds"] == 2
    assert block["all_bars_met"] == results["defaults"]["summary"]["all_bars_met"]
    assert block["figures"]["fd_alex"]["min"] == min(r["fd_alex"] for r in rows)
    assert list(metrics)[:4] == ["real", "blurred_real", "ldm", "pixelcnn"]  # section order
    assert block["short"], "untrained models fall short of some bar"
    # every figure is a valid MLflow metric name (a bar's label, with commas, is not)
    names = numeric_metrics(metrics)
    assert "pixelcnn.seeds.all_bars_met" in names
    assert all(re.fullmatch(r"[\w\-. :/]+", name) for name in names), [
        n for n in names if not re.fullmatch(r"[\w\-. :/]+", n)
    ]
