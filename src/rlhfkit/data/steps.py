r"""Rendering for process reward models (Lightman 2023) and reward scoring.

A process-reward reply is its steps joined by a separator; the whole conversation is rendered by
the chat template and tokenised once (as in :mod:`rlhfkit.data.templates`), and each step's label
sits on the last token of the step's text. :func:`render_sequence` is prompt + completion as a
reward model sees it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from rlhfkit.data.sources import DataError
from rlhfkit.data.templates import _render, check_roles, render_messages
from rlhfkit.types import STEP_LABELS, StepExample, TokenizedExample

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
    """Render a prompt and a stepwise reply for a process reward model (Lightman 2023).

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
    """Render prompt + completion as a reward model scores it (docs/methods/reward_models.md).

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
