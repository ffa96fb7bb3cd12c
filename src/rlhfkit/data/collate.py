"""Padding, padding-free packing and length bucketing of tokenized examples.

Labels follow the Hugging Face convention: ``labels[b, i]`` is the token at position ``i``, and
it is predicted from positions ``< i`` (the shift happens in the loss); ``-100`` means "not in the
loss".

Padding-free packing (finding for transformers 5.24, read in ``masking_utils.py``):

- ``create_causal_mask`` calls ``find_packed_sequence_indices(position_ids)``, which starts a new
  document wherever consecutive position ids do not increase by exactly 1, and ANDs the causal
  mask with "same document" (and remaps positions per document). For ``sdpa`` and ``eager``
  this materialises a block-diagonal causal mask; for ``flash_attention_2/3`` the attention
  wrapper instead detects packing from ``position_ids`` (``_is_packed_sequence``) and calls the
  varlen kernel.
- This detection only runs when ``attention_mask is None`` **and the cache is None**. Llama's
  ``forward`` creates a ``DynamicCache`` whenever ``use_cache`` is true, and ``use_cache``
  defaults to ``config.use_cache`` (``True``) even in training mode. So a packed forward must be
  called as ``model(input_ids=..., position_ids=..., use_cache=False)``; with the default,
  documents silently attend to each other (the equivalence tests check both facts).
- :func:`block_causal_mask` builds an explicit 4D mask for callers that cannot pass
  ``use_cache=False``; a 4D mask is passed through to the attention unchanged (sdpa, eager).

``packed_batch`` therefore returns no ``attention_mask``. Pass only ``input_ids`` and
``position_ids`` to the model (``seq_lens`` and ``cu_seqlens`` are for the loss and for kernels
that take them directly).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import torch

from rlhfkit.types import TokenizedExample

IGNORE_INDEX = -100
"""Label value excluded from the loss (``torch.nn.functional.cross_entropy`` default)."""

PADDING_FREE_ATTENTION = frozenset(
    {"sdpa", "eager", "varlen_sdpa", "flash_attention_2", "flash_attention_3"}
)
"""Attention implementations whose packed (position-id) path is verified.

``sdpa`` and ``eager`` are checked by ``tests/equivalence/test_packing.py``, ``varlen_sdpa``
(rlhfkit's per-document sdpa, which uses ``cu_seqlens``) by
``tests/equivalence/test_varlen_attention.py``; the flash kernels
use transformers' position-id varlen path (read in the source, not testable on CPU).
"""


def _labels(example: TokenizedExample) -> list[int]:
    """Labels of one example: the ids where ``loss_mask`` is True, ``-100`` elsewhere."""
    return [
        t if m else IGNORE_INDEX for t, m in zip(example.input_ids, example.loss_mask, strict=True)
    ]


def pad_batch(
    examples: Sequence[TokenizedExample],
    *,
    pad_id: int,
    side: Literal["right", "left"] = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad examples into a rectangular batch.

    ``position_ids = clamp(cumsum(attention_mask) - 1, min=0)``, so each sequence starts at
    position 0 whichever side is padded.

    Args:
        examples: Examples to batch (at least one).
        pad_id: Token id written at padded positions.
        side: Pad on the ``right`` (training) or the ``left`` (prompts for generation).
        pad_to_multiple_of: Round the padded length up to a multiple of this.

    Returns:
        ``input_ids``, ``attention_mask`` (1 = real token), ``labels`` (``input_ids`` where the
        loss mask is set, else -100) and ``position_ids``, all long tensors.

    Shapes:
        every output: (B, L) with L = max length (rounded up to ``pad_to_multiple_of``).
    """
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    length = max(len(e.input_ids) for e in examples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)  # (B, L)
    for b, example in enumerate(examples):
        n = len(example.input_ids)
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        input_ids[b, cols] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[b, cols] = torch.tensor(_labels(example), dtype=torch.long)
        labels[b, cols.start] = IGNORE_INDEX  # nothing precedes it: it cannot be predicted
        attention_mask[b, cols] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
    }


class _MaxTree:
    """Segment tree over bins holding each bin's free space; finds the leftmost bin that fits."""

    def __init__(self, num_leaves: int) -> None:
        self.size = 1
        while self.size < max(num_leaves, 1):
            self.size *= 2
        self.tree = [-1] * (2 * self.size)  # -1: bin not opened (fits nothing)

    def set(self, leaf: int, value: int) -> None:
        node = leaf + self.size
        self.tree[node] = value
        while node > 1:
            node //= 2
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])

    def leftmost_at_least(self, need: int) -> int | None:
        if self.tree[1] < need:
            return None
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= need else 2 * node + 1
        return node - self.size


def pack_examples(examples: Sequence[TokenizedExample], *, max_tokens: int) -> list[list[int]]:
    """Group example indices into bins of at most ``max_tokens`` tokens (first-fit decreasing).

    See :func:`pack_lengths`; the length of an example is its number of tokens.
    """
    return pack_lengths([len(e.input_ids) for e in examples], max_tokens=max_tokens)


def pack_lengths(lengths: Sequence[int], *, max_tokens: int) -> list[list[int]]:
    """Group indices into bins whose lengths sum to at most ``max_tokens`` (first-fit decreasing).

    Items are taken longest first (ties by index) and each goes into the first bin with
    room; an item longer than ``max_tokens`` gets a bin of its own. Deterministic;
    O(n log n). Used for examples and for groups of examples that must share a micro-batch
    (the chosen and rejected sequences of a preference pair).

    Args:
        lengths: Token count of each item.
        max_tokens: Capacity of a bin (tokens per packed row).

    Returns:
        Bins of indices, in the order the bins were opened; every index appears once.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    tree = _MaxTree(len(lengths))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        slot = tree.leftmost_at_least(lengths[i]) if lengths[i] <= max_tokens else None
        if slot is None:
            slot = len(bins)
            bins.append([])
            free.append(max_tokens)
        bins[slot].append(i)
        free[slot] -= lengths[i]
        tree.set(slot, free[slot])  # negative for an oversized item: the bin stays closed
    return bins


def packed_batch(examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
    """Concatenate examples into one padding-free row with per-document positions.

    The label of each document's first token is set to -100: it would be predicted from the
    previous document's last token. Call the model with ``input_ids``, ``position_ids`` and
    ``use_cache=False`` (see the module docstring).

    Args:
        examples: Documents to pack (non-empty, each at least one token).

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` (long, restarting at 0 per document),
        ``seq_lens`` and ``cu_seqlens`` (int32, cumulative lengths starting at 0).

    Shapes:
        input_ids, labels, position_ids: (1, N) with N = total tokens.
        seq_lens: (D,) documents. cu_seqlens: (D + 1,).
    """
    if not examples:
        raise ValueError("packed_batch needs at least one example")
    if any(len(e.input_ids) == 0 for e in examples):
        raise ValueError("packed_batch got an empty example")
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for example in examples:
        input_ids.extend(example.input_ids)
        labels.append(IGNORE_INDEX)  # the first label would come from the previous document
        labels.extend(_labels(example)[1:])
        positions.extend(range(len(example.input_ids)))
    seq_lens = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int32)  # (D,)
    cu_seqlens = torch.zeros(len(examples) + 1, dtype=torch.int32)  # (D + 1,)
    cu_seqlens[1:] = seq_lens.cumsum(0)
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),  # (1, N)
        "labels": torch.tensor([labels], dtype=torch.long),  # (1, N)
        "position_ids": torch.tensor([positions], dtype=torch.long),  # (1, N)
        "seq_lens": seq_lens,
        "cu_seqlens": cu_seqlens,
    }


def block_causal_mask(seq_lens: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Explicit block-diagonal causal mask of a packed row (O(N^2) memory).

    ``allowed[q, k] = doc(q) == doc(k) and k <= q``. Not needed when the model is called with
    ``use_cache=False`` (transformers builds it from ``position_ids``); useful otherwise.

    Args:
        seq_lens: Document lengths of the packed row.
        dtype: ``None`` for a boolean mask (True = attend; sdpa only); a floating dtype for an
            additive mask (0 where allowed, the dtype's minimum elsewhere; sdpa and eager).

    Returns:
        The mask, ready to pass as ``attention_mask``.

    Shapes:
        seq_lens: (D,). output: (1, 1, N, N) with N = seq_lens.sum().
    """
    lengths = seq_lens.to(torch.long)
    doc = torch.repeat_interleave(
        torch.arange(len(lengths), device=lengths.device), lengths
    )  # (N,)
    n = doc.numel()
    causal = torch.ones(n, n, dtype=torch.bool, device=lengths.device).tril()  # (N, N)
    allowed = (doc[:, None] == doc[None, :]) & causal  # (N, N)
    allowed = allowed[None, None]  # (1, 1, N, N)
    if dtype is None:
        return allowed
    additive = torch.zeros(allowed.shape, dtype=dtype, device=lengths.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)


def bucket_by_length(
    lengths: Sequence[int], *, max_tokens: int, shuffle_seed: int | None = None
) -> list[list[int]]:
    """Group indices of similar length into batches of bounded padded size.

    Indices are sorted by length (ties broken by index, or at random for a seed) and cut
    greedily so that ``len(batch) * max(lengths in batch) <= max_tokens``; a single index longer
    than ``max_tokens`` forms its own batch. With a seed, the batch order is shuffled too.
    The fallback when the model cannot run padding-free packing.

    Args:
        lengths: Sequence lengths.
        max_tokens: Budget of padded tokens per batch.
        shuffle_seed: ``None`` for shortest-first order; else the seed of the shuffles.

    Returns:
        Batches of indices; every index appears exactly once. Deterministic for a seed.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    rng = random.Random(shuffle_seed)
    order = list(range(len(lengths)))
    if shuffle_seed is not None:
        rng.shuffle(order)
    order.sort(key=lambda i: lengths[i])  # stable: ties keep the (shuffled) order
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Ascending order: lengths[i] is the longest in the batch once i joins it.
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    if shuffle_seed is not None:
        rng.shuffle(batches)
    return batches


def supports_padding_free(model: Any) -> bool:
    """Whether the model's attention implementation handles the packed (position-id) path.

    Duck-typed: reads ``model.config._attn_implementation`` (or ``attn_implementation``); a
    config object itself is accepted too. The model must build its masks with transformers'
    ``masking_utils`` (all Llama-style models in transformers >= 4.56 do).

    Args:
        model: A model or config-like object.

    Returns:
        True for the implementations in :data:`PADDING_FREE_ATTENTION`.
    """
    config = getattr(model, "config", model)
    impl = getattr(config, "_attn_implementation", None) or getattr(
        config, "attn_implementation", None
    )
    return impl in PADDING_FREE_ATTENTION
