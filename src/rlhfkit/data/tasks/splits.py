"""Train and held-out splits of a procedural task, disjoint by construction."""

from __future__ import annotations

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
