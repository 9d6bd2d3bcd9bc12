"""The ``braingen`` command: the pipeline's stages, synthetic slices for augmentation,
SDEdit and inpainting.

Examples::

    braingen make-demo && braingen prepare      # what `dvc repro` runs first
    braingen train-autoencoder vqvae
    braingen generate --model ldm --z 0:31 --per-z 8 --seed 1 --out synthetic/
    braingen generate --checkpoint models/ldm.pt --z 0.25,0.5 --format both --volume
    braingen generate --model models:/braingen-ldm/latest --z 0:31 --out synthetic/  # registry
    braingen sdedit my_slice.png --z 17 --strength 0.4 --out edited.png
    braingen inpaint my_slice.nii.gz --mask lesion.png --z 0.55 --out filled.png

A user error (unknown model, missing checkpoint, z out of range, existing output, bad
file) prints one ``error: ...`` line on stderr and exits with code 1.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from pipeline.core.config import (
    DEVICES,
    GENERATORS,
    KINDS,
    OUTPUT_FORMATS,
    SAMPLERS,
    NoveltyConfig,
)
from pipeline.core.errors import InputError
from pipeline.core.stage import user_error_message

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="z-conditioned synthetic brain MRI slices (braingen).",
)

#: What ``sdedit`` and ``inpaint`` read (:func:`data_prep.images.read_slice`).
SLICE_HELP = (
    "Your slice: a PNG (8/16-bit, grey or colour) or a single-slice NIfTI/Analyze file "
    "(.nii, .nii.gz, .hdr/.img; any letter case), oriented by its affine."
)

#: ``--model`` names and the model files they stand for (relative to the working directory).
MODELS = {name: Path("models") / f"{name}.pt" for name in GENERATORS}

T = TypeVar("T")

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="ldm or pixelcnn (models/<name>.pt), or a registered model "
        "(models:/braingen-ldm/latest, models:/braingen-pixelcnn/3); default ldm.",
    ),
]
CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", help="A generator model file (instead of --model).")
]
StepsOpt = Annotated[
    int | None, typer.Option("--steps", help="Sampling steps (ldm; default from the model).")
]
SamplerOpt = Annotated[
    str | None,
    typer.Option("--sampler", help="ddim or pndm (ldm; default from the model)."),
]
GuidanceOpt = Annotated[
    float | None,
    typer.Option(
        "--guidance",
        help="Classifier-free guidance weight (ldm: z and covariates; pixelcnn: "
        "covariates; default from model).",
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (>= 0).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]


def _run(fn: Callable[[], T]) -> T:
    """Call ``fn``; a user error becomes one stderr line and exit code 1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return fn()
    except Exception as err:
        message = user_error_message(err)
        if message is None:
            raise
        typer.echo(message, err=True)
        raise typer.Exit(1) from None


def _choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    if value not in allowed:
        raise InputError(f"{option} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def resolve_model(model: str | None, checkpoint: Path | None) -> Path:
    """The model file for ``--model`` / ``--checkpoint`` (default ``models/ldm.pt``).

    A ``models:/...`` name is downloaded from the MLflow registry (with the first stage it
    needs) and checked (:func:`pipeline.core.registry.fetch_model`).

    Raises:
        ValueError: both given, or an unknown model name.
        RegistryError: a registered model that is missing, altered or from another release.
    """
    if checkpoint is not None:
        if model is not None:
            raise InputError("give --model or --checkpoint, not both")
        return checkpoint
    if model is not None and model.startswith("models:/"):
        from pipeline.core.registry import fetch_model

        return fetch_model(model)
    name = model or "ldm"
    if name not in MODELS:
        raise InputError(
            f"unknown model {name!r}; choose {' or '.join(MODELS)}, models:/<registered name>/"
            f"<version|latest> or --checkpoint"
        )
    return MODELS[name]


AgeOpt = Annotated[
    str | None,
    typer.Option(
        "--age",
        help="Age in years, within the model's training range. generate: a value (70), a "
        "list (60,80), a range (60:90, drawn uniformly per slice) or 'match' (drawn from the "
        "training subjects that agree with the other values); sdedit/inpaint: a value.",
    ),
]
SexOpt = Annotated[str | None, typer.Option("--sex", help="F or M (generate: also F,M).")]
CdrOpt = Annotated[
    str | None,
    typer.Option("--cdr", help="Clinical dementia rating 0, 0.5, 1 or 2 (generate: also a list)."),
]
CovariateOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--covariate",
        help="Another covariate the model conditions on, NAME=VALUE (mmse=28; generate: also "
        "etiv=1400:1600); repeatable.",
    ),
]


@app.command()
def generate(
    z: Annotated[
        str,
        typer.Option(
            "--z",
            help="Slice indices (17), inclusive ranges (0:31) or fractions (0.25), "
            "comma-separated; 'all' = every level of the model.",
        ),
    ] = "all",
    per_z: Annotated[int, typer.Option("--per-z", help="Slices per z level.")] = 4,
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("synthetic"),
    fmt: Annotated[str, typer.Option("--format", help="png (16-bit), nifti or both.")] = "png",
    volume: Annotated[
        bool, typer.Option("--volume", help="Also stack the levels of each sample into a NIfTI.")
    ] = False,
    prefix: Annotated[
        str | None, typer.Option("--prefix", help="File-name prefix (default: model kind).")
    ] = None,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    seed: SeedOpt = 0,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    sampler: SamplerOpt = None,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    novelty: Annotated[
        bool,
        typer.Option(
            "--novelty/--no-novelty",
            help="Re-sample slices that are near copies of a training slice (pixel "
            "correlation, SSIM or AlexNet features above the "
            f"{NoveltyConfig().quantile:g} quantile of held-out slices; at most "
            f"{NoveltyConfig().max_attempts} re-samples) and record each slice's similarity "
            "in the manifest.",
        ),
    ] = False,
    prepared_dir: Annotated[
        Path,
        typer.Option(
            "--prepared-dir",
            help="prepare's output (train = copies searched, val or test = reference); "
            "for --novelty.",
        ),
    ] = Path("data/prepared"),
    texture: Annotated[
        bool,
        typer.Option(
            "--texture/--no-texture",
            help="Decode and finish slices like real ones: clear the background haze the first "
            "stage leaves and draw the texture of what it misses (calibrated on the training "
            "slices; recorded as background_floor and texture_residual_std in the manifest), "
            "after decoding an LDM's latent as a posterior sample if its file says so "
            "(posterior_std); --no-texture writes the decoder's output for the sampled latent.",
        ),
    ] = True,
    age: AgeOpt = None,
    sex: SexOpt = None,
    cdr: CdrOpt = None,
    covariate: CovariateOpt = None,
    spec: Annotated[
        Path | None,
        typer.Option(
            "--spec",
            help="CSV or YAML spec: one row per request with columns z, count and covariates "
            "(value, list or range); replaces --z/--per-z/covariate options.",
        ),
    ] = None,
    masks: Annotated[
        bool,
        typer.Option(
            "--masks/--no-masks",
            help="Also write each slice's tissue labels (<name>_mask: 0 background, 1 CSF, "
            "2 GM, 3 WM; PNG grey levels 0/85/170/255), decoded with the image.",
        ),
    ] = False,
    validate_only: Annotated[
        bool,
        typer.Option("--validate-only", help="Check the request against the model; write nothing."),
    ] = False,
) -> None:
    """Generate labelled slices: one file per slice (and mask) plus manifest.csv.

    Lists of different covariates are crossed with each other and with the z levels (every
    combination gets --per-z slices); a range is drawn uniformly, once per slice. Covariates
    left out are unconditioned (the model's learned "unknown").
    """
    from pipeline.inference.generate import NoveltySettings
    from pipeline.inference.generate import generate as run_generate

    def body() -> None:
        result = run_generate(
            resolve_model(model, checkpoint),
            z,
            per_z=per_z,
            seed=seed,
            out_dir=out,
            fmt=_choice(fmt, OUTPUT_FORMATS, "--format"),  # type: ignore[arg-type]
            steps=steps,
            guidance=guidance,
            sampler=None if sampler is None else _choice(sampler, SAMPLERS, "--sampler"),  # type: ignore[arg-type]
            volume=volume,
            overwrite=overwrite,
            device=_choice(device, DEVICES, "--device"),
            prefix=prefix,
            progress=sys.stderr.isatty(),
            novelty=NoveltySettings(prepared_dir) if novelty else None,
            texture=texture,
            covariates=_covariate_options(age, sex, cdr, covariate or []),
            spec=spec,
            masks=masks,
            validate_only=validate_only,
        )
        if validate_only:
            typer.echo(f"request valid: {result.slices} slices; nothing written")
            return
        typer.echo(
            f"wrote {result.slices} slices ({len(result.files)} files) to {out} in "
            f"{result.seconds:.1f} s; manifest: {result.manifest}"
        )

    _run(body)


def _covariate_options(
    age: str | None, sex: str | None, cdr: str | None, others: list[str]
) -> dict[str, str]:
    """The covariate options given, name → text (``--covariate NAME=VALUE`` split)."""
    options = {k: v for k, v in {"age": age, "sex": sex, "cdr": cdr}.items() if v is not None}
    for item in others:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--covariate {item!r}: expected NAME=VALUE, e.g. mmse=28")
        options[name.strip().lower()] = value
    return options


@app.command()
def sdedit(
    image: Annotated[Path, typer.Argument(help=SLICE_HELP)],
    z: Annotated[str, typer.Option("--z", help="Target slice index (17) or fraction (0.55).")],
    out: Annotated[Path, typer.Option("--out", help="Output .png (16-bit).")],
    strength: Annotated[
        float, typer.Option("--strength", help="0 keeps the input, 1 ignores it.")
    ] = 0.5,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    seed: SeedOpt = 0,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    age: AgeOpt = None,
    sex: SexOpt = None,
    cdr: CdrOpt = None,
    covariate: CovariateOpt = None,
) -> None:
    """Re-imagine your slice at position z with the latent diffusion model (SDEdit)."""
    from pipeline.inference.edit import sdedit_file

    def body() -> None:
        path = sdedit_file(
            resolve_model(model, checkpoint),
            image,
            out,
            z,
            strength=strength,
            steps=steps,
            guidance=guidance,
            seed=seed,
            device=_choice(device, DEVICES, "--device"),
            overwrite=overwrite,
            covariates=_covariate_options(age, sex, cdr, covariate or []),
        )
        typer.echo(f"wrote {path}")

    _run(body)


@app.command()
def inpaint(
    image: Annotated[Path, typer.Argument(help=SLICE_HELP)],
    mask: Annotated[
        Path, typer.Option("--mask", help="Same size as the image; non-zero = regenerate.")
    ],
    z: Annotated[str, typer.Option("--z", help="Slice index (17) or fraction (0.55).")],
    out: Annotated[Path, typer.Option("--out", help="Output .png (16-bit).")],
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
    seed: SeedOpt = 0,
    steps: StepsOpt = None,
    guidance: GuidanceOpt = None,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    age: AgeOpt = None,
    sex: SexOpt = None,
    cdr: CdrOpt = None,
    covariate: CovariateOpt = None,
) -> None:
    """Regenerate the masked region of your slice, keeping the rest (latent diffusion)."""
    from pipeline.inference.edit import inpaint_file

    def body() -> None:
        path = inpaint_file(
            resolve_model(model, checkpoint),
            image,
            mask,
            out,
            z,
            steps=steps,
            guidance=guidance,
            seed=seed,
            device=_choice(device, DEVICES, "--device"),
            overwrite=overwrite,
            covariates=_covariate_options(age, sex, cdr, covariate or []),
        )
        typer.echo(f"wrote {path}")

    _run(body)


#: Pipeline stages the CLI exposes: command name → (module under ``stages/``, help).
#: Each runs the same code as its DVC stage (params from ./params.yaml); ``dvc repro`` runs
#: them in order and skips what is up to date.
STAGES = {
    "make-demo": ("make_demo", "Synthesise the demo stand-in cohort (OASIS-1 layout)."),
    "prepare": ("prepare", "Volumes or PNG release -> axial slices with z, split by subject."),
    "encode-latents": ("encode_latents", "Encode the slices with the trained autoencoders."),
    "train-generators": (
        "train_generators",
        "Train the LDM and the PixelCNN prior, side by side where the machine allows.",
    ),
    "train-prior": ("train_prior", "Train the z-conditioned PixelCNN prior over VQ codes."),
    "train-ldm": ("train_ldm", "Train the z-conditioned latent diffusion UNet."),
    "train-zprobe": ("train_zprobe", "Train the z-index probe (judge of z-conditioning)."),
    "train-probes": (
        "train_probes",
        "Train the label probes (judges of covariates and tissue masks).",
    ),
    "evaluate": ("evaluate", "Test-split metrics of every model -> reports/metrics.json."),
    "report": ("report", "Write reports/index.html."),
}


@app.command("augment-study")
def augment_study(
    synthetic: Annotated[
        Path | None,
        typer.Option(
            "--synthetic",
            help="A `braingen generate` folder to draw synthetic slices from (its manifest "
            "needs masks for segmentation, ages for age regression); default: generate a "
            "pool matched to the training slices with the study's generator.",
        ),
    ] = None,
    model: ModelOpt = None,
    checkpoint: CheckpointOpt = None,
) -> None:
    """Measure whether synthetic slices help a real task (reports/augmentation.*)."""
    args = [] if synthetic is None else ["--synthetic", str(synthetic)]
    if model is not None or checkpoint is not None:
        args += ["--model", str(_run(lambda: resolve_model(model, checkpoint)))]
    _run_stage("augment_study", args)


def _run_stage(module: str, args: list[str]) -> None:
    """Run ``python -m stages.<module> <args>`` (what ``dvc repro`` runs) and exit with its code.

    The stage runs in a child process of the same interpreter, so the library never imports
    ``stages`` and a stage behaves exactly as under DVC (its own error lines and exit code).
    """
    code = subprocess.call([sys.executable, "-m", f"stages.{module}", *args])
    if code:
        raise typer.Exit(code)


def _stage_command(module: str) -> Callable[[], None]:
    def command() -> None:
        _run_stage(module, [])

    return command


for _name, (_module, _help) in STAGES.items():
    app.command(_name, help=_help)(_stage_command(_module))


@app.command("train-autoencoder")
def train_autoencoder(
    kind: Annotated[
        str | None, typer.Argument(help="vqvae or vaegan (default: every kind, side by side).")
    ] = None,
) -> None:
    """Train the z-conditioned first stage: the VQ-VAE and/or the VAE-GAN."""
    _run(lambda: _choice(kind, KINDS, "kind") if kind else None)
    _run_stage("train_autoencoder", [kind] if kind else [])


if __name__ == "__main__":
    app()
