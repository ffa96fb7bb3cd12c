"""Training-data decontamination against evaluation sets (docs/methods/evaluation.md).

Two detectors, both exact and index-based (build the index of the eval texts once, then each
training text costs time linear in its length):

- **n-gram overlap** (default n = 8): a text's n-grams are the tuples of n consecutive tokens of
  ``text.lower().split()`` (lowercased, split on whitespace; punctuation stays attached). A
  training text is contaminated iff it shares at least one n-gram with an eval text:
  ``ngrams(train) & index != {}``. A text with fewer than n tokens has no n-gram, so it is
  never flagged and, as an eval text, can never flag anything (the report counts such eval
  texts as ``eval_too_short``; use a smaller n or substring matching for short prompts).
- **substring matching** (default 50 characters): texts are whitespace-normalised (every run of
  whitespace becomes one space, ends stripped; case is kept). The index holds every window
  ``s[i:i+length]`` of every normalised eval text; a training text matches iff one of its own
  windows is in the index, i.e. iff it contains a ``length``-character substring of an eval
  text. Memory is about ``length`` characters per indexed position; eval texts shorter than
  ``length`` have no window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Ngram = tuple[str, ...]


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def ngrams(text: str, n: int = 8) -> set[Ngram]:
    """The set of word n-grams of ``text`` (lowercased, whitespace tokens).

    ``ngrams("A b c", 2) == {("a", "b"), ("b", "c")}``; empty when the text has fewer than n
    tokens.

    Raises:
        ValueError: If ``n < 1``.
    """
    _check_positive("n", n)
    words = text.lower().split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def build_index(eval_texts: Iterable[str], n: int = 8) -> frozenset[Ngram]:
    """The union of the n-grams of every eval text: ``U_j ngrams(e_j, n)``."""
    index: set[Ngram] = set()
    for text in eval_texts:
        index |= ngrams(text, n)
    return frozenset(index)


def contaminated(train_text: str, index: frozenset[Ngram] | set[Ngram], n: int = 8) -> bool:
    """Whether ``train_text`` shares any n-gram with the index (built with the same ``n``)."""
    words = train_text.lower().split()
    return any(tuple(words[i : i + n]) in index for i in range(len(words) - n + 1))


def normalise_whitespace(text: str) -> str:
    """Collapse every whitespace run into one space and strip the ends."""
    return " ".join(text.split())


def build_substring_index(eval_texts: Iterable[str], length: int = 50) -> frozenset[str]:
    """Every ``length``-character window of every whitespace-normalised eval text.

    Raises:
        ValueError: If ``length < 1``.
    """
    _check_positive("length", length)
    windows: set[str] = set()
    for text in eval_texts:
        s = normalise_whitespace(text)
        windows.update(s[i : i + length] for i in range(len(s) - length + 1))
    return frozenset(windows)


def substring_match(
    train_text: str, eval_texts: Sequence[str] | frozenset[str], length: int = 50
) -> bool:
    """Whether ``train_text`` contains a ``length``-character substring of an eval text.

    Both sides are whitespace-normalised first (:func:`normalise_whitespace`).

    Args:
        train_text: The training text to check.
        eval_texts: The eval texts, or (faster, for many training texts) their index from
            :func:`build_substring_index` with the same ``length`` (any ``frozenset`` is taken
            as such an index).
        length: Window length in characters.
    """
    index = (
        eval_texts
        if isinstance(eval_texts, frozenset)
        else build_substring_index(eval_texts, length)
    )
    s = normalise_whitespace(train_text)
    return any(s[i : i + length] in index for i in range(len(s) - length + 1))


def contamination_report(
    train_rows_texts: Sequence[str],
    eval_sets: Mapping[str, Sequence[str]],
    n: int = 8,
    *,
    substring: int | None = None,
) -> dict[str, Any]:
    """Which training texts overlap which eval set, with rates.

    A training text is flagged for an eval set iff it shares an n-gram with one of its texts
    (:func:`contaminated`) or, when ``substring`` is set, contains a ``substring``-character
    substring of one (:func:`substring_match`).

    Args:
        train_rows_texts: One text per training row.
        eval_sets: Eval set name -> its texts.
        n: n-gram length (the threshold: longer n flags less).
        substring: Window length of substring matching (e.g. 50); None disables it.

    Returns:
        ``{"n", "substring", "train_rows", "sets": {name: {"eval_rows", "eval_too_short",
        "flagged", "count", "rate"}}, "any": {"flagged", "count", "rate"}}`` where ``flagged``
        are 0-based training-row indices (ascending), ``rate = count / train_rows`` (0 without
        training rows) and ``eval_too_short`` counts the eval texts with fewer than n tokens
        (and, with substring matching, fewer than ``substring`` characters) that can never
        flag anything.
    """
    _check_positive("n", n)
    if substring is not None:
        _check_positive("substring", substring)
    total = len(train_rows_texts)
    sets: dict[str, dict[str, Any]] = {}
    union: set[int] = set()
    for name, texts in eval_sets.items():
        grams = build_index(texts, n)
        windows = build_substring_index(texts, substring) if substring else frozenset()
        flagged = [
            i
            for i, text in enumerate(train_rows_texts)
            if contaminated(text, grams, n)
            or (substring and substring_match(text, windows, substring))
        ]
        short = sum(
            len(t.split()) < n and (not substring or len(normalise_whitespace(t)) < substring)
            for t in texts
        )
        union.update(flagged)
        sets[name] = _counts(flagged, total) | {"eval_rows": len(texts), "eval_too_short": short}
    return {
        "n": n,
        "substring": substring,
        "train_rows": total,
        "sets": sets,
        "any": _counts(sorted(union), total),
    }


def _counts(flagged: list[int], total: int) -> dict[str, Any]:
    return {
        "flagged": flagged,
        "count": len(flagged),
        "rate": len(flagged) / total if total else 0.0,
    }
