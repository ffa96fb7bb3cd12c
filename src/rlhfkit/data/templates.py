r"""Chat template -> token ids + loss mask (METHODS.md section 2).

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

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any, Literal

from rlhfkit.data.messages import NEXT_ROLES, misplaced_role
from rlhfkit.data.sources import DataError
from rlhfkit.types import STEP_LABELS, StepExample, TokenizedExample

MaskMode = Literal["final_turn", "all_assistant_turns"]
Truncation = Literal["right", "drop", "left_prompt"]


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim"
    " + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML (METHODS.md section 2) without a default system message."""


def check_roles(messages: Sequence[dict[str, Any]], source: str = "") -> None:
    """Check that roles follow the strict chat order of METHODS.md section 2.

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
        return None  # METHODS.md section 2: rows with empty completions are dropped
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


# ---------------------------------------------------------------------------------------------
# Process reward models (METHODS.md section 3.7) and reward scoring (section 3.1)

STEP_SEPARATOR = "\n<step>\n"
"""Default text joining the steps of a process-reward reply."""


def _as_messages(value: str | Sequence[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    """A string as one message with ``role``, or a copy of a message list."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def _check_steps(
    steps: Sequence[str], labels: Sequence[int], separator: str, where: str
) -> tuple[list[str], list[int]]:
    """Validate steps and labels; return the stripped steps and the labels as ints."""
    if not separator:
        raise ValueError("the step separator must be a non-empty string")
    if not steps:
        raise DataError(where, "steps", "no steps; a process-reward example needs at least one")
    if len(labels) != len(steps):
        raise DataError(where, "labels", f"{len(labels)} labels for {len(steps)} steps")
    for i, (step, label) in enumerate(zip(steps, labels, strict=True)):
        if separator in step:
            raise DataError(
                where, f"steps[{i}]", f"contains the step separator {separator!r}; split it there"
            )
        if not step.strip():
            raise DataError(where, f"steps[{i}]", "empty step; remove it or write its text")
        if label not in STEP_LABELS:
            raise DataError(where, f"labels[{i}]", f"expected -1, 0 or 1, got {label!r}")
    texts = [step.strip() for step in steps]
    if separator.join(texts).split(separator) != texts:
        raise DataError(
            where, "steps", f"a step starts or ends with part of the separator {separator!r}"
        )
    return texts, [int(label) for label in labels]


def _last_tokens(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]], where: str
) -> list[int]:
    """Index of the last token with non-empty offsets ``[s, e)`` overlapping each span."""
    tokens = [t for t, (s, e) in enumerate(offsets) if e > s]
    starts = [offsets[t][0] for t in tokens]
    positions: list[int] = []
    for i, (a, b) in enumerate(spans):
        k = bisect_left(starts, b) - 1  # the last token starting before the span's end
        if k < 0 or offsets[tokens[k]][1] <= a:
            raise ValueError(f"{where}: no token covers step {i}; the offsets are unusable")
        if positions and tokens[k] <= positions[-1]:
            raise DataError(
                where,
                f"steps[{i}]",
                "ends in the same token as the step before it; use a separator the tokenizer "
                "does not merge with the steps",
            )
        positions.append(tokens[k])
    return positions


def _window(n: int, first: int, max_len: int) -> tuple[int, int]:
    """Tokens ``[lo, hi)`` kept: prompt cut from the left (>= 1 token kept), then the end."""
    if n <= max_len:
        return 0, n
    keep_prompt = min(first, max(max_len - (n - first), 1 if first > 0 else 0))
    lo = first - keep_prompt
    return lo, lo + max_len


def render_steps(
    tokenizer: Any,
    prompt: str | Sequence[dict[str, Any]],
    steps: Sequence[str],
    labels: Sequence[int],
    *,
    separator: str = STEP_SEPARATOR,
    max_len: int = 2048,
    source: str = "",
    chat_template: str | None = None,
) -> StepExample | None:
    """Render a prompt and a stepwise reply for a process reward model (METHODS.md 3.7).

    Each step is stripped of surrounding whitespace (the separator carries the layout, and chat
    templates trim the reply anyway); the reply ``separator.join(steps)`` is rendered after the
    prompt with the chat template, and the full text ``F`` is tokenised once with offsets.

    Step ``i`` occupies ``[a_i, b_i)`` in ``F`` (``a_0`` = length of the prompt rendered with the
    generation prompt, ``a_{i+1} = b_i + len(separator)``). Its position is the last token whose
    non-empty offsets ``[s, e)`` overlap it (``s < b_i`` and ``e > a_i``): the token containing
    its last character ``F[b_i - 1]``, or the last of several tokens sharing that character (the
    bytes of one multi-byte character). A step ending exactly at a token boundary (``e == b_i``)
    is labelled on the token ending there; a token straddling the end (``s < b_i < e``, possible
    only with separators the tokenizer merges with text) also counts as the step's last token.

    Truncation when longer than ``max_len``: prompt tokens (those before the first token of the
    reply) are cut from the left, keeping at least one; if still too long, tokens are cut from
    the right and only the steps whose last token survives are kept, with their labels.

    Args:
        tokenizer: A fast Hugging Face tokenizer (offsets mapping) with a chat template.
        prompt: A user message, or messages ending with a user (or tool) message.
        steps: The reasoning steps, non-empty, none containing the separator.
        labels: One label per step: -1 (bad), 0 (neutral) or 1 (good).
        separator: Text joining the steps.
        max_len: Maximum number of tokens.
        source: Where the example came from (``file:row``), for messages.
        chat_template: Template overriding the tokenizer's.

    Returns:
        The example, or ``None`` when truncation leaves no step.

    Raises:
        DataError: (a ``ValueError``) on no steps, an empty step, a step containing the
            separator, a label outside {-1, 0, 1}, or a label count different from the steps'.
        ValueError: On a bad role order, or a template that does not render the reply verbatim
            after the prompt.
    """
    where = source or "steps example"
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    texts, step_labels = _check_steps(steps, labels, separator, where)
    reply = separator.join(texts)
    messages = [*_as_messages(prompt, "user"), {"role": "assistant", "content": reply}]
    check_roles(messages, source)
    full = _render(tokenizer, messages, add_generation_prompt=False, chat_template=chat_template)
    before = _render(
        tokenizer, messages[:-1], add_generation_prompt=True, chat_template=chat_template
    )
    start = len(before)
    if not (full.startswith(before) and full.startswith(reply, start)):
        raise ValueError(
            f"{where}: the chat template does not render the steps verbatim right after the "
            "prompt and its generation header, so step ends cannot be located"
        )
    spans, a = [], start
    for text in texts:
        spans.append((a, a + len(text)))
        a += len(text) + len(separator)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    positions = _last_tokens(offsets, spans, where)
    first = next((t for t, (s, e) in enumerate(offsets) if e > max(s, start)), len(ids))
    lo, hi = _window(len(ids), first, max_len)
    kept = [(p - lo, y) for p, y in zip(positions, step_labels, strict=True) if lo <= p < hi]
    if not kept:
        return None
    return StepExample(
        input_ids=ids[lo:hi],
        step_positions=[p for p, _ in kept],
        step_labels=[y for _, y in kept],
        source=source,
    )


def render_sequence(
    tokenizer: Any,
    prompt: str | Sequence[dict[str, Any]],
    completion: str | Sequence[dict[str, Any]],
    *,
    max_len: int = 2048,
    source: str = "",
    chat_template: str | None = None,
) -> TokenizedExample | None:
    """Render prompt + completion as a reward model scores it (METHODS.md section 3.1).

    :func:`render_messages` with ``mask_mode="final_turn"`` and ``truncation="left_prompt"``:
    the sequence ends with the completion's end-of-turn token (then the template's trailer, e.g.
    the ChatML newline), and the loss mask marks the final assistant message.

    Args:
        tokenizer: A fast Hugging Face tokenizer with a chat template.
        prompt: A user message, or messages ending with a user (or tool) message.
        completion: An assistant reply, or assistant (and tool) messages ending with one.
        max_len: Maximum number of tokens.
        source: Where the example came from (``file:row``), for messages.
        chat_template: Template overriding the tokenizer's.

    Returns:
        The example, or ``None`` when the final assistant message is empty.
    """
    messages = [*_as_messages(prompt, "user"), *_as_messages(completion, "assistant")]
    return render_messages(
        tokenizer,
        messages,
        mask_mode="final_turn",
        max_len=max_len,
        truncation="left_prompt",
        source=source,
        chat_template=chat_template,
    )
