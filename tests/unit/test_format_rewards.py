"""Format rewards."""

from __future__ import annotations

from rlhfkit.rewards.format import bare_number, boxed, think_answer


def test_think_answer():
    assert think_answer("<think>2+2 is 4</think>\n<answer>4</answer>") == 1.0
    assert think_answer("<think>a</think><answer>4</answer> extra") == 0.0
    assert think_answer("<answer>4</answer>") == 0.0
    assert think_answer("<think>a</think><think>b</think><answer>4</answer>") == 0.0


def test_boxed():
    assert boxed(r"so \boxed{12}") == 1.0
    assert boxed(r"\boxed{1} or \boxed{2}") == 0.0
    assert boxed("12") == 0.0


def test_bare_number():
    for text in ("95", " 95.\n", "1,234", "-3.5"):
        assert bare_number(text) == 1.0, text
    for text in ("The answer is 95", "95 + 3", ""):
        assert bare_number(text) == 0.0, text
