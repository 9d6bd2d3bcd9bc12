"""DVC stage ``report``: the self-contained page ``reports/index.html``.

Usage::

    python -m stages.report

Reads every stage's report and images under ``reports/``, the prepared test split (for a
grid of real slices by z) and the MLflow store (training curves and run ids; see
:func:`pipeline.core.tracking.tracking_uri`); writes ``reports/index.html`` with every image
embedded. Missing inputs leave their section saying "not produced".
"""

from __future__ import annotations

import logging

from pipeline.core.config import load_params
from pipeline.core.stage import main
from pipeline.core.tracking import tracking_uri
from pipeline.evaluation.report import ReportPaths, write_report

logger = logging.getLogger("braingen")


def run() -> None:
    """Write the report page."""
    params = load_params()
    paths = ReportPaths.standard(params.data.prepared_dir)
    stand_in = params.data.raw_dir == params.demo.out_dir
    out = write_report(paths, tracking_uri=tracking_uri(), stand_in=stand_in)
    logger.info("report written to %s", out)


if __name__ == "__main__":
    main(run)
