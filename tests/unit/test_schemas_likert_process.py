"""Tests for the ``likert`` and ``process`` schemas of rlhfkit.data.schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhfkit.data import (
    SCHEMAS,
    DataError,
    LikertExample,
    ProcessExample,
    Row,
    load_examples,
    validate_rows,
)


def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def rows(*data: dict[str, Any]) -> list[Row]:
    return [Row(data=d, location=f"mem:{i}") for i, d in enumerate(data, 1)]


def one(schema: str, data: dict[str, Any]) -> Any:
    (example,) = validate_rows(rows(data), schema).examples
    return example


def error(schema: str, data: dict[str, Any]) -> DataError:
    with pytest.raises(DataError) as info:
        validate_rows(rows(data), schema)
    assert info.value.location == "mem:1"
    return info.value


def write_jsonl(tmp_path: Path, lines: list[Any]) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return str(path)


def likert_row(**overrides: Any) -> dict[str, Any]:
    return {"prompt": "q", "completions": ["x", "y"], "likert": 2, "scale": 5, **overrides}


def process_row(**overrides: Any) -> dict[str, Any]:
    steps = ["3 * 4 = 12", "2 + 12 = 14"]
    return {"prompt": "2 + 3 * 4?", "steps": steps, "labels": [1, 1], **overrides}


def test_both_schemas_are_registered() -> None:
    assert {"likert", "process"} <= set(SCHEMAS)


# --- likert ----------------------------------------------------------------------------------


def test_likert_normalises_and_keeps_meta() -> None:
    example = one("likert", likert_row(completions=["x", [a("y")]], annotator="ann-3"))
    assert example == LikertExample(
        [u("q")], [[a("x")], [a("y")]], 2, 5, meta={"annotator": "ann-3"}, location="mem:1"
    )


@pytest.mark.parametrize(("scale", "likert"), [(5, 1), (5, 3), (5, 5), (8, 1), (8, 8)])
def test_likert_accepts_the_scale_ends_and_the_tie(scale: int, likert: int) -> None:
    example = one("likert", likert_row(scale=scale, likert=likert))
    assert (example.scale, example.likert) == (scale, likert)


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        ({"completions": ["x", "y", "z"]}, "completions", "exactly 2 completions (A and B), got 3"),
        ({"completions": ["x"]}, "completions", "exactly 2 completions (A and B), got 1"),
        ({"completions": "x"}, "completions", "at least 2 completions, got str"),
        ({"completions": ["x", ""]}, "completions[1]", "empty completion"),
        ({"scale": 7}, "scale", "expected 5 or 8 (points), got 7"),
        ({"scale": "5"}, "scale", "expected 5 or 8"),
        ({"scale": 5.0}, "scale", "expected 5 or 8"),
        ({"likert": 0}, "likert", "expected an integer in 1..5, got 0"),
        ({"likert": 6}, "likert", "expected an integer in 1..5, got 6"),
        ({"likert": 9, "scale": 8}, "likert", "expected an integer in 1..8, got 9"),
        ({"likert": 2.0}, "likert", "expected an integer in 1..5, got 2.0"),
        ({"likert": True}, "likert", "expected an integer in 1..5, got True"),
        ({"likert": None}, "likert", "missing"),
        ({"scale": None}, "scale", "missing"),
        ({"prompt": [u("q"), a("r")]}, "prompt", "must end with a 'user'"),
    ],
)
def test_likert_errors_name_the_field(overrides: dict[str, Any], field: str, reason: str) -> None:
    err = error("likert", likert_row(**overrides))
    assert err.field == field
    assert reason in err.reason


def test_likert_bad_row_in_file_names_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [likert_row(), likert_row(likert=7)])
    with pytest.raises(DataError) as info:
        load_examples(path, "likert")
    # Line 2 holds the second row; 7 is outside 1..5.
    assert str(info.value) == f"{path}:2: field 'likert': expected an integer in 1..5, got 7"


def test_a_likert_row_under_another_schema_suggests_likert() -> None:
    err = error("preference", likert_row())
    assert err.field == "chosen"
    assert "did you mean schema 'likert'?" in err.reason


@given(st.sampled_from([5, 8]), st.integers(-3, 12))
def test_likert_accepts_exactly_1_to_scale(scale: int, likert: int) -> None:
    result = validate_rows(rows(likert_row(scale=scale, likert=likert)), "likert", on_error="skip")
    if 1 <= likert <= scale:
        assert [ex.likert for ex in result.examples] == [likert]
        assert result.errors == []
    else:
        assert result.examples == []
        assert [err.field for err in result.errors] == ["likert"]


# --- process ---------------------------------------------------------------------------------


def test_process_normalises_and_keeps_meta() -> None:
    example = one("process", process_row(labels=[1, -1], source="prm800k"))
    assert example == ProcessExample(
        [u("2 + 3 * 4?")],
        ["3 * 4 = 12", "2 + 12 = 14"],
        [1, -1],
        meta={"source": "prm800k"},
        location="mem:1",
    )


@pytest.mark.parametrize(
    ("overrides", "field", "reason"),
    [
        ({"steps": []}, "steps", "non-empty list of step strings, got an empty list"),
        ({"steps": "one step"}, "steps", "non-empty list of step strings, got str"),
        ({"steps": ["a", " "]}, "steps[1]", "expected a non-empty string, got ' '"),
        ({"steps": [3, "b"]}, "steps[0]", "expected a non-empty string, got 3"),
        ({"labels": [1]}, "labels", "expected a list of 2 entries (one per step), got 1"),
        ({"labels": 1}, "labels", "expected a list of 2 entries (one per step), got int"),
        ({"labels": [1, 2]}, "labels[1]", "expected -1, 0 or 1"),
        ({"labels": [True, 1]}, "labels[0]", "expected -1, 0 or 1"),
        ({"labels": [1.0, 1]}, "labels[0]", "expected -1, 0 or 1"),
        ({"labels": ["+", 1]}, "labels[0]", "expected -1, 0 or 1"),
        ({"labels": None}, "labels", "missing"),
        ({"prompt": ""}, "prompt", "empty prompt"),
    ],
)
def test_process_errors_name_the_field(overrides: dict[str, Any], field: str, reason: str) -> None:
    err = error("process", process_row(**overrides))
    assert err.field == field
    assert reason in err.reason


def test_process_bad_row_in_file_names_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [process_row(), process_row(), process_row(labels=[1, 5])])
    with pytest.raises(DataError) as info:
        load_examples(path, "process")
    # Line 3 holds the third row; its second label (index 1) is 5.
    assert str(info.value).startswith(f"{path}:3: field 'labels[1]': expected -1, 0 or 1")


step_text = st.text(min_size=1).filter(lambda s: s.strip() != "")


@given(st.lists(st.tuples(step_text, st.sampled_from([-1, 0, 1])), min_size=1, max_size=8))
def test_valid_process_rows_round_trip(steps: list[tuple[str, int]]) -> None:
    data = {"prompt": "q", "steps": [s for s, _ in steps], "labels": [lab for _, lab in steps]}
    example = one("process", data)
    assert list(zip(example.steps, example.labels, strict=True)) == steps
