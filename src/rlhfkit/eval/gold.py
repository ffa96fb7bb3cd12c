"""Win rate by the programmatic gold judge of ``builtin:preferences`` (known truth).

Used to check that alignment makes a model better by the task's own standard: greedy replies of
two models to the same held-out prompts are compared by
:func:`rlhfkit.data.tasks.preferences.gold_prefers` (1 win, 0.5 tie, 0 loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhfkit.data.tasks.preferences import gold_prefers, gold_score


def gold_win_rate(
    candidates: Sequence[str], baselines: Sequence[str], references: Sequence[dict[str, Any]]
) -> dict[str, float]:
    """Mean gold preference of ``candidates`` over ``baselines`` (ties 0.5) and mean gold scores.

    Args:
        candidates: One reply per prompt from the model under test.
        baselines: One reply per prompt from the model it is compared with.
        references: Per prompt, ``reference`` (the reference reply) and ``task``.
    """
    if not (len(candidates) == len(baselines) == len(references)):
        raise ValueError("candidates, baselines and references must have the same length")
    if not candidates:
        return {"win_rate": float("nan"), "gold": float("nan"), "gold_baseline": float("nan")}
    wins = [
        gold_prefers(a, b, r["reference"], r.get("task"))
        for a, b, r in zip(candidates, baselines, references, strict=True)
    ]
    pairs = list(zip(candidates, baselines, references, strict=True))
    gold = [gold_score(a, r["reference"], r.get("task")) for a, _, r in pairs]
    base = [gold_score(b, r["reference"], r.get("task")) for _, b, r in pairs]
    n = len(wins)
    return {"win_rate": sum(wins) / n, "gold": sum(gold) / n, "gold_baseline": sum(base) / n}
