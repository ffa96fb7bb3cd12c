"""Tests for the built-in datasets (rlhfkit.data.tasks)."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhfkit.data import load_examples, load_rows, validate_rows
from rlhfkit.data.sources import Row
from rlhfkit.data.tasks import BUILTIN, builtin_rows, instructions
from rlhfkit.data.tasks.arithmetic import as_sft_rows, builtin_split, evaluate, generate

TASK_DIR = Path(instructions.__file__).parent


def safe_eval(expression: str) -> int:
    """Python's own evaluation of an expression made only of digits, spaces and + - *."""
    assert re.fullmatch(r"[0-9 +*-]+", expression), expression
    return eval(expression, {"__builtins__": {}})  # only digits and operators: checked above


def first_user(row: dict[str, Any]) -> str:
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def prompt_of(row: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in row["messages"][:-1])


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict[str, Any]]]:
    return {
        split: [row.data for row in load_rows("builtin:instructions", split=split)]
        for split in ("train", "heldout")
    }


# --- builtin:instructions --------------------------------------------------------------------


def test_instructions_sizes_and_task_types(splits: dict[str, list[dict[str, Any]]]) -> None:
    assert len(splits["train"]) >= 300
    assert len(splits["heldout"]) >= 50
    train_tasks = Counter(row["task"] for row in splits["train"])
    assert len(train_tasks) >= 8
    assert set(Counter(row["task"] for row in splits["heldout"])) == set(train_tasks)
    assert {"multi_turn", "with_system"} <= set(train_tasks)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_instructions_validate_with_zero_errors(split: str) -> None:
    result = load_examples("builtin:instructions", "sft", split=split, on_error="skip")
    assert result.errors == []
    assert len(result.examples) == len(builtin_rows("instructions", split))
    assert all("task" in ex.meta for ex in result.examples)


def test_instructions_have_system_and_multi_turn_rows(
    splits: dict[str, list[dict[str, Any]]],
) -> None:
    train = splits["train"]
    assert sum(row["messages"][0]["role"] == "system" for row in train) >= 10
    assert sum(len(row["messages"]) >= 4 for row in train) >= 10


def test_no_prompt_overlap_between_splits(splits: dict[str, list[dict[str, Any]]]) -> None:
    train, heldout = splits["train"], splits["heldout"]
    assert not {prompt_of(r) for r in train} & {prompt_of(r) for r in heldout}
    assert not {first_user(r) for r in train} & {first_user(r) for r in heldout}
    # every row asks something new, within a split too
    everything = [first_user(r) for r in train + heldout]
    assert len(everything) == len(set(everything))


def test_replies_share_one_style(splits: dict[str, list[dict[str, Any]]]) -> None:
    for row in splits["train"] + splits["heldout"]:
        for message in row["messages"]:
            if message["role"] == "assistant":
                work, answer = message["content"].split("\nAnswer: ")
                assert work.strip() and answer.strip() and "\n" not in answer


def test_replies_are_short(splits: dict[str, list[dict[str, Any]]]) -> None:
    # ~4 characters per token: keeps most rows well under ~80 tokens with the chat template.
    sizes = sorted(sum(len(m["content"]) for m in r["messages"]) for r in splits["train"])
    assert sizes[int(0.9 * len(sizes))] < 250
    assert sizes[-1] < 400


def answer_of(content: str) -> str:
    return content.rsplit("\nAnswer: ", 1)[1]


def test_instruction_arithmetic_is_correct(splits: dict[str, list[dict[str, Any]]]) -> None:
    checked = 0
    for row in splits["train"] + splits["heldout"]:
        messages = row["messages"]
        for user, reply in itertools.pairwise(messages):
            if user["role"] != "user" or reply["role"] != "assistant":
                continue
            match = re.search(r"(\d+ [-+*] \d+)", user["content"])
            if row["task"] in ("arithmetic", "multi_turn", "with_system") and match:
                # the answer, and every "x op y = z" step of the working, is right
                assert int(answer_of(reply["content"])) == safe_eval(match.group(1))
                for lhs, rhs in re.findall(r"(\d+ [-+*] \d+) = (\d+)", reply["content"]):
                    assert safe_eval(lhs) == int(rhs)
                checked += 1
    assert checked >= 48


def test_instruction_follow_up_multiplication_is_correct(
    splits: dict[str, list[dict[str, Any]]],
) -> None:
    for row in splits["train"]:
        messages = row["messages"]
        if len(messages) == 4 and messages[2]["content"].startswith("Now multiply that by"):
            k = int(re.search(r"by (\d+)", messages[2]["content"]).group(1))
            assert (
                int(answer_of(messages[3]["content"])) == int(answer_of(messages[1]["content"])) * k
            )


def test_instruction_facts_spot_checks(splits: dict[str, list[dict[str, Any]]]) -> None:
    """A few tasks re-derived independently from the prompt text."""
    for row in splits["train"] + splits["heldout"]:
        user, reply = first_user(row), answer_of(row["messages"][-1]["content"])
        task = row["task"]
        if task == "reverse_word":
            assert reply == re.search(r"'(\w+)'", user).group(1)[::-1]
        elif task == "count_letters":
            assert int(reply) == len(re.search(r"'(\w+)'", user).group(1))
        elif task == "count_words":
            assert int(reply) == len(re.search(r'"(.*)"', user).group(1).split())
        elif task == "uppercase":
            assert reply == re.search(r'"(.*)"', user).group(1).upper()
        elif task == "lowercase":
            assert reply == re.search(r'"(.*)"', user).group(1).lower()
        elif task == "sort_numbers":
            numbers = [int(x) for x in re.search(r": ([\d, ]+)\.$", user).group(1).split(", ")]
            expected = sorted(numbers, reverse="largest first" in user or "largest to" in user)
            assert reply == ", ".join(map(str, expected))
        elif task == "even_odd":
            number = int(re.search(r"\d+", user).group())
            assert reply == ("even" if number % 2 == 0 else "odd")


def test_capitals_known_values() -> None:
    capitals = dict(instructions.CAPITALS)
    assert capitals["Australia"] == "Canberra"
    assert capitals["Canada"] == "Ottawa"
    assert capitals["Switzerland"] == "Bern"
    assert len(capitals) == len(instructions.CAPITALS)  # no country twice


def test_word_lists_have_no_duplicates() -> None:
    for name in ("WORDS", "SENTENCES", "ANTONYMS", "DEFINITIONS", "NAMES", "GIFTS"):
        values = getattr(instructions, name)
        assert len(values) == len(set(values)), name


def test_shipped_files_equal_a_fresh_build(tmp_path: Path) -> None:
    instructions.main(["--out-dir", str(tmp_path)])
    for split in ("train", "heldout"):
        name = f"instructions_{split}.jsonl"
        assert (tmp_path / name).read_text("utf-8") == (TASK_DIR / name).read_text("utf-8"), (
            f"{name} is stale: run `python -m rlhfkit.data.tasks.instructions`"
        )


def test_build_is_deterministic() -> None:
    assert instructions.build() == instructions.build()
    assert instructions.build(seed=1) != instructions.build()


def test_shipped_files_are_json_lines() -> None:
    for split in ("train", "heldout"):
        lines = (TASK_DIR / f"instructions_{split}.jsonl").read_text("utf-8").splitlines()
        assert all(set(json.loads(line)) == {"messages", "task"} for line in lines)


# --- arithmetic ------------------------------------------------------------------------------


def test_generate_row_format() -> None:
    (row,) = generate(1, seed=0)
    assert set(row) == {"prompt", "answer", "verifier", "task"}
    assert (row["verifier"], row["task"]) == ("math", "arithmetic")
    assert re.fullmatch(r"What is \d+ [-+*] \d+\? Answer with just the number\.", row["prompt"])


def test_generate_answers_are_correct() -> None:
    for n_terms in (2, 3, 4):
        for row in generate(200, seed=n_terms, n_terms=n_terms):
            expression = row["prompt"].removeprefix("What is ").split("?")[0]
            assert len(expression.split()) == 2 * n_terms - 1
            assert row["answer"] == str(safe_eval(expression))


def test_two_term_subtraction_is_never_negative() -> None:
    rows = generate(300, seed=3, ops=("-",))
    assert all(int(row["answer"]) >= 0 for row in rows)


def test_generate_is_deterministic_and_distinct() -> None:
    assert generate(50, seed=7) == generate(50, seed=7)
    assert generate(50, seed=7) != generate(50, seed=8)
    prompts = [row["prompt"] for row in generate(500, seed=0)]
    assert len(prompts) == len(set(prompts))


def test_generate_respects_ops_and_operand_range() -> None:
    for row in generate(60, seed=0, ops=("*",), max_operand=9):
        a, op, b = row["prompt"].split("?")[0].split()[-3:]
        assert op == "*" and 1 <= int(a) <= 9 and 1 <= int(b) <= 9


def test_generate_exclude_and_exhaustion() -> None:
    first = generate(9, seed=0, max_operand=3, ops=("+",))  # all 3 * 3 sums
    others = generate(
        5, seed=0, max_operand=3, ops=("+",), exclude={r["prompt"] for r in first[:4]}
    )
    assert not {r["prompt"] for r in others} & {r["prompt"] for r in first[:4]}
    with pytest.raises(ValueError, match="found only 9 distinct problems"):
        generate(10, seed=0, max_operand=3, ops=("+",))


@pytest.mark.parametrize(
    "kwargs", [{"n": -1}, {"ops": ("/",)}, {"ops": ()}, {"max_operand": 0}, {"n_terms": 1}]
)
def test_generate_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    args = {"n": 1, **kwargs}
    with pytest.raises(ValueError):
        generate(args.pop("n"), seed=0, **args)


@given(st.lists(st.integers(0, 50), min_size=1, max_size=6), st.data())
def test_evaluate_matches_python(operands: list[int], data: st.DataObject) -> None:
    ops = data.draw(
        st.lists(st.sampled_from("+-*"), min_size=len(operands) - 1, max_size=len(operands) - 1)
    )
    expression = " ".join(
        str(x) + (f" {op}" if i < len(ops) else "")
        for i, (x, op) in enumerate(zip(operands, [*ops, ""], strict=True))
    )
    assert evaluate(operands, ops) == safe_eval(expression)


def test_builtin_arithmetic_splits_are_disjoint_and_verifiable() -> None:
    train, heldout = builtin_split("train"), builtin_split("heldout")
    assert (len(train), len(heldout)) == (400, 100)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert heldout == generate(100, seed=1)
    for split in ("train", "heldout"):
        result = load_examples("builtin:arithmetic", "verifiable", split=split)
        assert result.errors == [] and result.examples[0].verifier == "math"
    with pytest.raises(ValueError, match="unknown split"):
        builtin_split("test")


def test_as_sft_rows_validate() -> None:
    sft_rows = as_sft_rows(generate(5, seed=0))
    assert sft_rows[0]["messages"][1]["content"] == generate(5, seed=0)[0]["answer"]
    rows = [Row(data=d, location=f"mem:{i}") for i, d in enumerate(sft_rows, 1)]
    assert len(validate_rows(rows, "sft").examples) == 5


def test_registry() -> None:
    assert set(BUILTIN) == {"instructions", "arithmetic", "preferences", "wrong_answers",
                            "countdown", "strings", "calculator", "calculator_traces",
                            "guess_number", "guess_number_traces"}  # fmt: skip
