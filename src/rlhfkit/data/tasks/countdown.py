"""Countdown: reach a target number with arithmetic on a few given numbers (TinyZero style).

Each problem gives 3 or 4 numbers and a target; the model writes one arithmetic expression with
``+ - * /`` and parentheses that equals the target, using **each given number at most once and
no other number** (a number listed twice may be used twice). Rows are ``verifiable`` records::

    {"prompt": "Using the numbers [3, 5, 8, 12], ...", "answer": "(12 - 8) * 5 + 3",
     "verifier": "countdown", "task": "countdown", "numbers": [3, 5, 8, 12], "target": 23}

``answer`` is one valid expression (others may exist); the ``countdown`` verifier
(:func:`rlhfkit.rewards.verifiers.tasks.countdown_reward`) checks any expression against
``numbers`` and ``target``, not against ``answer``.

Generation: draw the numbers, shuffle them, combine them all with a random binary expression tree
and random operators, and keep the draw when every intermediate value is a positive integer
(divisions are exact), the target lies in ``1..max_target`` and is not itself one of the numbers
(which would make the problem trivial). So every problem is solvable and its answer uses every
number exactly once. The numbers are listed in ascending order, which makes the prompt a function
of the problem (the multiset of numbers and the target): distinct prompts are distinct problems.
Generation is deterministic for a seed and ``exclude`` keeps another split's prompts out.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

from rlhfkit.data.tasks.splits import disjoint_split, distinct_rows

OPS = ("+", "-", "*", "/")
"""Operators of the expressions."""

PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
"""Binding strength of each operator (higher binds tighter)."""

PROMPT_TEMPLATE = (
    "Using the numbers {numbers}, create an arithmetic expression that equals {target}. "
    "You may use +, -, * and / and parentheses, and each number at most once. "
    "Show your work, then give only the expression inside <answer></answer>, "
    "for example <answer>(1 + 2) * 3</answer>."
)

_Tree = int | tuple[str, "_Tree", "_Tree"]
"""A leaf number, or ``(operator, left, right)``."""


def _draw_tree(rng: random.Random, leaves: Sequence[int]) -> _Tree:
    """A random binary expression tree whose leaves are ``leaves`` in order."""
    if len(leaves) == 1:
        return leaves[0]
    cut = rng.randint(1, len(leaves) - 1)
    return (rng.choice(OPS), _draw_tree(rng, leaves[:cut]), _draw_tree(rng, leaves[cut:]))


def _value(tree: _Tree) -> int | None:
    """Value of the tree, or None when an intermediate result is not a positive integer."""
    if isinstance(tree, int):
        return tree
    op, left_tree, right_tree = tree
    left, right = _value(left_tree), _value(right_tree)
    if left is None or right is None:
        return None
    if op == "+":
        return left + right
    if op == "-":
        return left - right if left > right else None
    if op == "*":
        return left * right
    return left // right if left % right == 0 else None


def render(tree: _Tree) -> str:
    """The expression as text with only the parentheses it needs.

    A child is parenthesised when its operator binds more loosely than its parent's, or as the
    right operand of ``-`` or ``/`` when it binds equally (``a - (b + c)``, ``a / (b * c)``).
    """
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    left_text, right_text = render(left), render(right)
    if not isinstance(left, int) and PRECEDENCE[left[0]] < PRECEDENCE[op]:
        left_text = f"({left_text})"
    if not isinstance(right, int) and (
        PRECEDENCE[right[0]] < PRECEDENCE[op]
        or (PRECEDENCE[right[0]] == PRECEDENCE[op] and op in "-/")
    ):
        right_text = f"({right_text})"
    return f"{left_text} {op} {right_text}"


def _check_args(n: int, n_numbers: Sequence[int], max_number: int, max_target: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not n_numbers or any(k < 2 for k in n_numbers):
        raise ValueError(f"n_numbers must be a non-empty list of counts >= 2, got {n_numbers}")
    if max_number < 1:
        raise ValueError(f"max_number must be >= 1, got {max_number}")
    if max_target < 1:
        raise ValueError(f"max_target must be >= 1, got {max_target}")


def _problem(
    rng: random.Random, n_numbers: Sequence[int], max_number: int, max_target: int
) -> tuple[list[int], int, str] | None:
    """One draw: (numbers ascending, target, answer expression), or None if it is rejected."""
    numbers = [rng.randint(1, max_number) for _ in range(rng.choice(n_numbers))]
    tree = _draw_tree(rng, rng.sample(numbers, len(numbers)))
    target = _value(tree)
    if target is None or not 1 <= target <= max_target or target in numbers:
        return None
    return sorted(numbers), target, render(tree)


def generate(
    n: int,
    *,
    seed: int,
    n_numbers: Sequence[int] = (3, 4),
    max_number: int = 25,
    max_target: int = 100,
    exclude: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Generate ``n`` distinct solvable Countdown problems as verifiable rows.

    Args:
        n: Number of rows.
        seed: Seed of ``random.Random``; the same arguments always give the same rows.
        n_numbers: How many numbers a problem gives, drawn uniformly from this list.
        max_number: Numbers are drawn uniformly from ``1..max_number``.
        max_target: Targets lie in ``1..max_target``.
        exclude: Prompts that must not be generated (e.g. another split's prompts).

    Returns:
        Rows ``{"prompt", "answer", "verifier": "countdown", "task": "countdown", "numbers",
        "target"}``; ``answer`` uses every number exactly once and evaluates to ``target``.

    Raises:
        ValueError: Invalid arguments, or fewer than ``n`` distinct problems could be found.
    """
    _check_args(n, n_numbers, max_number, max_target)

    def draw(rng: random.Random, seen: set[str]) -> dict[str, Any] | None:
        problem = _problem(rng, n_numbers, max_number, max_target)
        if problem is None:
            return None
        numbers, target, answer = problem
        return {
            "prompt": PROMPT_TEMPLATE.format(numbers=numbers, target=target),
            "answer": answer, "verifier": "countdown", "task": "countdown",
            "numbers": numbers, "target": target,
        }  # fmt: skip

    return distinct_rows(
        n, random.Random(seed), draw, exclude=exclude, max_attempts=200 * n + 1000,
        hint="; raise max_number or max_target, or allow more numbers",
    )  # fmt: skip


def builtin_split(split: str) -> list[dict[str, Any]]:
    """The ``builtin:countdown`` rows: train (seed 0, 2000 rows) or heldout (seed 1, 200 rows).

    Args:
        split: ``"train"`` or ``"heldout"``.

    Returns:
        Verifiable rows; the two splits share no problem.

    Raises:
        ValueError: An unknown split.
    """
    return disjoint_split(generate, split, train=2000, heldout=200)
