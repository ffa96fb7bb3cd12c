"""Tests for rlhfkit.data.sources: reading rows and locating them."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from rlhfkit.data import DataError, Row, load_rows
from rlhfkit.data import sources as sources_module


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# --- DataError ------------------------------------------------------------------------------


def test_data_error_str_with_and_without_field() -> None:
    err = DataError("data.jsonl:4", "messages[2].role", "bad role")
    assert str(err) == "data.jsonl:4: field 'messages[2].role': bad role"
    assert (err.location, err.field, err.reason) == ("data.jsonl:4", "messages[2].role", "bad role")
    assert str(DataError("data.jsonl:3", None, "invalid JSON")) == "data.jsonl:3: invalid JSON"
    assert isinstance(err, ValueError)


def test_data_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(DataError("f.jsonl:1", "prompt", "missing")))
    assert str(err) == "f.jsonl:1: field 'prompt': missing"


def test_row_is_frozen() -> None:
    row = Row(data={"a": 1}, location="x.jsonl:1")
    with pytest.raises(AttributeError):
        row.location = "y"  # type: ignore[misc]


# --- JSON lines -----------------------------------------------------------------------------


def test_jsonl_locations_count_blank_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "data.jsonl", ['{"a": 1}', "", "   ", '{"a": 2}', '{"a": 3}'])
    rows = load_rows(path)
    assert [row.data for row in rows] == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert [row.location for row in rows] == [f"{path}:1", f"{path}:4", f"{path}:5"]


def test_jsonl_limit_and_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n{"a": 2}\r\n{"a": 3}\r\n')
    rows = load_rows(str(path), limit=2)
    assert [row.data for row in rows] == [{"a": 1}, {"a": 2}]
    assert rows[1].location.endswith("data.jsonl:3")
    assert load_rows(str(path), limit=0) == []


def test_jsonl_malformed_line_names_file_line_and_column(tmp_path: Path) -> None:
    # Line 3 is `{"a": 1 "b": 2}`: the parser expects ',' at 0-based offset 8, i.e. column 9.
    path = write_lines(tmp_path / "data.jsonl", ['{"a": 0}', "", '{"a": 1 "b": 2}'])
    with pytest.raises(DataError) as info:
        load_rows(path)
    assert str(info.value) == (
        f"{path}:3: invalid JSON (Expecting ',' delimiter at column 9). Fix the line or remove it."
    )
    assert info.value.field is None


def test_jsonl_line_must_be_object(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "data.jsonl", ['{"a": 0}', "[1, 2]"])
    with pytest.raises(DataError, match=r"data\.jsonl:2: expected a JSON object .* got list"):
        load_rows(path)


def test_jsonl_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"a": 0}\n{"a": "\xff"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2: not valid UTF-8"):
        load_rows(str(path))


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "train.jsonl")
    with pytest.raises(FileNotFoundError, match=r"nope/train\.jsonl: no such file"):
        load_rows(missing)
    with pytest.raises(FileNotFoundError, match=r"train\.csv"):
        load_rows(str(tmp_path / "train.csv"))


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'.*\.jsonl"):
        load_rows(str(path))


def test_negative_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        load_rows("builtin:arithmetic", limit=-1)


# --- Formats read through `datasets` --------------------------------------------------------


RECORDS = [
    {"prompt": "What is 1 + 1?", "answer": "2"},
    {"prompt": "What is 2 + 2?", "answer": "4"},
    {"prompt": "What is 3 + 3?", "answer": "6"},
]


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('prompt,answer\n"What is 1 + 1?",2\n"What is 2 + 2?",4\n"What is 3 + 3?",6\n')
    rows = load_rows(str(path))
    assert [row.data for row in rows] == [{**r, "answer": int(r["answer"])} for r in RECORDS]
    assert [row.location for row in rows] == [f"{path}:row {i}" for i in (1, 2, 3)]


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    rows = load_rows(str(path), limit=2)
    assert [row.data for row in rows] == RECORDS[:2]
    assert [row.location for row in rows] == [f"{path}:row 1", f"{path}:row 2"]


def test_json_array(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    rows = load_rows(str(path))
    assert [row.data for row in rows] == RECORDS
    assert rows[2].location == f"{path}:row 3"


def test_malformed_json_file(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[{"a": 1}, {"a": 2')
    with pytest.raises(DataError, match=r"data\.json: could not read the file as json"):
        load_rows(str(path))


# --- Built-in and hub sources ---------------------------------------------------------------


def test_builtin_locations() -> None:
    rows = load_rows("builtin:instructions", split="heldout", limit=3)
    assert [row.location for row in rows] == [
        f"builtin:instructions[heldout]:row {i}" for i in (1, 2, 3)
    ]
    assert "messages" in rows[0].data


def test_builtin_unknown_name_and_split() -> None:
    with pytest.raises(ValueError, match=r"builtin:instructions, builtin:arithmetic"):
        load_rows("builtin:nope")
    with pytest.raises(ValueError, match=r"no split 'test'.*train, heldout"):
        load_rows("builtin:instructions", split="test")


def test_hub_error_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError) as info:
        load_rows("owner/name", split="test")
    assert str(info.value).startswith("hub:owner/name[test]: could not load 'owner/name'")
    assert "Couldn't reach" in info.value.reason


def test_hub_rows_are_located(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def fake_hub(name: str, split: str) -> datasets.Dataset:
        assert (name, split) == ("owner/name", "train")
        return datasets.Dataset.from_list(RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    rows = sources_module.load_rows("owner/name", limit=2)
    assert [row.location for row in rows] == [
        "hub:owner/name[train]:row 1",
        "hub:owner/name[train]:row 2",
    ]
    assert [row.data for row in rows] == RECORDS[:2]


def test_nonexistent_hub_dataset_offline_fails_fast() -> None:
    # A real call into `datasets`, kept offline so that it never touches the network.
    code = (
        "from rlhfkit.data import DataError, load_rows\n"
        "try:\n"
        "    load_rows('rlhfkit-no-such-owner/no-such-dataset')\n"
        "except DataError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        "hub:rlhfkit-no-such-owner/no-such-dataset[train]: could not load"
    ), out.stdout
