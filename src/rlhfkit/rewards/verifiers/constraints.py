r"""Instruction-following constraints: checkable instructions in the style of IFEval.

An example lists its instructions in its ``constraints`` field, each a dict naming a checker of
:data:`CONSTRAINTS` by ``type`` with that checker's parameters::

    [{"type": "word_count", "n": 50, "relation": "at most"},
     {"type": "keywords", "keywords": ["river", "stone"]},
     {"type": "no_commas"}]

:func:`constraints_reward` (registered as ``verifier:constraints``) scores a completion against
them: ``all`` = 1.0 iff every constraint holds, ``fraction`` = the share that hold.

Each checker is a pure ``check(response, **params) -> bool`` that first validates its
parameters (raising ValueError on a bad one, whatever the response). Counting checkers take
``n`` and a ``relation`` of :data:`RELATIONS` (``"at least"``, ``"at most"``, ``"exactly"``).
Text matching of keywords, phrases and letters ignores case.

Only the reply is checked, not the reasoning: with a ``</think>`` the text after the last one,
and when that reply is a single ``<answer>...</answer>`` block, the text inside it.

Definitions used by several checkers:

- word: a whitespace-separated token with at least one letter or digit (``don't`` and ``3.14``
  are one word each, a lone ``-`` none).
- sentence: text ended by ``.``, ``!`` or ``?`` followed by whitespace or the end, or by
  ``。！？``; pieces without a letter or digit are not sentences (``3.14`` does not end one;
  abbreviations such as ``e.g. this`` do).
- paragraph: text between blank lines or ``***`` dividers; empty pieces are not paragraphs.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlhfkit.rewards.verifiers.format import ANSWER_CLOSE, ANSWER_OPEN, split_think
from rlhfkit.rewards.verifiers.language import language_scripts, script_fraction

RELATIONS = ("at least", "at most", "exactly")
"""How a count compares with the constraint's ``n``."""

MODES = ("all", "fraction")

_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|[。！？]+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n|\*\*\*")
_JSON_FENCE = re.compile(r"```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```", re.DOTALL | re.IGNORECASE)
_TITLE = re.compile(r"<<[^\n<>]*[^\s<>][^\n<>]*>>")
_BULLET = re.compile(r"^[ \t]*[-*+][ \t]+\S", re.MULTILINE)
_HIGHLIGHT = re.compile(r"(?<![\w*])(\*\*?)(?![\s*])[^\n*]+?(?<!\s)\1(?!\*)")
# [placeholder] with some non-space text; not a markdown link [text](url).
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]*[^\s\[\]][^\[\]\n]*\](?!\()")
_QUOTES = (('"', '"'), ("\u201c", "\u201d"))


# ---- parameter validation ------------------------------------------------------------------


def _count(n: Any, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {n!r}")
    return n


def _relation(relation: Any) -> str:
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")
    return relation


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _texts(values: Any, name: str) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list of strings, got {values!r}")
    return [_text(value, f"each of {name}") for value in values]


def _compare(count: int, n: Any, relation: Any) -> bool:
    """``count >= n``, ``count <= n`` or ``count == n`` after validating ``n`` and ``relation``."""
    n, relation = _count(n), _relation(relation)
    if relation == "at least":
        return count >= n
    if relation == "at most":
        return count <= n
    return count == n


# ---- shared text measures ------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return [token for token in text.split() if any(char.isalnum() for char in token)]


def _occurrences(text: str, phrase: str) -> int:
    """Case-insensitive occurrences of ``phrase`` not inside a longer word.

    ``cat`` does not occur in ``category``.
    """
    pattern = rf"(?<!\w){re.escape(phrase.strip())}(?!\w)"
    return len(re.findall(pattern, text, re.IGNORECASE))


# ---- checkers ------------------------------------------------------------------------------


def word_count(response: str, *, n: int, relation: str = "at least") -> bool:
    """The number of words compares with ``n`` as ``relation`` says."""
    return _compare(len(_words(response)), n, relation)


def sentence_count(response: str, *, n: int, relation: str = "at least") -> bool:
    """The number of sentences compares with ``n`` as ``relation`` says."""
    pieces = _SENTENCE_END.split(response)
    return _compare(sum(any(c.isalnum() for c in piece) for piece in pieces), n, relation)


def paragraph_count(response: str, *, n: int, relation: str = "exactly") -> bool:
    """The number of paragraphs (split at blank lines or ``***``) compares with ``n``."""
    pieces = _PARAGRAPH_BREAK.split(response)
    return _compare(sum(bool(piece.strip()) for piece in pieces), n, relation)


def keywords(response: str, *, keywords: list[str]) -> bool:
    """Every keyword occurs (case-insensitive, as a whole word or phrase)."""
    return all(_occurrences(response, word) > 0 for word in _texts(keywords, "keywords"))


def forbidden_words(response: str, *, words: list[str]) -> bool:
    """No forbidden word occurs (case-insensitive, as a whole word or phrase)."""
    return not any(_occurrences(response, word) > 0 for word in _texts(words, "words"))


def keyword_frequency(response: str, *, keyword: str, n: int, relation: str = "at least") -> bool:
    """The (case-insensitive, whole-word) occurrences of ``keyword`` compare with ``n``."""
    return _compare(_occurrences(response, _text(keyword, "keyword")), n, relation)


def letter_frequency(response: str, *, letter: str, n: int, relation: str = "at least") -> bool:
    """The letter occurs (case-insensitive) a number of times that compares with ``n``."""
    if not isinstance(letter, str) or len(letter) != 1 or not letter.isalpha():
        raise ValueError(f"letter must be a single letter, got {letter!r}")
    return _compare(response.casefold().count(letter.casefold()), n, relation)


def json_format(response: str) -> bool:
    """The whole reply parses as JSON (any JSON value).

    It may be inside a fence opened by ```` ```json ```` or a bare ```` ``` ````.
    """
    text = response.strip()
    fenced = _JSON_FENCE.fullmatch(text)
    if fenced is not None:
        text = fenced.group(1)
    try:
        json.loads(text)
    except ValueError:  # json.JSONDecodeError is a ValueError
        return False
    return True


def lowercase(response: str) -> bool:
    """Every cased letter is lowercase, and there is at least one (``str.islower``)."""
    return response.islower()


def uppercase(response: str) -> bool:
    """Every cased letter is uppercase, and there is at least one (``str.isupper``)."""
    return response.isupper()


def capital_word_frequency(response: str, *, n: int, relation: str = "at least") -> bool:
    """The number of words in capitals (``NASA``, ``I``, ``U.S.``) compares with ``n``."""
    return _compare(sum(word.isupper() for word in _words(response)), n, relation)


def starts_with(response: str, *, phrase: str) -> bool:
    """The reply, stripped of surrounding whitespace, begins with ``phrase`` (any case)."""
    return response.strip().casefold().startswith(_text(phrase, "phrase").strip().casefold())


def ends_with(response: str, *, phrase: str) -> bool:
    """The reply, stripped of surrounding whitespace, ends with ``phrase`` (any case)."""
    return response.strip().casefold().endswith(_text(phrase, "phrase").strip().casefold())


def title(response: str) -> bool:
    """A title in double angular brackets, such as ``<<Ode to Joy>>``, on one line."""
    return _TITLE.search(response) is not None


def bullet_count(response: str, *, n: int, relation: str = "exactly") -> bool:
    """The number of markdown bullets compares with ``n``.

    A bullet is a line starting with ``-``, ``*`` or ``+`` then a space; numbered lists and
    ``***`` / ``---`` rules are not bullets.
    """
    return _compare(len(_BULLET.findall(response)), n, relation)


def highlight_count(response: str, *, n: int, relation: str = "at least") -> bool:
    """The number of highlighted sections (``*text*`` or ``**text**``) compares with ``n``.

    A section lies on one line, has no space just inside its asterisks and is not glued to a
    word before it (``2*3*4`` is not highlighted).
    """
    return _compare(len(_HIGHLIGHT.findall(response)), n, relation)


def placeholder_count(response: str, *, n: int, relation: str = "at least") -> bool:
    """The number of placeholders in square brackets (``[address]``) compares with ``n``.

    Markdown links (``[text](url)``) and blank brackets are not placeholders.
    """
    return _compare(len(_PLACEHOLDER.findall(response)), n, relation)


def postscript(response: str, *, marker: str = "P.S.") -> bool:
    """A line starts with the postscript ``marker``.

    Case is ignored, and a space may follow each dot (``P. S.`` counts as ``P.S.``).
    """
    parts = [re.escape(char) + (r"\s?" if char == "." else "") for char in _text(marker, "marker")]
    pattern = r"^\s*" + "".join(parts)
    return re.search(pattern, response, re.IGNORECASE | re.MULTILINE) is not None


def no_commas(response: str) -> bool:
    """No comma, ASCII or fullwidth (``，``)."""
    return "," not in response and "，" not in response


def quotation(response: str) -> bool:
    """The whole reply is wrapped in double quotation marks (straight or curly)."""
    text = response.strip()
    return len(text) >= 2 and any(text[0] == a and text[-1] == b for a, b in _QUOTES)


def response_language(response: str, *, language: str, min_fraction: float = 0.8) -> bool:
    """At least ``min_fraction`` of the reply's words are in the scripts of ``language``.

    Scripts as in :mod:`rlhfkit.rewards.verifiers.language` (so English and French, both
    Latin, are not told apart). A reply with no words fails.
    """
    language_scripts(language)  # validates the language
    if isinstance(min_fraction, bool) or not isinstance(min_fraction, int | float):
        raise ValueError(f"min_fraction must be a number in [0, 1], got {min_fraction!r}")
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be a number in [0, 1], got {min_fraction!r}")
    fraction = script_fraction(response, language)
    return fraction is not None and fraction >= min_fraction


CONSTRAINTS: dict[str, Callable[..., bool]] = {
    "word_count": word_count,
    "sentence_count": sentence_count,
    "paragraph_count": paragraph_count,
    "keywords": keywords,
    "forbidden_words": forbidden_words,
    "keyword_frequency": keyword_frequency,
    "letter_frequency": letter_frequency,
    "json_format": json_format,
    "lowercase": lowercase,
    "uppercase": uppercase,
    "capital_word_frequency": capital_word_frequency,
    "starts_with": starts_with,
    "ends_with": ends_with,
    "title": title,
    "bullet_count": bullet_count,
    "highlight_count": highlight_count,
    "placeholder_count": placeholder_count,
    "postscript": postscript,
    "no_commas": no_commas,
    "quotation": quotation,
    "response_language": response_language,
}
"""Constraint type -> checker ``(response, **params) -> bool``."""


# ---- scoring -------------------------------------------------------------------------------


def reply_text(completion: str) -> str:
    """The part of a completion the constraints apply to.

    The reply after the reasoning (see :func:`rlhfkit.rewards.verifiers.format.split_think`),
    or the inside of its ``<answer>`` block when the reply is exactly one such block.
    """
    _, reply = split_think(completion)
    inner = reply.strip()
    if (
        inner.startswith(ANSWER_OPEN)
        and inner.endswith(ANSWER_CLOSE)
        and inner.count(ANSWER_OPEN) == 1
        and inner.count(ANSWER_CLOSE) == 1
    ):
        return inner[len(ANSWER_OPEN) : -len(ANSWER_CLOSE)]
    return reply


def check_constraint(response: str, constraint: Mapping[str, Any], index: int = 0) -> bool:
    """Whether ``response`` satisfies one constraint ``{"type": name, **params}``.

    Raises:
        ValueError: A malformed constraint (not a dict, unknown type, missing, unknown or
            invalid parameters); the message names ``index`` and the type.
    """
    if not isinstance(constraint, Mapping):
        raise ValueError(f"constraint {index}: expected a dict with a 'type', got {constraint!r}")
    kind = constraint.get("type")
    where = f"constraint {index} ({kind!r})"
    if not isinstance(kind, str) or kind not in CONSTRAINTS:
        known = ", ".join(CONSTRAINTS)
        raise ValueError(f"{where}: unknown constraint type; known: {known}")
    checker = CONSTRAINTS[kind]
    params = {key: value for key, value in constraint.items() if key != "type"}
    try:
        inspect.signature(checker).bind(response, **params)
    except TypeError as err:
        accepted = [p for p in inspect.signature(checker).parameters if p != "response"]
        raise ValueError(f"{where}: {err}; its parameters are {accepted}") from None
    try:
        return checker(response, **params)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def validate_constraints(constraints: Any) -> None:
    """Check a ``constraints`` field without a response (for validating a dataset on load).

    Raises:
        ValueError: Not a list of dicts, or a malformed constraint (naming its index and type).
    """
    if isinstance(constraints, str | bytes) or not isinstance(constraints, Sequence):
        raise ValueError(f"constraints must be a list of dicts, got {type(constraints).__name__}")
    for index, constraint in enumerate(constraints):
        check_constraint("", constraint, index)


def constraints_reward(
    completion: str, constraints: Sequence[Mapping[str, Any]], *, mode: str = "all"
) -> float | None:
    """Score a completion against an example's instruction constraints.

    With ``h_i = 1`` when constraint ``i`` holds on the reply (:func:`reply_text`), else 0:

    - ``all``: ``r = prod_i h_i`` (1.0 iff every constraint holds; IFEval's strict prompt-level
      accuracy);
    - ``fraction``: ``r = (1/K) sum_i h_i`` over the ``K`` constraints (instruction level).

    Every constraint is validated even when an earlier one already failed.

    Args:
        completion: The model's reply.
        constraints: The example's ``constraints`` field: a list of ``{"type": name, **params}``
            dicts, ``name`` a key of :data:`CONSTRAINTS`.
        mode: ``"all"`` or ``"fraction"``.

    Returns:
        The reward in ``[0, 1]``, or None when the example has no constraints.

    Raises:
        ValueError: An unknown mode, or a malformed constraint (naming its index and type).
    """
    if mode not in MODES:
        raise ValueError(f"constraints_reward: unknown mode {mode!r}; use one of {MODES}")
    validate_constraints(constraints)
    if not constraints:
        return None
    response = reply_text(completion)
    held = [check_constraint(response, c, i) for i, c in enumerate(constraints)]
    if mode == "all":
        return float(all(held))
    return sum(held) / len(held)
