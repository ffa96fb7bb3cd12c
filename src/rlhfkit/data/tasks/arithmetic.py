"""Procedurally generated arithmetic problems with verifiable answers.

Each row is a ``verifiable`` record::

    {"prompt": "What is 37 + 58? Answer with just the number.", "answer": "95",
     "verifier": "math", "task": "arithmetic"}

Expressions use ``+``, ``-`` and ``*`` on positive integers with the usual precedence
(``*`` before ``+``/``-``). Two-term subtractions put the larger operand first so that the answer
is never negative. Generation is deterministic for a seed (``random.Random(seed)``) and never
repeats a prompt; ``exclude`` keeps prompts of another split out, which is how the built-in
held-out split stays disjoint from the training split.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

from rlhfkit.data.tasks.splits import disjoint_split, distinct_rows

OPS = ("+", "-", "*")
"""Supported operators."""

PROMPT_TEMPLATE = "What is {expression}? Answer with just the number."


def evaluate(operands: Sequence[int], ops: Sequence[str]) -> int:
    """Evaluate ``operands[0] ops[0] operands[1] ...`` with ``*`` binding tighter than ``+``/``-``.

    Args:
        operands: N >= 1 integers.
        ops: N - 1 operators from ``OPS``.

    Returns:
        The exact integer value.
    """
    signs, terms = [1], [operands[0]]
    for op, value in zip(ops, operands[1:], strict=True):
        if op == "*":
            terms[-1] *= value
        else:
            signs.append(1 if op == "+" else -1)
            terms.append(value)
    return sum(sign * term for sign, term in zip(signs, terms, strict=True))


def _problem(rng: random.Random, ops: Sequence[str], max_operand: int, n_terms: int) -> str:
    """Draw one expression string."""
    operands = [rng.randint(1, max_operand) for _ in range(n_terms)]
    chosen = [rng.choice(ops) for _ in range(n_terms - 1)]
    if n_terms == 2 and chosen[0] == "-":
        operands.sort(reverse=True)
    parts = [str(operands[0])]
    for op, value in zip(chosen, operands[1:], strict=True):
        parts += [op, str(value)]
    return " ".join(parts)


def _check_args(n: int, ops: Sequence[str], max_operand: int, n_terms: int) -> None:
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {tuple(ops)}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    if n_terms < 2:
        raise ValueError(f"n_terms must be >= 2, got {n_terms}")


def generate(
    n: int,
    *,
    seed: int,
    ops: Sequence[str] = OPS,
    max_operand: int = 99,
    n_terms: int = 2,
    exclude: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Generate ``n`` distinct arithmetic problems as verifiable rows.

    Args:
        n: Number of rows.
        seed: Seed of ``random.Random``; the same arguments always give the same rows.
        ops: Operators to draw from (subset of ``("+", "-", "*")``).
        max_operand: Operands are drawn uniformly from ``1..max_operand``.
        n_terms: Number of operands per expression (>= 2).
        exclude: Prompts that must not be generated (e.g. another split's prompts).

    Returns:
        Rows ``{"prompt", "answer", "verifier": "math", "task": "arithmetic"}``.

    Raises:
        ValueError: Invalid arguments, or fewer than ``n`` distinct problems could be found.
    """
    _check_args(n, ops, max_operand, n_terms)

    def draw(rng: random.Random, seen: set[str]) -> dict[str, Any]:
        expression = _problem(rng, ops, max_operand, n_terms)
        tokens = expression.split()
        answer = evaluate([int(t) for t in tokens[::2]], tokens[1::2])
        prompt = PROMPT_TEMPLATE.format(expression=expression)
        return {"prompt": prompt, "answer": str(answer), "verifier": "math", "task": "arithmetic"}

    return distinct_rows(
        n, random.Random(seed), draw, exclude=exclude, max_attempts=100 * n + 1000,
        hint="; raise max_operand or n_terms, or add operators",
    )  # fmt: skip


def as_sft_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turn verifiable rows into ``sft`` rows whose assistant reply is the answer.

    Args:
        rows: Rows from :func:`generate` (``prompt`` and ``answer`` strings).

    Returns:
        Rows ``{"messages": [user prompt, assistant answer], "task": ...}``.
    """
    return [
        {
            "messages": [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["answer"]},
            ],
            "task": row.get("task", "arithmetic"),
        }
        for row in rows
    ]


def builtin_split(split: str) -> list[dict[str, Any]]:
    """The ``builtin:arithmetic`` rows: train (seed 0, 400 rows) or heldout (seed 1, 100 rows).

    Args:
        split: ``"train"`` or ``"heldout"``.

    Returns:
        Verifiable rows; the two splits share no prompt.

    Raises:
        ValueError: An unknown split.
    """
    return disjoint_split(generate, split, train=400, heldout=100)
