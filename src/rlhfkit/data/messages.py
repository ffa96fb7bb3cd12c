"""Chat message rules, stated once: roles, their order, and parsing of message lists.

Conversation rules (docs/methods/sft.md): roles are system, user, assistant and tool; one
optional leading system message; then strict user/assistant alternation starting with a user
message, where a tool message may follow an assistant message (or another tool message) and an
assistant message may follow a tool message. User and assistant content must be a non-empty
string (an assistant message that only makes ``tool_calls`` may have empty content). Prompts end
with a user (or tool) message; completions hold only assistant (and tool) messages, start and
end with an assistant message. Extra message keys (``tool_calls``, ``name``, ...) pass through;
extra keys whose value is None (added when Arrow unifies message structs) are dropped.

The role order is the ``NEXT_ROLES`` table, walked by :func:`misplaced_role`. Dataset
validation (:mod:`rlhfkit.data.schemas`) reports a violation as a
:class:`~rlhfkit.data.sources.DataError` through :func:`check_order` and the parsers below;
chat rendering (:func:`rlhfkit.data.templates.check_roles`) reports it as a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rlhfkit.data.sources import DataError

Message = dict[str, Any]
"""One chat message: ``{"role": str, "content": str, ...extra keys}``."""

ROLES = ("system", "user", "assistant", "tool")

NEXT_ROLES: dict[str | None, tuple[str, ...]] = {
    None: ("system", "user"),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user", "tool"),
    "tool": ("assistant", "tool"),
}
"""Role -> roles allowed to follow it (None: the start of the conversation)."""


# ---------------------------------------------------------------------------------------------
# Role order


def misplaced_role(
    roles: Iterable[Any], prev: str | None = None
) -> tuple[int, str | None, Any] | None:
    """Find the first role that may not follow the one before it (stops reading there).

    Args:
        roles: The roles of consecutive messages.
        prev: The role before the first one (None: they start the conversation).

    Returns:
        ``(index, role before it, the role)`` of the first misplaced role, or None if the order
        is valid.
    """
    for index, role in enumerate(roles):
        if role not in NEXT_ROLES[prev]:
            return index, prev, role
        prev = role
    return None


def quoted(names: Sequence[str]) -> str:
    """``'a'``, ``'a' or 'b'``, ``'a', 'b' or 'c'``."""
    items = [f"'{name}'" for name in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def order_reason(prev: str | None, role: str) -> str:
    """Explain why ``role`` may not follow ``prev``."""
    if role == "system":
        return "a 'system' message may only be the first message; merge it into that one"
    if prev is None:
        return f"expected 'user' as the first message (after an optional 'system'), got '{role}'"
    article = "an" if prev == "assistant" else "a"  # "a user", "a tool", "a system"
    return f"expected {quoted(NEXT_ROLES[prev])} after {article} '{prev}' message, got '{role}'"


def check_order(
    messages: list[Message], path: str, loc: str, prev: str | None = None, offset: int = 0
) -> str | None:
    """Check role order, continuing after ``prev``; return the last role.

    ``offset`` is added to indices in error paths (for a slice of a longer list).

    Raises:
        DataError: At the first misplaced message, with :func:`order_reason`.
    """
    bad = misplaced_role((message["role"] for message in messages), prev)
    if bad is not None:
        index, before, role = bad
        raise DataError(loc, f"{path}[{index + offset}].role", order_reason(before, role))
    return messages[-1]["role"] if messages else prev


# ---------------------------------------------------------------------------------------------
# Parsing: raw values -> normalised message lists (errors are DataError)


def type_name(value: Any) -> str:
    """The JSON-ish name of a value's type, for errors (``null`` for None)."""
    return "null" if value is None else type(value).__name__


def parse_message(value: Any, path: str, loc: str) -> Message:
    """Check one message's shape, role and content; return a normalised copy."""
    if not isinstance(value, dict):
        raise DataError(
            loc,
            path,
            f"expected a message object with 'role' and 'content', got {type_name(value)}",
        )
    role = value.get("role")
    if role not in ROLES:
        raise DataError(loc, f"{path}.role", f"expected one of {quoted(ROLES)}, got {role!r}")
    message = {key: item for key, item in value.items() if item is not None}
    message["content"] = message_content(value, path, loc)
    return message


def message_content(message: dict[str, Any], path: str, loc: str) -> str:
    """The message's content: a string, non-empty for user/assistant turns."""
    role, content = message["role"], message.get("content")
    if role == "assistant" and message.get("tool_calls") and content in (None, ""):
        return ""  # a pure tool-call turn has no text
    if not isinstance(content, str):
        raise DataError(loc, f"{path}.content", f"expected a string, got {type_name(content)}")
    if role in ("user", "assistant") and not content.strip():
        raise DataError(
            loc, f"{path}.content", f"empty {role} message; write its text or remove the message"
        )
    return content


def parse_messages(value: Any, path: str, loc: str) -> list[Message]:
    """Check that ``value`` is a non-empty list of messages; return normalised copies."""
    if not isinstance(value, list):
        raise DataError(
            loc, path, f"expected a list of messages ({{role, content}}), got {type_name(value)}"
        )
    if not value:
        raise DataError(loc, path, "empty list of messages")
    return [parse_message(item, f"{path}[{i}]", loc) for i, item in enumerate(value)]


def parse_conversation(value: Any, path: str, loc: str) -> list[Message]:
    """A full conversation: alternating roles, ending with an assistant reply."""
    messages = parse_messages(value, path, loc)
    check_order(messages, path, loc)
    if messages[-1]["role"] != "assistant":
        raise DataError(
            loc,
            path,
            f"the last message must be an 'assistant' reply, got '{messages[-1]['role']}'; "
            "add the reply or remove the trailing message",
        )
    return messages


def parse_prompt(value: Any, path: str, loc: str) -> list[Message]:
    """A prompt: a non-empty string (one user message) or messages ending with user/tool."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(loc, path, "empty prompt")
        return [{"role": "user", "content": value}]
    messages = parse_messages(value, path, loc)
    last = check_order(messages, path, loc)
    if last not in ("user", "tool"):
        raise DataError(
            loc,
            path,
            f"a prompt must end with a 'user' (or 'tool') message, got '{last}'; "
            "move the reply into the completion",
        )
    return messages


def parse_completion(value: Any, path: str, loc: str, after: str) -> list[Message]:
    """A completion following a prompt whose last role is ``after``.

    A non-empty string (one assistant message) or assistant/tool messages that start and end
    with an assistant message.
    """
    if isinstance(value, str):
        if not value.strip():
            raise DataError(loc, path, "empty completion; every example needs a non-empty reply")
        return [{"role": "assistant", "content": value}]
    messages = parse_messages(value, path, loc)
    check_completion_messages(messages, path, loc, after=after)
    return messages


def check_completion_messages(
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
    check_order(messages, path, loc, prev=after, offset=offset)
    if messages[-1]["role"] != "assistant":
        raise DataError(loc, path, "a completion must end with an 'assistant' message")


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
                f"(lists of messages) that share the prompt, got {type_name(value)}; add a "
                "'prompt' field or give both as message lists",
            )
    chosen_msgs = parse_conversation(chosen, "chosen", loc)
    rejected_msgs = parse_conversation(rejected, "rejected", loc)
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
        check_completion_messages(messages[k:], name, loc, after=after, offset=k)
    return chosen_msgs[:k], chosen_msgs[k:], rejected_msgs[k:]


def _common_prompt_length(a: list[Message], b: list[Message]) -> int:
    """Length of the longest common prefix that both conversations continue with an assistant."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    while n > 0 and not (n < len(a) and n < len(b) and a[n]["role"] == b[n]["role"] == "assistant"):
        n -= 1
    return n
