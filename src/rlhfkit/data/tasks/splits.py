"""Procedural tasks' rows: distinct prompts, and train/held-out splits disjoint by construction."""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from typing import Any

Generate = Callable[..., list[dict[str, Any]]]
"""A task's ``generate(n, *, seed, exclude)``: n rows, none of whose prompts is in ``exclude``."""


def disjoint_split(generate: Generate, split: str, *, train: int, heldout: int) -> list[dict]:
    """The rows of ``split`` of a procedural task, the two splits sharing no prompt.

    heldout: ``heldout`` rows from seed 1; train: ``train`` rows from seed 0 whose prompts are
    not in the held-out split.

    Raises:
        ValueError: An unknown split.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")
    held: list[dict[str, Any]] = generate(heldout, seed=1)
    if split == "heldout":
        return held
    exclude: Collection[str] = {row["prompt"] for row in held}
    return generate(train, seed=0, exclude=exclude)


Draw = Callable[[random.Random, set[str]], dict[str, Any] | None]
"""One candidate row (with a ``prompt``) from the generator, or None for a failed draw; it sees
the prompts taken so far (to redraw within a kind, say)."""


def distinct_rows(
    n: int,
    rng: random.Random,
    draw: Draw,
    *,
    exclude: Collection[str] = (),
    max_attempts: int,
    hint: str = "",
) -> list[dict[str, Any]]:
    """``n`` rows from ``draw`` whose prompts are distinct and not in ``exclude``.

    Raises:
        ValueError: When ``max_attempts`` draws give fewer than ``n`` rows (``hint`` says what to
            change).
    """
    seen, rows = set(exclude), []
    for _ in range(max_attempts):
        if len(rows) == n:
            return rows
        row = draw(rng, seen)
        if row is None or row["prompt"] in seen:
            continue
        seen.add(row["prompt"])
        rows.append(row)
    if len(rows) == n:
        return rows
    raise ValueError(f"found only {len(rows)} distinct problems of the {n} requested{hint}")
