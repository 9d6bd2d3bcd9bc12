"""DVC stage ``augment_study``: does adding synthetic slices help a real downstream task?

Usage::

    python -m stages.augment_study
    python -m stages.augment_study --synthetic DIR     # a `braingen generate` folder
    python -m stages.augment_study --model models/pixelcnn.pt

Reads ``params.yaml`` (study, seed, device, data.prepared_dir), ``data/prepared`` and the
generator (``models/<study.generator>.pt``, which makes a synthetic pool matched to the
training slices in ``data/study_pool`` unless a folder is given); writes
``reports/augmentation.{json,md,png}`` and ``reports/augmentation_pairs.png``
(:mod:`pipeline.evaluation.augmentation`).
"""

from __future__ import annotations

import argparse

from pipeline.core.config import load_params
from pipeline.core.device import resolve_device
from pipeline.core.identity import stage_identity
from pipeline.core.stage import main
from pipeline.core.tracking import StageRun
from pipeline.evaluation.augmentation import StudyPaths, augment_study


def run(argv: list[str] | None = None) -> None:
    """Run the study and write its reports."""
    parser = argparse.ArgumentParser(prog="augment_study")
    parser.add_argument("--synthetic", default=None, help="a braingen generate folder")
    parser.add_argument("--model", default=None, help="the generator of the synthetic pool")
    args = parser.parse_args(argv)
    params = load_params()
    stand_in = params.data.raw_dir == params.demo.out_dir
    with StageRun("augment_study", stage_identity(params, "augment_study")) as tracking:
        tracking.log_datasets(params.data.prepared_dir, ("train", "test"))
        augment_study(
            params,
            device=resolve_device(params.device),
            run=tracking,
            paths=StudyPaths.standard(),
            synthetic_dir=args.synthetic,
            model=args.model,
            stand_in=stand_in,
        )


if __name__ == "__main__":
    main(run)
