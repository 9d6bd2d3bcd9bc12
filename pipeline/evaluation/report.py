"""The ``report`` stage: one self-contained HTML page over every stage's outputs.

``reports/index.html`` embeds every image as a base64 data URI, so the file can be mailed or
opened anywhere. It opens with one verdict table per generator
(:mod:`pipeline.evaluation.verdicts`: realism, fidelity, novelty and z fidelity beside their
real references, pass or short), the judges' strength curve and the nearest-copy figures;
then every evaluation figure (folded; ``reports/metrics.json``, one column per model) and
per-z curves; real test slices against LDM and PixelCNN samples, rows by z;
autoencoder reconstructions; the LDM denoising trajectory; the z-probe scatter; the table of
every stage report; training curves read back from MLflow; the MLflow run ids; the prepared
data. An input that is missing leaves its section saying "not produced" instead of failing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from pipeline.core.figures import figure_image, grid
from pipeline.core.io import write_text
from pipeline.core.tracking import EXPERIMENT, flatten, to_uint8_image
from pipeline.data.datasets import SliceDataset
from pipeline.evaluation.verdicts import JUDGED, Verdict, model_verdicts

logger = logging.getLogger(__name__)

#: Stage reports shown as key/value tables: (title, file name under reports/).
STAGE_REPORTS = (
    ("prepare", "prepare_report.json"),
    ("autoencoder: VQ-VAE", "ae_vqvae.json"),
    ("autoencoder: VAE-GAN", "ae_vaegan.json"),
    ("PixelCNN prior", "prior.json"),
    ("latent diffusion", "ldm.json"),
    ("z-probe", "zprobe.json"),
    ("label probes", "probes.json"),
)
#: Rows of the label tables: (label, key in a ``labels`` arm, better when higher).
LABEL_ROWS = (
    ("age from the image, probe MAE (years)", "age_mae"),
    ("CDR > 0 from the image, probe AUC", "cdr_auc"),
    ("sex from the image, probe AUC", "sex_auc"),
)
#: Column order of the evaluation table (sections of ``reports/metrics.json``).
SECTIONS = ("real", "blurred_real", "ldm", "pixelcnn", "ae_vqvae", "ae_vaegan")
#: Rows (z levels) and columns (slices per level) of the real-slice grid.
REAL_GRID_LEVELS, REAL_GRID_COLUMNS = 8, 8
#: At most this many metric panels per training run.
MAX_CURVES = 12
#: Small images are magnified (by a whole factor, at most 4) to about this display width.
DISPLAY_WIDTH = 360
#: List values longer than this are shortened in tables.
MAX_LIST_ITEMS = 8

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-family: monospace; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
figure { margin: 0; }
figcaption { font-size: 0.85em; color: #555; max-width: 480px; }
img { image-rendering: pixelated; max-width: 100%; }
.missing { color: #a00; font-style: italic; }
.note { background: #fff6d6; padding: 0.5em 1em; border-left: 4px solid #e0b000; }
.pass { color: #070; font-weight: bold; }
.short { color: #b00; font-weight: bold; }
.unknown { color: #777; }
summary { cursor: pointer; font-weight: bold; margin: 0.5em 0; }
"""
#: Display names of the judged generators.
MODEL_NAMES = {"ldm": "latent diffusion", "pixelcnn": "PixelCNN prior"}


@dataclass(frozen=True)
class ReportPaths:
    """Inputs and output of the ``report`` stage.

    Attributes:
        reports: the folder of the stage reports and images, ``reports``.
        test: the prepared test split (for the real-slice grid), ``data/prepared/test``.
        out: the page, ``reports/index.html``.
    """

    reports: Path
    test: Path
    out: Path

    @classmethod
    def standard(cls, prepared_dir: str | Path, root: str | Path = ".") -> ReportPaths:
        """The standard layout under ``root``."""
        root = Path(root)
        return cls(
            reports=root / "reports",
            test=root / prepared_dir / "test",
            out=root / "reports" / "index.html",
        )


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON report, or None (with a warning) when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("%s is unreadable (%s); its section says not produced", path, err)
        return None
    return data if isinstance(data, dict) else None


def missing(what: str) -> str:
    """The placeholder of a section whose input does not exist."""
    return f'<p class="missing">not produced: {html.escape(what)}</p>'


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """Encode an image compactly as PNG for embedding: greyscale as 8-bit grey, colour
    (plots) as a 256-colour palette (lossless for plots with fewer colours), zlib-optimised.

    Args:
        image: a (H, W) or (H, W, 3) array (values in [0, 1], or uint8), or a PIL image.
    """
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        image = Image.fromarray(arr if arr.dtype == np.uint8 else to_uint8_image(arr))
    rgb = np.asarray(image.convert("RGB"))
    grey = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    compact = image.convert("L") if grey else image.convert("RGB").quantize(256)
    buf = io.BytesIO()
    compact.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def figure_html(source: Path | np.ndarray | None, caption: str) -> str:
    """An embedded image with its caption, or the "not produced" placeholder.

    Images narrower than :data:`DISPLAY_WIDTH` are shown magnified by a whole factor (at
    most 4; pixels stay sharp).

    Args:
        source: a PNG/GIF file, an image array, or None (not produced).
        caption: text under the image (plain text).

    Returns:
        An HTML ``<figure>`` (or ``<p class="missing">``).
    """
    if source is None or (isinstance(source, Path) and not source.is_file()):
        return missing(f"{caption} ({source})" if isinstance(source, Path) else caption)
    if isinstance(source, Path) and source.suffix == ".gif":
        data, mime = source.read_bytes(), "image/gif"
        width = Image.open(io.BytesIO(data)).width
    elif isinstance(source, Path):
        with Image.open(source) as image:
            data, mime, width = png_bytes(image), "image/png", image.width
    else:
        data, mime, width = png_bytes(source), "image/png", np.asarray(source).shape[1]
    uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    scale = max(1, min(4, DISPLAY_WIDTH // width))
    return (
        f'<figure><img src="{uri}" width="{width * scale}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def format_value(value: Any) -> str:
    """A table cell: floats to 4 significant digits, long lists and hashes shortened."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list | tuple):
        shown = ", ".join(format_value(v) for v in value[:MAX_LIST_ITEMS])
        return shown + (f", … ({len(value)} items)" if len(value) > MAX_LIST_ITEMS else "")
    text = str(value)
    if len(text) > 24 and " " not in text:  # a hash or a path
        return f'<span title="{html.escape(text)}">{html.escape(text[:16])}…</span>'
    return html.escape(text)


def flat_items(report: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys of a nested report, without the bulky ``per_z`` subtrees."""
    return {k: v for k, v in flatten(report).items() if ".per_z." not in f".{k}."}


def table_html(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A table: the first column is a label, the others formatted values."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr><td>"
        + html.escape(str(row[0]))
        + "</td>"
        + "".join(
            f'<td class="{"num" if isinstance(v, int | float) else ""}">{format_value(v)}</td>'
            for v in row[1:]
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """``reports/metrics.json`` as one table: a row per figure, a column per model/reference."""
    sections = [s for s in SECTIONS if s in metrics] + [s for s in metrics if s not in SECTIONS]
    flat = {s: flat_items(metrics[s]) if isinstance(metrics[s], dict) else {} for s in sections}
    keys = list(dict.fromkeys(k for s in sections for k in flat[s]))
    return table_html(
        ["figure", *sections], ([k, *(flat[s].get(k) for s in sections)] for k in keys)
    )


def verdict_mark(
    passed: bool | None, note: str | None = None, ceiling_passed: bool | None = None
) -> str:
    """The verdict cell: pass (green), short (red), or not measured / cannot judge (grey,
    with ``note`` saying why); a short mark says so when the autoencoder's ceiling is short
    of the bar too (``ceiling_passed`` False: the first stage, not the generator, limits it)."""
    if passed is None:
        text = f"cannot judge: {note}" if note else "not measured"
        return f'<span class="unknown">{html.escape(text)}</span>'
    if passed:
        return '<span class="pass">pass</span>'
    limit = " (so is the ceiling: the first stage limits it)" if ceiling_passed is False else ""
    return f'<span class="short">short</span>{limit}'


def seeds_note(seeds: Mapping[str, Any] | None) -> str:
    """The line under a verdict table's headline when its figures are a mean over sampling
    seeds (``metrics.json``'s ``seeds`` block, :mod:`pipeline.evaluation.seeds`); empty for
    one seed."""
    if not seeds or seeds.get("n_seeds", 1) < 2:
        return ""
    short = "; ".join(f"{row['bar']} ({row['seeds']})" for row in seeds.get("short", []))
    return (
        f"<p>Figures are the mean over {seeds['n_seeds']} sampling seeds "
        f"({', '.join(map(str, seeds.get('seeds', [])))}). Every bar met on "
        f"{seeds['all_bars_met']} of {seeds['n_seeds']} seeds."
        + (f" Short on single seeds, with how many: {html.escape(short)}." if short else "")
        + "</p>"
    )


def verdict_table(
    model: str, rows: Sequence[Verdict], seeds: Mapping[str, Any] | None = None
) -> str:
    """One generator's verdicts: figure, reference (real slices, or the shuffled control),
    autoencoder ceiling, bar, mark; with :func:`seeds_note` under the headline."""
    short = sum(row.passed is False for row in rows)
    measured = sum(row.passed is not None for row in rows)
    headline = f"{MODEL_NAMES.get(model, model)}: " + (
        "meets every bar"
        if short == 0 and measured == len(rows)
        else f"short of {short} of {len(rows)} bars"
        if short
        else f"{len(rows) - measured} of {len(rows)} bars not judged"
    )
    body = "".join(
        f"<tr><td>{html.escape(row.label)}</td><td class='num'>{format_value(row.value)}</td>"
        f"<td class='num'>{format_value(row.reference)}</td>"
        f"<td class='num'>{format_value(row.ceiling)}</td>"
        f"<td>{html.escape(row.bar)}</td>"
        f"<td>{verdict_mark(row.passed, row.note, row.ceiling_passed)}</td></tr>"
        for row in rows
    )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("criterion", "model", "reference", "autoencoder ceiling", "bar", "verdict")
    )
    return (
        f"<h3>{html.escape(headline)}</h3>{seeds_note(seeds)}<table><tr>{head}</tr>{body}</table>"
    )


def verdicts_html(metrics: Mapping[str, Any] | None) -> str:
    """The verdict tables of every judged generator (the page's opening section)."""
    if not metrics:
        return missing("reports/metrics.json")
    tables = [
        verdict_table(m, rows, metrics[m].get("seeds"))
        for m in JUDGED
        if (rows := model_verdicts(metrics, m))
    ]
    return "".join(tables) or missing("generator sections in reports/metrics.json")


def real_grid(
    test_dir: Path, levels: int = REAL_GRID_LEVELS, columns: int = REAL_GRID_COLUMNS
) -> np.ndarray | None:
    """Real test slices, one row per z level (evenly spaced, low z on top), or None if absent.

    Args:
        test_dir: the prepared test split.
        levels: rows.
        columns: at most this many slices per row (blank tiles when a level has fewer).

    Returns:
        (H', W') array in [0, 1], or None when the split is missing.
    """
    if not (test_dir / "slices.npy").is_file():
        return None
    data = SliceDataset(test_dir)
    slices = np.load(test_dir / "slices.npy", mmap_mode="r")
    present = np.unique(data.z_index)
    rows = present[np.unique(np.linspace(0, len(present) - 1, levels).round().astype(int))]
    columns = min(columns, int(np.bincount(data.z_index).max()))
    tiles = torch.zeros(len(rows) * columns, 1, *slices.shape[-2:])
    for r, level in enumerate(rows):
        picks = np.flatnonzero(data.z_index == level)[:columns]
        tiles[r * columns : r * columns + len(picks)] = torch.from_numpy(
            np.asarray(slices[picks], dtype=np.float32)
        )
    return grid(tiles, ncol=columns)


def latest_runs(client: Any) -> list[Any]:
    """The newest MLflow run of every run name in the braingen experiment, by start time."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=5000
    )
    newest: dict[str, Any] = {}
    for run in runs:
        newest.setdefault(run.info.run_name, run)
    return sorted(newest.values(), key=lambda r: r.info.start_time)


def curves_image(client: Any, run: Any) -> np.ndarray | None:
    """Training curves of one run: a panel per metric that changed over the logged steps.

    Args:
        client: an ``mlflow.tracking.MlflowClient``.
        run: an MLflow run.

    Returns:
        (H, W, 3) uint8 image, or None when the run logged no history.
    """
    histories = {}
    for key in sorted(run.data.metrics):
        points = client.get_metric_history(run.info.run_id, key)
        if len({p.value for p in points}) > 1:  # a flat line (e.g. an unused loss) says nothing
            histories[key] = sorted((p.step, p.value) for p in points)
        if len(histories) == MAX_CURVES:
            break
    if not histories:
        return None
    ncol = min(4, len(histories))
    nrow = math.ceil(len(histories) / ncol)
    fig = Figure(figsize=(3.4 * ncol, 2.4 * nrow), dpi=90)
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for ax, (key, points) in zip(axes, histories.items(), strict=False):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.locator_params(nbins=4)
    for ax in axes[len(histories) :]:
        ax.set_axis_off()
    fig.suptitle(f"{run.info.run_name} (run {run.info.run_id[:8]})", fontsize=10)
    # fixed margins: tight_layout measured every tick label, seconds per figure
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12 / nrow, top=1 - 0.3 / (nrow + 1),
                        wspace=0.3, hspace=0.45)  # fmt: skip
    return figure_image(fig)


def mlflow_sections(tracking_uri: str) -> tuple[str, str]:
    """(training-curves HTML, run-table HTML) read back from the MLflow store.

    Training runs are those whose ``stage`` tag starts with ``train``. A missing sqlite
    store, or a store that cannot be read, leaves both sections saying so.
    """
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[10:]).is_file():
        note = missing(f"MLflow store {tracking_uri}")
        return note, note
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        runs = latest_runs(client)
        curves = [
            figure_html(curves_image(client, r), f"training curves of {r.info.run_name}")
            for r in runs
            if r.data.tags.get("stage", "").startswith("train")
        ]
    except Exception as err:  # the page must still be written when the store is unreadable
        note = missing(f"MLflow store {tracking_uri} unreadable ({type(err).__name__}: {err})")
        return note, note
    table = table_html(
        ["run name", "stage", "run id", "status", "started (UTC)", "pipeline id"],
        (
            [
                r.info.run_name,
                r.data.tags.get("stage", ""),
                r.info.run_id,
                r.info.status,
                datetime.fromtimestamp(r.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
                r.data.tags.get("pipeline_id", ""),
            ]
            for r in runs
        ),
    )
    runs_html = (
        f"<p>Tracking store: <code>{html.escape(tracking_uri)}</code>, experiment "
        f"<code>{EXPERIMENT}</code> (newest run of each name).</p>" + table
        if runs
        else missing(f"MLflow runs in {tracking_uri}")
    )
    return "".join(curves) or missing("training runs in MLflow"), runs_html


def labels_html(metrics: Mapping[str, Any]) -> str:
    """One table per generator: the label probes on real test slices, on slices generated at
    their z and covariates, and on the shuffled-covariate control; and mask Dice."""
    parts = []
    for model in ("ldm", "pixelcnn"):
        section = metrics.get(model) if isinstance(metrics, Mapping) else None
        labels = section.get("labels") if isinstance(section, Mapping) else None
        if not isinstance(labels, Mapping):
            continue
        rows = [
            (label, *(labels.get(arm, {}).get(key) for arm in ("real", "matched", "shuffled")))
            for label, key in LABEL_ROWS
        ]
        if "mask_dice" in labels:
            real_dice = labels.get("real_mask_dice", {}).get("dice_mean")
            dice = labels["mask_dice"].get("dice_mean")
            rows.append(("mask Dice, segmenter vs mask (CSF/GM/WM mean)", real_dice, dice, None))
        skipped = "; ".join(f"{k}: {v}" for k, v in labels.get("skipped", {}).items())
        parts.append(
            f"<h3>{html.escape(model)} (conditions on "
            f"{html.escape(', '.join(labels.get('covariates', [])) or 'z only')})</h3>"
            + table_html(["label", "real slices", "matched synthetic", "shuffled control"], rows)
            + (f"<p class='note'>not measured: {html.escape(skipped)}</p>" if skipped else "")
        )
    return "".join(parts) or missing("labels in reports/metrics.json")


def augmentation_html(study: Mapping[str, Any]) -> str:
    """The augmentation study: its conclusions first, then one table per task (mean score,
    paired difference from the baseline with its CI and p-value, Holm flag)."""
    tasks = study.get("tasks") if isinstance(study, Mapping) else None
    if not isinstance(tasks, Mapping):
        return missing("reports/augmentation.json (the augment_study stage)")
    lines = [
        f"<li>{html.escape(str(res.get('conclusion', res.get('skipped'))))}</li>"
        for res in tasks.values()
    ]
    parts = [f"<ul>{''.join(lines)}</ul>"]
    for task, res in tasks.items():
        if "arms" not in res:
            continue
        summaries = {"auc": "AUC (subjects)", "balanced_accuracy": "balanced accuracy"}
        extra = [k for k in summaries if k in res["arms"].get("real", {})]
        rows = []
        for name, arm in res["arms"].items():
            e = res["effects"].get(name, {})
            ci = f"[{e['low']:+.3g}, {e['high']:+.3g}]" if e else "reference"
            holm_mark = "survives" if e.get("survives_holm") else ("—" if e else "")
            means = (sum(arm[k]) / len(arm[k]) for k in extra)
            rows.append((name, arm["mean"], e.get("mean"), ci, e.get("p_value"), holm_mark, *means))
        direction = (
            f" ({'higher' if res['higher_is_better'] else 'lower'} is better)"
            if "higher_is_better" in res
            else ""
        )
        parts.append(
            f"<h3>{html.escape(task)}: {html.escape(str(res.get('score', '')))}{direction}</h3>"
            + table_html(
                ["arm", "mean", "difference", "CI", "p", "Holm", *(summaries[k] for k in extra)],
                rows,
            )
        )
    return "".join(parts)


def build_report(paths: ReportPaths, *, tracking_uri: str, stand_in: bool) -> str:
    """The whole page.

    Args:
        paths: where the inputs are.
        tracking_uri: the MLflow store to read training curves and run ids from.
        stand_in: the data is the synthetic demo cohort (its numbers are labelled stand-in).

    Returns:
        The HTML text.
    """
    r = paths.reports
    metrics = read_json(r / "metrics.json")
    curves_html, runs_html = mlflow_sections(tracking_uri)
    note = (
        '<p class="note">Data: the synthetic stand-in cohort derived from the MNI152 template, '
        "not OASIS. Every number on this page is a stand-in figure.</p>"
        if stand_in
        else ""
    )
    stage_tables = []
    for title, name in STAGE_REPORTS:
        report = read_json(r / name)
        body = (
            table_html(["key", "value"], flat_items(report).items())
            if report
            else missing(f"reports/{name}")
        )
        stage_tables.append(f"<h3>{html.escape(title)}</h3>{body}")
    generated_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>braingen report</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>braingen report</h1><p>Written {generated_at}.</p>{note}",
        "<h2>Verdicts on the test split</h2>",
        "<p>Each generator's figures beside the same figure on real slices (the reference) "
        "and the autoencoder's reconstructions (the ceiling a second stage can reach). C2ST: "
        "ROC AUC of a judge trained to tell real from synthetic slices (small CNNs trained "
        "alike from several seeds, their logits averaged; 0.5 = it cannot; "
        "real against real is the control); <i>blurred</i>: both sides blurred, so only "
        "anatomy counts. Copy-like: nearer a training slice than the real held-out slices' "
        "99th percentile.</p>",
        verdicts_html(metrics),
        "<p>The look test: no figure above replaces it. Real test slices (top row), their "
        "reconstructions by the generator's autoencoder, finished as its slices are (middle: "
        "the best a second stage could do), and the slices generated at the same z and "
        "covariates (bottom), magnified 2x with no smoothing.</p>",
        "<div class='row'>",
        figure_html(r / "beside_real_ldm.png", "latent diffusion beside real slices"),
        figure_html(r / "beside_real_pixelcnn.png", "PixelCNN beside real slices"),
        "</div>",
        "<div class='row'>",
        figure_html(
            r / "c2st_strength.png",
            "judge strength: held-out AUC over training steps (a judge still rising is weak)",
        ),
        figure_html(
            r / "novelty_ldm.png",
            "latent diffusion: the samples most like a copy (nearest training slice far nearer "
            "than the next, d1/d2 small), each above that training slice",
        ),
        figure_html(r / "novelty_pixelcnn.png", "PixelCNN: the same"),
        "</div>",
        "<h2>Labels: are covariates and masks obeyed?</h2>",
        "<p>Independent probes trained on real training slices read age, CDR &gt; 0 and sex "
        "off real test slices (the floor), off slices generated at those slices' own z and "
        "covariates (matched), and off slices generated with the covariates shuffled across "
        "slices (a generator that ignores its covariates scores the same there); scored "
        "against the real labels. Mask Dice: the tissue segmenter's map of each generated "
        "image against the mask generated with it; the real row is the segmenter against the "
        "true tissue of real slices.</p>",
        labels_html(metrics),
        "<div class='row'>",
        figure_html(
            r / "labelled_ldm.png",
            "latent diffusion: real slices and tissue (top two rows), generated at the same "
            "z and covariates with their masks (bottom two)",
        ),
        figure_html(r / "labelled_pixelcnn.png", "PixelCNN: the same"),
        figure_html(
            r / "labels_ldm.png",
            "latent diffusion: age and CDR read off real, matched and shuffled slices against "
            "what was asked for, and the age error per z",
        ),
        figure_html(r / "labels_pixelcnn.png", "PixelCNN: the same"),
        figure_html(r / "probes.png", "label probes on the real test split"),
        "</div>",
        "<h2>Augmentation study: do synthetic slices help a real task?</h2>",
        "<p>Each arm trains the same network for the same steps on the same seeds; scores are "
        "per real test subject; differences are paired (seed x subject) against the arm's "
        "real-only baseline, with a bootstrap CI and Holm's correction across arms.</p>",
        augmentation_html(read_json(r / "augmentation.json")),
        "<div class='row'>",
        figure_html(r / "augmentation.png", "score against synthetic ratio, per data regime"),
        figure_html(
            r / "augmentation_pairs.png",
            "training pairs: real image and tissue (top), synthetic image and mask (bottom)",
        ),
        "</div>",
        "<details><summary>Every evaluation figure</summary>",
        "<p><code>fd_alex</code> is a Fréchet distance on AlexNet (LPIPS trunk) features, not "
        "FID. <code>zprobe_mae</code> is in slice units; the <code>real</code> column is the "
        "floor, <code>blurred_real</code> the reference a generator must beat. "
        "<code>split_halves</code> compares two halves of the test split (half the size, so "
        "only comparable with itself).</p>",
        metrics_table(metrics) if metrics else missing("reports/metrics.json"),
        "</details>",
        figure_html(r / "eval_per_z.png", "per-z curves (x: slice index)"),
        "<h2>Real and generated slices by z</h2><div class='row'>",
        figure_html(
            real_grid(paths.test),
            "real test slices: rows are evenly spaced z levels, low z on top",
        ),
        figure_html(r / "ldm_samples.png", "latent diffusion samples, rows by z"),
        figure_html(r / "prior_samples.png", "PixelCNN samples, rows by z"),
        "</div><h2>Autoencoder reconstructions</h2><div class='row'>",
        figure_html(r / "ae_vqvae_recon.png", "VQ-VAE: real | reconstruction | wrong z"),
        figure_html(r / "ae_vaegan_recon.png", "VAE-GAN: real | reconstruction | wrong z"),
        "</div><h2>Denoising trajectory (latent diffusion)</h2><div class='row'>",
        figure_html(r / "ldm_trajectory.gif", "x_t (top) and predicted x0 (bottom) per DDIM step"),
        figure_html(
            r / "ldm_trajectory.png",
            "predicted x0 along the run: rows by z, columns steps",
        ),
        "</div><h2>z-probe</h2>",
        figure_html(r / "zprobe_scatter.png", "predicted against true slice index, test split"),
        "<h2>Stage reports</h2>",
        *stage_tables,
        "<h2>Training curves (from MLflow)</h2>",
        curves_html,
        "<h2>MLflow runs</h2>",
        runs_html,
        "<h2>Prepared data</h2>",
        figure_html(r / "prepare_preview.png", "prepared slices preview"),
        "</body></html>",
    ]
    return "\n".join(parts)


def write_report(paths: ReportPaths, *, tracking_uri: str, stand_in: bool) -> Path:
    """Build the page and write it atomically to ``paths.out``; returns the path."""
    return write_text(paths.out, build_report(paths, tracking_uri=tracking_uri, stand_in=stand_in))
