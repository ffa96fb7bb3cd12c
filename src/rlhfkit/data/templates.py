r"""Chat template -> token ids + loss mask (docs/methods/sft.md).

The conversation is rendered to text with the tokenizer's own chat template and the *full* text
is tokenised once, with character offsets. Assistant spans are located in character space by
rendering prefixes of the conversation, then mapped to tokens through the offsets. Segments are
never tokenised separately and concatenated, because BPE merges differ at segment boundaries.

Span of assistant message ``i`` (character positions in the full text ``F``):

- ``start = len(render(messages[:i], add_generation_prompt=True))``: everything before it (the
  history and the ``<|im_start|>assistant\n`` header) is prompt;
- ``end = k + len(eos)`` where ``k`` is the last occurrence of the tokenizer's ``eos_token`` text
  in ``F[start:len(render(messages[:i + 1]))]``: the span ends with the end-of-turn token and
  excludes whatever the template writes after it (the ChatML trailing newline).

Both rendered prefixes must be prefixes of ``F``. A template that rewrites history (for example
one that strips the reasoning of earlier assistant turns) breaks this, and rendering raises a
``ValueError`` naming the example, instead of silently mislabelling tokens.

A token with character offsets ``[s, e)`` is labelled iff ``e > s`` and ``[s, e)`` intersects a
labelled span ``[start, end)``, i.e. ``s < end and e > start``. A token that straddles a span
boundary is therefore labelled; with ChatML templates none does, because the header ends in a
newline, the content is trimmed and the end-of-turn marker is a special token.

The first token of a sequence is never labelled: the HF label convention predicts label ``i``
from positions ``< i``, and nothing precedes position 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from rlhfkit.data.messages import NEXT_ROLES, misplaced_role
from rlhfkit.types import TokenizedExample

MaskMode = Literal["final_turn", "all_assistant_turns"]
Truncation = Literal["right", "drop", "left_prompt"]


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim"
    " + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML (docs/methods/sft.md) without a default system message."""


def check_roles(messages: Sequence[dict[str, Any]], source: str = "") -> None:
    """Check that roles follow the strict chat order of docs/methods/sft.md.

    An optional leading ``system`` message, then ``user`` and ``assistant`` alternating; ``tool``
    messages may follow an assistant message (a tool call) and are followed by the assistant.
    The order is :data:`rlhfkit.data.messages.NEXT_ROLES`, shared with dataset validation.

    Args:
        messages: Chat messages with ``role`` and ``content`` keys.
        source: Where the conversation came from, for the error message.

    Raises:
        ValueError: If a message has no role or the order is not allowed.
    """
    bad = misplaced_role(message.get("role") for message in messages)
    if bad is not None:
        index, previous, role = bad
        after = f"after a {previous!r} message" if previous else "as the first message"
        raise ValueError(
            f"{source or 'conversation'}: message {index} has role {role!r}, but only "
            f"{NEXT_ROLES[previous]} may come {after}; fix the role order (optional system, "
            "then user/assistant alternating, tool messages only after an assistant tool call)"
        )


def unroll_turns(messages: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Make one conversation per assistant turn, for ``final_turn`` masking of multi-turn data.

    Conversation ``j`` is ``messages`` up to and including the ``j``-th assistant message, so
    rendering each with ``mask_mode="final_turn"`` labels every assistant turn exactly once.

    Args:
        messages: Chat messages with ``role`` and ``content`` keys.

    Returns:
        The prefixes ending at each assistant message, in order (the messages are shared, not
        copied).
    """
    return [
        list(messages[: index + 1])
        for index, message in enumerate(messages)
        if message.get("role") == "assistant"
    ]


def _render(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    chat_template: str | None,
) -> str:
    """Render messages to text with the chat template (no tokenisation)."""
    text = tokenizer.apply_chat_template(
        list(messages),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def _assistant_spans(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    full: str,
    indices: Sequence[int],
    *,
    chat_template: str | None,
    source: str,
) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` (content + end-of-turn marker) of assistant messages."""
    where = source or "conversation"
    eos = tokenizer.eos_token
    if not eos:
        raise ValueError("the tokenizer has no eos_token; cannot find the end-of-turn marker")
    spans = []
    for i in indices:
        before = _render(
            tokenizer, messages[:i], add_generation_prompt=True, chat_template=chat_template
        )
        through = _render(
            tokenizer, messages[: i + 1], add_generation_prompt=False, chat_template=chat_template
        )
        if not (full.startswith(before) and full.startswith(through)):
            raise ValueError(
                f"{where}: the chat template renders the conversation up to message {i} "
                "differently from the full conversation (it rewrites history, e.g. strips "
                "earlier reasoning), so assistant tokens cannot be located; use mask_mode="
                "'final_turn' on unroll_turns(messages) or a template that keeps history"
            )
        start = len(before)
        k = full.rfind(eos, start, len(through))
        if k < 0:
            raise ValueError(
                f"{where}: no end-of-turn token {eos!r} after assistant message {i} in the "
                "rendered text; the tokenizer's eos_token must be the template's end-of-turn marker"
            )
        spans.append((start, k + len(eos)))
    return spans


def _token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Flag tokens whose non-empty offsets ``[s, e)`` intersect one of the spans."""
    mask = [False] * len(offsets)
    for t, (s, e) in enumerate(offsets):
        if e > s:
            mask[t] = any(s < end and e > start for start, end in spans)
    if mask:
        mask[0] = False  # nothing precedes position 0, so its label is never predicted
    return mask


def _truncate(
    ids: list[int], mask: list[bool], max_len: int, truncation: Truncation
) -> tuple[list[int], list[bool]] | None:
    """Apply the truncation mode; ``None`` when the example must be dropped."""
    if len(ids) <= max_len:
        return ids, mask
    if truncation == "drop":
        return None
    if truncation == "right":
        return ids[:max_len], mask[:max_len]
    if truncation != "left_prompt":
        raise ValueError(f"unknown truncation {truncation!r}; use 'right', 'drop' or 'left_prompt'")
    first = mask.index(True) if True in mask else len(mask)
    completion = len(ids) - first
    # Keep at least one prompt token so that the first completion label can be predicted.
    keep_prompt = min(first, max(max_len - completion, 1 if first > 0 else 0))
    lo = first - keep_prompt
    return ids[lo : lo + max_len], mask[lo : lo + max_len]


def render_messages(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    mask_mode: MaskMode = "final_turn",
    max_len: int = 2048,
    truncation: Truncation = "right",
    source: str = "",
    chat_template: str | None = None,
) -> TokenizedExample | None:
    """Render a conversation with the chat template into ids and an assistant-only loss mask.

    Args:
        tokenizer: A fast Hugging Face tokenizer (offsets mapping) with a chat template and an
            ``eos_token`` equal to the template's end-of-turn marker.
        messages: Chat messages (``role``, ``content``), ending with an assistant message.
        mask_mode: ``final_turn`` labels the last assistant message; ``all_assistant_turns``
            labels every assistant message.
        max_len: Maximum number of tokens.
        truncation: ``right`` cuts tokens from the end; ``drop`` returns ``None`` when too long;
            ``left_prompt`` drops prompt tokens (before the first labelled token) from the left
            and keeps the completion whole, cutting its end only if it alone exceeds
            ``max_len`` (one prompt token is always kept).
        source: Where the conversation came from (``file:row``), for messages.
        chat_template: Template overriding the tokenizer's (e.g. an instruct sibling's for a
            base model).

    Returns:
        The example, or ``None`` when it is dropped: too long under ``drop``, no labelled
        token left after truncation, or every labelled assistant message is empty.

    Raises:
        ValueError: On a bad role order, a conversation not ending with an assistant message, or
            a template that rewrites history.
    """
    where = source or "conversation"
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    check_roles(messages, source)
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be an assistant message to train on")
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if mask_mode == "final_turn":
        labelled = assistant[-1:]
    elif mask_mode == "all_assistant_turns":
        labelled = assistant
    else:
        raise ValueError(
            f"unknown mask_mode {mask_mode!r}; use 'final_turn' or 'all_assistant_turns'"
        )
    if all(not str(messages[i].get("content") or "").strip() for i in labelled):
        return None  # rows with empty completions are dropped (docs/methods/sft.md)
    full = _render(tokenizer, messages, add_generation_prompt=False, chat_template=chat_template)
    spans = _assistant_spans(
        tokenizer, messages, full, labelled, chat_template=chat_template, source=source
    )
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = _token_mask(enc["offset_mapping"], spans)
    truncated = _truncate(ids, mask, max_len, truncation)
    if truncated is None or not any(truncated[1]):
        return None
    return TokenizedExample(input_ids=truncated[0], loss_mask=truncated[1], source=source)


def render_prompt(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    *,
    max_len: int | None = None,
    chat_template: str | None = None,
) -> list[int]:
    r"""Token ids of a conversation followed by the generation prompt, for sampling.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template.
        messages: Chat messages (``role``, ``content``), not ending with an assistant message.
        max_len: Keep only the rightmost ``max_len`` tokens (``None``: keep all).
        chat_template: Template overriding the tokenizer's.

    Returns:
        The prompt ids, ending with the assistant header (e.g. ``<|im_start|>assistant\n``).

    Raises:
        ValueError: On a bad role order or a conversation ending with an assistant message.
    """
    check_roles(messages)
    if messages and messages[-1]["role"] == "assistant":
        raise ValueError("a prompt must not end with an assistant message (use render_messages)")
    text = _render(tokenizer, messages, add_generation_prompt=True, chat_template=chat_template)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if max_len is not None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        ids = ids[-max_len:]
    return ids
