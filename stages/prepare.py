"""DVC stage ``prepare``: raw volumes → per-split axial slices, manifest, report, preview.

Reads ``params.yaml`` (``seed``, ``data``, ``prepare``) and ``data.raw_dir``; writes
``data.prepared_dir/{train,val,test}/{slices.npy,masks.npy,manifest.csv}``,
``reports/prepare_report.json`` and ``reports/prepare_preview.png``. Bad input files are
listed in the report; the stage fails (exit 1, one line) only when nothing usable is left
or ``prepare.strict`` is set.
"""

from __future__ import annotations

from data_prep.prepare import prepare_dataset
from pipeline.core.config import load_params
from pipeline.core.stage import main
from pipeline.core.tracking import StageRun


def run() -> None:
    """Prepare the slices and log counts, report and preview."""
    params = load_params()
    with StageRun("prepare", params.model_dump(mode="json")) as tracking:
        result = prepare_dataset(
            params.data.raw_dir,
            params.data.prepared_dir,
            params.prepare,
            fmt=params.data.format,
            seed=params.seed,
            report_dir="reports",
        )
        tracking.log_metrics(result.metrics())
        tracking.log_image(result.preview, "prepare/prepare_preview.png")
        tracking.log_dict(result.report, "prepare/prepare_report.json")


if __name__ == "__main__":
    main(run)
