"""DVC stage ``train_probes``: the label probes, the independent judges of covariate and
tissue-mask conditioning (trained on real training slices only).

Usage::

    python -m stages.train_probes
    torchrun --standalone --nproc_per_node N -m stages.train_probes
    BRAINGEN_NPROC=N python -m stages.train_probes   # the same, via torchrun

Reads ``params.yaml`` (probes, prepare.n_slices, seed, device) and ``data/prepared``; writes
``models/covariate_probe.pt`` (age, CDR > 0, sex), ``models/segmenter.pt`` (CSF, GM, WM),
``reports/probes.json`` (their test-split floors beside image-blind baselines) and
``reports/probes.png``.
"""

from __future__ import annotations

from pipeline.core import distributed
from pipeline.core.config import load_params
from pipeline.core.identity import stage_identity
from pipeline.core.registry import model_run
from pipeline.core.stage import main
from pipeline.training.probes import ProbePaths, train_probes


def run() -> None:
    """Train both probes and report their floors."""
    distributed.relaunch_with_torchrun("stages.train_probes", [])
    params = load_params()
    paths = ProbePaths.standard()
    identity = stage_identity(params, "train_probes")
    with (
        distributed.session(params.device) as device,
        model_run(
            "train_probes",
            identity,
            run_name="probes",
            datasets=params.data.prepared_dir,
            model=(paths.covariate_probe, paths.segmenter),
        ) as tracking,
    ):
        train_probes(params, run=tracking, device=device, paths=paths, identity=identity)


if __name__ == "__main__":
    main(run)
