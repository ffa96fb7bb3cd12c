"""Prompt sources rendered for sampling: the rows every sampling command starts from.

A :class:`PromptRow` is a prompt's token ids (chat template, generation prompt appended) and the
example's fields, which reach the reward functions (``prompt``, ``answer``, ``verifier`` and the
row's other fields). ``rlhfkit rl``, ``eval``, ``rs``, ``bon`` and ``filter`` read their prompts
through :func:`load_prompt_rows`; ``generate``, ``dpo online`` and the DPO evaluation render
conversations they have already read with :func:`conversation_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlhfkit.data.schemas import load_examples
from rlhfkit.data.templates import render_prompt
from rlhfkit.errors import ConfigError


@dataclass
class PromptRow:
    """A prompt rendered for sampling, with the fields the rewards see.

    Attributes:
        ids: The rendered prompt's token ids (chat template, generation prompt appended).
        fields: ``prompt`` (messages), ``answer`` and ``verifier`` where the schema has them,
            and the row's other fields.
        location: Where the row came from (``file:line``), for error messages.
    """

    ids: list[int]
    fields: dict[str, Any]
    location: str = ""


def load_prompt_rows(
    tokenizer: Any,
    source: str,
    schema: str,
    *,
    split: str = "train",
    limit: int | None = None,
    max_prompt_len: int = 512,
    distinct: bool = False,
    max_prompts: int | None = None,
) -> list[PromptRow]:
    """Prompts of ``source`` validated by ``schema`` and rendered with the chat template.

    Args:
        tokenizer: Renders the prompts (chat template, generation prompt appended).
        source: A file, hub dataset, ``builtin:NAME``, ``gsm8k:FILE`` or ``rgym:NAME``.
        schema: Row format (any schema whose examples have a ``prompt``; a conversation's
            prompt is what precedes its last assistant message, whose text becomes the row's
            ``completion`` field).
        split: Split of a hub or built-in source.
        limit: Read at most this many rows.
        max_prompt_len: Longer prompts keep their last tokens.
        distinct: Keep only the first row of each distinct rendered prompt (a preference
            dataset repeats a prompt for each of its pairs).
        max_prompts: Keep at most this many prompts (after ``distinct``).

    Raises:
        DataError: A bad row (naming file, row and field).
        ValueError: A source without prompts.
    """
    result = load_examples(source, schema, split=split, limit=limit)
    rows: list[PromptRow] = []
    seen: set[tuple[int, ...]] = set()
    for example in result.examples:
        if max_prompts is not None and len(rows) >= max_prompts:
            break
        prompt, reply = _prompt_of(example)
        fields = {**(getattr(example, "meta", None) or {}), "prompt": prompt}
        if reply is not None:
            fields["completion"] = reply
        for name in ("answer", "verifier"):
            if getattr(example, name, None) is not None:
                fields[name] = getattr(example, name)
        ids = render_prompt(tokenizer, prompt, max_len=max_prompt_len)
        if distinct and tuple(ids) in seen:
            continue
        seen.add(tuple(ids))
        rows.append(PromptRow(ids, fields, getattr(example, "location", "")))
    if not rows:
        raise ConfigError(f"{source}: no prompts")
    return rows


def _prompt_of(example: Any) -> tuple[list[dict[str, Any]], str | None]:
    """An example's prompt messages, and for a conversation (``sft`` rows) its last reply.

    A conversation's prompt is everything before its last assistant message, whose text is
    the row's ``completion``.
    """
    if hasattr(example, "prompt"):
        return list(example.prompt), None
    messages = list(example.messages)
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        return messages, None
    content = messages[last].get("content")
    return messages[:last], content if isinstance(content, str) else None


def conversation_rows(
    tokenizer: Any,
    conversations: Sequence[Sequence[dict[str, Any]]],
    *,
    max_prompt_len: int | None = None,
) -> list[PromptRow]:
    """Conversations rendered for sampling, each with ``prompt`` (its messages) as its fields.

    Args:
        tokenizer: Renders the prompts (chat template, generation prompt appended).
        conversations: Message lists, none ending with an assistant message.
        max_prompt_len: Longer prompts keep their last tokens (None: keep all).
    """
    return [
        PromptRow(
            render_prompt(tokenizer, messages, max_len=max_prompt_len), {"prompt": list(messages)}
        )
        for messages in conversations
    ]


__all__ = ["PromptRow", "conversation_rows", "load_prompt_rows"]
