r"""Scalar heads on a causal-LM backbone: reward models, ORM/PRM token heads, value models.

A reward model is ``AutoModelForSequenceClassification`` with ``num_labels=1`` (the backbone
plus ``score = Linear(hidden, 1, bias=False)``; docs/methods/reward_models.md): loading a causal-LM
checkpoint into it keeps the backbone and initialises the head, and ``save_pretrained`` writes a
directory that ``AutoModelForSequenceClassification.from_pretrained`` loads as it is. The same
container with ``num_labels=3`` is the 3-class process reward model, and the per-token head
outputs of a 1-label model serve as token-level ORM logits and as PPO values.

rlhfkit never calls the transformers forward of that class: it runs the backbone padding-free
(packed rows, no compute on padding) and reads the head only where it is needed, in fp32.

Pooling. rlhfkit reads the reward at the last *attended* token of each sequence
(:func:`rlhfkit.ops.masking.last_token_index`, or the end of each packed document), which is
right for left and right padding. The transformers class reads it at the last token whose id is
not ``config.pad_token_id``. The two agree whenever a sequence does not end with the pad id;
ChatML renders ``<|im_end|>\n``, so a pad of ``<|im_end|>`` (SmolLM2) is fine, and
:func:`check_pooling_compatible` guards the rest.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import nn

from rlhfkit.data.collate import packed_batch, pad_batch
from rlhfkit.data.groups import TokenizedGroup, group_bins, tree_batch
from rlhfkit.models.attention import VARLEN_SDPA
from rlhfkit.models.forward import (
    _model_inputs,
    _unwrap,
    backbone_hidden,
    completion_inputs,
    selected_hidden,
)
from rlhfkit.ops.masking import last_token_index
from rlhfkit.types import TokenizedExample


def score_head(model: nn.Module) -> nn.Linear:
    """The ``score`` linear head of a sequence-classification model (through a peft wrapper).

    Raises:
        TypeError: If the model has no ``score`` linear layer.
    """
    lm = _unwrap(model)
    head = getattr(lm, "score", None)
    copies = getattr(head, "modules_to_save", None)
    if copies is not None:  # peft ModulesToSaveWrapper: the active adapter's trained copy
        head = copies[head.active_adapters[0]]
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"{type(lm).__name__} has no 'score' linear head; load the model with "
            "load_model(..., task='score') (AutoModelForSequenceClassification)"
        )
    return head


def apply_head(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """The head on selected hidden states, in fp32 at least (bf16 weights are upcast).

    Shapes:
        hidden: (N, H); returns (N, C) fp32.
    """
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 in tests
    out = hidden.to(dtype) @ head.weight.to(dtype).T  # (N, C)
    return out if head.bias is None else out + head.bias.to(dtype)


def last_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the last token of every sequence of a padded or packed batch.

    Packed rows (``cu_seqlens``) end each document at ``cu_seqlens[1:] - 1``; prefix-tree rows
    give the end of every branch (``last_cols``); padded rows end at the last attended column.

    Shapes:
        returns (D,), (D,) long with D sequences (documents).
    """
    if "last_cols" in batch:  # prefix trees: each branch ends inside its document
        cols = batch["last_cols"].to(torch.long)  # (D,)
        return torch.zeros_like(cols), cols
    if "cu_seqlens" in batch:
        cols = batch["cu_seqlens"][1:].to(torch.long) - 1  # (D,)
        return torch.zeros_like(cols), cols
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(batch["input_ids"])
    cols = last_token_index(mask)  # (B,)
    return torch.arange(len(cols), device=cols.device), cols


def sequence_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Head output at the last token of each sequence (rewards for ``num_labels=1``).

    Args:
        model: A sequence-classification model (see module docstring).
        batch: Padded (``input_ids``, ``attention_mask``, ``position_ids``) or packed
            (``input_ids``, ``position_ids``, ``cu_seqlens``, ``seq_lens``) batch.

    Shapes:
        returns (D, C) fp32: D sequences, C labels.
    """
    rows, cols = last_positions(batch)
    hidden = selected_hidden(model, _model_inputs(batch), rows, cols)  # (D, H)
    return apply_head(score_head(model), hidden)  # (D, C)


def token_scores(
    model: nn.Module, batch: dict[str, torch.Tensor], select: torch.Tensor
) -> torch.Tensor:
    """Head output at the selected positions (ORM/PRM token logits, values).

    Shapes:
        select: (B, L) bool; returns (N, C) fp32 in row-major order of the selected positions.
    """
    hidden = backbone_hidden(model, **_model_inputs(batch))  # (B, L, H)
    return apply_head(score_head(model), hidden[select])  # (N, C)


def completion_values(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    attention: torch.Tensor | None = None,
) -> torch.Tensor:
    """PPO values V(s_t) of every completion position: the head at the state before token t.

    V_t is read at column P-1+t of ``cat(prompt, completion)``, the position whose logits
    predict completion token t (as in :func:`rlhfkit.models.forward.completion_logprobs`).

    Shapes:
        prompt_ids, prompt_mask: (B, P) left-padded; completion_ids, completion_mask: (B, T)
        right-padded; ``attention`` (B, T): the completion tokens attended to, when they are
        more than the masked ones (tool output); returns (B, T) fp32 (0 where the mask is
        False).
    """
    attend = completion_mask if attention is None else attention
    inputs = completion_inputs(prompt_ids, prompt_mask, completion_ids, attend)
    hidden = backbone_hidden(model, **inputs)[:, prompt_ids.shape[1] - 1 : -1]  # (B, T, H)
    select = completion_mask.bool()
    out = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    values = apply_head(score_head(model), hidden[select])[:, 0]  # (N,)
    if values.dtype != out.dtype:  # fp64 in tests
        out = out.to(values.dtype)
    out[select] = values
    return out


def rollout_values(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Values V(s_t) of a rollout micro-batch, padded or prefix-tree packed.

    Shapes:
        returns (B, T) fp32 (0 where ``completion_mask`` is False).
    """
    mask = batch["completion_mask"].bool()
    if "target_ids" not in batch:
        return completion_values(
            model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], mask,
            batch.get("completion_attention"),
        )  # fmt: skip
    hidden = backbone_hidden(model, **_model_inputs(batch))  # (1, L, H)
    values = apply_head(score_head(model), hidden[batch["target_rows"], batch["target_cols"]])
    out = torch.zeros(mask.shape, dtype=values.dtype, device=mask.device)
    out[mask] = values[:, 0]
    return out


def check_pooling_compatible(sequences: Sequence[Sequence[int]], pad_token_id: int | None) -> int:
    """Count sequences that end with the pad id (transformers would pool elsewhere for them)."""
    if pad_token_id is None:
        return 0
    return sum(1 for ids in sequences if ids and ids[-1] == pad_token_id)


def collate_sequences(
    examples: Sequence[TokenizedExample], *, packing: bool, pad_id: int
) -> dict[str, torch.Tensor]:
    """One micro-batch of whole sequences: a packed row, or right-padded rows."""
    return packed_batch(examples) if packing else pad_batch(examples, pad_id=pad_id)


@torch.no_grad()
def score_examples(
    model: nn.Module,
    examples: Sequence[TokenizedExample],
    *,
    packing: bool,
    pad_id: int,
    max_tokens: int = 8192,
    prefix_keys: Sequence[Hashable] | None = None,
) -> torch.Tensor:
    """Score many sequences: sorted by length, batched by a token budget, order restored.

    With ``prefix_keys`` (packed rows on ``varlen_sdpa`` only; ignored elsewhere) sequences
    with the same key are scored as prefix trees (:func:`rlhfkit.data.groups.tree_batch`): the
    prefix they share, typically the prompt of several sampled completions, is computed once.
    The scores are the same either way (every token sees the same context at the same
    position); only the work differs. With 64 samples of a 52-token prompt and 20-token
    completions, trees compute about a third of the tokens.

    Args:
        model: A sequence-classification model in eval mode.
        examples: Rendered sequences (prompt + completion).
        packing: Pack each batch into one padding-free row (else pad similar lengths).
        pad_id: Padding id for the padded path.
        max_tokens: Tokens per forward pass.
        prefix_keys: One key per example (for instance its prompt); any grouping is exact.

    Returns:
        Head outputs in the order of ``examples``.

    Shapes:
        returns (D, C) fp32 (fp64 for an fp64 model) on the CPU.
    """
    if not examples:
        return torch.zeros(0, _unwrap(model).config.num_labels)
    if prefix_keys is not None and packing and supports_prefix_trees(model):
        return _score_trees(model, examples, prefix_keys, max_tokens)
    device = next(model.parameters()).device
    lengths = [len(e.input_ids) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    out: torch.Tensor | None = None
    for chunk in _budget_chunks(order, lengths, max_tokens, padded=not packing):
        batch = collate_sequences([examples[i] for i in chunk], packing=packing, pad_id=pad_id)
        scores = sequence_scores(model, {k: v.to(device) for k, v in batch.items()}).cpu()
        if out is None:
            out = scores.new_zeros(len(examples), scores.shape[-1])
        out[torch.tensor(chunk)] = scores
    return out


TREE_BRANCHES = 16
"""Most sequences per prefix tree when scoring. A tree is one document whose attention is
computed densely over all its branches (masked to each branch and the prefix), so its cost
grows with the square of its length: 16 completions of about 20 tokens after a 52-token prompt
keep a tree near 400 tokens, where the shared prompt already saves most of the work."""


def _score_trees(
    model: nn.Module,
    examples: Sequence[TokenizedExample],
    keys: Sequence[Hashable],
    max_tokens: int,
) -> torch.Tensor:
    """:func:`score_examples` with the sequences of each key packed as prefix trees.

    Shapes:
        returns (D, C) fp32 (fp64 for an fp64 model) on the CPU.
    """
    if len(keys) != len(examples):
        raise ValueError(f"prefix_keys: {len(keys)} keys for {len(examples)} examples")
    device = next(model.parameters()).device
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    parts = [
        ix[start : start + TREE_BRANCHES]
        for ix in members.values()
        for start in range(0, len(ix), TREE_BRANCHES)
    ]
    trees = [TokenizedGroup([examples[i] for i in part], [0.0] * len(part)) for part in parts]
    rows: list[int] = []
    scores: list[torch.Tensor] = []
    for chosen in group_bins(trees, max_tokens=max_tokens, share_prefix=True):
        batch = tree_batch([trees[t] for t in chosen])
        scores.append(sequence_scores(model, {k: v.to(device) for k, v in batch.items()}).cpu())
        rows += [i for t in chosen for i in parts[t]]
    flat = torch.cat(scores)  # (D, C) in the order of the trees
    out = flat.new_zeros(flat.shape)
    out[torch.tensor(rows)] = flat
    return out


def _budget_chunks(
    order: Sequence[int], lengths: Sequence[int], max_tokens: int, *, padded: bool
) -> list[list[int]]:
    """Cut length-sorted indices into consecutive chunks within the token budget.

    The cost of a chunk is its token count (packed) or ``size x longest`` (padded; the indices
    are sorted by length, so the newest is the longest).
    """
    chunks: list[list[int]] = []
    chunk: list[int] = []
    tokens = 0
    for i in order:
        cost = (len(chunk) + 1) * lengths[i] if padded else tokens + lengths[i]
        if chunk and cost > max_tokens:
            chunks.append(chunk)
            chunk, tokens = [], 0
        chunk.append(i)
        tokens += lengths[i]
    return [*chunks, chunk] if chunk else chunks


def selected_documents(batch: dict[str, torch.Tensor], select: torch.Tensor) -> torch.Tensor:
    """The sequence (document) each selected position belongs to, in row-major order.

    Packed rows map a column to its document through ``cu_seqlens``; padded rows are one
    sequence each.

    Shapes:
        select: (B, L) bool; returns (N,) long with N = select.sum().
    """
    rows, cols = select.nonzero(as_tuple=True)  # (N,), (N,)
    if "cu_seqlens" not in batch:
        return rows
    ends = batch["cu_seqlens"][1:].to(cols.device, torch.long)  # (D,)
    return torch.searchsorted(ends, cols, right=True)  # (N,)


def supports_prefix_trees(model: nn.Module) -> bool:
    """Whether the model's attention reads per-document masks (``varlen_sdpa`` does)."""
    config = _unwrap(model).config
    return getattr(config, "_attn_implementation", None) == VARLEN_SDPA
