"""DVC stage ``make_demo``: write the synthetic stand-in cohort (MNI152-derived, not OASIS).

Reads ``params.yaml`` (``seed``, ``demo``); writes ``demo.out_dir`` in the OASIS-1 layout.
"""

from __future__ import annotations

from data_prep.demo_cohort import build_demo_cohort
from pipeline.core.config import load_params
from pipeline.core.stage import main


def run() -> None:
    """Build the cohort from the parameters."""
    params = load_params()
    build_demo_cohort(params.demo.out_dir, params.demo, seed=params.seed)


if __name__ == "__main__":
    main(run)
