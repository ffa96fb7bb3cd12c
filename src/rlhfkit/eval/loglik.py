"""Log-likelihood (multiple-choice) scoring (docs/methods/evaluation.md).

A question has a prompt x and K options o_1 .. o_K (letters such as ``" A"`` or full answer
strings). Each option is scored by the summed log-probability of its tokens as the continuation
of the prompt, optionally divided by its token count n_k, and the prediction is the argmax:

    s_k = sum_{t=1..n_k} log p(o_k,t | x, o_k,<t)   (or s_k / n_k when length-normalised)
    pick = argmax_k s_k                              (ties go to the first option)

The prompt is either

- a list of chat messages (ending with a user or tool message): it is rendered with the
  tokenizer's chat template and the generation prompt (the assistant header), and the option
  is the start of the assistant reply, written right after the header; the end-of-turn token is
  not scored (the option is a prefix of a reply, not a whole reply); or
- a plain string: the option text directly follows the prompt text (no template; the
  tokenizer's own special tokens such as BOS are added, as for any raw text). Write the
  separating space into the option (``"Answer:"`` + ``" Paris"``), as usual for base models.

Each ``prompt + option`` text is tokenised once, with character offsets (never prompt and option
separately, whose BPE merges can differ at the boundary). The option's
tokens are those whose offsets ``[s, e)`` intersect the option's characters (``e > len(prompt)``):
a token that straddles the boundary belongs to the option. All K sequences of a question go
through one padded forward (prompts left-padded, options right-padded) with
:func:`rlhfkit.models.forward.completion_logprobs`, which applies the fp32 log-softmax at the
option positions only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from rlhfkit.data.templates import _render, check_roles
from rlhfkit.models.forward import completion_logprobs

Prompt = str | Sequence[Mapping[str, Any]]
"""A plain prompt text, or chat messages to render with the chat template."""


def prompt_text(tokenizer: Any, prompt: Prompt, *, chat_template: str | None = None) -> str:
    """The text an option is appended to: the prompt string, or the rendered chat prompt.

    Raises:
        ValueError: Chat messages in a bad role order or ending with an assistant message.
    """
    if isinstance(prompt, str):
        return prompt
    messages = [dict(m) for m in prompt]
    check_roles(messages)
    if messages and messages[-1].get("role") == "assistant":
        raise ValueError("a multiple-choice prompt must not end with an assistant message")
    return _render(tokenizer, messages, add_generation_prompt=True, chat_template=chat_template)


def split_option_ids(
    tokenizer: Any, prefix: str, option: str, *, add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    """Tokenise ``prefix + option`` once and split the ids into (prompt ids, option ids).

    A token belongs to the option iff its character span ``[s, e)`` is non-empty and ends past
    the prefix (``e > len(prefix)``); the ids before the first such token are the prompt.

    Raises:
        ValueError: If the option is empty or has no token, or nothing precedes it.
    """
    if not option:
        raise ValueError("an option must be a non-empty string")
    enc = tokenizer(
        prefix + option, add_special_tokens=add_special_tokens, return_offsets_mapping=True
    )
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    boundary = len(prefix)
    first = next((i for i, (s, e) in enumerate(offsets) if e > s and e > boundary), len(ids))
    if first == len(ids):
        raise ValueError(f"option {option!r} has no token of its own after the prompt")
    if first == 0:
        raise ValueError(
            f"option {option!r} starts the sequence: nothing precedes its first token to "
            "predict it; give a non-empty prompt (or a tokenizer that adds a BOS token)"
        )
    return ids[:first], ids[first:]


def _pad(seqs: list[list[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to one width. Shapes: returns (K, W) ids and (K, W) bool mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (K, W)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)  # (K, W)
    for k, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[k, cols] = torch.tensor(s, dtype=torch.long)
        mask[k, cols] = True
    return ids, mask


@torch.no_grad()
def option_logprobs(
    model: nn.Module,
    tokenizer: Any,
    prompt_messages: Prompt,
    options: Sequence[str],
    *,
    length_normalise: bool = False,
    chat_template: str | None = None,
) -> list[float]:
    """Score every option of one question by its log-likelihood after the prompt.

    s_k = sum_t log p(o_k,t | x, o_k,<t), divided by n_k (the option's token count) when
    ``length_normalise``. One padded forward for all K options.

    Args:
        model: A causal LM in eval mode (any dtype; the log-softmax runs in fp32).
        tokenizer: Its fast tokenizer (offsets mapping; a chat template for message prompts).
        prompt_messages: Chat messages (rendered with the chat template and the assistant
            header) or a plain prompt string (the option follows the text directly).
        options: K >= 1 non-empty option strings.
        length_normalise: Divide each sum by the option's token count.
        chat_template: Template overriding the tokenizer's (message prompts only).

    Returns:
        The K scores, in the order of ``options``.

    Raises:
        ValueError: No options, an empty option, or a bad chat prompt.

    Shapes:
        internally (K, P) left-padded prompts and (K, T) right-padded options; returns K floats.
    """
    if not options:
        raise ValueError("a question needs at least one option")
    prefix = prompt_text(tokenizer, prompt_messages, chat_template=chat_template)
    plain = isinstance(prompt_messages, str)
    pairs = [split_option_ids(tokenizer, prefix, o, add_special_tokens=plain) for o in options]
    pad_id = tokenizer.pad_token_id
    pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
    pad_id = 0 if pad_id is None else pad_id
    prompt_ids, prompt_mask = _pad([p for p, _ in pairs], pad_id, left=True)  # (K, P)
    option_ids, option_mask = _pad([o for _, o in pairs], pad_id, left=False)  # (K, T)
    device = next(model.parameters()).device
    logprobs = completion_logprobs(
        model, prompt_ids.to(device), prompt_mask.to(device),
        option_ids.to(device), option_mask.to(device),
    )  # fmt: skip  # (K, T), 0 off the mask
    sums = logprobs.double().sum(dim=1).cpu()  # (K,)
    if length_normalise:
        sums = sums / option_mask.sum(dim=1)  # (K,)
    return sums.tolist()


def argmax_first(scores: Sequence[float]) -> int:
    """Index of the largest score; ties go to the first (NaN scores never win).

    Raises:
        ValueError: If ``scores`` is empty.
    """
    if not scores:
        raise ValueError("no scores to pick from")
    best = 0
    for k, s in enumerate(scores):
        if s > scores[best] or (math.isnan(scores[best]) and not math.isnan(s)):
            best = k
    return best


def pick_option(
    model: nn.Module,
    tokenizer: Any,
    prompt_messages: Prompt,
    options: Sequence[str],
    *,
    length_normalise: bool = False,
    chat_template: str | None = None,
) -> int:
    """The index of the most likely option: argmax_k s_k (see :func:`option_logprobs`)."""
    scores = option_logprobs(
        model, tokenizer, prompt_messages, options,
        length_normalise=length_normalise, chat_template=chat_template,
    )  # fmt: skip
    return argmax_first(scores)


def _label_index(row: Mapping[str, Any], index: int) -> int:
    """The correct option's index: an int, or a string equal to one of the options."""
    label, options = row.get("label"), list(row.get("options") or [])
    if isinstance(label, str) and label in options:
        return options.index(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(options):
        return label
    raise ValueError(
        f"row {index}: label {label!r} is neither an option index in [0, {len(options)}) nor "
        "one of the option strings; fix the row's 'label' field"
    )


def mc_accuracy(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    length_normalise: bool = False,
    chat_template: str | None = None,
) -> float:
    """Multiple-choice accuracy: mean_i 1[pick_option(x_i, options_i) == label_i].

    Args:
        model: A causal LM.
        tokenizer: Its fast tokenizer.
        rows: Questions ``{"prompt": str | messages, "options": [str, ...], "label": int | str}``;
            ``label`` is the correct option's index or its string.
        length_normalise: Score options by their mean token log-probability.
        chat_template: Template overriding the tokenizer's.

    Returns:
        The accuracy in [0, 1] (nan without rows).

    Raises:
        ValueError: A row with a missing prompt, no options or a label that names no option.
    """
    if not rows:
        return float("nan")
    correct = 0
    for i, row in enumerate(rows):
        if row.get("prompt") is None:
            raise ValueError(f"row {i}: missing 'prompt'")
        label = _label_index(row, i)
        pick = pick_option(
            model, tokenizer, row["prompt"], list(row["options"]),
            length_normalise=length_normalise, chat_template=chat_template,
        )  # fmt: skip
        correct += pick == label
    return correct / len(rows)
