"""The report page: built from small fixture files, checked as text and in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline.core import tracking
from pipeline.core.figures import save_png
from pipeline.core.io import write_json
from pipeline.core.tracking import StageRun
from pipeline.evaluation.report import (
    ReportPaths,
    build_report,
    curves_image,
    labels_html,
    verdict_mark,
    write_report,
)
from pipeline.training.ldm import save_gif

CHROMIUM = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
PNGS = (
    "eval_per_z.png",
    "ldm_samples.png",
    "prior_samples.png",
    "ae_vqvae_recon.png",
    "ae_vaegan_recon.png",
    "ldm_trajectory.png",
    "zprobe_scatter.png",
    "prepare_preview.png",
    "c2st_strength.png",
    "novelty_ldm.png",
    "novelty_pixelcnn.png",
    "beside_real_ldm.png",
    "beside_real_pixelcnn.png",
)
#: Records load errors and every image's natural size into the title, read via --dump-dom.
PROBE_SCRIPT = """<script>
const errors = [];
window.addEventListener('error', e => errors.push(String(e.message || e.target.tagName)), true);
window.addEventListener('load', () => {
  const images = [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight]);
  document.title = 'PROBE' + JSON.stringify({errors, images});
});
</script>"""


def _write_fixture(root: Path) -> ReportPaths:
    """Every input of the report except ``ae_vaegan.json`` and the MLflow store."""
    rng = np.random.default_rng(0)
    reports = root / "reports"
    for name in PNGS:
        save_png(rng.random((12, 20)), reports / name)
    save_gif([rng.random((12, 20)) for _ in range(3)], reports / "ldm_trajectory.gif")
    write_json(
        reports / "metrics.json",
        {
            "real": {"zprobe_mae": 0.61, "split_halves": {"fd_alex": 3.5}},
            "blurred_real": {"fd_alex": 21.25, "zprobe_mae": 1.0},
            "ldm": {
                "fd_alex": 12.75,
                "zprobe_mae": 0.9,
                "checkpoint_sha256": "ab" * 32,
                "c2st": {"blur": {"auc": 0.625}, "raw": {"auc": 0.9375}},
            },
            "ae_vqvae": {"ssim": 0.875},
        },
    )
    write_json(reports / "ae_vqvae.json", {"ssim": 0.875, "per_z": {"0": {"ssim": 0.5}}})
    write_json(reports / "prior.json", {"test_bits_per_code": 3.25})
    write_json(reports / "ldm.json", {"final_loss": 0.125, "sampling": {"slices_per_s": 40.0}})
    write_json(reports / "zprobe.json", {"test_mae": 0.61})
    write_json(
        reports / "prepare_report.json", {"subjects": {"test": [f"S{i}" for i in range(20)]}}
    )
    test = root / "data" / "prepared" / "test"
    test.mkdir(parents=True)
    np.save(test / "slices.npy", rng.random((12, 1, 32, 32)).astype(np.float16))
    z_index = np.tile(np.arange(4), 3)
    pd.DataFrame({"z_index": z_index, "z": z_index / 3}).to_csv(test / "manifest.csv", index=False)
    return ReportPaths.standard("data/prepared", root=root)


def _render(page: Path, tmp_path: Path) -> dict[str, list]:
    """Open ``page`` (with the probe script) in headless Chromium; return errors and sizes."""
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("<head>", f"<head>{PROBE_SCRIPT}", 1))
    out = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r"<title>PROBE(.*?)</title>", out.stdout, re.S)
    assert found, f"no probe result; chromium said: {out.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"'))


def test_sections_are_filled_from_the_files_and_missing_ones_say_so(tmp_path: Path) -> None:
    paths = _write_fixture(tmp_path)
    page = build_report(paths, tracking_uri=f"sqlite:///{tmp_path / 'none.db'}", stand_in=True)
    # every PNG + GIF + the real grid
    assert page.count('src="data:image/') == len(PNGS) + 2
    assert page.count("data:image/gif;base64,") == 1
    assert "stand-in" in page
    for value in ("12.75", "21.25", "0.61", "3.25", "0.125"):
        assert value in page, value
    header = re.search(r"<tr><th>figure</th>(.*?)</tr>", page).group(1)  # type: ignore[union-attr]
    assert re.findall(r"<th>(\w+)</th>", header) == ["real", "blurred_real", "ldm", "ae_vqvae"]
    assert "split_halves.fd_alex" in page and "per_z" not in page
    assert "not produced: reports/ae_vaegan.json" in page
    assert "not produced: MLflow store" in page
    assert "… (20 items)" in page


def test_page_opens_with_verdicts_and_folds_the_full_table(tmp_path: Path) -> None:
    page = build_report(
        _write_fixture(tmp_path), tracking_uri=f"sqlite:///{tmp_path / 'none.db'}", stand_in=True
    )
    verdicts = page.index("Verdicts on the test split")
    assert verdicts < page.index("<details><summary>Every evaluation figure")
    assert page.index("Every evaluation figure") < page.index("split_halves.fd_alex")
    ldm = page[page.index("latent diffusion: short of") :]
    rows = dict(re.findall(r"<tr><td>([^<]+)</td>.*?class=\"(pass|short|unknown)\"", ldm))
    assert rows["realism, anatomy (C2ST AUC, blurred)"] == "pass"  # 0.625 <= 0.65
    assert rows["realism, texture (C2ST AUC, raw)"] == "short"  # 0.9375 > 0.8
    assert rows["fd_alex"] == "short"  # 12.75 > 1.5 x 3.5
    assert rows["z fidelity (z-probe MAE, slices)"] == "pass"  # 0.9 <= 1.5 x 0.61
    assert rows["precision"] == "unknown"
    assert "PixelCNN prior: " not in page  # no section in metrics.json, no verdict table


def test_a_short_mark_says_when_the_ceiling_is_short_too() -> None:
    limit = "so is the ceiling"
    assert limit in verdict_mark(False, ceiling_passed=False)
    assert limit not in verdict_mark(False, ceiling_passed=True)
    assert limit not in verdict_mark(False)
    assert verdict_mark(True, ceiling_passed=False) == '<span class="pass">pass</span>'
    assert "cannot judge: probe at chance" in verdict_mark(None, "probe at chance", False)


def test_missing_inputs_never_crash(tmp_path: Path) -> None:
    paths = ReportPaths.standard("data/prepared", root=tmp_path)
    out = write_report(paths, tracking_uri=f"sqlite:///{tmp_path / 'none.db'}", stand_in=False)
    page = out.read_text()
    assert 'src="data:' not in page
    assert page.count("not produced") >= 15
    assert "stand-in" not in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_page_loads_in_headless_chromium_and_every_image_renders(tmp_path: Path) -> None:
    paths = _write_fixture(tmp_path)
    page = write_report(paths, tracking_uri=f"sqlite:///{tmp_path / 'none.db'}", stand_in=True)
    result = _render(page, tmp_path)
    assert result["errors"] == []
    assert len(result["images"]) == len(PNGS) + 2
    assert all(done and w > 0 and h > 0 for done, w, h in result["images"]), result


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~10 s
def test_training_curves_and_run_ids_come_from_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with StageRun("prepare", {"a": 1}) as prep:
        prep.log_metrics({"n_slices": 12.0})
    with StageRun("train_autoencoder", {"a": 1}, run_name="vqvae") as old:
        old.log_metrics({"loss": 9.0}, step=1)
    with StageRun("train_autoencoder", {"a": 2}, run_name="vqvae") as train:
        for step in range(1, 6):
            train.log_metrics({"loss": 1.0 / step, "lr": 1e-3}, step=step)
    paths = _write_fixture(tmp_path)
    page = write_report(paths, tracking_uri=tracking.tracking_uri(), stand_in=True).read_text()
    assert train.run_id in page and prep.run_id in page
    assert old.run_id not in page  # only the newest run of each name
    assert "training curves of vqvae" in page
    assert page.count('src="data:image/') == len(PNGS) + 3
    if CHROMIUM is not None:
        result = _render(paths.out, tmp_path)
        assert result["errors"] == [] and all(w > 0 for _, w, _ in result["images"])
    with StageRun("train_prior", {"a": 1}, run_name="prior") as flat:
        for step in range(1, 6):
            flat.log_metrics({"lr": 1e-3}, step=step)  # a flat line is no curve
    client = MlflowClient(tracking.tracking_uri())
    assert curves_image(client, client.get_run(flat.run_id)) is None
    assert curves_image(client, client.get_run(train.run_id)) is not None


def test_label_tables_show_real_matched_and_shuffled_beside_each_other() -> None:
    labels = {
        "covariates": ["age", "cdr"],
        "real": {"age_mae": 9.5, "cdr_auc": 0.8},
        "matched": {"age_mae": 11.25, "cdr_auc": 0.7},
        "shuffled": {"age_mae": 17.75, "cdr_auc": 0.5},
        "mask_dice": {"dice_mean": 0.61},
        "real_mask_dice": {"dice_mean": 0.78},
        "skipped": {"sex_auc": "only one class"},
    }
    page = labels_html({"ldm": {"labels": labels}})
    assert "conditions on age, cdr" in page and "shuffled control" in page
    age_row = page[page.index("probe MAE") : page.index("</tr>", page.index("probe MAE"))]
    assert [v in age_row for v in ("9.5", "11.25", "17.75")] == [True] * 3
    assert "0.61" in page and "0.78" in page and "not measured: sex_auc: only one class" in page
    assert "labels in reports/metrics.json" in labels_html({"ldm": {"fd_alex": 1.0}})
