"""The labels a slice carries besides z: subject covariates and tissue classes.

Tissue classes: :data:`TISSUE_CLASSES` (label 0..3 = background, CSF, GM, WM, as FSL FAST
and the OASIS PNG release number them), the labels of ``tissue.npy`` and of generated masks.

Subject covariates a model conditions on: how each is read, bounded and coded.

Covariates are subject labels from the prepared manifest (``age``, ``sex``, ``cdr``,
``mmse``, ``etiv``, ``nwbv``, ``educ``, ``ses``; ``conditioning.covariates`` picks them).
A :class:`Covariate` records how one is read and bounded (continuous: its training range;
categorical: its training categories); the tuple of them, the *schema*, is stored in every
conditioned model file's metadata (:func:`schema_to_meta` / :func:`schema_from_meta`), so
normalisation constants travel with the weights. In tensors and arrays a covariate is
*coded* as one float per slice (:meth:`Covariate.code`): the raw value (continuous) or the
category index (categorical), NaN where unknown.

This is the label vocabulary, shared by datasets, requests, probes and the networks
(:class:`pipeline.models.conditioning.Conditioner`, the decoder's tissue head), so it sits
in ``core``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from pipeline.core.errors import InputError

#: Tissue label names, index = label value.
TISSUE_CLASSES: tuple[str, ...] = ("background", "CSF", "GM", "WM")

CovariateKind = Literal["continuous", "categorical"]
#: Covariates a model may condition on (prepared-manifest column → kind). CDR and sex are
#: categories; the others are numbers (OASIS's Educ and SES are ordinal codes, read as numbers).
KNOWN_COVARIATES: dict[str, CovariateKind] = {
    "age": "continuous",
    "sex": "categorical",
    "cdr": "categorical",
    "mmse": "continuous",
    "etiv": "continuous",
    "nwbv": "continuous",
    "educ": "continuous",
    "ses": "continuous",
}
#: Categorical covariates whose categories have a natural order (CDR 0 < 0.5 < 1 < 2): the
#: conditioning module embeds each category as the one below it plus a learned step.
ORDERED_COVARIATES = frozenset({"cdr"})
#: Spellings of sex accepted in manifests, CLIs and spec files (lower case) → the code used.
SEX_CODES: dict[str, str] = {"f": "F", "female": "F", "m": "M", "male": "M"}
#: Values a user may write for "not conditioned on this covariate".
UNKNOWN_WORDS = frozenset({"", "unknown", "nan", "none", "na", "n/a"})


def _blank(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in UNKNOWN_WORDS


def label_value(name: str, value: object) -> float:
    """A covariate cell as one number for a downstream task: the value itself, sex as 1.0 for
    M and 0.0 for F, NaN where blank or unreadable (no schema needed).

    Args:
        name: covariate name (a key of :data:`KNOWN_COVARIATES`).
        value: a manifest cell.
    """
    if _blank(value):
        return math.nan
    if name == "sex":
        code = SEX_CODES.get(str(value).strip().lower())
        return math.nan if code is None else float(code == "M")
    try:
        return float(str(value).strip())
    except ValueError:
        return math.nan


def _category_name(name: str, value: object) -> str:
    """Canonical category string: ``F``/``M`` for sex, ``0``/``0.5``/``1``/``2`` for CDR."""
    text = str(value).strip()
    if name == "sex":
        code = SEX_CODES.get(text.lower())
        if code is None:
            raise InputError(f"sex {text!r} is not a sex code (allowed: F, M, female, male)")
        return code
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


@dataclass(frozen=True)
class Covariate:
    """How one covariate is read, bounded and coded.

    Attributes:
        name: prepared-manifest column (a key of :data:`KNOWN_COVARIATES`).
        kind: ``continuous`` or ``categorical``.
        low: smallest training value (continuous; years for age); requests below refuse.
        high: largest training value (continuous); values are normalised to
            ``(v - low) / (high - low)`` before embedding.
        categories: training categories in code order (categorical), e.g. ``("F", "M")``
            or ``("0", "0.5", "1")``.
        ordered: the categories are ordered (CDR): the conditioning module embeds category k
            as category k - 1's embedding plus a learned step, so what is learnt on CDR 1
            also moves CDR 0.5 (False in model files from before this attribute).
    """

    name: str
    kind: CovariateKind
    low: float = 0.0
    high: float = 1.0
    categories: tuple[str, ...] = ()
    ordered: bool = False

    def allowed(self) -> str:
        """The allowed values, as error messages show them."""
        if self.kind == "categorical":
            return ", ".join(self.categories)
        return f"{self.low:g} to {self.high:g}"

    def canonical(self, value: object) -> float | str | None:
        """A manifest cell or user value → the value recorded (None = unknown).

        Raises:
            InputError: one line naming the covariate, the value and the allowed values
                (a category the model was not trained on, a number outside its training
                range, text where a number is needed).
        """
        if _blank(value):
            return None
        if self.kind == "categorical":
            category = _category_name(self.name, value)
            if category not in self.categories:
                raise InputError(
                    f"{self.name} {str(value).strip()!r} is not one the model was trained on "
                    f"(allowed: {self.allowed()}, or unknown)"
                )
            return category
        try:
            number = float(str(value).strip())
        except ValueError:
            raise InputError(f"{self.name} {value!r} is not a number") from None
        if not math.isfinite(number) or not self.low <= number <= self.high:
            raise InputError(
                f"{self.name} {number:g} is outside the model's training range ({self.allowed()})"
            )
        return number

    def code(self, value: object) -> float:
        """A value → its tensor code: the number, or the category index; NaN if unknown."""
        canonical = self.canonical(value)
        if canonical is None:
            return math.nan
        if self.kind == "categorical":
            return float(self.categories.index(str(canonical)))
        return float(canonical)

    def decode(self, code: float) -> float | str | None:
        """Inverse of :meth:`code` (None for NaN)."""
        if math.isnan(code):
            return None
        return self.categories[round(code)] if self.kind == "categorical" else float(code)


Schema = tuple[Covariate, ...]


def covariate_schema(manifest: pd.DataFrame, names: Sequence[str]) -> Schema:
    """The schema of ``names`` as found in a (training) manifest.

    Continuous covariates get the range of their known values, categorical ones their
    known categories in sorted order (numeric for CDR).

    Args:
        manifest: prepared manifest (one row per slice).
        names: covariates to condition on (keys of :data:`KNOWN_COVARIATES`).

    Raises:
        InputError: an unknown name, or a covariate with no known value in the manifest
            (the cohort does not carry it: leave it out of ``conditioning.covariates``).
    """
    schema = []
    for name in names:
        kind = KNOWN_COVARIATES.get(name)
        if kind is None:
            raise InputError(
                f"conditioning.covariates: {name!r} is not a known covariate "
                f"(known: {', '.join(KNOWN_COVARIATES)})"
            )
        column = manifest[name] if name in manifest.columns else pd.Series([], dtype=object)
        known = [v for v in column.tolist() if not _blank(v)]
        if not known:
            raise InputError(
                f"conditioning.covariates: the training split has no {name!r} value "
                "(this cohort does not record it); remove it from conditioning.covariates"
            )
        if kind == "categorical":
            names_ = {_category_name(name, v) for v in known}
            order = sorted(names_, key=lambda c: (float(c), c) if _is_number(c) else (0.0, c))
            ordered = name in ORDERED_COVARIATES
            schema.append(Covariate(name, kind, categories=tuple(order), ordered=ordered))
        else:
            values = np.asarray([float(v) for v in known], dtype=np.float64)
            schema.append(Covariate(name, kind, float(values.min()), float(values.max())))
    return tuple(schema)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def covariate_codes(manifest: pd.DataFrame, schema: Schema) -> np.ndarray:
    """Coded covariates of every manifest row, for datasets and batches.

    Values outside the schema (a category or range the training split did not have, e.g.
    in the test split) are coded unknown rather than refused: the rows stay usable.

    Returns:
        (N, len(schema)) float32; NaN where unknown.
    """
    codes = np.full((len(manifest), len(schema)), np.nan, dtype=np.float32)
    for j, cov in enumerate(schema):
        if cov.name not in manifest.columns:
            continue
        for i, value in enumerate(manifest[cov.name].tolist()):
            try:
                codes[i, j] = cov.code(value)
            except InputError:
                codes[i, j] = np.nan
    return codes


def schema_to_meta(schema: Schema) -> list[dict[str, Any]]:
    """JSON-able form of a schema, stored in model-file metadata."""
    return [{**asdict(c), "categories": list(c.categories)} for c in schema]


def schema_from_meta(meta: Iterable[Mapping[str, Any]] | None) -> Schema:
    """Inverse of :func:`schema_to_meta`; None (a model file from before covariates) → ()."""
    return tuple(
        Covariate(
            str(m["name"]),
            m["kind"],
            float(m.get("low", 0.0)),
            float(m.get("high", 1.0)),
            tuple(m.get("categories", ())),
            bool(m.get("ordered", False)),
        )
        for m in (meta or ())
    )


def covariate_reference(manifest: pd.DataFrame, schema: Schema) -> list[dict[str, Any]]:
    """The training subjects' covariates, one row per subject (no ids): what ``match``
    requests draw from (``generate --age match --cdr 1``: ages of the CDR-1 training
    subjects). Stored in second-stage model files as ``covariate_reference``.

    Args:
        manifest: the training manifest (one row per slice; ``subject`` column if present,
            else every row counts).
        schema: the covariates to keep (canonical values; None where unknown or outside it).

    Returns:
        Rows ``{name: value}`` in subject order.
    """
    if not schema:
        return []
    rows = manifest.drop_duplicates("subject") if "subject" in manifest.columns else manifest
    out = []
    for _, row in rows.iterrows():
        values: dict[str, Any] = {}
        for cov in schema:
            try:
                values[cov.name] = cov.canonical(row.get(cov.name))
            except InputError:
                values[cov.name] = None
        out.append(values)
    return out
