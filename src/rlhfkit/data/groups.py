"""Ranked preference groups as token ids, and their micro-batches (reward models, DPO).

A :class:`~rlhfkit.data.preferences.RankedGroup` (one prompt, K >= 2 completions best first)
becomes a :class:`TokenizedGroup`: each completion rendered together with the prompt by the chat
template (tokenised once; the loss mask marks the completion), the prompt truncated from the
left (docs/methods/reward_models.md). Pairs whose chosen and rejected ids are identical after
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
    groups: Sequence[TokenizedGroup],
    *,
    max_tokens: int,
    packing: bool,
    pad_id: int,
    share_prefix: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Split groups into micro-batches of about ``max_tokens`` tokens, whole groups each.

    With ``share_prefix`` (packed rows only) each group becomes one prefix-tree document
    (:func:`tree_batch`), and the budget counts the tokens actually computed.
    """
    bins = group_bins(groups, max_tokens=max_tokens, share_prefix=share_prefix)
    return [collate_groups([groups[i] for i in b], packing, pad_id, share_prefix) for b in bins]


def group_bins(
    groups: Sequence[TokenizedGroup], *, max_tokens: int, share_prefix: bool
) -> list[list[int]]:
    """Indices of the groups of each micro-batch (first-fit decreasing on their tokens)."""
    cost = [tree_tokens(g) if share_prefix else g.num_tokens for g in groups]
    return pack_lengths(cost, max_tokens=max_tokens)


def collate_groups(
    groups: Sequence[TokenizedGroup], packing: bool, pad_id: int, share_prefix: bool
) -> dict[str, torch.Tensor]:
    """One micro-batch: prefix trees, a packed row or right-padded rows."""
    if share_prefix and not packing:
        raise ValueError("share_prefix needs packing (prefix trees live in packed rows)")
    if share_prefix:
        return tree_batch(groups)
    return group_batch(groups, packing=packing, pad_id=pad_id)


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of all sequences, leaving each >= 1 own token."""
    shortest = min(len(s) for s in sequences)
    n = 0
    while n < shortest - 1 and all(s[n] == sequences[0][n] for s in sequences):
        n += 1
    return n


def tree_tokens(group: TokenizedGroup) -> int:
    """Tokens of a group as a prefix tree (the shared prefix counted once)."""
    ids = [s.input_ids for s in group.sequences]
    return group.num_tokens - (len(ids) - 1) * shared_prefix_length(ids)


def tree_batch(groups: Sequence[TokenizedGroup]) -> dict[str, torch.Tensor]:
    """Collate groups as prefix trees: shared prefixes are computed once.

    Two levels of sharing, both exact:

    - Within a group: group g becomes one document ``[prefix, branch_1, ..., branch_K]`` where
      ``prefix`` is the longest common prefix of its K sequences' ids and ``branch_k`` the rest
      of sequence k; a branch attends to the prefix and to itself only
      (:func:`rlhfkit.ops.masking.prefix_tree_mask`).
    - Across groups: the longest prefix common to *every* sequence of the micro-batch (a chat
      template's default system prompt, say) is a context document of its own at the start of
      the row, and every group document also attends to it (``tree_context`` tokens).

    Positions continue from the shared part, so every sequence gets exactly the hidden states
    it would get alone. Needs the ``varlen_sdpa`` attention (the forward pass builds the masks
    from ``tree_context``, ``tree_prefix`` and ``tree_branches``). The result has the keys of
    :func:`group_batch` (no ``labels``) plus ``last_cols``, the column of each sequence's last
    token.

    Shapes:
        input_ids, position_ids: (1, N); cu_seqlens: (docs + 1,) with docs = G (+ 1 with a
        context); tree_context: (1,); tree_prefix: (G,); tree_branches: (G, K);
        last_cols, slots, lengths: (S,) for S sequences.
    """
    every = [s.input_ids for g in groups for s in g.sequences]
    context = shared_prefix_length(every) if len(groups) > 1 else 0
    ids: list[int] = list(every[0][:context])
    positions: list[int] = list(range(context))
    doc_lens = [context] if context else []
    prefixes, branches, last_cols = [], [], []
    targets = _Targets()
    k = max(len(g.sequences) for g in groups)
    for g in groups:
        seqs = [s.input_ids for s in g.sequences]
        p = shared_prefix_length(seqs)  # >= context: the context is common to all
        start = len(ids)
        ids.extend(seqs[0][context:p])
        positions.extend(range(context, p))
        for example in g.sequences:
            seq = example.input_ids
            branch = len(ids)
            ids.extend(seq[p:])
            positions.extend(range(p, len(seq)))
            last_cols.append(len(ids) - 1)
            columns = [
                t if t < context else start + t - context if t < p else branch + t - p
                for t in range(len(seq))
            ]  # where token t of this sequence sits in the row
            targets.add(example, columns)
        prefixes.append(p - context)
        branches.append([len(seq) - p for seq in seqs] + [0] * (k - len(seqs)))
        doc_lens.append(len(ids) - start)
    seq_lens = torch.tensor(doc_lens, dtype=torch.int32)  # (docs,)
    cu_seqlens = torch.zeros(len(doc_lens) + 1, dtype=torch.int32)  # (docs + 1,)
    cu_seqlens[1:] = seq_lens.cumsum(0)
    batch = {
        "input_ids": torch.tensor([ids], dtype=torch.long),  # (1, N)
        "position_ids": torch.tensor([positions], dtype=torch.long),  # (1, N)
        "seq_lens": seq_lens,
        "cu_seqlens": cu_seqlens,
        "tree_context": torch.tensor([context], dtype=torch.long),  # (1,)
        "tree_prefix": torch.tensor(prefixes, dtype=torch.long),  # (G,)
        "tree_branches": torch.tensor(branches, dtype=torch.long),  # (G, K)
        "last_cols": torch.tensor(last_cols, dtype=torch.long),  # (S,)
    }
    return {**batch, **targets.tensors(), **_group_targets(groups)}


def group_batch(
    groups: Sequence[TokenizedGroup], *, packing: bool, pad_id: int
) -> dict[str, torch.Tensor]:
    """Collate whole groups: their sequences plus where each sequence's output belongs.

    Returns:
        The sequences as a packed row (or right-padded rows) with, in addition, ``slots``
        (flat index ``group * K + position`` of each sequence), ``scores`` and ``group_mask``
        (which of the K columns exist), ``margins`` and ``lengths`` (tokens per sequence), and
        the completion tokens as ``target_ids`` predicted at ``(target_rows, target_cols)``,
        belonging to sequence ``target_seq`` (for log-probabilities: DPO and its family).

    Shapes:
        slots, lengths: (D,) for D sequences; scores, group_mask: (N, K); margins: (N,).
    """
    sequences = [s for g in groups for s in g.sequences]
    batch = packed_batch(sequences) if packing else pad_batch(sequences, pad_id=pad_id)
    targets = _Targets()
    start = 0
    for row, example in enumerate(sequences):
        n = len(example.input_ids)
        columns = list(range(start, start + n)) if packing else list(range(n))
        targets.add(example, columns, row=0 if packing else row)
        start += n if packing else 0
    return {**batch, **targets.tensors(), **_group_targets(groups)}


class _Targets:
    """Completion tokens of every sequence with the row position that predicts each one."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.seq: list[int] = []
        self.count = 0

    def add(self, example: TokenizedExample, columns: list[int], row: int = 0) -> None:
        """Token t (loss mask set, t >= 1) is predicted at the column of token t - 1."""
        for t in range(1, len(example.input_ids)):
            if example.loss_mask[t]:
                self.ids.append(example.input_ids[t])
                self.rows.append(row)
                self.cols.append(columns[t - 1])
                self.seq.append(self.count)
        self.count += 1

    def tensors(self) -> dict[str, torch.Tensor]:
        """``target_ids``, ``target_rows``, ``target_cols``, ``target_seq`` (all (M,) long)."""
        return {
            "target_ids": torch.tensor(self.ids, dtype=torch.long),
            "target_rows": torch.tensor(self.rows, dtype=torch.long),
            "target_cols": torch.tensor(self.cols, dtype=torch.long),
            "target_seq": torch.tensor(self.seq, dtype=torch.long),
        }


def _group_targets(groups: Sequence[TokenizedGroup]) -> dict[str, torch.Tensor]:
    """``slots``, ``scores``, ``group_mask``, ``margins`` and ``lengths`` of whole groups."""
    sequences = [s for g in groups for s in g.sequences]
    k = max(len(g.sequences) for g in groups)
    slots = [gi * k + j for gi, g in enumerate(groups) for j in range(len(g.sequences))]
    scores = torch.zeros(len(groups), k)  # (N, K)
    group_mask = torch.zeros(len(groups), k, dtype=torch.bool)  # (N, K)
    for gi, g in enumerate(groups):
        scores[gi, : len(g.scores)] = torch.tensor(g.scores)
        group_mask[gi, : len(g.scores)] = True
    return {
        "slots": torch.tensor(slots, dtype=torch.long),  # (S,)
        "scores": scores,
        "group_mask": group_mask,
        "margins": torch.tensor([g.margin for g in groups], dtype=torch.float32),  # (N,)
        "lengths": torch.tensor([len(s.input_ids) for s in sequences], dtype=torch.long),
    }


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
