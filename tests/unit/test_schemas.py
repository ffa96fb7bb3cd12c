"""Tests for rlhfkit.data.schemas: every format's normalisation and every error case."""

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
    PreferenceExample,
    RankingExample,
    RatingsExample,
    Row,
    SFTExample,
    UnpairedExample,
    VerifiableExample,
    load_examples,
    validate_rows,
)
from rlhfkit.data.schemas import split_implicit_prompt


def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def s(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def t(text: str) -> dict[str, str]:
    return {"role": "tool", "content": text}


def write_jsonl(tmp_path: Path, rows: list[Any]) -> str:
    """One row per line: row i (0-based) is on line i + 1 of data.jsonl."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def rows(*data: dict[str, Any]) -> list[Row]:
    return [Row(data=d, location=f"mem:{i}") for i, d in enumerate(data, 1)]


def one(schema: str, data: dict[str, Any]) -> Any:
    (example,) = validate_rows(rows(data), schema).examples
    return example


def error(schema: str, data: dict[str, Any]) -> DataError:
    with pytest.raises(DataError) as info:
        validate_rows(rows(data), schema)
    return info.value


# --- sft -------------------------------------------------------------------------------------


def test_sft_accepts_and_keeps_meta() -> None:
    messages = [s("Be brief."), u("Hi"), a("Hello!"), u("Bye"), a("Goodbye!")]
    example = one("sft", {"messages": messages, "task": "greeting"})
    assert example == SFTExample(messages=messages, meta={"task": "greeting"}, location="mem:1")


def test_sft_tool_turns_and_extra_keys_pass_through() -> None:
    call = {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "args": [1, 2]}]}
    messages = [u("1 + 2?"), call, t("3"), a("It is 3.")]
    example = one("sft", {"messages": messages})
    assert example.messages == messages


def test_sft_drops_none_extras_from_arrow() -> None:
    example = one("sft", {"messages": [{**u("Hi"), "tool_calls": None}, a("Hello")]})
    assert example.messages == [u("Hi"), a("Hello")]


def test_sft_role_order_error_names_file_line_and_field(tmp_path: Path) -> None:
    good = {"messages": [u("Hi"), a("Hello")]}
    bad = {"messages": [u("Hi"), a("Hello"), u("Again"), u("And again"), a("Ok")]}
    path = write_jsonl(tmp_path, [good, good, good, bad])
    with pytest.raises(DataError) as info:
        load_examples(path, "sft")
    assert str(info.value) == (
        f"{path}:4: field 'messages[3].role': expected 'assistant' after a 'user' message, "
        "got 'user'"
    )
    assert (info.value.location, info.value.field) == (f"{path}:4", "messages[3].role")


def test_sft_role_order_message_matches_spec_wording(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path, [{"messages": [u("a"), a("b")]}] * 3 + [{"messages": [u("x"), u("y"), a("z")]}]
    )
    with pytest.raises(DataError) as info:
        load_examples(path, "sft")
    # Counted by hand: the 4th line, the message at index 1.
    assert str(info.value).endswith(
        "data.jsonl:4: field 'messages[1].role': "
        "expected 'assistant' after a 'user' message, got 'user'"
    )


@pytest.mark.parametrize(
    ("messages", "field", "reason"),
    [
        ([a("Hi")], "messages[0].role", "expected 'user' as the first message"),
        (
            [u("Hi"), s("late"), a("x")],
            "messages[1].role",
            "'system' message may only be the first",
        ),
        (
            [u("Hi"), a("x"), a("y")],
            "messages[2].role",
            "expected 'user' or 'tool' after an 'assistant'",
        ),
        ([u("Hi"), t("out"), a("x")], "messages[1].role", "expected 'assistant' after a 'user'"),
        (
            [u("Hi"), a("x"), t("out"), u("y"), a("z")],
            "messages[3].role",
            "'assistant' or 'tool' after a 'tool'",
        ),
        (
            [u("Hi"), {"role": "bot", "content": "x"}],
            "messages[1].role",
            "expected one of 'system'",
        ),
        ([u("Hi"), a("x"), u("y")], "messages", "the last message must be an 'assistant' reply"),
        ([s("sys")], "messages", "the last message must be an 'assistant' reply"),
        (
            [u("Hi"), {"role": "assistant", "content": 5}],
            "messages[1].content",
            "expected a string, got int",
        ),
        ([u("Hi"), {"role": "assistant"}], "messages[1].content", "expected a string, got null"),
        ([u("Hi"), a("   ")], "messages[1].content", "empty assistant message"),
        ([u(""), a("x")], "messages[0].content", "empty user message"),
        ([u("Hi"), "text"], "messages[1]", "expected a message object"),
        ([], "messages", "empty list of messages"),
    ],
)
def test_sft_errors(messages: list[Any], field: str, reason: str) -> None:
    err = error("sft", {"messages": messages})
    assert err.location == "mem:1"
    assert err.field == field
    assert reason in err.reason


def test_sft_non_string_content_in_file(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path,
        [
            {"messages": [u("a"), a("b")]},
            {"messages": [u("q"), a("r"), u("s"), {"role": "assistant", "content": ["x"]}]},
        ],
    )
    with pytest.raises(DataError) as info:
        load_examples(path, "sft")
    assert str(info.value) == f"{path}:2: field 'messages[3].content': expected a string, got list"


def test_missing_key_names_field_and_suggests_schema(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path, [{"messages": [u("a"), a("b")]}, {"prompt": "p", "completion": "c"}]
    )
    with pytest.raises(DataError) as info:
        load_examples(path, "sft")
    text = str(info.value)
    assert text.startswith(f"{path}:2: field 'messages': missing; schema 'sft' needs 'messages'")
    assert "the row has 'completion', 'prompt'" in text
    assert "did you mean schema 'prompt_completion'?" in text


def test_none_counts_as_missing() -> None:
    assert error("verifiable", {"prompt": "p", "answer": None}).field == "answer"


def test_row_must_be_an_object() -> None:
    err = error("sft", ["not", "a", "dict"])  # type: ignore[arg-type]
    assert err.field is None
    assert "expected an object" in err.reason


# --- prompt_completion -----------------------------------------------------------------------


def test_prompt_completion_strings() -> None:
    example = one("prompt_completion", {"prompt": "2+2?", "completion": "4", "id": 7})
    assert example == SFTExample(messages=[u("2+2?"), a("4")], meta={"id": 7}, location="mem:1")


def test_prompt_completion_conversational() -> None:
    data = {"prompt": [s("Be brief."), u("2+2?")], "completion": [a("4")]}
    assert one("prompt_completion", data).messages == [s("Be brief."), u("2+2?"), a("4")]


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({"prompt": "q", "completion": ""}, "completion", "empty completion"),
        ({"prompt": "q", "completion": []}, "completion", "empty list of messages"),
        ({"prompt": "", "completion": "x"}, "prompt", "empty prompt"),
        ({"prompt": [u("q"), a("x")], "completion": "y"}, "prompt", "must end with a 'user'"),
        (
            {"prompt": [u("q")], "completion": [u("x")]},
            "completion[0].role",
            "completion holds only",
        ),
        (
            {"prompt": [u("q")], "completion": [a("x"), t("out")]},
            "completion",
            "must end with an 'assistant'",
        ),
        ({"prompt": 3, "completion": "x"}, "prompt", "expected a list of messages"),
    ],
)
def test_prompt_completion_errors(data: dict[str, Any], field: str, reason: str) -> None:
    err = error("prompt_completion", data)
    assert err.field == field
    assert reason in err.reason


def test_empty_completion_in_file_names_line(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path, [{"prompt": "a", "completion": "b"}] * 2 + [{"prompt": "a", "completion": " "}]
    )
    with pytest.raises(DataError) as info:
        load_examples(path, "prompt_completion")
    assert str(info.value).startswith(f"{path}:3: field 'completion': empty completion")


# --- preference ------------------------------------------------------------------------------


def test_preference_explicit_strings() -> None:
    example = one(
        "preference", {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away.", "margin": 2}
    )
    assert example == PreferenceExample(
        prompt=[u("Hi")],
        chosen=[a("Hello!")],
        rejected=[a("Go away.")],
        margin=2.0,
        location="mem:1",
    )


def test_preference_explicit_conversational() -> None:
    data = {
        "prompt": [u("Hi"), a("Hello"), u("Joke?")],
        "chosen": [a("Knock knock.")],
        "rejected": [a("No.")],
    }
    example = one("preference", data)
    assert example.prompt == [u("Hi"), a("Hello"), u("Joke?")]
    assert (example.chosen, example.rejected, example.margin) == (
        [a("Knock knock.")],
        [a("No.")],
        None,
    )


def test_preference_implicit_prompt_single_turn() -> None:
    example = one(
        "preference", {"chosen": [u("Hi"), a("Hello!")], "rejected": [u("Hi"), a("Go away.")]}
    )
    assert (example.prompt, example.chosen, example.rejected) == (
        [u("Hi")],
        [a("Hello!")],
        [a("Go away.")],
    )


def test_preference_implicit_prompt_multi_turn_with_system() -> None:
    shared = [s("sys"), u("q1"), a("r1"), u("q2")]
    example = one("preference", {"chosen": [*shared, a("good")], "rejected": [*shared, a("bad")]})
    assert example.prompt == shared
    assert (example.chosen, example.rejected) == ([a("good")], [a("bad")])


def test_preference_implicit_prompt_backs_off_to_before_assistant() -> None:
    # Shared prefix includes the tool call and output; the completions are the final answers.
    call = {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}
    chosen = [u("q"), call, t("42"), a("It is 42.")]
    rejected = [u("q"), call, t("42"), a("No idea.")]
    prompt, c, r = split_implicit_prompt(chosen, rejected)
    assert (prompt, c, r) == ([u("q"), call, t("42")], [a("It is 42.")], [a("No idea.")])


def test_preference_implicit_completion_may_not_contain_user_turns() -> None:
    err = error(
        "preference", {"chosen": [u("q"), a("x"), u("more"), a("y")], "rejected": [u("q"), a("z")]}
    )
    assert err.field == "chosen[2].role"
    assert "completion holds only" in err.reason


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({"prompt": "q", "chosen": "", "rejected": "x"}, "chosen", "empty completion"),
        (
            {"prompt": "q", "chosen": "x", "rejected": [a(" ")]},
            "rejected[0].content",
            "empty assistant",
        ),
        ({"prompt": "q", "chosen": "x", "rejected": "x"}, "rejected", "identical to 'chosen'"),
        ({"chosen": [u("q"), a("x")], "rejected": [u("q"), a("x")]}, "rejected", "identical"),
        ({"chosen": [u("q1"), a("x")], "rejected": [u("q2"), a("y")]}, "chosen", "same prompt"),
        ({"chosen": "x", "rejected": "y"}, "chosen", "must be full conversations"),
        (
            {"prompt": "q", "chosen": "x", "rejected": "y", "margin": "big"},
            "margin",
            "finite number",
        ),
        (
            {"prompt": "q", "chosen": "x", "rejected": "y", "margin": float("nan")},
            "margin",
            "finite",
        ),
        ({"prompt": "q", "chosen": "x"}, "rejected", "missing"),
    ],
)
def test_preference_errors(data: dict[str, Any], field: str, reason: str) -> None:
    err = error("preference", data)
    assert err.field == field
    assert reason in err.reason


# --- unpaired_preference ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "expected"), [(True, True), (False, False), (1, True), (0, False)]
)
def test_unpaired(label: Any, expected: bool) -> None:
    example = one("unpaired_preference", {"prompt": "q", "completion": "x", "label": label})
    assert example == UnpairedExample([u("q")], [a("x")], expected, location="mem:1")


@pytest.mark.parametrize("label", [2, "yes", 0.5])
def test_unpaired_bad_label(label: Any) -> None:
    err = error("unpaired_preference", {"prompt": "q", "completion": "x", "label": label})
    assert err.field == "label"


# --- ratings and rankings --------------------------------------------------------------------


def test_ratings() -> None:
    data = {"prompt": "q", "completions": ["x", [a("y")], "z"], "ratings": [5, 3.5, 1]}
    example = one("ratings", data)
    assert example == RatingsExample(
        [u("q")], [[a("x")], [a("y")], [a("z")]], [5.0, 3.5, 1.0], location="mem:1"
    )


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        (
            {"prompt": "q", "completions": ["x", "y", "z"], "ratings": [1, 2]},
            "ratings",
            "expected a list of 3 entries (one per completion), got 2",
        ),
        (
            {"prompt": "q", "completions": ["x"], "ratings": [1]},
            "completions",
            "at least 2 completions, got 1 item(s)",
        ),
        (
            {"prompt": "q", "completions": ["x", ""], "ratings": [1, 2]},
            "completions[1]",
            "empty completion",
        ),
        (
            {"prompt": "q", "completions": ["x", "y"], "ratings": [1, float("inf")]},
            "ratings[1]",
            "finite",
        ),
        ({"prompt": "q", "completions": ["x", "y"], "ratings": [True, 1]}, "ratings[0]", "finite"),
    ],
)
def test_ratings_errors(data: dict[str, Any], field: str, reason: str) -> None:
    err = error("ratings", data)
    assert err.field == field
    assert reason in err.reason


def test_ratings_length_mismatch_in_file(tmp_path: Path) -> None:
    good = {"prompt": "q", "completions": ["x", "y"], "ratings": [1, 2]}
    bad = {"prompt": "q", "completions": ["x", "y"], "ratings": [1, 2, 3]}
    path = write_jsonl(tmp_path, [good, bad])
    with pytest.raises(DataError) as info:
        load_examples(path, "ratings")
    assert str(info.value).startswith(f"{path}:2: field 'ratings': expected a list of 2 entries")


def test_rankings() -> None:
    example = one("rankings", {"prompt": "q", "completions": ["x", "y", "z"], "ranking": [2, 0, 1]})
    assert example == RankingExample(
        [u("q")], [[a("x")], [a("y")], [a("z")]], [2, 0, 1], location="mem:1"
    )


@pytest.mark.parametrize(
    "ranking", [[0, 0, 2], [1, 2, 3], [0, 1], [0, 1, 2, 3], [0, 1.0, 2], [True, False, 2], "012"]
)
def test_rankings_rejects_non_permutations(ranking: Any) -> None:
    err = error("rankings", {"prompt": "q", "completions": ["x", "y", "z"], "ranking": ranking})
    assert err.field == "ranking"


def test_bad_ranking_in_file(tmp_path: Path) -> None:
    good = {"prompt": "q", "completions": ["x", "y"], "ranking": [1, 0]}
    bad = {"prompt": "q", "completions": ["x", "y", "z"], "ranking": [0, 2, 2]}
    path = write_jsonl(tmp_path, [good, good, bad])
    with pytest.raises(DataError) as info:
        load_examples(path, "rankings")
    assert str(info.value) == (
        f"{path}:3: field 'ranking': expected a permutation of 0..2 (completion indices, "
        "best first), got [0, 2, 2]"
    )


# --- verifiable ------------------------------------------------------------------------------


def test_verifiable_keeps_meta_and_stringifies_answer() -> None:
    data = {"prompt": "6*7?", "answer": 42, "verifier": "math", "task": "arith", "level": 1}
    example = one("verifiable", data)
    assert example == VerifiableExample(
        [u("6*7?")], "42", "math", meta={"task": "arith", "level": 1}, location="mem:1"
    )


@pytest.mark.parametrize(("answer", "expected"), [("x", "x"), (3, "3"), (3.0, "3"), (2.5, "2.5")])
def test_verifiable_answers(answer: Any, expected: str) -> None:
    example = one("verifiable", {"prompt": "q", "answer": answer})
    assert (example.answer, example.verifier) == (expected, None)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"prompt": "q", "answer": ""}, "answer"),
        ({"prompt": "q", "answer": True}, "answer"),
        ({"prompt": "q", "answer": float("nan")}, "answer"),
        ({"prompt": "q", "answer": "1", "verifier": 3}, "verifier"),
        ({"prompt": [u("q"), a("x")], "answer": "1"}, "prompt"),
    ],
)
def test_verifiable_errors(data: dict[str, Any], field: str) -> None:
    assert error("verifiable", data).field == field


# --- validate_rows / load_examples -----------------------------------------------------------


def test_skip_mode_collects_errors_and_keeps_good_rows(tmp_path: Path) -> None:
    lines = [
        {"prompt": "a", "completion": "1"},
        {"prompt": "b", "completion": ""},
        {"prompt": "c", "completion": "3"},
        {"prompt": "d"},
        {"prompt": "e", "completion": "5"},
    ]
    path = write_jsonl(tmp_path, lines)
    result = load_examples(path, "prompt_completion", on_error="skip")
    assert [ex.messages[0]["content"] for ex in result.examples] == ["a", "c", "e"]
    assert [ex.location for ex in result.examples] == [f"{path}:1", f"{path}:3", f"{path}:5"]
    assert [(err.location, err.field) for err in result.errors] == [
        (f"{path}:2", "completion"),
        (f"{path}:4", "completion"),
    ]


def test_raise_mode_raises_first_bad_row(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path, [{"prompt": "a", "completion": "1"}, {"prompt": "b"}, {"prompt": ""}]
    )
    with pytest.raises(DataError, match=r"data\.jsonl:2: field 'completion': missing"):
        load_examples(path, "prompt_completion")


def test_load_examples_limit(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [{"prompt": "a", "completion": "1"}] * 3 + [{"prompt": "bad"}])
    assert len(load_examples(path, "prompt_completion", limit=3).examples) == 3


def test_unknown_schema_lists_valid_names() -> None:
    with pytest.raises(
        ValueError, match="unknown schema 'dpo'; valid schemas: sft, prompt_completion, preference"
    ):
        validate_rows([], "dpo")
    with pytest.raises(ValueError, match="unknown schema"):
        load_examples("does-not-matter.jsonl", "dpo")
    with pytest.raises(ValueError, match="on_error"):
        validate_rows([], "sft", on_error="ignore")  # type: ignore[arg-type]


def test_schema_table_is_complete() -> None:
    assert set(SCHEMAS) == {
        "sft",
        "prompt_completion",
        "preference",
        "unpaired_preference",
        "ratings",
        "rankings",
        "verifiable",
        "likert",
        "process",
    }


# --- Properties ------------------------------------------------------------------------------

text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1
).filter(lambda x: x.strip() != "")


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, str]]:
    """Valid conversations: optional system, then n >= 1 user/assistant turns."""
    messages = [s(draw(st.text()))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        messages += [u(draw(text)), a(draw(text))]
    return messages


@given(conversations())
def test_valid_conversations_validate_and_round_trip(messages: list[dict[str, str]]) -> None:
    (example,) = validate_rows(rows({"messages": messages}), "sft").examples
    assert example.messages == messages
    # and the same conversation split as prompt/completion gives the same messages back
    split = {"prompt": messages[:-1], "completion": messages[-1:]}
    (pc,) = validate_rows(rows(split), "prompt_completion").examples
    assert pc.messages == messages


@given(conversations(), st.data())
def test_swapping_two_roles_breaks_validation(
    messages: list[dict[str, str]], data: st.DataObject
) -> None:
    roles = [m["role"] for m in messages]
    pairs = [
        (i, j) for i in range(len(roles)) for j in range(i + 1, len(roles)) if roles[i] != roles[j]
    ]
    i, j = data.draw(st.sampled_from(pairs))
    shuffled = list(messages)
    shuffled[i], shuffled[j] = shuffled[j], shuffled[i]
    result = validate_rows(rows({"messages": shuffled}), "sft", on_error="skip")
    assert result.examples == []
    assert len(result.errors) == 1


@given(conversations(), text, text)
def test_implicit_prompt_recovers_the_shared_prefix(
    messages: list[dict[str, str]], good: str, bad: str
) -> None:
    if good == bad:
        bad = good + "!"
    prompt = messages[:-1]
    example = one("preference", {"chosen": [*prompt, a(good)], "rejected": [*prompt, a(bad)]})
    assert (example.prompt, example.chosen, example.rejected) == (prompt, [a(good)], [a(bad)])
    # swapping chosen and rejected swaps the completions and nothing else
    swapped = one("preference", {"prompt": prompt, "chosen": [a(bad)], "rejected": [a(good)]})
    assert (swapped.prompt, swapped.chosen, swapped.rejected) == (prompt, [a(bad)], [a(good)])
