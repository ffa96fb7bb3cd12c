"""Typed dataset formats and row validation.

Each schema name maps to a parser (the ``SCHEMAS`` table) that checks one raw row and returns a
normalised, typed example. Every message list becomes ``[{"role": ..., "content": ...}, ...]``;
plain-string prompts become one user message and plain-string completions one assistant message.

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
=======================  ======================================  =====================

Conversation rules (METHODS.md section 2): roles are system, user, assistant and tool; one
optional leading system message; then strict user/assistant alternation starting with a user
message, where a tool message may follow an assistant message (or another tool message) and an
assistant message may follow a tool message. User and assistant content must be a non-empty
string (an assistant message that only makes ``tool_calls`` may have empty content). Prompts end
with a user (or tool) message; completions hold only assistant (and tool) messages, start and
end with an assistant message. Extra message keys (``tool_calls``, ``name``, ...) pass through;
extra keys whose value is None (added when Arrow unifies message structs) are dropped. Fields of
the row that the schema does not use are kept in the example's ``meta``.

Errors are :class:`~rlhfkit.data.sources.DataError` naming the row's location, the field path
and the reason, e.g. ``data.jsonl:4: field 'messages[2].role': expected 'assistant' after a
'user' message, got 'user'``.

This module is longer than the ~400-line guideline on purpose: it is the single place that states
every format and the message rules they share (one documented dataclass per format, one small
parser per format, one table); split across files the shared rules would drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rlhfkit.data.sources import DataError, Row, load_rows

Message = dict[str, Any]
"""One chat message: ``{"role": str, "content": str, ...extra keys}``."""

ROLES = ("system", "user", "assistant", "tool")

_NEXT_ROLES: dict[str | None, tuple[str, ...]] = {
    None: ("user",),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user", "tool"),
    "tool": ("assistant", "tool"),
}
"""Role -> roles allowed to follow it (None: the start of the conversation)."""


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


Example = (
    SFTExample
    | PreferenceExample
    | UnpairedExample
    | RatingsExample
    | RankingExample
    | VerifiableExample
)


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
# Messages


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_message(value: Any, path: str, loc: str) -> Message:
    """Check one message's shape, role and content; return a normalised copy."""
    if not isinstance(value, dict):
        raise DataError(
            loc,
            path,
            f"expected a message object with 'role' and 'content', got {_type_name(value)}",
        )
    role = value.get("role")
    if role not in ROLES:
        raise DataError(loc, f"{path}.role", f"expected one of {_quoted(ROLES)}, got {role!r}")
    message = {key: item for key, item in value.items() if item is not None}
    message["content"] = _message_content(value, path, loc)
    return message


def _message_content(message: dict[str, Any], path: str, loc: str) -> str:
    """The message's content: a string, non-empty for user/assistant turns."""
    role, content = message["role"], message.get("content")
    if role == "assistant" and message.get("tool_calls") and content in (None, ""):
        return ""  # a pure tool-call turn has no text
    if not isinstance(content, str):
        raise DataError(loc, f"{path}.content", f"expected a string, got {_type_name(content)}")
    if role in ("user", "assistant") and not content.strip():
        raise DataError(
            loc, f"{path}.content", f"empty {role} message; write its text or remove the message"
        )
    return content


def _parse_messages(value: Any, path: str, loc: str) -> list[Message]:
    """Check that ``value`` is a non-empty list of messages; return normalised copies."""
    if not isinstance(value, list):
        raise DataError(
            loc, path, f"expected a list of messages ({{role, content}}), got {_type_name(value)}"
        )
    if not value:
        raise DataError(loc, path, "empty list of messages")
    return [_parse_message(item, f"{path}[{i}]", loc) for i, item in enumerate(value)]


def _quoted(names: Sequence[str]) -> str:
    quoted = [f"'{name}'" for name in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _order_reason(prev: str | None, role: str) -> str:
    """Explain why ``role`` may not follow ``prev``."""
    if role == "system":
        return "a 'system' message may only be the first message; merge it into that one"
    if prev is None:
        return f"expected 'user' as the first message (after an optional 'system'), got '{role}'"
    article = "an" if prev == "assistant" else "a"  # "a user", "a tool", "a system"
    return f"expected {_quoted(_NEXT_ROLES[prev])} after {article} '{prev}' message, got '{role}'"


def _check_order(
    messages: list[Message], path: str, loc: str, prev: str | None = None, offset: int = 0
) -> str | None:
    """Check role alternation, continuing after ``prev``; return the last role.

    ``offset`` is added to indices in error paths (for a slice of a longer list).
    """
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and prev is None and i == 0:
            prev = role
            continue
        if role not in _NEXT_ROLES[prev]:
            raise DataError(loc, f"{path}[{i + offset}].role", _order_reason(prev, role))
        prev = role
    return prev


def _conversation(value: Any, path: str, loc: str) -> list[Message]:
    """A full conversation: alternating roles, ending with an assistant reply."""
    messages = _parse_messages(value, path, loc)
    _check_order(messages, path, loc)
    if messages[-1]["role"] != "assistant":
        raise DataError(
            loc,
            path,
            f"the last message must be an 'assistant' reply, got '{messages[-1]['role']}'; "
            "add the reply or remove the trailing message",
        )
    return messages


def _prompt(value: Any, path: str, loc: str) -> list[Message]:
    """A prompt: a non-empty string (one user message) or messages ending with user/tool."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(loc, path, "empty prompt")
        return [{"role": "user", "content": value}]
    messages = _parse_messages(value, path, loc)
    last = _check_order(messages, path, loc)
    if last not in ("user", "tool"):
        raise DataError(
            loc,
            path,
            f"a prompt must end with a 'user' (or 'tool') message, got '{last}'; "
            "move the reply into the completion",
        )
    return messages


def _completion(value: Any, path: str, loc: str, after: str) -> list[Message]:
    """A completion following a prompt whose last role is ``after``.

    A non-empty string (one assistant message) or assistant/tool messages that start and end
    with an assistant message.
    """
    if isinstance(value, str):
        if not value.strip():
            raise DataError(loc, path, "empty completion; every example needs a non-empty reply")
        return [{"role": "assistant", "content": value}]
    messages = _parse_messages(value, path, loc)
    _check_completion_messages(messages, path, loc, after=after)
    return messages


def _check_completion_messages(
    messages: list[Message], path: str, loc: str, *, after: str, offset: int = 0
) -> None:
    """Check roles of a completion (a slice of a list starting at ``offset``)."""
    for i, message in enumerate(messages):
        allowed = ("assistant",) if i == 0 else ("assistant", "tool")
        if message["role"] not in allowed:
            raise DataError(
                loc,
                f"{path}[{i + offset}].role",
                "a completion holds only 'assistant' (and 'tool') messages and starts with "
                f"'assistant', got '{message['role']}'; earlier turns belong in the prompt",
            )
    _check_order(messages, path, loc, prev=after, offset=offset)
    if messages[-1]["role"] != "assistant":
        raise DataError(loc, path, "a completion must end with an 'assistant' message")


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


def _meta(data: dict[str, Any], used: Sequence[str]) -> dict[str, Any]:
    return {key: value for key, value in data.items() if key not in used}


# ---------------------------------------------------------------------------------------------
# Schema parsers: (row data, location) -> example. Required keys are checked before they run.


def _parse_sft(data: dict[str, Any], loc: str) -> SFTExample:
    messages = _conversation(data["messages"], "messages", loc)
    return SFTExample(messages=messages, meta=_meta(data, ("messages",)), location=loc)


def _parse_prompt_completion(data: dict[str, Any], loc: str) -> SFTExample:
    prompt = _prompt(data["prompt"], "prompt", loc)
    completion = _completion(data["completion"], "completion", loc, prompt[-1]["role"])
    meta = _meta(data, ("prompt", "completion"))
    return SFTExample(messages=prompt + completion, meta=meta, location=loc)


def _parse_preference(data: dict[str, Any], loc: str) -> PreferenceExample:
    if data.get("prompt") is None:
        prompt, chosen, rejected = split_implicit_prompt(data["chosen"], data["rejected"], loc)
    else:
        prompt = _prompt(data["prompt"], "prompt", loc)
        chosen = _completion(data["chosen"], "chosen", loc, prompt[-1]["role"])
        rejected = _completion(data["rejected"], "rejected", loc, prompt[-1]["role"])
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


def split_implicit_prompt(
    chosen: Any, rejected: Any, loc: str = "<row>"
) -> tuple[list[Message], list[Message], list[Message]]:
    """Split two full conversations into (prompt, chosen completion, rejected completion).

    The prompt is the longest common prefix of messages that ends right before an assistant
    message in both conversations; the rest of each conversation is its completion.

    Args:
        chosen: The preferred full conversation (a list of messages).
        rejected: The dispreferred full conversation.
        loc: Location used in errors.

    Returns:
        ``(prompt, chosen, rejected)`` as normalised message lists.

    Raises:
        DataError: A conversation is invalid, or they share no prompt.
    """
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list):
            raise DataError(
                loc,
                name,
                f"without a 'prompt' field, 'chosen' and 'rejected' must be full conversations "
                f"(lists of messages) that share the prompt, got {_type_name(value)}; add a "
                "'prompt' field or give both as message lists",
            )
    chosen_msgs = _conversation(chosen, "chosen", loc)
    rejected_msgs = _conversation(rejected, "rejected", loc)
    k = _common_prompt_length(chosen_msgs, rejected_msgs)
    if k == 0:
        raise DataError(
            loc,
            "chosen",
            "'chosen' and 'rejected' do not start with the same prompt messages; the implicit "
            "prompt format needs a shared prefix (or add an explicit 'prompt' field)",
        )
    for name, messages in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
        after = messages[k - 1]["role"]
        _check_completion_messages(messages[k:], name, loc, after=after, offset=k)
    return chosen_msgs[:k], chosen_msgs[k:], rejected_msgs[k:]


def _common_prompt_length(a: list[Message], b: list[Message]) -> int:
    """Length of the longest common prefix that both conversations continue with an assistant."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n > 0 and not (n < len(a) and n < len(b) and a[n]["role"] == b[n]["role"] == "assistant"):
        n -= 1
    return n


def _parse_unpaired(data: dict[str, Any], loc: str) -> UnpairedExample:
    prompt = _prompt(data["prompt"], "prompt", loc)
    completion = _completion(data["completion"], "completion", loc, prompt[-1]["role"])
    label = _label(data["label"], "label", loc)
    meta = _meta(data, ("prompt", "completion", "label"))
    return UnpairedExample(prompt, completion, label, meta=meta, location=loc)


def _completion_list(data: dict[str, Any], prompt: list[Message], loc: str) -> list[list[Message]]:
    """The ``completions`` field: a list of >= 2 completions of the prompt."""
    value = data["completions"]
    if not isinstance(value, list) or len(value) < 2:
        got = f"{len(value)} item(s)" if isinstance(value, list) else _type_name(value)
        raise DataError(loc, "completions", f"expected a list of at least 2 completions, got {got}")
    after = prompt[-1]["role"]
    return [_completion(item, f"completions[{i}]", loc, after) for i, item in enumerate(value)]


def _per_completion_list(value: Any, name: str, k: int, loc: str) -> list[Any]:
    """A list with one entry per completion."""
    if not isinstance(value, list) or len(value) != k:
        got = f"{len(value)}" if isinstance(value, list) else _type_name(value)
        raise DataError(
            loc, name, f"expected a list of {k} entries (one per completion), got {got}"
        )
    return value


def _parse_ratings(data: dict[str, Any], loc: str) -> RatingsExample:
    prompt = _prompt(data["prompt"], "prompt", loc)
    completions = _completion_list(data, prompt, loc)
    raw = _per_completion_list(data["ratings"], "ratings", len(completions), loc)
    ratings = [_finite_number(value, f"ratings[{i}]", loc) for i, value in enumerate(raw)]
    meta = _meta(data, ("prompt", "completions", "ratings"))
    return RatingsExample(prompt, completions, ratings, meta=meta, location=loc)


def _parse_rankings(data: dict[str, Any], loc: str) -> RankingExample:
    prompt = _prompt(data["prompt"], "prompt", loc)
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
    prompt = _prompt(data["prompt"], "prompt", loc)
    answer = _answer(data["answer"], "answer", loc)
    verifier = data.get("verifier")
    if verifier is not None and (not isinstance(verifier, str) or not verifier.strip()):
        raise DataError(loc, "verifier", f"expected a verifier name (string), got {verifier!r}")
    meta = _meta(data, ("prompt", "answer", "verifier"))
    return VerifiableExample(prompt, answer, verifier, meta=meta, location=loc)


SCHEMAS: dict[str, Callable[[dict[str, Any], str], Any]] = {
    "sft": _parse_sft,
    "prompt_completion": _parse_prompt_completion,
    "preference": _parse_preference,
    "unpaired_preference": _parse_unpaired,
    "ratings": _parse_ratings,
    "rankings": _parse_rankings,
    "verifiable": _parse_verifiable,
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
}
"""Schema name -> fields every row must have (a None value counts as missing)."""


def _check_required(data: Any, schema: str, loc: str) -> dict[str, Any]:
    """Check the row is an object with the schema's required fields."""
    if not isinstance(data, dict):
        raise DataError(loc, None, f"expected an object (a JSON {{...}}), got {_type_name(data)}")
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
        on_error: ``"raise"`` raises on the first bad row; ``"skip"`` leaves bad rows out and
            collects their errors in ``ValidationResult.errors``.

    Returns:
        The examples of the valid rows (input order) and the errors of the skipped rows.

    Raises:
        DataError: With ``on_error="raise"``, the first invalid row (location, field, reason).
        ValueError: An unknown schema name or ``on_error`` value.
    """
    parser = SCHEMAS.get(schema)
    if parser is None:
        raise ValueError(f"unknown schema {schema!r}; valid schemas: {', '.join(SCHEMAS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    result = ValidationResult(examples=[], errors=[])
    for row in rows:
        try:
            data = _check_required(row.data, schema, row.location)
            result.examples.append(parser(data, row.location))
        except DataError as err:
            if on_error == "raise":
                raise
            result.errors.append(err)
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
        raise ValueError(f"unknown schema {schema!r}; valid schemas: {', '.join(SCHEMAS)}")
    rows = load_rows(source, split=split, limit=limit)
    return validate_rows(rows, schema, on_error=on_error)
