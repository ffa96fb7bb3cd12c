"""String-manipulation problems with exact answers (``builtin:strings``).

Each row is a ``verifiable`` record checked by the ``strings`` verifier
(:func:`rlhfkit.rewards.verifiers.tasks.string_reward`)::

    {"prompt": "Reverse the characters of 'river apple'. ...", "answer": "elppa revir",
     "verifier": "strings", "task": "reverse", "case_sensitive": false}

Kinds (the row's ``task``), on texts of one or more words from
:data:`rlhfkit.data.tasks.instruction_facts.WORDS` (all lower case):

- ``reverse``: the characters of a 1-2 word text in reverse order;
- ``reverse_words``: the words of a 3-5 word text in reverse order;
- ``sort_words``: 3-5 words sorted alphabetically, separated by single spaces;
- ``count_letter``: how often a letter occurs in a 1-3 word text (the letter is present);
- ``remove_vowels``: a 1-2 word text without ``a e i o u``;
- ``uppercase``: a 1-3 word text in capitals;
- ``lowercase``: a 1-3 word text in random mixed case, written in lower case.

``case_sensitive`` is true only for ``uppercase`` and ``lowercase``, the tasks about case; the
verifier ignores case for the others. Each row's kind is drawn uniformly (a repeated problem is
redrawn within its kind). Generation is deterministic for a seed, never repeats a prompt, and
``exclude`` keeps another split's prompts out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from typing import Any

from rlhfkit.data.tasks.instruction_facts import WORDS
from rlhfkit.data.tasks.splits import disjoint_split, distinct_rows

VOWELS = "aeiou"
ANSWER_HINT = " Answer with just the result."

_Maker = Callable[[random.Random], tuple[str, str]]
"""Draws one problem: (prompt, answer)."""


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    """``low..high`` distinct random words."""
    return rng.sample(WORDS, rng.randint(low, high))


def _reverse(rng: random.Random) -> tuple[str, str]:
    text = " ".join(_words(rng, 1, 2))
    return f"Reverse the characters of '{text}'.", text[::-1]


def _reverse_words(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 5)
    return (
        f"Write the words '{' '.join(words)}' in reverse order, separated by single spaces.",
        " ".join(reversed(words)),
    )


def _sort_words(rng: random.Random) -> tuple[str, str]:
    words = _words(rng, 3, 5)
    return (
        f"Sort these words alphabetically: {', '.join(words)}. "
        "Write them separated by single spaces.",
        " ".join(sorted(words)),
    )


def _count_letter(rng: random.Random) -> tuple[str, str]:
    text = " ".join(_words(rng, 1, 3))
    letter = rng.choice(sorted(set(text) - {" "}))
    return f"How many times does the letter '{letter}' occur in '{text}'?", str(text.count(letter))


def _remove_vowels(rng: random.Random) -> tuple[str, str]:
    text = " ".join(_words(rng, 1, 2))
    answer = "".join(c for c in text if c not in VOWELS)
    return f"Remove every vowel (a, e, i, o, u) from '{text}'.", answer


def _uppercase(rng: random.Random) -> tuple[str, str]:
    text = " ".join(_words(rng, 1, 3))
    return f"Write '{text}' in uppercase.", text.upper()


def _lowercase(rng: random.Random) -> tuple[str, str]:
    text = " ".join(_words(rng, 1, 3))
    mixed = "".join(c.upper() if rng.random() < 0.5 else c for c in text)
    if mixed == text:  # keep at least one capital so that the task is not a copy
        mixed = mixed[0].upper() + mixed[1:]
    return f"Write '{mixed}' in lowercase.", text


KINDS: dict[str, _Maker] = {
    "reverse": _reverse,
    "reverse_words": _reverse_words,
    "sort_words": _sort_words,
    "count_letter": _count_letter,
    "remove_vowels": _remove_vowels,
    "uppercase": _uppercase,
    "lowercase": _lowercase,
}
"""Task name -> problem maker."""

CASE_TASKS = frozenset({"uppercase", "lowercase"})
"""Tasks whose answers are compared case-sensitively."""


def generate(
    n: int, *, seed: int, kinds: Sequence[str] = tuple(KINDS), exclude: Collection[str] = ()
) -> list[dict[str, Any]]:
    """Generate ``n`` distinct string-manipulation problems as verifiable rows.

    Args:
        n: Number of rows.
        seed: Seed of ``random.Random``; the same arguments always give the same rows.
        kinds: Task kinds to draw from uniformly (keys of :data:`KINDS`).
        exclude: Prompts that must not be generated (e.g. another split's prompts).

    Returns:
        Rows ``{"prompt", "answer", "verifier": "strings", "task": kind, "case_sensitive"}``.

    Raises:
        ValueError: Invalid arguments, or fewer than ``n`` distinct problems could be found.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not kinds or any(kind not in KINDS for kind in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {tuple(KINDS)}, got {kinds}")

    def draw(rng: random.Random, seen: set[str]) -> dict[str, Any] | None:
        kind = rng.choice(kinds)
        # Redraw within the kind on a repeat, so that kinds with fewer distinct problems (the
        # one-word variants run out first) do not become rarer as the split grows.
        for _ in range(100):
            question, answer = KINDS[kind](rng)
            prompt = question + ANSWER_HINT
            if prompt not in seen:
                return {
                    "prompt": prompt, "answer": answer, "verifier": "strings", "task": kind,
                    "case_sensitive": kind in CASE_TASKS,
                }  # fmt: skip
        return None

    return distinct_rows(n, random.Random(seed), draw, exclude=exclude, max_attempts=100 * n + 1000)


def builtin_split(split: str) -> list[dict[str, Any]]:
    """The ``builtin:strings`` rows: train (seed 0, 1000 rows) or heldout (seed 1, 200 rows).

    Args:
        split: ``"train"`` or ``"heldout"``.

    Returns:
        Verifiable rows; the two splits share no prompt.

    Raises:
        ValueError: An unknown split.
    """
    return disjoint_split(generate, split, train=1000, heldout=200)
