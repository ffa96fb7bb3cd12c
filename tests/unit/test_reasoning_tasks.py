"""Tests for the procedural reasoning tasks and their verifiers.

Countdown and string tasks (``builtin:countdown``, ``builtin:strings``), the GSM8K-format loader
(``gsm8k:PATH``), the reasoning-gym adapter (``rgym:NAME``) and
``rlhfkit.rewards.verifiers.tasks``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from rlhfkit.data import load_examples, load_rows
from rlhfkit.data.sources import DataError
from rlhfkit.data.tasks import BUILTIN, countdown, gsm8k, strings
from rlhfkit.data.tasks import reasoning_gym as rgym
from rlhfkit.rewards.verifiers import get_verifier, verify
from rlhfkit.rewards.verifiers import tasks as vt
from rlhfkit.rewards.verifiers.tasks import (
    countdown_reward,
    evaluate_expression,
    extract_expression,
    extract_final_answer,
    extract_rg_answer,
    normalize_string_answer,
    reasoning_gym_reward,
    string_reward,
)


def tagged(text: str) -> str:
    return f"<think>work</think>\n<answer>{text}</answer>"


# --- countdown: generation -------------------------------------------------------------------


@pytest.fixture(scope="module")
def countdown_splits() -> dict[str, list[dict[str, Any]]]:
    return {split: countdown.builtin_split(split) for split in ("train", "heldout")}


def test_countdown_registered_and_sizes(countdown_splits: dict[str, list[dict[str, Any]]]) -> None:
    assert BUILTIN["countdown"] is countdown.builtin_split
    assert len(countdown_splits["train"]) == 2000
    assert len(countdown_splits["heldout"]) == 200
    assert get_verifier("countdown") is countdown_reward


def test_countdown_deterministic_and_seeded() -> None:
    assert countdown.generate(50, seed=7) == countdown.generate(50, seed=7)
    assert countdown.generate(50, seed=7) != countdown.generate(50, seed=8)
    assert countdown.builtin_split("heldout") == countdown.builtin_split("heldout")


def test_countdown_splits_disjoint(countdown_splits: dict[str, list[dict[str, Any]]]) -> None:
    def problems(rows: list[dict[str, Any]]) -> set[tuple[tuple[int, ...], int]]:
        return {(tuple(sorted(r["numbers"])), r["target"]) for r in rows}

    train, heldout = countdown_splits["train"], countdown_splits["heldout"]
    assert len(problems(train)) == len(train) and len(problems(heldout)) == len(heldout)
    assert not problems(train) & problems(heldout)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}


def test_countdown_rows_are_well_formed(countdown_splits: dict[str, list[dict[str, Any]]]) -> None:
    rows = countdown_splits["train"] + countdown_splits["heldout"]
    assert Counter(len(r["numbers"]) for r in rows).keys() == {3, 4}
    assert any("/" in r["answer"] for r in rows) and any("(" in r["answer"] for r in rows)
    for row in rows:
        assert row["verifier"] == "countdown" and row["task"] == "countdown"
        assert row["numbers"] == sorted(row["numbers"])
        assert all(1 <= k <= 25 for k in row["numbers"])
        assert 1 <= row["target"] <= 100 and row["target"] not in row["numbers"]
        assert f"numbers {row['numbers']}" in row["prompt"]
        assert f"equals {row['target']}." in row["prompt"]
        # the reference answer uses every number exactly once and equals the target
        result = evaluate_expression(row["answer"])
        assert result is not None
        value, used = result
        assert value == row["target"] and sorted(used) == row["numbers"]


def test_every_countdown_answer_verifies(countdown_splits: dict[str, list[dict[str, Any]]]) -> None:
    for row in countdown_splits["train"] + countdown_splits["heldout"]:
        fields = json.loads(json.dumps(row))
        assert verify(tagged(row["answer"]), **fields) == 1.0, row
        assert verify(f"I get {row['answer']} = {row['target']}.", **fields) == 1.0, row


def test_countdown_through_load_rows_and_schema() -> None:
    rows = load_rows("builtin:countdown", split="heldout")
    assert rows[0].location == "builtin:countdown[heldout]:row 1"
    result = load_examples("builtin:countdown", "verifiable", split="heldout", on_error="skip")
    assert not result.errors and len(result.examples) == 200
    assert result.examples[0].verifier == "countdown"
    assert set(result.examples[0].meta) >= {"numbers", "target", "task"}


@pytest.mark.parametrize(
    ("tree", "text"),
    [
        (("-", 10, ("+", 2, 3)), "10 - (2 + 3)"),
        (("-", ("-", 10, 2), 3), "10 - 2 - 3"),
        (("*", ("+", 1, 2), 3), "(1 + 2) * 3"),
        (("+", 1, ("*", 2, 3)), "1 + 2 * 3"),
        (("/", 12, ("*", 2, 3)), "12 / (2 * 3)"),
        (("*", 12, ("/", 6, 3)), "12 * 6 / 3"),  # exact arithmetic: same value
        (("/", ("*", 12, 2), 3), "12 * 2 / 3"),
        (("+", ("-", 9, 4), ("-", 8, 1)), "9 - 4 + 8 - 1"),
        (("-", ("+", 9, 4), ("-", 8, 1)), "9 + 4 - (8 - 1)"),
    ],
)
def test_countdown_render_parentheses(tree: Any, text: str) -> None:
    assert countdown.render(tree) == text
    result = evaluate_expression(text)
    assert result is not None and result[0] == countdown._value(tree)


def test_countdown_generate_rejects_bad_args() -> None:
    with pytest.raises(ValueError, match="n must be"):
        countdown.generate(-1, seed=0)
    with pytest.raises(ValueError, match="n_numbers"):
        countdown.generate(1, seed=0, n_numbers=(1,))
    with pytest.raises(ValueError, match="distinct problems"):
        countdown.generate(50, seed=0, n_numbers=(2,), max_number=2, max_target=4)
    with pytest.raises(ValueError, match="unknown split"):
        countdown.builtin_split("test")


# --- countdown: verifier ---------------------------------------------------------------------

NUMS = [2, 3, 7]


@pytest.mark.parametrize(
    ("completion", "numbers", "target", "expected"),
    [
        (tagged("2 * 7 + 3"), NUMS, 17, 1.0),
        (tagged("(7 * 2) + 3 = 17"), NUMS, 17, 1.0),
        ("Let me try.\nSo 2*7+3 = 17.", NUMS, 17, 1.0),
        ("2 * 7 + 3 = 17\nSo the answer is 17.", NUMS, 17, 1.0),  # last line has no operator
        ("Answer: 7 × 2 + 3", NUMS, 17, 1.0),
        ("- 2 * 7 + 3", NUMS, 17, 1.0),  # a Markdown bullet is not a unary minus
        ("3 * 7", [2, 3, 7, 50], 21, 1.0),  # at most once: unused numbers are fine
        ("5 * 5 + 2", [5, 5, 2], 27, 1.0),  # a number given twice may be used twice
        ("(1 / 10 + 2 / 10) * 10", [1, 2, 10, 10, 10], 3, 1.0),  # exact, not float
        ("(-(2 - 7)) * 3 + 2", [2, 2, 3, 7], 17, 1.0),  # unary minus inside
        ("-(2 - 7) * 3 + 2", [2, 2, 3, 7], 17, 0.0),  # a leading '-' is read as a bullet
        ("2 * 7 + 3", ["2", "3", "7"], "17", 1.0),  # string fields
        (tagged("2 + 3") + " then " + tagged("2 * 7 + 3"), NUMS, 17, 1.0),  # last tag wins
        (tagged("2 * 7 + 3") + " then " + tagged("2 + 3"), NUMS, 17, 0.0),
        (tagged("2 * 7 + 3") + "\n(7 - 2) * 3", NUMS, 17, 1.0),  # tags win over later text
        ("7 * 7", NUMS, 49, 0.0),  # reused number
        ("2 * 8 + 1", NUMS, 17, 0.0),  # numbers not given
        ("2 * 7 + 3", NUMS, 18, 0.0),  # wrong value
        ("7 / 3 + 2", NUMS, 4, 0.0),  # 13/3, not 4
        ("7 / (3 - 3)", [3, 3, 7], 7, 0.0),  # division by zero
        ("2 ** 3", [2, 3], 8, 0.0),
        ("7 // 2 + 3", NUMS, 6, 0.0),
        ("3.5 * 2", [3, 2], 7, 0.0),  # floats are not given numbers
        ("07 * 2 + 3", NUMS, 17, 0.0),  # leading zero: not valid syntax
        ("2 * 7 = 14\n14 + 3 = 17", NUMS, 17, 0.0),  # a chain of steps is not one expression
        ("(2 * 7 + 3", NUMS, 17, 0.0),  # unbalanced
        (tagged("__import__('os').system('echo pwned')"), NUMS, 17, 0.0),
        (tagged("[2, 3, 7]"), NUMS, 17, 0.0),
        ("", NUMS, 17, 0.0),
        ("I have no idea.", NUMS, 17, 0.0),
    ],
)
def test_countdown_reward(
    completion: str, numbers: list[Any], target: Any, expected: float
) -> None:
    reward = countdown_reward(completion, numbers, target)
    assert isinstance(reward, float) and reward == expected


@pytest.mark.parametrize(
    ("completion", "expression"),
    [
        ("<answer> (3 + 5) * 2 </answer>", "(3 + 5) * 2"),
        ("We need 16: (3 + 5) * 2 = 16.", "(3 + 5) * 2"),
        ("Step 2: 10 * 2", "10 * 2"),
        ("So 3 + 4.", "3 + 4"),
        ("Try 6 ÷ 3 × 4", "6 / 3 * 4"),
        ("<answer>16</answer>", "16"),
        ("the answer is 16", "16"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_expression(completion: str, expression: str | None) -> None:
    assert extract_expression(completion) == expression


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "().__class__",
        "open('x')",
        "lambda: 1",
        "1 if 1 else 2",
        "[1, 2]",
        "2 ** 10",
        "7 % 3",
        "1e3",
        "0x10",
        "True + 1",
        "1 / 0",
        "(1 - 1) / (2 - 2)",
        "1 +",
        "",
        "+".join(["1"] * 101),  # over MAX_EXPRESSION_CHARS
        "(" * 150 + "1" + ")" * 150,  # deep nesting: rejected without a crash
    ],
)
def test_evaluate_expression_rejects(expression: str) -> None:
    assert evaluate_expression(expression) is None


def test_evaluate_expression_values() -> None:
    assert evaluate_expression("(1 / 3) * 3") == (Fraction(1), [1, 3, 3])
    assert evaluate_expression(" 10 - 2 - 3 ") == (Fraction(5), [10, 2, 3])
    assert evaluate_expression("-4 / 8") == (Fraction(-1, 2), [4, 8])
    assert evaluate_expression("(1 + 2\n* 3)") == (Fraction(7), [1, 2, 3])  # newline in brackets
    assert evaluate_expression("1 + 2\n* 3") is None  # as in Python: a newline ends it


def test_countdown_reward_never_runs_code(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr("builtins.__import__", lambda *a, **k: calls.append("import"))
    completion = tagged("__import__('os').system('touch /tmp/pwned')")
    assert countdown_reward(completion, NUMS, 17) == 0.0
    assert calls == []


def test_countdown_reward_bad_fields() -> None:
    with pytest.raises(ValueError, match="integer 'numbers' and 'target'"):
        countdown_reward("1 + 2", ["a", 2], 3)
    with pytest.raises(ValueError, match="integer 'numbers' and 'target'"):
        countdown_reward("1 + 2", [1, 2], None)  # type: ignore[arg-type]


# --- strings ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def string_splits() -> dict[str, list[dict[str, Any]]]:
    return {split: strings.builtin_split(split) for split in ("train", "heldout")}


def test_strings_registered_sizes_and_kinds(string_splits: dict[str, list[dict[str, Any]]]) -> None:
    assert BUILTIN["strings"] is strings.builtin_split
    assert get_verifier("strings") is string_reward
    assert len(string_splits["train"]) == 1000 and len(string_splits["heldout"]) == 200
    for rows in string_splits.values():
        assert {r["task"] for r in rows} == set(strings.KINDS)
        assert all(r["case_sensitive"] == (r["task"] in strings.CASE_TASKS) for r in rows)
        assert all(r["verifier"] == "strings" for r in rows)


def test_strings_deterministic_and_disjoint(string_splits: dict[str, list[dict[str, Any]]]) -> None:
    assert strings.generate(40, seed=3) == strings.generate(40, seed=3)
    assert strings.generate(40, seed=3) != strings.generate(40, seed=4)
    train = [r["prompt"] for r in string_splits["train"]]
    heldout = [r["prompt"] for r in string_splits["heldout"]]
    assert len(set(train)) == len(train) and len(set(heldout)) == len(heldout)
    assert not set(train) & set(heldout)


def _expected_string_answer(row: dict[str, Any]) -> str:
    """The answer recomputed from the prompt alone."""
    prompt, task = row["prompt"], row["task"]
    quoted = re.findall(r"'([^']*)'", prompt)
    if task == "sort_words":
        listed = re.search(r"alphabetically: ([a-z, ]+)\.", prompt)
        assert listed is not None
        return " ".join(sorted(listed.group(1).split(", ")))
    if task == "count_letter":
        letter, text = quoted
        return str(sum(c == letter for c in text))
    (text,) = quoted
    return {
        "reverse": lambda: "".join(reversed(text)),
        "reverse_words": lambda: " ".join(text.split()[::-1]),
        "remove_vowels": lambda: re.sub("[aeiou]", "", text),
        "uppercase": text.upper,
        "lowercase": text.lower,
    }[task]()


def test_string_answers_are_correct_and_verify(
    string_splits: dict[str, list[dict[str, Any]]],
) -> None:
    for row in string_splits["train"] + string_splits["heldout"]:
        assert row["answer"] == _expected_string_answer(row), row
        fields = json.loads(json.dumps(row))
        assert verify(row["answer"], **fields) == 1.0
        assert verify(tagged(row["answer"]), **fields) == 1.0
        assert verify(f"Thinking...\nAnswer: '{row['answer']}'.", **fields) == 1.0
        assert verify(row["answer"] + "x", **fields) == 0.0


def test_strings_kinds_stay_balanced() -> None:
    # one-word variants run out of distinct prompts first; their kinds must not become rare
    counts = Counter(r["task"] for r in strings.generate(3500, seed=2))
    assert min(counts.values()) >= 400 and max(counts.values()) <= 600, counts


def test_strings_through_schema() -> None:
    result = load_examples("builtin:strings", "verifiable", split="heldout", on_error="skip")
    assert not result.errors and len(result.examples) == 200


def test_strings_generate_rejects_bad_args() -> None:
    with pytest.raises(ValueError, match="kinds"):
        strings.generate(3, seed=0, kinds=("reverse", "rot13"))
    with pytest.raises(ValueError, match="n must be"):
        strings.generate(-2, seed=0)


@pytest.mark.parametrize(
    ("completion", "answer", "case_sensitive", "expected"),
    [
        ("ananab", "ananab", True, 1.0),
        ("  'ananab'. ", "ananab", True, 1.0),
        ('"ananab"', "ananab", True, 1.0),
        ("`ananab`", "ananab", True, 1.0),
        ("“ananab”", "ananab", True, 1.0),
        ("apple   fig\tpear", "apple fig pear", True, 1.0),
        ("Ananab", "ananab", True, 0.0),
        ("Ananab", "ananab", False, 1.0),
        ("HELLO WORLD", "HELLO WORLD", True, 1.0),
        ("Hello World", "HELLO WORLD", True, 0.0),  # the task is about case
        ("Hello World", "HELLO WORLD", False, 1.0),
        ("Reversing letters.\nANSWER: ananab\nHope this helps", "ananab", True, 1.0),
        ("answer: wrong\nFinal answer: ananab", "ananab", True, 1.0),  # last Answer: line
        ("<answer>ananab</answer>\nAnswer: banana", "ananab", True, 1.0),  # tag first
        ("Here it is:\n\nananab\n\n", "ananab", True, 1.0),  # last non-empty line
        ("ananab is the answer", "ananab", True, 0.0),
        ("3", "3", False, 1.0),
        ("three", "3", False, 0.0),
        ("", "ananab", True, 0.0),
        ("   \n ", "ananab", True, 0.0),
    ],
)
def test_string_reward(completion: str, answer: str, case_sensitive: bool, expected: float) -> None:
    reward = string_reward(completion, answer, case_sensitive)
    assert isinstance(reward, float) and reward == expected


def test_string_reward_defaults_to_case_sensitive() -> None:
    assert string_reward("abc", "ABC") == 0.0
    assert verify("abc", verifier="strings", answer="ABC") == 0.0
    assert verify("abc", verifier="strings", answer="ABC", case_sensitive=False) == 1.0


def test_extract_final_answer_and_normalize() -> None:
    assert extract_final_answer("x\n<answer> a b </answer>") == " a b "
    assert extract_final_answer("line one\nAnswer:  42 ") == "42 "
    assert extract_final_answer("") is None
    assert normalize_string_answer("  ' Hello  World '. ") == "Hello World"
    assert normalize_string_answer("Hello.", case_sensitive=False) == "hello"


# --- gsm8k -----------------------------------------------------------------------------------

GSM8K_ROWS = [
    {
        "question": "Tom has 3 boxes of 4 apples. How many apples does he have?",
        "answer": "He has 3 * 4 = <<3*4=12>>12 apples.\n#### 12",
        "id": "q1",
    },
    {
        "question": "A car costs $1,200 and a bike $34. What do both cost?",
        "answer": "Both cost 1200 + 34 = <<1200+34=1234>>1234 dollars.\n#### 1,234",
    },
]


def write_jsonl(path: Path, records: list[Any], blank_after_first: bool = True) -> Path:
    lines = [json.dumps(r) for r in records]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_gsm8k_converts_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    rows = gsm8k.load_gsm8k(path)
    assert rows == [
        {
            "id": "q1",
            "prompt": GSM8K_ROWS[0]["question"] + gsm8k.ANSWER_INSTRUCTION,
            "answer": "12",
            "solution": "He has 3 * 4 = 12 apples.",
            "verifier": "math",
            "task": "gsm8k",
        },
        {
            "prompt": GSM8K_ROWS[1]["question"] + gsm8k.ANSWER_INSTRUCTION,
            "answer": "1234",
            "solution": "Both cost 1200 + 34 = 1234 dollars.",
            "verifier": "math",
            "task": "gsm8k",
        },
    ]
    assert "#### <number>" in rows[0]["prompt"]
    assert gsm8k.load_gsm8k(path, limit=1) == rows[:1]


@pytest.mark.parametrize(
    ("final", "expected"), [("72", "72"), ("-5", "-5"), ("$1,000,000", "1000000"), ("2.5", "2.5")]
)
def test_gsm8k_final_numbers(final: str, expected: str) -> None:
    row = gsm8k.convert({"question": "q?", "answer": f"r\n#### {final}"}, "f.jsonl:1")
    assert row["answer"] == expected


def test_gsm8k_source_prefix(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", GSM8K_ROWS)
    rows = load_rows(f"gsm8k:{path}")
    assert [r.location for r in rows] == [f"{path}:1", f"{path}:3"]  # blank line 2 counted
    assert rows[1].data["answer"] == "1234"
    assert len(load_rows(f"gsm8k:{path}", limit=1)) == 1
    result = load_examples(f"gsm8k:{path}", "verifiable", on_error="skip")
    assert not result.errors and [e.answer for e in result.examples] == ["12", "1234"]


@pytest.mark.parametrize(
    ("record", "field", "reason"),
    [
        ({"question": "q?", "answer": "no marker 12"}, "answer", "no '####' marker"),
        ({"question": "q?", "answer": "r\n#### twelve"}, "answer", "expected a number"),
        ({"question": "q?", "answer": "r\n####"}, "answer", "expected a number"),
        ({"answer": "r\n#### 1"}, "question", "got nothing"),
        ({"question": "  ", "answer": "r\n#### 1"}, "question", "non-empty string"),
        ({"question": "q?", "answer": 12}, "answer", "non-empty string, got 12"),
    ],
)
def test_gsm8k_bad_row_names_file_line_and_field(
    tmp_path: Path, record: dict[str, Any], field: str, reason: str
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [GSM8K_ROWS[0], record])
    with pytest.raises(DataError) as info:
        load_rows(f"gsm8k:{path}")
    err = info.value
    assert (err.location, err.field) == (f"{path}:3", field)
    assert str(err).startswith(f"{path}:3: field '{field}': ")
    assert reason in err.reason


def test_gsm8k_missing_file_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        gsm8k.load_gsm8k(tmp_path / "missing.jsonl")
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GSM8K_ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: invalid JSON"):
        gsm8k.load_gsm8k(path)


# --- reasoning-gym ---------------------------------------------------------------------------

RG_SPECS = ["chain_sum?size=40&heldout_size=15&seed=2", "spell_backward?size=25&heldout_size=10"]


@pytest.fixture(scope="module")
def rg_rows() -> dict[str, dict[str, list[dict[str, Any]]]]:
    return {
        spec: {split: rgym.split_rows(spec, split) for split in ("train", "heldout")}
        for spec in RG_SPECS
    }


def test_rgym_parse_spec() -> None:
    assert rgym.parse_spec("chain_sum") == (
        "chain_sum",
        {"size": rgym.DEFAULT_SIZE, "heldout_size": rgym.DEFAULT_HELDOUT_SIZE, "seed": 0},
    )
    assert rgym.parse_spec("leg_counting?seed=4&size=9") == (
        "leg_counting",
        {"size": 9, "heldout_size": rgym.DEFAULT_HELDOUT_SIZE, "seed": 4},
    )
    for bad, match in [
        ("", "name a reasoning-gym dataset"),
        ("?size=3", "name a reasoning-gym dataset"),
        ("chain_sum?size=-1", "size must be an integer"),
        ("chain_sum?seed=x", "seed must be an integer"),
        ("chain_sum?min_terms=2", "unknown setting"),
        ("chain_sum?size", "unknown setting"),
    ]:
        with pytest.raises(ValueError, match=match):
            rgym.parse_spec(bad)


def test_rgym_sizes_deterministic_disjoint(
    rg_rows: dict[str, dict[str, list[dict[str, Any]]]],
) -> None:
    for spec, splits in rg_rows.items():
        _, settings = rgym.parse_spec(spec)
        assert len(splits["train"]) == settings["size"]
        assert len(splits["heldout"]) == settings["heldout_size"]
        train = {r["prompt"] for r in splits["train"]}
        heldout = {r["prompt"] for r in splits["heldout"]}
        assert len(train) == settings["size"] and len(heldout) == settings["heldout_size"]
        assert not train & heldout
        assert rgym.split_rows(spec, "train") == splits["train"]
    other_seed = rgym.split_rows("chain_sum?size=40&heldout_size=15&seed=3", "train")
    assert other_seed != rg_rows[RG_SPECS[0]]["train"]


def test_rgym_exclude_is_respected() -> None:
    first = rgym.generate("chain_sum", 10, seed=5)
    questions = {r["rg_entry"]["question"] for r in first[:5]}
    again = rgym.generate("chain_sum", 10, seed=5, exclude=questions)
    assert not questions & {r["rg_entry"]["question"] for r in again}
    assert again[:5] == first[5:]  # the same stream, minus the excluded questions


def test_rgym_rows_json_round_trip_and_fields(
    rg_rows: dict[str, dict[str, list[dict[str, Any]]]],
) -> None:
    for spec, splits in rg_rows.items():
        name = spec.partition("?")[0]
        for row in splits["train"] + splits["heldout"]:
            assert json.loads(json.dumps(row)) == row
            assert row["verifier"] == "reasoning_gym" and row["rg_dataset"] == name
            assert row["task"] == f"rgym:{name}"
            assert set(row["rg_entry"]) == {"question", "answer", "metadata"}
            assert row["prompt"] == row["rg_entry"]["question"] + rgym.ANSWER_INSTRUCTION
            assert row["answer"] == row["rg_entry"]["answer"]


def test_rgym_answers_verify(rg_rows: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    assert get_verifier("reasoning_gym") is reasoning_gym_reward
    for splits in rg_rows.values():
        for row in splits["train"] + splits["heldout"]:
            fields = json.loads(json.dumps(row))
            assert verify(tagged(row["answer"]), **fields) == 1.0
            assert verify(f"Let me think.\n{row['answer']}", **fields) == 1.0
            assert verify(tagged("9" + row["answer"]), **fields) < 1.0
            assert verify("", **fields) == 0.0


def test_rgym_entry_as_json_text() -> None:
    row = rgym.generate("chain_sum", 1, seed=11)[0]
    text = json.dumps(row["rg_entry"])
    assert reasoning_gym_reward(tagged(row["answer"]), "chain_sum", text) == 1.0
    assert reasoning_gym_reward(tagged("not a number"), "chain_sum", text) == 0.0
    with pytest.raises(ValueError, match="JSON object"):
        reasoning_gym_reward("1", "chain_sum", "[1, 2]")


def test_rgym_source_prefix_and_schema() -> None:
    spec = "rgym:chain_sum?size=6&heldout_size=4"
    rows = load_rows(spec)
    assert [r.location for r in rows][:2] == [f"{spec}[train]:row 1", f"{spec}[train]:row 2"]
    assert len(load_rows(spec, split="heldout")) == 4
    assert len(load_rows(spec, limit=2)) == 2
    result = load_examples(spec, "verifiable", on_error="skip")
    assert not result.errors and result.examples[0].verifier == "reasoning_gym"
    with pytest.raises(ValueError, match="no split 'test'"):
        load_rows(spec, split="test")


def test_rgym_refuses_unknown_and_answerless_datasets() -> None:
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'no_such_task'"):
        load_rows("rgym:no_such_task")
    with pytest.raises(ValueError, match="no reference answer"):
        rgym.generate("graph_color", 2, seed=0)
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset"):
        reasoning_gym_reward("1", "no_such_task", {"question": "q", "answer": "1"})


def test_rgym_scorer_errors_score_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    def raising(answer: str | None, entry: dict[str, Any]) -> float:
        raise ValueError(f"cannot parse {answer!r}")

    monkeypatch.setattr(vt, "_rg_scorer", lambda name: raising)
    assert reasoning_gym_reward("<answer>x</answer>", "chain_sum", {"answer": "1"}) == 0.0


@pytest.mark.parametrize(("raw", "clipped"), [(1.0000000000000002, 1.0), (-0.5, 0.0), (0.4, 0.4)])
def test_rgym_score_is_clipped(monkeypatch: pytest.MonkeyPatch, raw: float, clipped: float) -> None:
    monkeypatch.setattr(vt, "_rg_scorer", lambda name: lambda answer, entry: raw)
    assert reasoning_gym_reward("<answer>x</answer>", "chain_sum", {"answer": "1"}) == clipped


def test_rgym_real_scorer_overshoot_is_clipped() -> None:
    # reasoning-gym's spell_backward sums 1/len per matching prefix character in floats
    entry = rgym.generate("spell_backward", 1, seed=0)[0]["rg_entry"]
    completion = tagged(entry["answer"] + "zzz")
    assert 0.0 <= reasoning_gym_reward(completion, "spell_backward", entry) <= 1.0


def test_extract_rg_answer() -> None:
    assert extract_rg_answer("a\n<answer>\n 42 \n</answer>\nb") == "42"
    assert extract_rg_answer("work\n  42  \n\n") == "42"
    assert extract_rg_answer("") is None
