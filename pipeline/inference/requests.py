"""What ``braingen generate`` is asked for: slice levels, covariates and counts.

A request is a list of :class:`SliceRequest`\\ s, each a z level, one canonical value per
schema covariate (None = unconditioned) and a number of slices. It is built from the
command line (:func:`build_requests`) or from a spec file (:func:`read_spec`); both check
every value against the model's covariate schema (:class:`Covariate`) before anything is
sampled, and a bad value is one :class:`InputError` line naming it and the allowed values.

Covariate values (``--age 70``, a spec cell) are written as (:func:`parse_covariate_option`):

* a single value: ``70``, ``F`` (sex also ``female``/``m``/..., any case), ``0.5``;
* a list ``0.5,1`` or ``F,M``: each value is requested; lists of different covariates are
  **crossed** with each other and with the z levels, and every combination gets the full
  count (``--z 3,5 --cdr 0.5,1 --sex F,M --per-z 3`` is 2 x 2 x 2 x 3 = 24 slices);
* a range ``60:90`` (continuous covariates only; both ends inside the training range):
  every slice draws its own value uniformly from [60, 90]. A combination with a range is
  therefore returned as ``count`` requests of one slice each, each with its own draw;
* ``unknown`` (or blank): unconditioned, as is every covariate not mentioned;
* ``match``: drawn per slice from the training subjects (the model file's
  ``covariate_reference``) that agree with the combination's fixed values, so
  ``--cdr 1 --age match`` gives the ages of the CDR-1 training subjects. Several ``match``
  covariates are drawn jointly (one training subject per slice).

Draws are deterministic: the values of one combination come from a numpy Generator seeded
from (seed, z, spec row, the combination), so a level's draws do not depend on which other
levels or rows are requested.
"""

from __future__ import annotations

import csv
import itertools
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.core.errors import InputError
from pipeline.core.labels import KNOWN_COVARIATES, UNKNOWN_WORDS, Covariate, Schema
from pipeline.models.conditioning import index_from_z, z_from_index

#: z fractions are given with at most this many decimals (they name files exactly).
Z_DECIMALS = 4
_INDEX = re.compile(r"-?\d+")
_COUNT = re.compile(r"\+?\d+")
#: Spec file suffixes (lower case) and their format.
SPEC_FORMATS: dict[str, str] = {".csv": "csv", ".yaml": "yaml", ".yml": "yaml"}
#: Spec columns every row needs.
SPEC_REQUIRED = ("z", "count")
#: YAML spellings of an empty value (the spec is read without YAML typing, see read_spec).
_YAML_NULLS = frozenset({"~", "null"})

CovariateValue = float | str | None


@dataclass(frozen=True)
class ZLevel:
    """One requested slice position.

    Attributes:
        z: position in [0, 1].
        z_index: ``z * (K - 1)`` in slice units (an integer for index requests; None when
            the model does not record K).
        name: file-name token, ``z017`` (slice index 17) or ``f02500`` (fraction 0.25).
    """

    z: float
    z_index: float | None
    name: str


def _index_level(index: int, n_slices: int | None, token: str) -> ZLevel:
    if n_slices is None:
        raise InputError(
            f"--z {token}: this model file does not record its number of slice levels K; "
            "give z as fractions in [0, 1] (e.g. 0.25,0.5)"
        )
    if not 0 <= index <= n_slices - 1:
        raise InputError(
            f"--z {token}: slice index {index} is outside 0..{n_slices - 1} "
            f"(the model has K={n_slices} levels)"
        )
    width = max(3, len(str(n_slices - 1)))
    return ZLevel(z_from_index(index, n_slices), index, f"z{index:0{width}d}")


def _fraction_level(token: str, n_slices: int | None) -> ZLevel:
    try:
        z = float(token)
    except ValueError:
        raise InputError(
            f"--z {token!r}: expected a slice index (17), an inclusive range (0:31) or a "
            "fraction with a decimal point (0.25)"
        ) from None
    if not 0.0 <= z <= 1.0:  # also rejects nan
        raise InputError(f"--z {token}: z fraction must lie in [0, 1], got {z}")
    key = z * 10**Z_DECIMALS
    if abs(key - round(key)) > 1e-6:
        raise InputError(f"--z {token}: give z fractions with at most {Z_DECIMALS} decimals")
    z_index = None if n_slices is None else round(index_from_z(z, n_slices), 4)
    return ZLevel(z, z_index, f"f{round(key):05d}")


def parse_z(spec: str | None, n_slices: int | None) -> list[ZLevel]:
    """Parse a ``--z`` request into slice positions.

    Args:
        spec: comma-separated items, each a slice index (``17``), an inclusive index range
            (``0:31``) or a fraction with a decimal point (``0.25``, at most 4 decimals);
            ``None``, ``""`` or ``"all"`` means every level 0..K-1. Indices become
            z = index / (K - 1).
        n_slices: K, the model's number of slice levels (``metadata["n_slices"]``), or None
            if unknown (then only fractions are accepted).

    Returns:
        The levels in request order.

    Raises:
        ValueError: malformed item, index outside 0..K-1, fraction outside [0, 1] or with
            more than 4 decimals, or a level requested twice.
    """
    if spec is None or spec.strip() in ("", "all"):
        return [_index_level(i, n_slices, "all") for i in range(n_slices or 1)]
    levels: list[ZLevel] = []
    for raw in spec.split(","):
        token = raw.strip()
        if ":" in token:
            lo, _, hi = (part.strip() for part in token.partition(":"))
            if not (_INDEX.fullmatch(lo) and _INDEX.fullmatch(hi)):
                raise InputError(f"--z {token}: a range needs two slice indices, e.g. 0:31")
            if int(lo) > int(hi):
                raise InputError(f"--z {token}: range start {lo} is above its end {hi}")
            _index_level(int(hi), n_slices, token)  # names the end if it is out of range
            levels += [_index_level(i, n_slices, token) for i in range(int(lo), int(hi) + 1)]
        elif _INDEX.fullmatch(token):
            levels.append(_index_level(int(token), n_slices, token))
        else:
            levels.append(_fraction_level(token, n_slices))
    seen: set[int] = set()
    for level in levels:
        key = round(level.z * 10**6)
        if key in seen:
            raise InputError(f"--z {spec}: z={level.z:g} is requested twice")
        seen.add(key)
    return levels


@dataclass(frozen=True)
class SliceRequest:
    """``count`` slices at one level with one set of covariate values.

    Attributes:
        level: the slice position.
        covariates: schema covariate name → canonical value (:meth:`Covariate.canonical`:
            a number for continuous covariates, a category string such as ``"F"`` or
            ``"0.5"`` for categorical ones); None = unconditioned (the model's unknown
            embedding).
        count: number of slices (>= 1).
    """

    level: ZLevel
    covariates: dict[str, CovariateValue]
    count: int

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise InputError(f"a slice request's count must be an integer >= 1; got {self.count!r}")

    def codes(self, schema: Schema) -> list[float]:
        """The covariates as the model reads them: one code per schema covariate, in order.

        Args:
            schema: the model's covariate schema.

        Returns:
            :meth:`Covariate.code` of each schema covariate's value (the number, or the
            category index; NaN where None or not given).

        Raises:
            InputError: a covariate the schema lacks, or a value it does not allow.
        """
        names = {cov.name for cov in schema}
        extra = sorted(set(self.covariates) - names)
        if extra:
            raise InputError(_not_in_model(extra[0], schema))
        return [cov.code(self.covariates.get(cov.name)) for cov in schema]


@dataclass(frozen=True)
class CovariateChoice:
    """What one covariate option asks for: fixed values (crossed) or a range (drawn).

    Attributes:
        name: the covariate.
        values: canonical values, one per list item (``(None,)`` for unknown); empty for a
            range.
        span: ``(low, high)`` of a range, drawn uniformly per slice; None otherwise.
        match: drawn per slice from the training subjects that agree with the fixed values.
    """

    name: str
    values: tuple[CovariateValue, ...] = (None,)
    span: tuple[float, float] | None = None
    match: bool = False


def _number(cov: Covariate, text: str) -> float:
    """``text`` as a covariate number inside the training range (one-line error otherwise)."""
    try:
        float(text)
    except ValueError:
        raise InputError(
            f"{cov.name} {text!r} is not a number (allowed: {cov.allowed()}, "
            "a range low:high, a comma-separated list, or unknown)"
        ) from None
    return float(cov.canonical(text))  # type: ignore[arg-type]  # raises if out of range


def parse_covariate_option(cov: Covariate, text: str) -> CovariateChoice:
    """Parse one covariate value as given on the command line or in a spec cell.

    Args:
        cov: the model's covariate.
        text: a value (``70``, ``F``, ``female``, ``0.5``), a comma-separated list
            (``0.5,1``, ``F,M``; crossed with other lists), a range ``low:high``
            (continuous only, drawn per slice) or ``unknown``/blank (unconditioned).

    Returns:
        The :class:`CovariateChoice`.

    Raises:
        InputError: one line naming the covariate, the value and the allowed values: a value
            outside the training range or categories, text for a number, a range of a
            categorical covariate, a range with its start above its end, an empty list
            item, or a value listed twice.
    """
    text = str(text).strip()
    if text.lower() == "match":
        return CovariateChoice(cov.name, (), None, match=True)
    if ":" in text:
        if cov.kind != "continuous":
            raise InputError(
                f"{cov.name} {text!r}: a range needs a continuous covariate; list the "
                f"categories instead (allowed: {cov.allowed()})"
            )
        if "," in text:
            raise InputError(f"{cov.name} {text!r}: give either one range low:high or a list")
        lo_text, _, hi_text = (part.strip() for part in text.partition(":"))
        if not lo_text or not hi_text:
            raise InputError(
                f"{cov.name} {text!r}: a range needs two numbers, e.g. "
                f"{cov.low:g}:{cov.high:g} (allowed: {cov.allowed()})"
            )
        low, high = _number(cov, lo_text), _number(cov, hi_text)
        if low > high:
            raise InputError(f"{cov.name} {text}: range start {low:g} is above its end {high:g}")
        return CovariateChoice(cov.name, (), (low, high))
    if text.lower() in UNKNOWN_WORDS:
        return CovariateChoice(cov.name, (None,))
    values: list[CovariateValue] = []
    for raw in text.split(","):
        token = raw.strip()
        if not token:
            raise InputError(f"{cov.name} {text!r}: empty item in the list")
        if cov.kind == "continuous" and token.lower() not in UNKNOWN_WORDS:
            value: CovariateValue = _number(cov, token)
        else:
            value = cov.canonical(token)
        if value in values:
            shown = (
                "unknown" if value is None else f"{value:g}" if isinstance(value, float) else value
            )
            raise InputError(f"{cov.name} {text!r}: {shown} is listed twice")
        values.append(value)
    return CovariateChoice(cov.name, tuple(values))


def _conditions_on(schema: Schema) -> str:
    names = ", ".join(cov.name for cov in schema)
    return f"it conditions on: {names}" if names else "it conditions on no covariate, only z"


def _not_in_model(name: str, schema: Schema) -> str:
    """The one-line message for a covariate name the model does not condition on."""
    if name in KNOWN_COVARIATES:
        return f"the model was not trained on covariate {name!r} ({_conditions_on(schema)})"
    return (
        f"{name!r} is not a covariate (known: {', '.join(KNOWN_COVARIATES)}); "
        f"the model was not trained on it ({_conditions_on(schema)})"
    )


def _schema_covariate(name: str, schema: Schema) -> Covariate:
    for cov in schema:
        if cov.name == name:
            return cov
    raise InputError(_not_in_model(name, schema))


def _option_name(name: str) -> str:
    """``--Age`` / ``age`` → ``age``."""
    return str(name).strip().lstrip("-").lower()


def _draw_rng(seed: int, level: ZLevel, row: int, fixed: Iterable[tuple[str, Any]]) -> Any:
    """The Generator of one combination's range draws (stable across processes)."""
    key = zlib.crc32(repr(sorted(fixed, key=lambda item: item[0])).encode())
    return np.random.default_rng([seed, round(level.z * 10**6), row, key])


def _expand(
    levels: list[ZLevel],
    choices: Mapping[str, CovariateChoice],
    schema: Schema,
    count: int,
    seed: int,
    row: int = 0,
    reference: Sequence[Mapping[str, CovariateValue]] = (),
) -> list[SliceRequest]:
    """Cross ``levels`` with the choices' values; a combination with a range or ``match``
    → one request per slice."""
    names = [cov.name for cov in schema]
    fixed_axes = [
        [(name, v) for v in choices[name].values]
        for name in names
        if name in choices and choices[name].span is None and not choices[name].match
    ]
    spans = {n: choices[n].span for n in names if n in choices and choices[n].span is not None}
    matched = [n for n in names if n in choices and choices[n].match]
    requests: list[SliceRequest] = []
    for level in levels:
        for combination in itertools.product(*fixed_axes):
            fixed = dict(combination)
            base = {name: fixed.get(name) for name in names}
            if not spans and not matched:
                requests.append(SliceRequest(level, base, count))
                continue
            pool = _matching_subjects(fixed, matched, reference)
            rng = _draw_rng(seed, level, row, [*base.items(), *spans.items(), ("match", matched)])
            for _ in range(count):
                drawn = {n: float(rng.uniform(lo, hi)) for n, (lo, hi) in spans.items()}
                if matched:
                    subject = pool[int(rng.integers(len(pool)))]
                    drawn |= {n: subject[n] for n in matched}
                requests.append(SliceRequest(level, base | drawn, 1))
    return requests


def _matching_subjects(
    fixed: Mapping[str, CovariateValue],
    matched: Sequence[str],
    reference: Sequence[Mapping[str, CovariateValue]],
) -> list[Mapping[str, CovariateValue]]:
    """Training subjects that agree with the fixed values and know every matched covariate."""
    if not matched:
        return []
    if not reference:
        raise InputError(
            f"{matched[0]} match: this model file records no training covariates to match "
            "(made before covariate_reference was stored); give values or ranges"
        )
    pool = [
        subject
        for subject in reference
        if all(v is None or subject.get(n) == v for n, v in fixed.items())
        and all(subject.get(n) is not None for n in matched)
    ]
    if not pool:
        wanted = ", ".join(f"{n} {v}" for n, v in fixed.items() if v is not None) or "any values"
        raise InputError(
            f"{', '.join(matched)} match: no training subject with {wanted} has a known "
            f"{' and '.join(matched)}"
        )
    return pool


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def build_requests(
    schema: Schema,
    n_slices: int | None,
    z: str | None,
    per_z: int,
    options: Mapping[str, str | None],
    seed: int,
    reference: Sequence[Mapping[str, CovariateValue]] = (),
) -> list[SliceRequest]:
    """The requests of a ``braingen generate`` command line.

    Lists of different covariates are crossed with each other and with the z levels, and
    every combination gets ``per_z`` slices; a range is drawn per slice, so a combination
    with a range becomes ``per_z`` requests of one slice (see the module docstring).
    Requests come level by level, then combination by combination (schema order, the last
    covariate varying fastest).

    Args:
        schema: the model's covariate schema.
        n_slices: K, the model's number of slice levels, or None (fractions only).
        z: ``--z`` syntax (:func:`parse_z`); None or ``all`` = every level.
        per_z: slices per combination (>= 1).
        options: covariate name (``age`` or ``--age``, any case) → its value text
            (:func:`parse_covariate_option`); a None value counts as not given. Covariates
            not named are unconditioned.
        seed: >= 0; fixes every range draw.
        reference: the training subjects' covariates (the model's ``covariate_reference``)
            that ``match`` draws from.

    Returns:
        The requests; :func:`total_slices` counts their slices.

    Raises:
        InputError: bad z, per_z or seed, a covariate the model does not condition on, or
            a value it does not allow (one line naming the value and the allowed values).
    """
    _check_int(per_z, "per_z", 1)
    _check_int(seed, "seed", 0)
    choices: dict[str, CovariateChoice] = {}
    for raw_name, text in options.items():
        if text is None:
            continue
        name = _option_name(raw_name)
        choices[name] = parse_covariate_option(_schema_covariate(name, schema), text)
    return _expand(parse_z(z, n_slices), choices, schema, per_z, seed, reference=reference)


def _cell_text(value: object) -> str:
    """A spec cell as text: YAML lists are joined with commas, YAML nulls become blank."""
    if value is None:
        return ""
    if isinstance(value, list):
        if any(isinstance(item, list | dict) for item in value):
            raise InputError("expected a value, a range or a flat list")
        return ",".join(str(item).strip() for item in value)
    if isinstance(value, dict):
        raise InputError("expected a value, a range or a list, not a mapping")
    text = str(value).strip()
    return "" if text.lower() in _YAML_NULLS else text


def _read_rows(path: Path) -> list[dict[str, object]]:
    """The spec's rows as column → raw cell, untyped (CSV and YAML read alike)."""
    kind = SPEC_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: a spec file must end in .csv, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise InputError(f"{path}: cannot read the spec ({reason})") from None
    if kind == "csv":
        try:
            reader = csv.DictReader(text.splitlines())
            rows: list[Any] = list(reader)
            header = reader.fieldnames or []
        except csv.Error as err:
            raise InputError(f"{path}: not a readable CSV ({err})") from None
        if not header:
            raise InputError(f"{path}: the spec is empty (expected a header z,count,...)")
        for column in SPEC_REQUIRED:
            if column not in {_option_name(h) for h in header}:
                raise InputError(
                    f"{path}: no {column!r} column (columns: {', '.join(header)}; "
                    f"every spec needs {' and '.join(SPEC_REQUIRED)})"
                )
        for number, row in enumerate(rows, 1):
            if None in row:
                raise InputError(f"{path}, row {number}: more cells than the header has columns")
    else:
        try:
            # BaseLoader: every scalar stays text, so 1:30 is not read as sexagesimal 90
            data = yaml.load(text, Loader=yaml.BaseLoader)
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise InputError(f"{path}: not readable YAML ({first})") from None
        if isinstance(data, dict) and set(data) == {"rows"}:
            data = data["rows"]
        if data in (None, "", []):
            raise InputError(f"{path}: the spec has no rows")
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a list of rows (mappings) or {{rows: [...]}}")
        rows = data
        for number, row in enumerate(rows, 1):
            if not isinstance(row, dict):
                raise InputError(f"{path}, row {number}: expected a mapping (z: ..., count: ...)")
    if not rows:
        raise InputError(f"{path}: the spec has no rows")
    return rows


def read_spec(
    path: str | Path,
    schema: Schema,
    n_slices: int | None,
    *,
    seed: int = 0,
    reference: Sequence[Mapping[str, CovariateValue]] = (),
) -> list[SliceRequest]:
    """The requests of a spec file: one row per (z, count, covariates) group.

    A ``.csv`` file has a header row; a ``.yaml``/``.yml`` file is a list of mappings or
    ``{rows: [...]}``. Columns (any case): ``z`` (:func:`parse_z` syntax: ``17``, ``0:31``,
    ``0.25,0.5``, ``all``), ``count`` (an integer >= 1: slices per combination) and any of
    the schema's covariates (a value, a list, a range ``low:high`` or blank/``unknown`` =
    unconditioned). Each row expands as :func:`build_requests` does (lists crossed, ranges
    drawn per slice, seeded by ``seed`` and the row number); the requests come in row order.
    Every row is checked before anything is returned.

    Args:
        path: the spec file.
        schema: the model's covariate schema.
        n_slices: K, the model's number of slice levels, or None (fractions only).
        seed: >= 0; fixes every range draw.
        reference: the training subjects' covariates that ``match`` cells draw from.

    Returns:
        The requests of all rows.

    Raises:
        InputError: one line naming the file, the 1-based data row and the column: an
            unreadable or empty file, a missing ``z`` or ``count``, a bad count, a bad
            value, or a covariate the model does not condition on.
    """
    path = Path(path)
    _check_int(seed, "seed", 0)
    requests: list[SliceRequest] = []
    for number, raw_row in enumerate(_read_rows(path), 1):
        where = f"{path}, row {number}"
        row: dict[str, str] = {}
        for raw_column, value in raw_row.items():
            column = _option_name(raw_column)
            try:
                row[column] = _cell_text(value)
            except InputError as err:
                raise InputError(f"{where}, column {column!r}: {err}") from None
        for column in SPEC_REQUIRED:
            if not row.get(column):
                given = "is blank" if column in row else "is missing"
                raise InputError(
                    f"{where}, column {column!r}: {given} (every row needs "
                    f"{' and '.join(SPEC_REQUIRED)})"
                )
        count_text = row.pop("count")
        if not _COUNT.fullmatch(count_text) or int(count_text) < 1:
            raise InputError(f"{where}, column 'count': {count_text!r} is not an integer >= 1")
        z_text = row.pop("z")
        try:
            levels = parse_z(z_text, n_slices)
        except InputError as err:
            raise InputError(f"{where}, column 'z': {str(err).removeprefix('--z ')}") from None
        choices: dict[str, CovariateChoice] = {}
        for column, text in row.items():
            try:
                cov = _schema_covariate(column, schema)
                choices[column] = parse_covariate_option(cov, text)
            except InputError as err:
                raise InputError(f"{where}, column {column!r}: {err}") from None
        try:
            requests += _expand(levels, choices, schema, int(count_text), seed, number, reference)
        except InputError as err:
            raise InputError(f"{where}: {err}") from None
    return requests


def total_slices(requests: Iterable[SliceRequest]) -> int:
    """The number of slices the requests ask for."""
    return sum(request.count for request in requests)


def single_codes(schema: Schema, options: Mapping[str, str | None]) -> list[float]:
    """Codes of one fixed value per named covariate (``sdedit``/``inpaint``), NaN for the
    others: ``{"age": "70", "sex": "F"}`` → ``[70.0, 0.0, nan]`` for an (age, sex, cdr) schema.

    Raises:
        InputError: a covariate the model lacks, or a value that is not one allowed single
            value (lists and ranges are for ``generate``).
    """
    values: dict[str, Any] = {}
    for raw_name, text in options.items():
        if text is None:
            continue
        cov = _schema_covariate(_option_name(raw_name), schema)
        if "," in text or (":" in text and cov.kind == "continuous"):
            raise InputError(f"{cov.name} {text!r}: give one value here, not a list or range")
        values[cov.name] = cov.canonical(text)
    return [cov.code(values.get(cov.name)) for cov in schema]
