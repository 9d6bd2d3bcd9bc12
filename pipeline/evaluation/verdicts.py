"""Pass/short verdicts of each generator against its real reference (the report's first table).

A figure alone does not tell a reader whether a model is good enough; a figure beside its real
reference and a bar does. :data:`BARS` holds the bars of issues 15 ("realism and novelty")
and 17 ("labelled slices") per generator, each relative to a reference that ``evaluate``
measured on real slices:

- **realism, anatomy**: classifier two-sample AUC with both sides blurred by
  ``evaluate.c2st.blur_sigma`` px (0.5 = a strong judge cannot tell; the autoencoder's own
  reconstructions are the ceiling a second stage can reach);
- **realism, texture**: the same judge on the raw slices, and beside it the **noise level**
  of the slices as ``generate`` writes them (:func:`pipeline.inference.texture.noise_sigma`)
  against the real test slices': the judge is weak against added noise (stand-in cohort, the
  demo LDM finished with 2.5 x the real noise level scores 0.62 against 0.88 at the calibrated
  level), so a texture verdict is earned only at a noise level near the real one;
- **fd_alex** against the real test split's two halves (``real.split_halves``, the reference
  the issue set) and against as many real slices of other subjects as a generator is scored
  with (``real.other_subjects``): fd_alex is biased upward in small sets, so the half-size
  reference is lenient;
- **precision / recall** (improved k-NN manifolds, Kynkäänniemi et al. 2019), shown beside
  the same-size real figure; the same-size fd_alex, precision and recall also beside the
  autoencoder's reconstructions of those real slices (``{ae}.other_subjects``: what a second
  stage that reproduced its training slices exactly would score);
- **novelty**: the fraction of copy-like samples (nearer a training slice than the real held-out
  slices' ``evaluate.novelty.quantile``);
- **z fidelity**: the z-probe's MAE on samples at their requested level against its MAE on real
  test slices (the floor);
- **labels** (issue 17): the covariate probe's age MAE and CDR > 0 AUC on slices generated at
  the test slices' own z and covariates, against the same on the real test slices, and the
  Dice of the tissue segmenter's reading of each generated image against the mask generated
  with it, against the segmenter's Dice on real test slices.

Verdicts are computed from ``reports/metrics.json`` only, so the report, tests and a reader of
the JSON agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

#: Generators that get a verdict table, in report order.
JUDGED = ("ldm", "pixelcnn")

Rule = Literal["max_abs", "min_abs", "max_ratio", "min_ratio"]


@dataclass(frozen=True)
class Bar:
    """One bar: ``figure`` of a generator section compared with a bound.

    Attributes:
        label: the row's name in the report.
        figure: dotted key in the generator's section of ``metrics.json``.
        rule: ``max_abs`` (figure <= bound), ``min_abs`` (figure >= bound), ``max_ratio``
            (figure <= bound x reference) or ``min_ratio`` (figure >= bound x reference).
        bound: the number of the rule.
        reference: dotted key in ``metrics.json`` of the real reference shown beside the
            figure (also the base of the ratios), or None; ``{self}`` stands for the
            generator's own section.
        ceiling: dotted key of a second reference shown beside it (the autoencoder's own
            figure: the best a second stage can do), or None; ``{ae}`` stands for the
            generator's autoencoder section.
        chance: dotted key of what a probe that ignores the image scores on the same slices
            (label bars), or None. When the probe's real-slice figure is not clearly better
            than it (:func:`informative`), the probe reads nothing on real slices and the bar
            cannot be judged, whatever the generator's figure.
        real: dotted key of that real-slice figure (default: ``reference``; the shuffled-
            control bars compare with the shuffled figure but are gated by the real one).
        versus: what ``reference`` is, in the bar's words (``real``, ``shuffled``).
    """

    label: str
    figure: str
    rule: Rule
    bound: float
    reference: str | None = None
    ceiling: str | None = None
    chance: str | None = None
    real: str | None = None
    versus: str = "real"

    def describe(self) -> str:
        """The bar in words, e.g. ``<= 1.5 x real``."""
        if self.rule in ("max_ratio", "min_ratio"):
            return f"{'≤' if self.rule == 'max_ratio' else '≥'} {self.bound:g} × {self.versus}"
        return f"{'≤' if self.rule == 'max_abs' else '≥'} {self.bound:g}"


_C2ST_BLUR = "c2st.blur.auc"
_C2ST_RAW = "c2st.raw.auc"
_NOVELTY = Bar(
    "novelty (copy-like fraction)",
    "novelty.copy_like_fraction",
    "max_abs",
    0.05,
    "real.novelty.copy_like_fraction",
)


def _age(bound: float) -> Bar:
    """The age bar: matched synthetic age MAE at most ``bound`` x the real slices' MAE."""
    return Bar(
        "age from the image (probe MAE, years)",
        "labels.matched.age_mae",
        "max_ratio",
        bound,
        "{self}.labels.real.age_mae",
        chance="{self}.labels.chance.age_mae",
    )


def _same_size(label: str, figure: str, rule: Rule, bound: float) -> Bar:
    """A bar against real slices of other subjects at the generator's set size
    (``real.other_subjects``), with the autoencoder's reconstructions of those slices as its
    ceiling (``{ae}.other_subjects``)."""
    return Bar(
        label,
        figure,
        rule,
        bound,
        f"real.other_subjects.{figure}",
        f"{{ae}}.other_subjects.{figure}",
    )


def _fd_same_size(bound: float) -> Bar:
    """The fd_alex bar at the generator's set size (:func:`_same_size`)."""
    return _same_size(
        "fd_alex, same set size (real: other subjects)", "fd_alex", "max_ratio", bound
    )


_CDR = Bar(
    "CDR > 0 from the image (probe AUC)",
    "labels.matched.cdr_auc",
    "min_ratio",
    0.9,
    "{self}.labels.real.cdr_auc",
    chance="{self}.labels.chance.cdr_auc",
)
#: The shuffled controls must be clearly worse than the matched slices (issue 17): a model
#: that ignores a covariate scores the same on both.
_AGE_OBEYED = Bar(
    "age obeyed (matched vs shuffled control, MAE)",
    "labels.matched.age_mae",
    "max_ratio",
    0.9,
    "{self}.labels.shuffled.age_mae",
    chance="{self}.labels.chance.age_mae",
    real="{self}.labels.real.age_mae",
    versus="shuffled",
)
_CDR_OBEYED = Bar(
    "CDR obeyed (matched vs shuffled control, AUC)",
    "labels.matched.cdr_auc",
    "min_ratio",
    1.1,
    "{self}.labels.shuffled.cdr_auc",
    chance="{self}.labels.chance.cdr_auc",
    real="{self}.labels.real.cdr_auc",
    versus="shuffled",
)
_MASK = Bar(
    "mask agreement (segmenter vs generated mask, Dice)",
    "labels.mask_dice.dice_mean",
    "min_ratio",
    0.9,
    "{self}.labels.real_mask_dice.dice_mean",
)
#: The bars of each judged generator (issues 15 and 17).
BARS: dict[str, tuple[Bar, ...]] = {
    "ldm": (
        Bar(
            "realism, anatomy (C2ST AUC, blurred)",
            _C2ST_BLUR,
            "max_abs",
            0.65,
            "real.c2st.blur.auc",
            "{ae}.c2st.blur.auc",
        ),
        Bar(
            "realism, texture (C2ST AUC, raw)",
            _C2ST_RAW,
            "max_abs",
            0.8,
            "real.c2st.raw.auc",
            "{ae}.c2st.raw.auc",
        ),
        Bar(
            "texture, noise level (σ in the brain)",
            "noise_sigma",
            "max_ratio",
            1.25,
            "real.noise_sigma",
        ),
        Bar("fd_alex", "fd_alex", "max_ratio", 1.5, "real.split_halves.fd_alex"),
        _fd_same_size(1.5),
        _same_size("precision", "precision", "min_abs", 0.8),
        _same_size("recall", "recall", "min_abs", 0.8),
        _NOVELTY,
        Bar("z fidelity (z-probe MAE, slices)", "zprobe_mae", "max_ratio", 1.5, "real.zprobe_mae"),
        _age(1.5),
        _AGE_OBEYED,
        _CDR,
        _CDR_OBEYED,
        _MASK,
    ),
    "pixelcnn": (
        Bar(
            "realism, anatomy (C2ST AUC, blurred)",
            _C2ST_BLUR,
            "max_abs",
            0.8,
            "real.c2st.blur.auc",
            "{ae}.c2st.blur.auc",
        ),
        Bar("fd_alex", "fd_alex", "max_ratio", 2.0, "real.split_halves.fd_alex"),
        _fd_same_size(2.0),
        _NOVELTY,
        Bar("z fidelity (z-probe MAE, slices)", "zprobe_mae", "max_ratio", 2.0, "real.zprobe_mae"),
        _age(2.0),
        _AGE_OBEYED,
        _CDR,
        _CDR_OBEYED,
        _MASK,
    ),
}
#: The autoencoder whose latents (or codes) each generator models.
AUTOENCODER = {"ldm": "ae_vaegan", "pixelcnn": "ae_vqvae"}


@dataclass(frozen=True)
class Verdict:
    """One row of a verdict table.

    Attributes:
        label: what is judged.
        value: the generator's figure (None: not measured).
        reference: the real reference (None: not measured or none).
        ceiling: the autoencoder's own figure (None: not applicable or not measured).
        bar: the bar in words.
        passed: True (pass), False (short) or None (cannot judge: see ``note``).
        note: why it cannot be judged (None: not measured, or judged).
        ceiling_passed: whether the ceiling itself meets the bar (None: no ceiling). A bar
            that the autoencoder's own reconstructions miss is out of any second stage's
            reach on that first stage.
    """

    label: str
    value: float | None
    reference: float | None
    ceiling: float | None
    bar: str
    passed: bool | None
    note: str | None = None
    ceiling_passed: bool | None = None


def lookup(metrics: Mapping[str, Any], dotted: str | None) -> float | None:
    """The number at a dotted key of ``metrics.json``, or None where absent or not a number."""
    if dotted is None:
        return None
    node: Any = metrics
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, int | float):
        return None
    return float(node)


def limit(bar: Bar, reference: float | None) -> float | None:
    """The figure at which ``bar`` flips between pass and short: its bound, times
    ``reference`` for a ratio rule (None when a ratio rule has no reference)."""
    if bar.rule in ("max_abs", "min_abs"):
        return bar.bound
    return None if reference is None else bar.bound * reference


def judge(bar: Bar, value: float | None, reference: float | None) -> bool | None:
    """Whether ``value`` meets ``bar`` (None when it or a needed reference is missing)."""
    line = limit(bar, reference)
    if value is None or line is None:
        return None
    return value <= line if bar.rule in ("max_abs", "max_ratio") else value >= line


def threshold(bar: Bar, metrics: Mapping[str, Any], model: str) -> float | None:
    """:func:`limit` with the reference read from ``metrics`` (``reports/metrics.json``;
    ``{self}`` in the reference's key stands for ``model``'s section)."""
    return limit(bar, lookup(metrics, bar.reference.format(self=model) if bar.reference else None))


#: How much better than chance the real reference of a label bar must be for the probe to
#: count as reading something: an MAE at most this fraction of the chance MAE; an AUC at
#: least this fraction of the way from chance (0.5) to 1.
INFORMATIVE_MAE_RATIO = 0.9
INFORMATIVE_AUC_GAIN = 0.2


def informative(bar: Bar, real: float | None, chance: float | None) -> bool:
    """Whether the probe reads the label off real slices clearly better than chance (True
    when there is no chance figure to compare with)."""
    if real is None or chance is None:
        return True
    if bar.rule in ("max_ratio", "max_abs"):
        return real <= INFORMATIVE_MAE_RATIO * chance
    return real >= chance + INFORMATIVE_AUC_GAIN * (1 - chance)


def model_verdicts(metrics: Mapping[str, Any], model: str) -> list[Verdict]:
    """The verdict rows of one generator.

    Args:
        metrics: the content of ``reports/metrics.json``.
        model: a key of :data:`BARS`.

    Returns:
        One :class:`Verdict` per bar (empty when the model has no section).
    """
    section = metrics.get(model)
    if not isinstance(section, Mapping):
        return []
    rows = []
    for bar in BARS[model]:
        value = lookup(section, bar.figure)
        reference = lookup(metrics, bar.reference.format(self=model) if bar.reference else None)
        ceiling_key = bar.ceiling.format(ae=AUTOENCODER[model]) if bar.ceiling else None
        chance = lookup(metrics, bar.chance.format(self=model) if bar.chance else None)
        real = lookup(metrics, bar.real.format(self=model)) if bar.real else reference
        ceiling = lookup(metrics, ceiling_key)
        readable = informative(bar, real, chance)
        rows.append(
            Verdict(
                label=bar.label,
                value=value,
                reference=reference,
                ceiling=ceiling,
                bar=bar.describe(),
                passed=judge(bar, value, reference) if readable else None,
                note=None
                if readable
                else f"probe at chance on real slices ({real:.3g} vs chance {chance:.3g})",
                ceiling_passed=judge(bar, ceiling, reference),
            )
        )
    return rows
