"""Ranked preference groups as token ids, and their micro-batches (reward models, DPO).

A :class:`~rlhfkit.data.preferences.RankedGroup` (one prompt, K >= 2 completions best first)
becomes a :class:`TokenizedGroup`: each completion rendered together with the prompt by the chat
template (tokenised once; the loss mask marks the completion), the prompt truncated from the
left (METHODS.md section 3.2). Pairs whose chosen and rejected ids are identical after
truncation give a constant loss of log 2 and no gradient, so they are dropped and counted.

A micro-batch holds whole groups, because the loss couples the completions of a group: all
their sequences go into one packed row (or right-padded rows), and ``slots`` says where each
sequence's reward lands in the (N, K) matrix of the N groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhfkit.data.collate import pack_lengths, packed_batch, pad_batch
from rlhfkit.data.preferences import RankedGroup
from rlhfkit.data.templates import render_messages
from rlhfkit.types import TokenizedExample


@dataclass
class TokenizedGroup:
    """A rendered preference group.

    Attributes:
        sequences: K rendered prompt + completion sequences, best first.
        scores: K non-increasing scores (ties equal).
        margin: Pair margin (0 when the data gave none).
        meta: The group's metadata (``category``, ``group_id``, ...).
        source: Where the group came from.
    """

    sequences: list[TokenizedExample]
    scores: list[float]
    margin: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def num_tokens(self) -> int:
        """Tokens of all its sequences."""
        return sum(len(s.input_ids) for s in self.sequences)


def tokenize_group(
    tokenizer: Any, group: RankedGroup, *, max_len: int, chat_template: str | None = None
) -> TokenizedGroup | str:
    """Render every completion of ``group`` with its prompt.

    Returns:
        The tokenized group, or the reason it is dropped: ``"empty"`` (a completion rendered to
        nothing trainable) or ``"identical"`` (two completions with different scores have the
        same ids after truncation; for K > 2 the later duplicate is removed instead, and the
        group is dropped only if no two distinct completions with different scores remain).
    """
    sequences: list[TokenizedExample] = []
    scores: list[float] = []
    for completion, score in zip(group.completions, group.scores, strict=True):
        rendered = render_messages(
            tokenizer,
            [*group.prompt, *completion],
            mask_mode="final_turn",
            max_len=max_len,
            truncation="left_prompt",
            source=group.location,
            chat_template=chat_template,
        )
        if rendered is None:
            return "empty"
        if any(rendered.input_ids == s.input_ids for s in sequences):
            continue  # identical after truncation: no signal against its twin
        sequences.append(rendered)
        scores.append(score)
    if len(sequences) < 2 or min(scores) == max(scores):
        return "identical"  # no preference left among the distinct completions
    margin = group.margin or 0.0
    return TokenizedGroup(sequences, scores, margin, dict(group.meta), group.location)


def tokenize_groups(
    tokenizer: Any,
    groups: Sequence[RankedGroup],
    *,
    max_len: int,
    chat_template: str | None = None,
) -> tuple[list[TokenizedGroup], dict[str, int]]:
    """Render groups; returns the kept ones and counts of dropped ones (for the log)."""
    kept: list[TokenizedGroup] = []
    counts = {"groups": len(groups), "dropped_identical": 0, "dropped_empty": 0}
    for group in groups:
        out = tokenize_group(tokenizer, group, max_len=max_len, chat_template=chat_template)
        if isinstance(out, str):
            counts[f"dropped_{out}"] += 1
        else:
            kept.append(out)
    counts["kept"] = len(kept)
    return kept, counts


def group_micro_batches(
    groups: Sequence[TokenizedGroup], *, max_tokens: int, packing: bool, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Split groups into micro-batches of about ``max_tokens`` tokens, whole groups each."""
    bins = pack_lengths([g.num_tokens for g in groups], max_tokens=max_tokens)
    return [group_batch([groups[i] for i in b], packing=packing, pad_id=pad_id) for b in bins]


def group_batch(
    groups: Sequence[TokenizedGroup], *, packing: bool, pad_id: int
) -> dict[str, torch.Tensor]:
    """Collate whole groups: their sequences plus where each sequence's output belongs.

    Returns:
        The sequences as a packed row (or right-padded rows) with, in addition, ``slots``
        (flat index ``group * K + position`` of each sequence), ``scores`` and ``group_mask``
        (which of the K columns exist), ``margins`` and ``lengths`` (tokens per sequence).

    Shapes:
        slots, lengths: (D,) for D sequences; scores, group_mask: (N, K); margins: (N,).
    """
    sequences = [s for g in groups for s in g.sequences]
    batch = packed_batch(sequences) if packing else pad_batch(sequences, pad_id=pad_id)
    k = max(len(g.sequences) for g in groups)
    slots = [gi * k + j for gi, g in enumerate(groups) for j in range(len(g.sequences))]
    scores = torch.zeros(len(groups), k)  # (N, K)
    group_mask = torch.zeros(len(groups), k, dtype=torch.bool)  # (N, K)
    for gi, g in enumerate(groups):
        scores[gi, : len(g.scores)] = torch.tensor(g.scores)
        group_mask[gi, : len(g.scores)] = True
    batch["slots"] = torch.tensor(slots, dtype=torch.long)
    batch["scores"] = scores
    batch["group_mask"] = group_mask
    batch["margins"] = torch.tensor([g.margin for g in groups], dtype=torch.float32)
    batch["lengths"] = torch.tensor([len(s.input_ids) for s in sequences], dtype=torch.long)
    return batch


def scatter_rewards(
    rewards: torch.Tensor, slots: torch.Tensor, group_mask: torch.Tensor
) -> torch.Tensor:
    """Place per-sequence rewards into the (N, K) group matrix (0 where no completion).

    Shapes:
        rewards, slots: (D,); group_mask: (N, K); returns (N, K).
    """
    flat = rewards.new_zeros(group_mask.numel())  # (N * K,)
    flat = flat.index_put((slots,), rewards)  # differentiable placement
    return flat.view(group_mask.shape)  # (N, K)
