"""Typed dataset formats and row validation.

Each schema name maps to a parser (the ``SCHEMAS`` table) that checks one raw row and returns a
normalised, typed example. Every message list becomes ``[{"role": ..., "content": ...}, ...]``;
plain-string prompts become one user message and plain-string completions one assistant message.

The file is about 500 lines, over the ~400 guideline, because it keeps every format in one table
with its parser; the example dataclasses are the piece to move into their own module if more
formats come.

=======================  ======================================  =====================
schema                   row fields                              example type
=======================  ======================================  =====================
``sft``                  messages                                :class:`SFTExample`
``prompt_completion``    prompt, completion                      :class:`SFTExample`
``preference``           [prompt], chosen, rejected, [margin]    :class:`PreferenceExample`
``unpaired_preference``  prompt, completion, label               :class:`UnpairedExample`
``ratings``              prompt, completions, ratings            :class:`RatingsExample`
``rankings``             prompt, completions, ranking            :class:`RankingExample`
``verifiable``           prompt, answer, [verifier], ...         :class:`VerifiableExample`
``likert``               prompt, completions (2), likert, scale  :class:`LikertExample`
``process``              prompt, steps, labels                   :class:`ProcessExample`
=======================  ======================================  =====================

Message lists follow the conversation rules of :mod:`rlhfkit.data.messages` (roles, their order,
prompt and completion shapes), which also holds the message parsers used here. Fields of the row
that the schema does not use are kept in the example's ``meta``.

Errors are :class:`~rlhfkit.data.sources.DataError` naming the row's location, the field path
and the reason, e.g. ``data.jsonl:4: field 'messages[2].role': expected 'assistant' after a
'user' message, got 'user'``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rlhfkit.data.messages import ROLES as ROLES  # re-exported: public here before the split
from rlhfkit.data.messages import (
    Message,
    parse_completion,
    parse_conversation,
    parse_prompt,
    split_implicit_prompt,
    type_name,
)
from rlhfkit.data.rows import DataErrors, raise_collected
from rlhfkit.data.sources import DataError, Row, load_rows
from rlhfkit.errors import ConfigError
from rlhfkit.validation import did_you_mean


@dataclass(frozen=True)
class SFTExample:
    """A conversation to imitate (schemas ``sft`` and ``prompt_completion``).

    Attributes:
        messages: The whole conversation; its last message is from the assistant.
        meta: The row's other fields (e.g. ``task``).
        location: Where the row came from.
    """

    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)
    location: str = ""


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt with a preferred and a dispreferred completion (schema ``preference``).

    Attributes:
        prompt: Messages before the completions; ends with a user (or tool) message.
        chosen: Preferred completion (assistant messages).
        rejected: Dispreferred completion (assistant messages).
        margin: Optional strength of the preference (e.g. a rating difference).
        meta: The row's other fields.
        location: Where the row came from.
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    location: str = ""


@dataclass(frozen=True)
class UnpairedExample:
    """One completion labelled desirable or not (schema ``unpaired_preference``, for KTO).

    Attributes:
        prompt: Messages before the completion.
        completion: The completion (assistant messages).
        label: True if the completion is desirable.
        meta: The row's other fields.
        location: Where the row came from.
    """

    prompt: list[Message]
    completion: list[Message]
    label: bool
    meta: dict[str, Any] = field(default_factory=dict)
    location: str = ""


@dataclass(frozen=True)
class RatingsExample:
    """K >= 2 completions of one prompt with a scalar rating each (schema ``ratings``).

    Attributes:
        prompt: Messages before the completions.
        completions: K completions, each a list of assistant messages.
        ratings: K finite ratings, higher is better.
        meta: The row's other fields.
        location: Where the row came from.
    """

    prompt: list[Message]
    completions: list[list[Message]]
    ratings: list[float]
    meta: dict[str, Any] = field(default_factory=dict)
    location: str = ""


@dataclass(frozen=True)
class RankingExample:
    """K >= 2 completions of one prompt in a total order (schema ``rankings``).

    Attributes:
        prompt: Messages before the completions.
        completions: K completions, each a list of assistant messages.
        ranking: A permutation of ``range(K)``: completion indices, best first.
        meta: The row's other fields.
        location: Where the row came from.
    """

    prompt: list[Message]
    completions: list[list[Message]]
    ranking: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    location: str = ""


@dataclass(frozen=True)
class VerifiableExample:
    """A prompt with a reference answer that a verifier can check (schema ``verifiable``).

    Attributes:
        prompt: Messages to answer; ends with a user (or tool) message.
        answer: The reference answer, as a string.
        verifier: Name of the verifier to use (e.g. ``"math"``), or None for the default.
        meta: The row's other fields (e.g. ``task``, test cases).
        location: Where the row came from.
    """

    prompt: list[Message]
    answer: str
    verifier: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    location: str = ""


@dataclass(frozen=True)
class LikertExample:
    """Two completions A and B compared on a relative Likert scale (schema ``likert``).

    5-point scale: 1 = A much better, 2 = A better, 3 = tie, 4 = B better, 5 = B much better.
    8-point scale (no tie): 1..4 = A better (1 strongest), 5..8 = B better (8 strongest).

    Attributes:
        prompt: Messages before the completions.
        completions: ``[A, B]``, each a list of assistant messages.
        likert: The rating, an integer in ``1..scale``.
        scale: 5 or 8.
        meta: The row's other fields.
        location: Where the row came from.
    """

    prompt: list[Message]
    completions: list[list[Message]]
    likert: int
    scale: int
    meta: dict[str, Any] = field(default_factory=dict)
    location: str = ""


@dataclass(frozen=True)
class ProcessExample:
    """A step-by-step solution with one label per step (schema ``process``, for PRMs).

    Attributes:
        prompt: Messages before the solution.
        steps: The solution's steps, non-empty strings, in order.
        labels: One label per step: -1 (wrong), 0 (neutral) or 1 (correct).
        meta: The row's other fields.
        location: Where the row came from.
    """

    prompt: list[Message]
    steps: list[str]
    labels: list[int]
    meta: dict[str, Any] = field(default_factory=dict)
    location: str = ""


Example = (
    SFTExample
    | PreferenceExample
    | UnpairedExample
    | RatingsExample
    | RankingExample
    | VerifiableExample
    | LikertExample
    | ProcessExample
)

LIKERT_SCALES = (5, 8)
"""Allowed ``scale`` values of the ``likert`` schema."""

PROCESS_LABELS = (-1, 0, 1)
"""Allowed step labels of the ``process`` schema: wrong, neutral, correct."""


@dataclass
class ValidationResult:
    """The outcome of validating rows against a schema.

    Attributes:
        examples: Normalised examples of the valid rows, in input order.
        errors: One error per row left out (only with ``on_error="skip"``).
    """

    examples: list[Any]
    errors: list[DataError]


# ---------------------------------------------------------------------------------------------
# Scalars


def _finite_number(value: Any, path: str, loc: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(loc, path, f"expected a finite number, got {value!r}")
    return float(value)


def _label(value: Any, path: str, loc: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    raise DataError(loc, path, f"expected true/false (or 1/0), got {value!r}")


def _answer(value: Any, path: str, loc: str) -> str:
    """A reference answer: a non-empty string, or a finite number written as a string."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    raise DataError(loc, path, f"expected a non-empty string or a number, got {value!r}")


def _int_choice(value: Any, path: str, allowed: Sequence[int], loc: str, what: str) -> int:
    """An integer (not a bool or float) from ``allowed``."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise DataError(loc, path, f"expected {what}, got {value!r}")
    return value


def _meta(data: dict[str, Any], used: Sequence[str]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in used}


# ---------------------------------------------------------------------------------------------
# Schema parsers: (row data, location) -> example. Required keys are checked before they run.


def _parse_sft(data: dict[str, Any], loc: str) -> SFTExample:
    messages = parse_conversation(data["messages"], "messages", loc)
    return SFTExample(messages=messages, meta=_meta(data, ("messages",)), location=loc)


def _parse_prompt_completion(data: dict[str, Any], loc: str) -> SFTExample:
    prompt = parse_prompt(data["prompt"], "prompt", loc)
    completion = parse_completion(data["completion"], "completion", loc, prompt[-1]["role"])
    meta = _meta(data, ("prompt", "completion"))
    return SFTExample(messages=prompt + completion, meta=meta, location=loc)


def _parse_preference(data: dict[str, Any], loc: str) -> PreferenceExample:
    if data.get("prompt") is None:
        prompt, chosen, rejected = split_implicit_prompt(data["chosen"], data["rejected"], loc)
    else:
        prompt = parse_prompt(data["prompt"], "prompt", loc)
        chosen = parse_completion(data["chosen"], "chosen", loc, prompt[-1]["role"])
        rejected = parse_completion(data["rejected"], "rejected", loc, prompt[-1]["role"])
    if chosen == rejected:
        raise DataError(
            loc,
            "rejected",
            "identical to 'chosen'; a pair needs two different completions (an identical pair "
            "only adds a constant to the loss)",
        )
    margin = data.get("margin")
    margin = None if margin is None else _finite_number(margin, "margin", loc)
    meta = _meta(data, ("prompt", "chosen", "rejected", "margin"))
    return PreferenceExample(prompt, chosen, rejected, margin=margin, meta=meta, location=loc)


def _parse_unpaired(data: dict[str, Any], loc: str) -> UnpairedExample:
    prompt = parse_prompt(data["prompt"], "prompt", loc)
    completion = parse_completion(data["completion"], "completion", loc, prompt[-1]["role"])
    label = _label(data["label"], "label", loc)
    meta = _meta(data, ("prompt", "completion", "label"))
    return UnpairedExample(prompt, completion, label, meta=meta, location=loc)


def _completion_list(data: dict[str, Any], prompt: list[Message], loc: str) -> list[list[Message]]:
    """The ``completions`` field: a list of >= 2 completions of the prompt."""
    value = data["completions"]
    if not isinstance(value, list) or len(value) < 2:
        got = f"{len(value)} item(s)" if isinstance(value, list) else type_name(value)
        raise DataError(loc, "completions", f"expected a list of at least 2 completions, got {got}")
    after = prompt[-1]["role"]
    return [parse_completion(item, f"completions[{i}]", loc, after) for i, item in enumerate(value)]


def _per_completion_list(
    value: Any, name: str, k: int, loc: str, per: str = "completion"
) -> list[Any]:
    """A list with one entry per completion (or per ``per``)."""
    if not isinstance(value, list) or len(value) != k:
        got = f"{len(value)}" if isinstance(value, list) else type_name(value)
        raise DataError(loc, name, f"expected a list of {k} entries (one per {per}), got {got}")
    return value


def _parse_ratings(data: dict[str, Any], loc: str) -> RatingsExample:
    prompt = parse_prompt(data["prompt"], "prompt", loc)
    completions = _completion_list(data, prompt, loc)
    raw = _per_completion_list(data["ratings"], "ratings", len(completions), loc)
    ratings = [_finite_number(value, f"ratings[{i}]", loc) for i, value in enumerate(raw)]
    meta = _meta(data, ("prompt", "completions", "ratings"))
    return RatingsExample(prompt, completions, ratings, meta=meta, location=loc)


def _parse_rankings(data: dict[str, Any], loc: str) -> RankingExample:
    prompt = parse_prompt(data["prompt"], "prompt", loc)
    completions = _completion_list(data, prompt, loc)
    k = len(completions)
    ranking = _per_completion_list(data["ranking"], "ranking", k, loc)
    is_int = all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
    if not is_int or sorted(ranking) != list(range(k)):
        raise DataError(
            loc,
            "ranking",
            f"expected a permutation of 0..{k - 1} (completion indices, best first), "
            f"got {ranking!r}",
        )
    meta = _meta(data, ("prompt", "completions", "ranking"))
    return RankingExample(prompt, completions, list(ranking), meta=meta, location=loc)


def _parse_verifiable(data: dict[str, Any], loc: str) -> VerifiableExample:
    prompt = parse_prompt(data["prompt"], "prompt", loc)
    answer = _answer(data["answer"], "answer", loc)
    verifier = data.get("verifier")
    if verifier is not None and (not isinstance(verifier, str) or not verifier.strip()):
        raise DataError(loc, "verifier", f"expected a verifier name (string), got {verifier!r}")
    meta = _meta(data, ("prompt", "answer", "verifier"))
    return VerifiableExample(prompt, answer, verifier, meta=meta, location=loc)


def _parse_likert(data: dict[str, Any], loc: str) -> LikertExample:
    prompt = parse_prompt(data["prompt"], "prompt", loc)
    value = data["completions"]
    if isinstance(value, list) and len(value) != 2:
        raise DataError(
            loc, "completions", f"expected exactly 2 completions (A and B), got {len(value)}"
        )
    completions = _completion_list(data, prompt, loc)
    scale = _int_choice(data["scale"], "scale", LIKERT_SCALES, loc, "5 or 8 (points)")
    likert = _int_choice(
        data["likert"], "likert", range(1, scale + 1), loc, f"an integer in 1..{scale}"
    )
    meta = _meta(data, ("prompt", "completions", "likert", "scale"))
    return LikertExample(prompt, completions, likert, scale, meta=meta, location=loc)


def _parse_process(data: dict[str, Any], loc: str) -> ProcessExample:
    prompt = parse_prompt(data["prompt"], "prompt", loc)
    steps = data["steps"]
    if not isinstance(steps, list) or not steps:
        got = "an empty list" if isinstance(steps, list) else type_name(steps)
        raise DataError(loc, "steps", f"expected a non-empty list of step strings, got {got}")
    for i, step in enumerate(steps):
        if not isinstance(step, str) or not step.strip():
            raise DataError(loc, f"steps[{i}]", f"expected a non-empty string, got {step!r}")
    raw = _per_completion_list(data["labels"], "labels", len(steps), loc, per="step")
    what = "-1, 0 or 1 (wrong, neutral, correct)"
    labels = [_int_choice(v, f"labels[{i}]", PROCESS_LABELS, loc, what) for i, v in enumerate(raw)]
    meta = _meta(data, ("prompt", "steps", "labels"))
    return ProcessExample(prompt, list(steps), labels, meta=meta, location=loc)


SCHEMAS: dict[str, Callable[[dict[str, Any], str], Any]] = {
    "sft": _parse_sft,
    "prompt_completion": _parse_prompt_completion,
    "preference": _parse_preference,
    "unpaired_preference": _parse_unpaired,
    "ratings": _parse_ratings,
    "rankings": _parse_rankings,
    "verifiable": _parse_verifiable,
    "likert": _parse_likert,
    "process": _parse_process,
}
"""Schema name -> parser(row data, location) returning the normalised example."""

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "ratings": ("prompt", "completions", "ratings"),
    "rankings": ("prompt", "completions", "ranking"),
    "verifiable": ("prompt", "answer"),
    "likert": ("prompt", "completions", "likert", "scale"),
    "process": ("prompt", "steps", "labels"),
}
"""Schema name -> fields every row must have (a None value counts as missing)."""


def _check_required(data: Any, schema: str, loc: str) -> dict[str, Any]:
    """Check the row is an object with the schema's required fields."""
    if not isinstance(data, dict):
        raise DataError(loc, None, f"expected an object (a JSON {{...}}), got {type_name(data)}")
    present = {key for key, value in data.items() if value is not None}
    for key in REQUIRED_FIELDS[schema]:
        if key not in present:
            raise DataError(loc, key, f"missing; {_missing_hint(schema, present)}")
    return data


def _missing_hint(schema: str, present: set[str]) -> str:
    """Say what the schema needs, what the row has, and which schema would fit it."""
    needs = ", ".join(f"'{key}'" for key in REQUIRED_FIELDS[schema])
    has = ", ".join(f"'{key}'" for key in sorted(present)) or "no fields"
    hint = f"schema '{schema}' needs {needs}; the row has {has}"
    fits = [name for name, keys in REQUIRED_FIELDS.items() if set(keys) <= present]
    if fits:
        best = max(fits, key=lambda name: len(REQUIRED_FIELDS[name]))
        hint += f" (did you mean schema '{best}'?)"
    return hint


def validate_rows(
    rows: list[Row], schema: str, *, on_error: Literal["raise", "skip"] = "raise"
) -> ValidationResult:
    """Validate raw rows against a schema and normalise them into typed examples.

    Args:
        rows: Rows from :func:`~rlhfkit.data.sources.load_rows` (or built by hand).
        schema: One of the names in ``SCHEMAS``.
        on_error: ``"raise"`` checks every row and raises if any is bad; ``"skip"`` leaves
            bad rows out and collects their errors in ``ValidationResult.errors``.

    Returns:
        The examples of the valid rows (input order) and the errors of the skipped rows.

    Raises:
        DataError: With ``on_error="raise"``, the invalid row (location, field, reason), or
            :class:`~rlhfkit.data.rows.DataErrors` listing the first ``MAX_REPORTED`` of
            several.
        ValueError: An unknown schema name or ``on_error`` value.
    """
    parser = SCHEMAS.get(schema)
    if parser is None:
        raise _unknown_schema(schema)
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    result = ValidationResult(examples=[], errors=[])
    for row in rows:
        try:
            data = _check_required(row.data, schema, row.location)
            result.examples.append(parser(data, row.location))
        except DataError as err:
            result.errors.append(err)
    if on_error == "raise":
        raise_collected(result.errors)
    return result


def load_examples(
    source: str,
    schema: str,
    *,
    split: str = "train",
    on_error: Literal["raise", "skip"] = "raise",
    limit: int | None = None,
) -> ValidationResult:
    """Load a source and validate its rows: ``validate_rows(load_rows(...), schema)``.

    Lines that are not JSON objects count as bad rows like the invalid ones: with ``"raise"``
    all are reported together (in file order), with ``"skip"`` all are left out.

    Args:
        source: File path, ``builtin:NAME`` or hub dataset name (see ``load_rows``).
        schema: One of the names in ``SCHEMAS``.
        split: Split of a hub or built-in dataset.
        on_error: ``"raise"`` or ``"skip"`` (see ``validate_rows``).
        limit: Read at most this many rows.

    Returns:
        The validation result.
    """
    if schema not in SCHEMAS:  # fail before reading a possibly large source
        raise _unknown_schema(schema)
    try:
        rows, unreadable = load_rows(source, split=split, limit=limit), []
    except DataErrors as err:  # malformed lines: validate the others too, report them all
        if err.rows is None:
            raise
        rows, unreadable = err.rows, err.errors
    result = validate_rows(rows, schema, on_error="skip")
    result.errors = sorted([*unreadable, *result.errors], key=_row_order)
    if on_error == "raise":
        raise_collected(result.errors)
    return result


def _unknown_schema(schema: str) -> ConfigError:
    names = list(SCHEMAS)
    return ConfigError(
        f"unknown schema {schema!r}; valid schemas: {', '.join(names)}{did_you_mean(schema, names)}"
    )


def _row_order(err: DataError) -> float:
    """The line or row number in an error's location (``data.jsonl:7``, ``...:row 7``)."""
    tail = err.location.rpartition(":")[2].removeprefix("row ")
    return int(tail) if tail.isdigit() else math.inf
