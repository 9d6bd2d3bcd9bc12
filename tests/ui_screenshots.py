"""Screenshots of the MLflow UI over a braingen store, for reviewing the dashboard (issue 19).

Usage::

    .venv/bin/python -m tests.ui_screenshots --store . --out screenshots/
    .venv/bin/python -m tests.ui_screenshots --store /tmp/demo --out /tmp/shots --run ldm \\
        --key samples/ldm

``--store`` is a folder holding ``mlflow.db`` and ``mlartifacts/`` (a project after ``make
demo``). The script copies ``mlflow.db`` to a scratch folder (so the server can never alter
the store), serves it with ``mlflow server`` on 127.0.0.1 (artifacts: ``<store>/mlartifacts``;
runs keep the absolute artifact paths recorded when they were logged), and drives headless
Chromium (``/usr/bin/chromium`` through Playwright's Python package; no ``playwright
install``) with a fresh profile. It writes:

- ``a_landing_default.png``: ``#/experiments/<id>`` as a first visit sees it;
- ``a_landing_training.png``: the same with ``?workflowType=machine_learning`` (MLflow 3.17's
  UI opens experiments per its GenAI / Model training switch, not per the experiment's
  ``mlflow.experimentKind`` tag: the URL parameter selects the training view);
- ``b_runs_grouped.png``: the runs table with every pipeline parent run expanded into its
  stage runs, with the Models column;
- ``c_registered_models.png`` and ``c_logged_models.png``: the model registry and the
  experiment's logged models;
- ``d_images_step<N>.png``: the ``--run`` run's ``--key`` image history (Model metrics tab,
  the chart enlarged) at its first and last step.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support import mlflow_server

#: Chromium flags: no sandbox (containers), no GPU, and nothing that reaches the network.
CHROMIUM_FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
#: The query parameter that opens MLflow 3.17's UI on its "Model training" view.
TRAINING_VIEW = "workflowType=machine_learning"
#: Viewport: tall enough for an enlarged image chart to show its image.
VIEWPORT = {"width": 1600, "height": 1500}
#: Seconds to wait for one page's content (the UI loads it after the page itself).
PAGE_TIMEOUT_S = 90


@contextmanager
def serve_copy(store: Path, scratch: Path, start_timeout_s: float = 240) -> Iterator[str]:
    """``mlflow server`` on a free 127.0.0.1 port over a copy of ``<store>/mlflow.db`` (the
    store is never written) and ``<store>/mlartifacts``; yields its URL."""
    shutil.copyfile(store / "mlflow.db", scratch / "mlflow.db")
    with mlflow_server(
        scratch, start_timeout_s, database=scratch / "mlflow.db", artifacts=store / "mlartifacts"
    ) as server:
        yield server.url


def image_steps(client: Any, run_id: str, key: str) -> list[int]:
    """The steps of an image-history key (``images/<key, / as ~>+step+<n>+...png``)."""
    stored = re.escape(key.replace("/", "~"))
    names = [Path(a.path).name for a in client.list_artifacts(run_id, "images")]
    return sorted(
        {int(m.group(1)) for n in names if (m := re.match(rf"{stored}\+step\+(\d+)\+", n))}
    )


def _close_assistant(page: Any) -> None:
    """Close the MLflow Assistant side panel when it is open (it hides a third of the page)."""
    close = page.locator("button[aria-label='Close']").filter(visible=True)
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def _wait_text(page: Any, text: str) -> None:
    page.get_by_text(text).first.wait_for(timeout=PAGE_TIMEOUT_S * 1000)


def _expand_parents(page: Any, parent_names: list[str]) -> None:
    """Click the expander of every parent run's row in the runs table."""
    for name in parent_names:
        row = page.locator("[role=row]").filter(has_text=name).first
        row.locator("[col-id*='Run Name'] button").first.click()
        page.wait_for_timeout(1500)


def _drag_slider(page: Any, dialog: Any, *, to_last: bool) -> int:
    """Drag the enlarged image chart's step slider past one end of its track: to the first
    logged step, or the last (``to_last``). Returns the step it then shows.

    (MLflow 3.17 opens the chart at step 0 whatever the logged steps; dragging past an end
    lands exactly on that end's step.)
    """
    thumb = dialog.get_by_role("slider")
    track = thumb.evaluate(
        "e => { let n = e; while (n && n.getBoundingClientRect().width < 300) n = n.parentElement;"
        " const r = n.getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height}; }"
    )
    box = thumb.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    y = track["y"] + track["h"] / 2
    page.mouse.move(track["x"] + track["w"] + 50 if to_last else track["x"] - 50, y, steps=10)
    page.mouse.up()
    page.wait_for_timeout(4000)  # the image of that step loads
    return int(float(dialog.locator("input[type=number]").input_value()))


def take_screenshots(
    url: str, out: Path, *, run_name: str, key: str, chromium: str
) -> dict[str, str]:
    """Drive Chromium over the UI at ``url`` and write the screenshots into ``out``.

    Args:
        url: the MLflow server.
        out: folder for the PNGs (created).
        run_name: the run whose image history is shown (the newest run of that name).
        key: the image-history key (``samples/ldm``).
        chromium: the Chromium executable.

    Returns:
        ``{file name: what it shows}``.
    """
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("braingen")
    if experiment is None:
        raise RuntimeError(f"no experiment 'braingen' in the store served at {url}")
    eid = experiment.experiment_id
    parents = client.search_runs([eid], "tags.pipeline_role = 'parent'")
    runs = client.search_runs(
        [eid], f"attributes.run_name = '{run_name}'", order_by=["attributes.start_time DESC"]
    )
    if not runs:
        raise RuntimeError(f"no run named {run_name!r} in experiment {eid}")
    run_id = runs[0].info.run_id
    steps = image_steps(client, run_id, key)
    if not steps:
        raise RuntimeError(f"run {run_name} ({run_id}) has no image history {key!r}")

    out.mkdir(parents=True, exist_ok=True)
    shown: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            headless=True,
            args=list(CHROMIUM_FLAGS),
            viewport=VIEWPORT,
        )
        page = context.new_page()

        def shot(name: str, what: str) -> None:
            page.screenshot(path=str(out / name))
            shown[name] = what

        page.goto(f"{url}/#/experiments/{eid}")
        page.wait_for_timeout(8000)
        shot("a_landing_default.png", f"#/experiments/{eid}, first visit (fresh profile)")

        page.goto(f"{url}/#/experiments/{eid}?{TRAINING_VIEW}")
        top_level = parents[0].info.run_name if parents else run_name  # a row the table shows
        page.locator("[role=row]").filter(has_text=top_level).first.wait_for(
            timeout=PAGE_TIMEOUT_S * 1000
        )
        _close_assistant(page)
        shot("a_landing_training.png", f"#/experiments/{eid}?{TRAINING_VIEW}")

        _expand_parents(page, [r.info.run_name for r in parents])
        shot("b_runs_grouped.png", f"runs table, {len(parents)} pipeline parent run(s) expanded")

        page.goto(f"{url}/#/models?{TRAINING_VIEW}")
        _wait_text(page, "braingen-")
        page.wait_for_timeout(2000)
        promo = page.get_by_role("dialog")
        if promo.count():
            promo.get_by_role("button", name="Close").first.click()
            promo.wait_for(state="detached", timeout=PAGE_TIMEOUT_S * 1000)
            page.wait_for_timeout(1000)
        shot("c_registered_models.png", "model registry")

        page.goto(f"{url}/#/experiments/{eid}/models?{TRAINING_VIEW}")
        page.wait_for_timeout(8000)
        shot("c_logged_models.png", "the experiment's logged models (Models tab)")

        page.goto(f"{url}/#/experiments/{eid}/runs/{run_id}/model-metrics?{TRAINING_VIEW}")
        _wait_text(page, key)
        page.wait_for_timeout(3000)
        menu = "[data-testid='experiment-view-compare-runs-card-menu']"
        card = page.locator("div").filter(has=page.get_by_text(key, exact=True))
        # the chart's enlarge button comes just before its menu button
        card.filter(has=page.locator(menu)).last.locator(menu).evaluate(
            "m => { const all = [...document.querySelectorAll('button')];"
            " all[all.indexOf(m) - 1].click(); }"
        )
        dialog = page.get_by_role("dialog")
        dialog.wait_for(timeout=PAGE_TIMEOUT_S * 1000)
        for to_last in (False, True):
            reached = _drag_slider(page, dialog, to_last=to_last)
            shot(
                f"d_images_step{reached}.png",
                f"run {run_name}: image history {key} enlarged, slider at step {reached} "
                f"(logged steps {steps})",
            )
        context.close()
    return shown


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments, serve the store and write the screenshots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="folder with mlflow.db")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument("--run", default="ldm", help="run whose images are shown (ldm)")
    parser.add_argument("--key", default="samples/ldm", help="image key (samples/ldm)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    args = parser.parse_args(argv)
    store = args.store.resolve()
    if not (store / "mlflow.db").is_file():
        parser.error(f"--store {store}: no mlflow.db there")
    with tempfile.TemporaryDirectory() as scratch, serve_copy(store, Path(scratch)) as url:
        shown = take_screenshots(
            url, args.out, run_name=args.run, key=args.key, chromium=args.chromium
        )
    for name, what in shown.items():
        print(f"{args.out / name}: {what}")


if __name__ == "__main__":
    main()
