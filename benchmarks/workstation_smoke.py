"""A short run of every stage on a profile's settings, timed, for a first look at a GPU machine.

Runs the DVC stages in order (``make_demo`` … ``generate``) in a scratch folder, on the
``workstation`` profile (128×128 slices, the large networks, CUDA with bf16 autocast) with every
``train.steps`` cut to ``--steps``, so a user sees in minutes whether the workstation settings
run on their card, how fast each stage goes and how much GPU memory it takes, before starting
the full ``dvc exp run -S profile=workstation``. The figures after a few hundred steps say
nothing about the full run's quality.

Per stage: wall seconds and, with ``nvidia-ml-py`` and a GPU, the peak GPU memory in use and
the mean GPU utilisation (sampled every 0.2 s). After the stages: the first stages'
reconstruction figures and the generators' test-split figures from ``reports/``.

Usage::

    python -m benchmarks.workstation_smoke [--steps 300] [--workdir DIR] [--out DIR]
                                           [--profile workstation] [--device cuda]
                                           [--stages make_demo,prepare,...]

Writes ``<out>/workstation_smoke.{json,md}`` (rewritten after every stage, so a killed run
keeps what it measured), ``<out>/workstation_smoke.log`` (every stage's output) and copies of
the sample and reconstruction grids.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.config import deep_merge

ROOT = Path(__file__).resolve().parents[1]
#: The stages of ``dvc.yaml``, in the order ``dvc repro`` runs them.
STAGES = (
    "make_demo",
    "prepare",
    "train_autoencoder",
    "encode_latents",
    "train_generators",
    "train_zprobe",
    "train_probes",
    "evaluate",
    "augment_study",
    "report",
    "generate",
)
#: Grids copied to ``--out`` for a look (from the scratch folder's ``reports/``).
GRIDS = ("ae_vaegan_recon.png", "ldm_samples.png", "labelled_pixelcnn.png")


def shorten(tree: Any, steps: int) -> Any:
    """``tree`` with every training block cut to at most ``steps`` steps.

    A training block is a mapping with a ``steps`` key (``TrainConfig``, the judges'
    ``c2st``); its ``warmup_steps`` is scaled down with it, and its ``eval_every``,
    ``ckpt_every`` and ``curve_every`` become at most ``steps`` and at least a quarter of it
    (scaled, an evaluation every 10 steps would time the evaluations, not the training). The
    discriminator's ``start_step`` moves to at most half of ``steps``.

    Args:
        tree: a parameter mapping (nested dicts and lists).
        steps: the most steps any block trains.
    """
    if isinstance(tree, list):
        return [shorten(item, steps) for item in tree]
    if not isinstance(tree, dict):
        return tree
    out = {key: shorten(value, steps) for key, value in tree.items()}
    if isinstance(out.get("steps"), int) and out["steps"] > steps:
        scale = steps / out["steps"]
        out["steps"] = steps
        if isinstance(out.get("warmup_steps"), int):
            out["warmup_steps"] = max(1, round(out["warmup_steps"] * scale))
        for key in ("eval_every", "ckpt_every", "curve_every"):
            if isinstance(out.get(key), int):
                out[key] = max(1, steps // 4, min(steps, round(out[key] * scale)))
    if isinstance(out.get("start_step"), int):  # the adversarial term starts within the run
        out["start_step"] = min(out["start_step"], steps // 2)
    return out


def smoke_params(raw: dict[str, Any], profile: str, steps: int, device: str) -> dict[str, Any]:
    """``params.yaml`` for the scratch folder: ``profile``'s values with the steps cut.

    Args:
        raw: the project's ``params.yaml`` as read.
        profile: the profile to run (its overrides are merged into the base values).
        steps: see :func:`shorten`.
        device: the ``device`` key (``auto``, ``cpu`` or ``cuda``).
    """
    profiles = raw.get("profiles", {})
    if profile not in profiles:
        raise SystemExit(f"params.yaml has no profile {profile!r} (has {', '.join(profiles)})")
    base = {k: v for k, v in raw.items() if k not in ("profile", "profiles")}
    merged = shorten(deep_merge(base, profiles[profile]), steps)
    merged["device"] = device
    return {**merged, "profile": profile, "profiles": {**profiles, profile: merged}}


class GpuSampler:
    """Peak GPU memory in use (MiB) and mean utilisation (%) while open; nothing without NVML.

    Read from the driver (NVML) because each stage runs in a child process:
    :class:`benchmarks.measure.PeakMemory` reads torch's counters of this process only.
    """

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s = period_s
        self.peak_mib = 0.0
        self.util: list[float] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no GPU, no driver or no nvidia-ml-py: figures stay empty
            self._nvml = None

    def __enter__(self) -> GpuSampler:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._nvml is not None:
            self._thread.join()
            self._nvml.nvmlShutdown()  # pairs with this sampler's nvmlInit

    def _sample(self) -> None:
        nvml = self._nvml
        while not self._stop.wait(self.period_s):
            memory = nvml.nvmlDeviceGetMemoryInfo(self._handle)
            self.peak_mib = max(self.peak_mib, memory.used / 2**20)
            self.util.append(float(nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def figures(self) -> dict[str, float | None]:
        """``gpu_peak_mib`` and ``gpu_util_mean`` (None without NVML)."""
        if self._nvml is None:
            return {"gpu_peak_mib": None, "gpu_util_mean": None}
        mean = sum(self.util) / len(self.util) if self.util else 0.0
        return {"gpu_peak_mib": round(self.peak_mib), "gpu_util_mean": round(mean, 1)}


def run_stage(stage: str, workdir: Path, log: Path) -> dict[str, Any]:
    """Run ``python -m stages.<stage>`` in ``workdir``; its wall seconds, GPU figures and rc."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    with GpuSampler() as gpu, log.open("a") as fh:
        fh.write(f"\n===== {stage} =====\n")
        fh.flush()
        rc = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}"],
            cwd=workdir,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    return {
        "stage": stage,
        "rc": rc,
        "seconds": round(time.perf_counter() - start, 1),
        **gpu.figures(),
    }


def quality(reports: Path) -> dict[str, Any]:
    """The headline figures the stages wrote (missing files are skipped)."""

    def read(name: str) -> dict[str, Any]:
        path = reports / name
        return json.loads(path.read_text()) if path.is_file() else {}

    out: dict[str, Any] = {}
    for kind in ("vqvae", "vaegan"):
        ae = read(f"ae_{kind}.json")
        out[f"ae_{kind}"] = {k: round(ae[k], 4) for k in ("ssim", "psnr", "lpips") if k in ae}
    metrics = read("metrics.json")
    for name in ("real", "ldm", "pixelcnn"):
        section = metrics.get(name, {})
        figures = {
            k: round(section[k], 4)
            for k in ("fd_alex", "precision", "recall", "zprobe_mae")
            if isinstance(section.get(k), int | float)
        }
        for judge in ("raw", "blur"):
            auc = section.get("c2st", {}).get(judge, {}).get("auc")
            if auc is not None:
                figures[f"c2st_{judge}"] = round(auc, 4)
        if figures:
            out[name] = figures
    return out


def markdown(summary: dict[str, Any]) -> str:
    """The stage table and the quality figures as Markdown."""
    lines = [
        f"# Workstation smoke run: profile {summary['profile']}, {summary['steps']} steps per "
        "training block",
        "",
        f"Device: {summary['device_name']}. Stand-in cohort; figures after so few steps say "
        "nothing about the full run's quality.",
        "",
        "| stage | rc | seconds | GPU peak MiB | GPU util % |",
        "|---|---|---|---|---|",
    ]
    for row in summary["stages"]:
        lines.append(
            f"| {row['stage']} | {row['rc']} | {row['seconds']} | {row['gpu_peak_mib']} "
            f"| {row['gpu_util_mean']} |"
        )
    lines += ["", "```json", json.dumps(summary["quality"], indent=1), "```", ""]
    return "\n".join(lines)


def device_name() -> str:
    """The GPU's name, or ``cpu``."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="most steps of any training block")
    parser.add_argument("--workdir", type=Path, default=Path("workstation_smoke.tmp"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--profile", default="workstation")
    parser.add_argument("--device", default="cuda", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = smoke_params(raw, args.profile, args.steps, args.device)
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "workstation_smoke.log"
    log.write_text("")
    summary: dict[str, Any] = {
        "profile": args.profile,
        "steps": args.steps,
        "device_name": device_name(),
        "stages": [],
        "quality": {},
    }
    for stage in stages:
        row = run_stage(stage, args.workdir, log)
        summary["stages"].append(row)
        summary["quality"] = quality(args.workdir / "reports")
        (args.out / "workstation_smoke.json").write_text(json.dumps(summary, indent=1))
        (args.out / "workstation_smoke.md").write_text(markdown(summary))
        print(
            f"{stage:18s} rc {row['rc']}  {row['seconds']:7.1f} s  GPU peak "
            f"{row['gpu_peak_mib']} MiB, util {row['gpu_util_mean']} %",
            flush=True,
        )
        if row["rc"] != 0:
            print(f"{stage} failed; its output is in {log}", flush=True)
            break
    for grid in GRIDS:
        if (args.workdir / "reports" / grid).is_file():
            shutil.copy(args.workdir / "reports" / grid, args.out / f"smoke_{grid}")
    print(markdown(summary))
    return 0 if all(row["rc"] == 0 for row in summary["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
