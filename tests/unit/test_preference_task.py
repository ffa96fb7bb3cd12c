"""Tests for builtin:preferences and its gold judge (rlhfkit.data.tasks.preferences)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.data import load_examples, load_rows, validate_rows
from rlhfkit.data.sources import Row
from rlhfkit.data.tasks import BUILTIN, instructions
from rlhfkit.data.tasks.preferences import (
    CATEGORIES,
    MIN_GAP,
    WRONG_ANSWERS,
    build,
    build_wrong_answers,
    builtin_split,
    gold_prefers,
    gold_score,
    wrong_answers_split,
)

# 22 whitespace-separated words: "47", "+", "18:", "40", "+", "10", "=", "50", "and", "7", "+",
# "8", "=", "15,", "so", "50", "+", "15", "=", "65." (20) + "Answer:", "65" (2). Budget: 32.
WORK = "47 + 18: 40 + 10 = 50 and 7 + 8 = 15, so 50 + 15 = 65."
REF = f"{WORK}\nAnswer: 65"
FILLER = "This sentence is filler that adds exactly ten words here."  # 10 words


def rows_of(split: str) -> list[dict[str, Any]]:
    return [row.data for row in load_rows("builtin:preferences", split=split)]


def prompt_key(messages: list[dict[str, str]]) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in messages)


# --- the gold rubric on hand-written cases ----------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (REF, 1.3),  # correct 1.0 + format 0.3, 22 words <= budget 32
        (f"{WORK}\nAnswer: 64", 0.3),  # wrong answer, format holds
        (WORK, 0.0),  # no Answer line: neither correct nor formatted
        ("Well, I believe the answer is 65.", 0.0),  # the answer, but not on an Answer line
        ("I'm sorry, I can't help with that.", 0.0),  # refusal
        ("", 0.0),  # empty
        ("  \n\t ", 0.0),  # blank counts as empty
        ("Answer: 65", 1.0),  # correct, but no working line: format needs two lines
        (f"{WORK}\nAnswer: 65\nHope that helps!", 1.0),  # text after the Answer line
        (f"{WORK}\nanswer: 65", 1.0),  # label case is fine for correctness, not for format
        (f"{WORK}\n**Answer:** 65", 1.0),  # Markdown around the label
        (f"{WORK}\nAnswer: 65.", 1.3),  # trailing punctuation ignored
        (f"  {WORK}\nAnswer:   65  \n\n", 1.3),  # surrounding whitespace ignored
        (f"{WORK}\nAnswer: 64\nAnswer: 65", 1.0),  # the last Answer line counts; 3 lines
        (f"{WORK}\nAnswer: 65\nAnswer: 64", 0.0),  # last answer wrong, 3 lines
        (f"{WORK}\n\nAnswer: 65", 1.0),  # a blank line in between breaks the format
        # 22 + 10 = 32 words = budget: no penalty
        (f"{FILLER} {WORK}\nAnswer: 65", 1.3),
        # 22 + 20 = 42 words: 10 over the budget, 1.3 - 0.02 * 10 = 1.1
        (f"{FILLER} {FILLER} {WORK}\nAnswer: 65", 1.1),
        # 22 + 60 = 82 words: 50 over, 0.02 * 50 = 1.0 capped at 0.5, so 1.3 - 0.5 = 0.8
        (f"{FILLER * 6} {WORK}\nAnswer: 65", 0.8),
        # 60 words with no answer and no format: 0 - min(0.5, 0.02 * (60 - 32)) = -0.5
        (" ".join(["word"] * 60), -0.5),
    ],
)
def test_gold_rubric_cases(completion: str, expected: float) -> None:
    assert gold_score(completion, REF, "arithmetic") == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    ("answer", "reference_answer", "correct"),
    [
        ("1,234", "1234", True),  # thousands separators
        ("1234", "1,234", True),
        ("12.0", "12", True),  # numeric equality
        ("12.50", "12.5", True),
        ("-0", "0", True),
        ("12.5", "12", False),
        ("1, 234", "1234", False),  # a list of two numbers, not a thousands separator
        ("4000 Milliliters", "4000 milliliters", True),  # case ignored outside case tasks
        ("4,000 milliliters", "4000 milliliters", True),
        ("4000", "4000 milliliters", False),  # the unit is part of the answer
        ("'noclaf'", "noclaf", True),  # quotes stripped
        ("`Paris`", "Paris", True),
        ("46,56, 65,  75", "46, 56, 65, 75", True),  # comma spacing normalised
        ("56, 46, 65, 75", "46, 56, 65, 75", False),
    ],
)
def test_answer_normalisation(answer: str, reference_answer: str, correct: bool) -> None:
    """Same working line, so the gold is 1.3 when the answers match and 0.3 when not."""
    reference = f"Some working.\nAnswer: {reference_answer}"
    expected = 1.3 if correct else 0.3
    got = gold_score(f"Some working.\nAnswer: {answer}", reference, None)
    assert got == pytest.approx(expected, abs=1e-9)


def test_case_matters_only_for_case_tasks() -> None:
    upper = "Every letter becomes a capital letter.\nAnswer: THE CAT SAT ON THE MAT."
    lower = "Every capital letter becomes a lowercase letter.\nAnswer: the cat sat on the mat."
    sentence = "Done.\nAnswer: The cat sat on the mat."
    # Wrong case for a case task: format only (0.3), whether or not the task is given when the
    # reference answer is all capitals.
    assert gold_score(sentence, upper, "uppercase") == pytest.approx(0.3)
    assert gold_score(sentence, upper, None) == pytest.approx(0.3)
    assert gold_score(sentence, lower, "lowercase") == pytest.approx(0.3)
    # Without the task, a lowercase reference is compared case-insensitively (documented).
    assert gold_score(sentence, lower, None) == pytest.approx(1.3)
    # Other tasks ignore case.
    assert gold_score("Hm.\nAnswer: paris", "X.\nAnswer: Paris", "capitals") == pytest.approx(1.3)


def test_reference_without_answer_line_uses_its_last_line() -> None:
    reference = "Some text.\nParis"
    assert gold_score("Looked it up.\nAnswer: Paris", reference) == pytest.approx(1.3)
    assert gold_score("Looked it up.\nAnswer: Rome", reference) == pytest.approx(0.3)


def test_gold_prefers() -> None:
    wrong = f"{WORK}\nAnswer: 64"
    assert gold_prefers(REF, wrong, REF, "arithmetic") == 1.0
    assert gold_prefers(wrong, REF, REF, "arithmetic") == 0.0
    # a refusal and an empty completion both score 0.0: a tie
    assert gold_prefers("I can't help with that.", "", REF, "arithmetic") == 0.5
    assert gold_prefers(REF, f"{WORK}\nAnswer: 65.", REF, "arithmetic") == 0.5


# --- properties on arbitrary text -------------------------------------------------------------

TASK_NAMES = [*instructions.QUOTAS, None]


@settings(max_examples=200, deadline=None)
@given(
    st.text(max_size=300),
    st.text(max_size=300),
    st.one_of(st.sampled_from(TASK_NAMES), st.text(max_size=10)),
)
def test_gold_score_never_raises_and_stays_in_range(
    completion: str, reference: str, task: str | None
) -> None:
    score = gold_score(completion, reference, task)
    assert isinstance(score, float) and math.isfinite(score)
    assert -0.5 - 1e-9 <= score <= 1.3 + 1e-9


_JUNK_LINES = st.lists(
    st.one_of(
        st.text(max_size=40),
        st.builds(lambda v: f"Answer: {v}", st.text(max_size=40)),
        st.builds(lambda n: f"Answer: {n:,}", st.integers(-(10**30), 10**30)),
        st.just("Answer: 1" + "0" * 5000 + ".5"),  # huge numbers must not raise
    ),
    max_size=5,
)


@settings(max_examples=200, deadline=None)
@given(_JUNK_LINES, _JUNK_LINES)
def test_gold_prefers_is_antisymmetric_on_junk(a_lines: list[str], b_lines: list[str]) -> None:
    a, b = "\n".join(a_lines), "\n".join(b_lines)
    assert gold_prefers(a, b, REF, "arithmetic") + gold_prefers(b, a, REF, "arithmetic") == 1.0
    assert gold_prefers(a, a, REF, "arithmetic") == 0.5


_WORDS = st.from_regex(r"[A-Za-z][A-Za-z ]{0,30}[A-Za-z]", fullmatch=True)


@given(_WORDS, _WORDS, st.sampled_from(TASK_NAMES))
def test_a_house_format_reference_scores_full_marks(work: str, answer: str, task: str) -> None:
    """A house-format reply judged against itself: correct (1.0) + format (0.3), no penalty."""
    reference = f"{work}\nAnswer: {answer}"
    assert gold_score(reference, reference, task) == pytest.approx(1.3, abs=1e-9)


@given(st.integers(0, 10**15))
def test_numbers_match_however_written(n: int) -> None:
    """n, n with thousands separators and n.0 all denote the same number (1.3 = full marks)."""
    reference = f"Work.\nAnswer: {n}"
    for written in (f"{n:,}", f"{n}.0", f"{n:,}.00"):
        assert gold_score(f"Work.\nAnswer: {written}", reference) == pytest.approx(1.3)
    assert gold_score(f"Work.\nAnswer: {n + 1}", reference) == pytest.approx(0.3)


# --- the generated dataset --------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict[str, Any]]]:
    return {split: rows_of(split) for split in ("train", "heldout")}


def test_registered_with_sizes(splits: dict[str, list[dict[str, Any]]]) -> None:
    assert BUILTIN["preferences"] is builtin_split
    assert len(splits["train"]) >= 600
    assert len(splits["heldout"]) >= 100


def test_rows_have_gold_gap_and_consistent_fields(
    splits: dict[str, list[dict[str, Any]]],
) -> None:
    keys = {"prompt", "chosen", "rejected", "category", "task", "reference"}
    keys |= {"gold_chosen", "gold_rejected"}
    # wrong answer: format only; no Answer line / refusal: nothing; verbose: 1.3 - 0.5 (capped);
    # off-topic: format only, minus up to 0.5 length penalty
    expected = {
        "wrong_answer": (0.3, 0.3),
        "no_answer_line": (0.0, 0.0),
        "verbose": (0.8, 0.8),
        "refusal": (0.0, 0.0),
        "off_topic": (-0.2, 0.3),
    }
    for row in splits["train"] + splits["heldout"]:
        assert set(row) == keys
        assert row["chosen"] == row["reference"] != row["rejected"]
        assert row["prompt"][-1]["role"] == "user"
        assert row["gold_chosen"] == gold_score(row["chosen"], row["reference"], row["task"])
        assert row["gold_rejected"] == gold_score(row["rejected"], row["reference"], row["task"])
        assert row["gold_chosen"] == pytest.approx(1.3)
        assert row["gold_chosen"] - row["gold_rejected"] >= MIN_GAP
        low, high = expected[row["category"]]
        assert low - 1e-9 <= row["gold_rejected"] <= high + 1e-9, row
        assert gold_prefers(row["chosen"], row["rejected"], row["reference"], row["task"]) == 1.0


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_rows_validate_as_preference(split: str) -> None:
    result = load_examples("builtin:preferences", "preference", split=split)
    assert result.errors == []
    assert len(result.examples) == len(builtin_split(split))
    example = result.examples[0]
    assert {"category", "task", "reference", "gold_chosen", "gold_rejected"} <= set(example.meta)
    assert example.chosen[0]["role"] == "assistant"
    rows = [Row(data=d, location=f"mem:{i}") for i, d in enumerate(builtin_split(split), 1)]
    assert len(validate_rows(rows, "preference").examples) == len(rows)


def test_prompts_come_from_the_same_split_only(splits: dict[str, list[dict[str, Any]]]) -> None:
    for split, rows in splits.items():
        source = {
            prompt_key(row.data["messages"][:-1])
            for row in load_rows("builtin:instructions", split=split)
        }
        assert {prompt_key(row["prompt"]) for row in rows} <= source
    train = {prompt_key(row["prompt"]) for row in splits["train"]}
    heldout = {prompt_key(row["prompt"]) for row in splits["heldout"]}
    assert not train & heldout
    # multi-turn and system-prompt rows are included
    assert any(row["prompt"][0]["role"] == "system" for row in splits["train"])
    assert any(len(row["prompt"]) >= 3 for row in splits["train"])


def test_categories_all_present_and_balanced(splits: dict[str, list[dict[str, Any]]]) -> None:
    for rows in splits.values():
        counts = Counter(row["category"] for row in rows)
        assert set(counts) == set(CATEGORIES)
        assert min(counts.values()) >= 0.15 * len(rows)  # cycled: about a fifth each
        assert {row["task"] for row in rows} == set(instructions.QUOTAS)


def test_wrong_answers_cover_every_single_turn_task() -> None:
    assert set(WRONG_ANSWERS) == set(instructions.TASKS)


def test_build_is_deterministic_and_cache_safe() -> None:
    source = BUILTIN["instructions"]("heldout")
    assert build(source, seed=3) == build(source, seed=3)
    assert build(source, seed=3) != build(source, seed=4)
    first = builtin_split("heldout")
    first[0]["chosen"] = "changed"
    first[0]["prompt"][0]["content"] = "changed"
    assert builtin_split("heldout")[0]["chosen"] != "changed"
    assert builtin_split("heldout")[0]["prompt"][0]["content"] != "changed"
    assert builtin_split("train") == rows_of("train")


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="unknown split"):
        builtin_split("test")
    with pytest.raises(ValueError, match="unknown split"):
        wrong_answers_split("test")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_wrong_answer_pairs_are_one_per_prompt_and_only_the_answer_differs(split: str) -> None:
    """builtin:wrong_answers: each instruction row's reference against the same working with a
    wrong answer (format kept: 1.3 against 0.3), in row order; per_row 3 gives distinct ones."""
    rows = BUILTIN["wrong_answers"](split)
    source = BUILTIN["instructions"](split)
    assert [prompt_key(r["prompt"]) for r in rows] == [
        prompt_key(r["messages"][:-1]) for r in source
    ]
    for row in rows:
        assert row["category"] == "wrong_answer" and row["chosen"] == row["reference"]
        work, answer = row["chosen"].rsplit("\nAnswer: ", 1)
        assert row["rejected"].startswith(f"{work}\nAnswer: ") and not row["rejected"].endswith(
            f"Answer: {answer}"
        )
        assert (row["gold_chosen"], row["gold_rejected"]) == (pytest.approx(1.3), 0.3)
    assert len(load_examples("builtin:wrong_answers", "preference", split=split).examples) == len(
        rows
    )
    three = build_wrong_answers(source[:20], seed=0, per_row=3)
    by_prompt = Counter(prompt_key(r["prompt"]) for r in three)
    assert max(by_prompt.values()) == 3 and len({(prompt_key(r["prompt"]), r["rejected"])
                                                 for r in three}) == len(three)  # fmt: skip


def test_pairs_without_a_clear_gap_fall_back_to_another_category() -> None:
    """Every reply answers 7, so an off-topic reply would score 1.3 like the reference.

    Row i starts its two pairs at categories 2i and 2i + 1 of the cycle; the third row's first
    pair would be ``off_topic`` (index 4), which has no gap, so it takes the next category.
    """

    def row(user: str, work: str, task: str) -> dict[str, Any]:
        reply = {"role": "assistant", "content": f"{work}\nAnswer: 7"}
        return {"messages": [{"role": "user", "content": user}, reply], "task": task}

    rows = [
        row("Count the letters in 'diamond'.", "d-i-a-m-o-n-d.", "count_letters"),
        row('Count the words in: "A b c d e f g."', "A (1) ... g (7).", "count_words"),
        row("Count the letters in 'balloon'.", "b-a-l-l-o-o-n.", "count_letters"),
    ]
    pairs = build(rows, seed=0)
    assert len(pairs) == 6
    assert [p["category"] for p in pairs[4:]] == ["wrong_answer", "no_answer_line"]
    assert all(p["gold_chosen"] - p["gold_rejected"] >= MIN_GAP for p in pairs)
