"""The request layer of labelled generation: z levels, covariate values, crossing, ranges
and spec files, all checked against the model's covariate schema before sampling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipeline.core.errors import InputError
from pipeline.core.labels import Covariate
from pipeline.inference.requests import (
    CovariateChoice,
    SliceRequest,
    ZLevel,
    build_requests,
    parse_covariate_option,
    parse_z,
    read_spec,
    total_slices,
)

AGE = Covariate("age", "continuous", 18.0, 96.0)
SEX = Covariate("sex", "categorical", categories=("F", "M"))
CDR = Covariate("cdr", "categorical", categories=("0", "0.5", "1", "2"))
SCHEMA = (AGE, SEX, CDR)
K = 32


def _one_line_error(call, *args, match: str) -> str:
    """Run ``call``; it must raise one InputError line matching ``match``."""
    with pytest.raises(InputError, match=match) as info:
        call(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- z parsing (moved from generate.py; same expectations as tests/test_generate.py) -----


def test_parse_z_ranges_indices_fractions_and_all() -> None:
    levels = parse_z("0:3", 32)
    assert [lv.z_index for lv in levels] == [0, 1, 2, 3]
    assert levels[1] == ZLevel(1 / 31, 1, "z001")
    assert [lv.z for lv in parse_z("all", 4)] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert len(parse_z(None, 32)) == 32
    frac = parse_z("0.25, 0.5", 33)
    assert [(lv.z, lv.z_index, lv.name) for lv in frac] == [
        (0.25, 8, "f02500"),
        (0.5, 16, "f05000"),
    ]
    mixed = parse_z("30,0:1,1.0", 32)
    assert [lv.name for lv in mixed] == ["z030", "z000", "z001", "f10000"]
    assert parse_z("0.5", None)[0].z_index is None  # fractions need no K


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0:32", r"slice index 32 is outside 0\.\.31"),
        ("40", r"slice index 40 is outside 0\.\.31"),
        ("-1", "slice index -1"),
        ("1.5", r"must lie in \[0, 1\]"),
        ("-0.2", r"must lie in \[0, 1\]"),
        ("nan", r"must lie in \[0, 1\]"),
        ("5:2", "start 5 is above its end 2"),
        ("a:3", "a range needs two slice indices"),
        ("abc", "expected a slice index"),
        ("1,,2", "expected a slice index"),
        ("0.123456", "at most 4 decimals"),
        ("3,3", "requested twice"),
        ("0:3,0.0", "requested twice"),
    ],
)
def test_parse_z_rejects_bad_requests_with_a_clear_message(spec: str, message: str) -> None:
    _one_line_error(parse_z, spec, 32, match=message)


def test_parse_z_index_needs_k() -> None:
    _one_line_error(parse_z, "0:3", None, match="give z as fractions")


# --- covariate values ---------------------------------------------------------------------


def test_covariate_option_forms() -> None:
    assert parse_covariate_option(AGE, "70") == CovariateChoice("age", (70.0,))
    assert parse_covariate_option(AGE, " 60 : 90 ") == CovariateChoice("age", (), (60.0, 90.0))
    assert parse_covariate_option(CDR, "0.5,1") == CovariateChoice("cdr", ("0.5", "1"))
    assert parse_covariate_option(SEX, "female, M") == CovariateChoice("sex", ("F", "M"))
    assert parse_covariate_option(SEX, "f").values == ("F",)
    assert parse_covariate_option(SEX, "MALE").values == ("M",)
    assert parse_covariate_option(CDR, "unknown") == CovariateChoice("cdr", (None,))
    assert parse_covariate_option(AGE, "").values == (None,)


@pytest.mark.parametrize(
    ("cov", "text", "message"),
    [
        (AGE, "250", r"age 250 is outside the model's training range \(18 to 96\)"),
        (AGE, "10:90", r"age 10 is outside the model's training range \(18 to 96\)"),
        (AGE, "60:97", r"age 97 is outside the model's training range \(18 to 96\)"),
        (AGE, "90:60", "range start 90 is above its end 60"),
        (AGE, "60:", "a range needs two numbers"),
        (AGE, "old", r"age 'old' is not a number \(allowed: 18 to 96"),
        (AGE, "60,,70", "empty item"),
        (AGE, "60,60.0", "60 is listed twice"),
        (CDR, "3", r"cdr '3' is not one the model was trained on \(allowed: 0, 0\.5, 1, 2"),
        (CDR, "0.5,3", r"cdr '3' .*allowed: 0, 0\.5, 1, 2"),
        (CDR, "0:1", r"a range needs a continuous covariate.*allowed: 0, 0\.5, 1, 2"),
        (SEX, "X", r"sex 'X' is not a sex code \(allowed: F, M, female, male\)"),
        (SEX, "F,female", "F is listed twice"),
    ],
)
def test_bad_covariate_values_are_one_line_naming_value_and_allowed(
    cov: Covariate, text: str, message: str
) -> None:
    _one_line_error(parse_covariate_option, cov, text, match=message)


# --- build_requests -----------------------------------------------------------------------


def test_unmentioned_covariates_are_unconditioned() -> None:
    requests = build_requests(SCHEMA, K, "17", 4, {}, seed=0)
    assert requests == [SliceRequest(parse_z("17", K)[0], dict.fromkeys(("age", "sex", "cdr")), 4)]
    assert requests[0].codes(SCHEMA)[0] != requests[0].codes(SCHEMA)[0]  # NaN
    assert all(math.isnan(c) for c in requests[0].codes(SCHEMA))


def test_lists_are_crossed_with_each_other_and_the_z_levels() -> None:
    requests = build_requests(SCHEMA, K, "3,5", 3, {"cdr": "0.5,1", "--sex": "F,M"}, seed=0)
    assert len(requests) == 2 * 2 * 2
    assert total_slices(requests) == 24
    combos = {(r.level.z_index, r.covariates["sex"], r.covariates["cdr"]) for r in requests}
    assert len(combos) == 8
    assert all(r.count == 3 and r.covariates["age"] is None for r in requests)
    # level by level, schema order, the last covariate varying fastest
    assert [(r.covariates["sex"], r.covariates["cdr"]) for r in requests[:4]] == [
        ("F", "0.5"),
        ("F", "1"),
        ("M", "0.5"),
        ("M", "1"),
    ]
    assert requests[0].codes(SCHEMA)[1:] == [0.0, 1.0]  # sex F → 0, cdr 0.5 → index 1


def test_ranges_are_drawn_per_slice_within_bounds_and_by_seed() -> None:
    options = {"age": "60:90", "sex": "F,M"}
    requests = build_requests(SCHEMA, K, "3,5", 50, options, seed=7)
    assert len(requests) == 2 * 2 * 50 and total_slices(requests) == 200
    assert all(r.count == 1 for r in requests)
    ages = [r.covariates["age"] for r in requests]
    assert all(isinstance(a, float) and 60.0 <= a <= 90.0 for a in ages)
    assert len(set(ages)) == len(ages)  # each slice its own draw
    assert min(ages) < 65 and max(ages) > 85  # spread over the range
    again = build_requests(SCHEMA, K, "3,5", 50, options, seed=7)
    assert [r.covariates for r in again] == [r.covariates for r in requests]
    other = build_requests(SCHEMA, K, "3,5", 50, options, seed=8)
    assert [r.covariates["age"] for r in other] != ages
    # a level's draws do not depend on the other levels requested
    alone = build_requests(SCHEMA, K, "5", 50, options, seed=7)
    assert [r.covariates for r in alone] == [r.covariates for r in requests[100:]]


def test_a_single_value_range_draws_that_value() -> None:
    requests = build_requests(SCHEMA, K, "3", 2, {"age": "70:70"}, seed=0)
    assert [r.covariates["age"] for r in requests] == [70.0, 70.0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"age": "250"}, r"age 250 is outside the model's training range \(18 to 96\)"),
        ({"cdr": "3"}, r"cdr '3' .*allowed: 0, 0\.5, 1, 2"),
        ({"sex": "X"}, r"sex 'X' is not a sex code \(allowed: F, M, female, male\)"),
        (
            {"mmse": "28"},
            r"the model was not trained on covariate 'mmse' \(it conditions on: age, sex, cdr\)",
        ),
        ({"weight": "70"}, r"'weight' is not a covariate .*it conditions on: age, sex, cdr"),
    ],
)
def test_bad_requests_are_one_line_input_errors(options: dict[str, str], message: str) -> None:
    _one_line_error(build_requests, SCHEMA, K, "3", 2, options, 0, match=message)


def test_bad_z_per_z_and_seed_are_refused() -> None:
    _one_line_error(build_requests, SCHEMA, K, "40", 2, {}, 0, match="outside 0..31")
    _one_line_error(build_requests, SCHEMA, K, "3", 0, {}, 0, match="per_z must be an integer")
    _one_line_error(build_requests, SCHEMA, K, "3", 2, {}, -1, match="seed must be an integer")


def test_a_model_without_covariates_names_that() -> None:
    _one_line_error(
        build_requests, (), K, "3", 2, {"age": "70"}, 0, match="conditions on no covariate"
    )


def test_slice_request_checks_count_and_schema() -> None:
    level = parse_z("3", K)[0]
    _one_line_error(SliceRequest, level, {}, 0, match="count must be an integer >= 1")
    request = SliceRequest(level, {"mmse": 28.0}, 1)
    _one_line_error(request.codes, SCHEMA, match="not trained on covariate 'mmse'")


# --- spec files ---------------------------------------------------------------------------

CSV_SPEC = """z,count,age,sex,cdr
3,2,70,F,
0:1,1,60:90,,"0.5,1"
0.5,3,,male,2
"""

YAML_SPEC = """\
- {z: 3, count: 2, age: 70, sex: F}
- z: "0:1"
  count: 1
  age: 60:90
  cdr: [0.5, 1]
- {z: 0.5, count: 3, age: ~, sex: male, cdr: 2}
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_and_yaml_specs_parse_to_the_same_requests(tmp_path: Path) -> None:
    from_csv = read_spec(_write(tmp_path, "spec.csv", CSV_SPEC), SCHEMA, K, seed=3)
    from_yaml = read_spec(_write(tmp_path, "spec.yaml", YAML_SPEC), SCHEMA, K, seed=3)
    rows = _write(
        tmp_path, "rows.yml", "rows:\n" + "\n".join(f"  {line}" for line in YAML_SPEC.splitlines())
    )
    assert from_csv == from_yaml == read_spec(rows, SCHEMA, K, seed=3)
    # row 1: one request of 2; row 2: 2 levels x 2 cdr x 1 slice (age drawn); row 3: 3 slices
    assert len(from_csv) == 1 + 4 + 1
    assert total_slices(from_csv) == 2 + 4 + 3
    assert from_csv[0].covariates == {"age": 70.0, "sex": "F", "cdr": None}
    assert all(60 <= r.covariates["age"] <= 90 for r in from_csv[1:5])  # type: ignore[operator]
    assert from_csv[5].covariates == {"age": None, "sex": "M", "cdr": "2"}
    assert from_csv[5].level.name == "f05000"


def test_yaml_ranges_are_not_read_as_sexagesimal(tmp_path: Path) -> None:
    spec = _write(tmp_path, "spec.yaml", "- {z: 1:30, count: 1, age: 20:45}\n")
    requests = read_spec(spec, SCHEMA, K)
    assert [r.level.z_index for r in requests] == list(range(1, 31))
    assert all(20 <= r.covariates["age"] <= 45 for r in requests)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("s.csv", "z,age\n3,70\n", r"s\.csv: no 'count' column"),
        ("s.csv", "count,age\n3,70\n", r"s\.csv: no 'z' column"),
        ("s.yaml", "- {z: 3, count: 1}\n- {z: 4}\n", r"s\.yaml, row 2, column 'count': is missing"),
        ("s.csv", "z,count\n3,1\n4\n", r"s\.csv, row 2, column 'count': is blank"),
        ("s.csv", "z,count\n3,1\n4,0\n", r"row 2, column 'count': '0' is not an integer >= 1"),
        ("s.yaml", "- {z: 3, count: 2.5}\n", r"row 1, column 'count': '2\.5' is not an integer"),
        ("s.csv", "z,count\n3,lots\n", r"row 1, column 'count': 'lots' is not an integer"),
        ("s.csv", "z,count,age\n3,1,70\n4,1,250\n", r"row 2, column 'age': age 250 is outside"),
        ("s.csv", "z,count,cdr\n3,1,3\n", r"row 1, column 'cdr': cdr '3' .*allowed: 0, 0\.5"),
        ("s.csv", "z,count,sex\n3,1,X\n", r"row 1, column 'sex': sex 'X' is not a sex code"),
        ("s.csv", "z,count,mmse\n3,1,28\n", r"row 1, column 'mmse': the model was not trained"),
        ("s.csv", "z,count\n40,1\n", r"row 1, column 'z': 40: slice index 40 is outside"),
        ("s.csv", "z,count\n3,1,9\n", r"row 1: more cells than the header"),
        ("s.csv", "", r"s\.csv: the spec is empty"),
        ("s.csv", "z,count\n", r"s\.csv: the spec has no rows"),
        ("s.yaml", "", r"s\.yaml: the spec has no rows"),
        ("s.yaml", "rows: []\n", r"s\.yaml: the spec has no rows"),
        ("s.yaml", "z: 3\n", r"expected a list of rows"),
        ("s.yaml", "- 3\n", r"row 1: expected a mapping"),
        ("s.yaml", "- {z: 3, count: 1, age: {a: 1}}\n", r"row 1, column 'age': expected a value"),
        ("s.yaml", "- [z: 3\n", r"s\.yaml: not readable YAML"),
        ("s.json", "[]", r"must end in \.csv, \.yaml or \.yml"),
    ],
)
def test_bad_specs_name_file_row_and_column(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    _one_line_error(read_spec, _write(tmp_path, name, text), SCHEMA, K, match=message)


def test_every_spec_row_is_checked_before_returning(tmp_path: Path) -> None:
    rows = "".join(f"{i},1,70\n" for i in range(20)) + "20,1,250\n"
    spec = _write(tmp_path, "s.csv", "z,count,age\n" + rows)
    _one_line_error(read_spec, spec, SCHEMA, K, match="row 21, column 'age'")


def test_a_missing_spec_file_is_one_line(tmp_path: Path) -> None:
    _one_line_error(read_spec, tmp_path / "none.csv", SCHEMA, K, match="cannot read the spec")


def test_match_without_a_reference_says_why() -> None:
    schema = (Covariate("age", "continuous", 18.0, 96.0),)
    with pytest.raises(InputError, match="records no training covariates to match"):
        build_requests(schema, 4, "1", 2, {"age": "match"}, seed=0)
    drawn = build_requests(schema, 4, "1", 3, {"age": "match"}, 0, [{"age": 40.0}, {"age": None}])
    assert [r.covariates["age"] for r in drawn] == [40.0] * 3  # unknown ages are never drawn
