"""The R1 format reward, the single-shape rewards and the think/reply split."""

from __future__ import annotations

import pytest

from rlhfkit.rewards import format as old_format
from rlhfkit.rewards.verifiers import get_verifier, verify
from rlhfkit.rewards.verifiers.format import (
    bare_number,
    boxed,
    format_reward,
    split_think,
    think_answer,
)

GOOD = "<think>2+2 is 4</think>\n<answer>4</answer>"


@pytest.mark.parametrize(
    "text",
    [
        GOOD,
        "<think>a</think><answer>4</answer>",
        "<think>\nmulti\nline\n</think>\n\n<answer>\n4\n</answer>\n",  # DOTALL, trailing newline
        "  <think></think><answer></answer>",  # empty blocks, leading space
    ],
)
def test_strict_accepts(text):
    assert format_reward(text) == 1.0
    assert format_reward(text, mode="strict") == 1.0


@pytest.mark.parametrize(
    "text",
    [
        "<think>a</think><answer>4</answer> extra",  # text after the answer
        "preamble <think>a</think><answer>4</answer>",  # text before the think block
        "<think>a</think> b <answer>4</answer>",  # text between the blocks
        "<answer>4</answer><think>a</think>",  # wrong order
        "<answer>4</answer>",
        "<think>a</think>",
        "<think>a</think><think>b</think><answer>4</answer>",
        # The lazy pattern alone accepts these; the once-each rule does not.
        "<think>a</think></think><answer>4</answer>",
        "<think>a</think><answer>4</answer></answer>",
        "<think>a<answer>x</answer></think><answer>4</answer>",
        "<THINK>a</THINK><ANSWER>4</ANSWER>",  # tags are case-sensitive
        "",
    ],
)
def test_strict_rejects(text):
    assert format_reward(text) == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD, 1.0),
        ("<think>a</think> no answer", 0.5),
        ("<think>only the opening", 0.25),
        ("<answer>4</answer><think>a</think>", 1.0),  # order is not checked
        ("<think>a</think><think>b</think><answer>4</answer>", 0.5),  # repeated tags earn 0
        ("<answer>4</answer>", 0.5),
        ("plain text", 0.0),
        ("", 0.0),
    ],
)
def test_partial(text, expected):
    assert format_reward(text, mode="partial") == expected


def test_partial_is_one_whenever_strict_is():
    for text in (GOOD, "<think>x</think>  <answer>y</answer>\n"):
        assert format_reward(text, mode="strict") == 1.0
        assert format_reward(text, mode="partial") == 1.0


def test_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode 'lenient'"):
        format_reward(GOOD, mode="lenient")


def test_think_answer_is_strict():
    assert think_answer(GOOD) == 1.0
    assert think_answer("<think>a</think></think><answer>4</answer>") == 0.0


def test_boxed_and_bare_number():
    assert boxed(r"so \boxed{\frac{1}{2}}") == 1.0
    assert boxed(r"\boxed{1} or \boxed{2}") == 0.0
    assert bare_number("1,234.") == 1.0
    assert bare_number("x 1") == 0.0


def test_old_import_path_is_the_same_functions():
    assert old_format.think_answer is think_answer
    assert old_format.boxed is boxed
    assert old_format.bare_number is bare_number
    assert old_format.format_reward is format_reward


def test_registered_as_format():
    assert get_verifier("format") is format_reward
    assert verify(GOOD, verifier="format", answer="4") == 1.0


@pytest.mark.parametrize(
    ("completion", "reasoning", "reply"),
    [
        ("<think>r</think>ans", "r", "ans"),
        ("r</think>ans", "r", "ans"),  # opening tag was in the prompt
        ("pre <think>r</think>ans", "r", "ans"),
        ("<think>a</think><think>b</think>ans", "a  b", "ans"),
        ("<think>cut off", "cut off", ""),
        ("no tags", None, "no tags"),
        ("", None, ""),
    ],
)
def test_split_think(completion, reasoning, reply):
    assert split_think(completion) == (reasoning, reply)
