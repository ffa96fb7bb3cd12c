"""Per-document attention for packed rows: ``varlen_sdpa``.

A packed row holds several documents end to end. Transformers turns restarting position ids
into a block-diagonal (N, N) mask, so plain ``sdpa`` computes attention over the whole row and
masks most of it away: with 16 documents of 60 tokens that is 16x the attention FLOPs, and the
masked CPU kernel is slower than the causal one. ``varlen_sdpa`` receives the documents'
boundaries (``cu_seq_lens_q``, the same keyword transformers passes to flash-attention varlen
kernels) and runs causal sdpa on each document separately: exact, and O(sum of L_d^2) instead of
O(N^2). Without boundaries (padded batches, generation) it is plain ``sdpa``. A document may
carry its own mask (``doc_masks``): a prompt shared by several completions is then computed
once (:func:`rlhfkit.ops.masking.prefix_tree_mask`).

It is registered with transformers' attention and mask interfaces under the name ``varlen_sdpa``
so that ``from_pretrained(..., attn_implementation="varlen_sdpa")`` or
``model.set_attn_implementation("varlen_sdpa")`` selects it.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

VARLEN_SDPA = "varlen_sdpa"

MATH_MAX_LEN = 1024
"""On CPU, documents up to this length use sdpa's math kernel: for short sequences its forward
and backward are about twice as fast as the CPU flash kernel (measured: 16 documents of 52-80
tokens, 9 heads of 64, bf16: 12.6 ms against 25.8 ms per layer); memory is O(L^2) per head,
which is small at these lengths."""


def _backends(query: torch.Tensor, longest: int) -> list[SDPBackend]:
    """Kernel preference for one packed row (every kernel computes the same function)."""
    if query.device.type == "cpu" and longest <= MATH_MAX_LEN:
        return [SDPBackend.MATH]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    doc_masks: list[torch.Tensor | None] | None = None,
    doc_context: int = 0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed document (sdpa when no boundaries are given).

    Args:
        module: The attention module (for ``num_key_value_groups``).
        query: Queries.
        key: Keys (grouped-query: H_kv heads, each shared by H / H_kv query heads).
        value: Values.
        attention_mask: The mask transformers built; ignored when ``cu_seq_lens_q`` is given.
        dropout: Attention dropout probability (training only).
        scaling: Softmax scale.
        cu_seq_lens_q: Cumulative document lengths [0, L_1, L_1 + L_2, ..., N] (B must be 1).
        doc_masks: Optional explicit (L_d, L_d) boolean mask per document (None entries are
            causal), e.g. :func:`rlhfkit.ops.masking.prefix_tree_mask` for a prompt shared by
            several completions. With ``doc_context`` the mask of every document after the
            first is (L_d, doc_context + L_d).
        doc_context: If > 0, the first document is a shared context of this many tokens that
            every later document also attends to (its keys and values are prepended).
        **kwargs: Forwarded to sdpa on the fallback path.

    Returns:
        The attention output and None (no attention weights).

    Shapes:
        query: (1, H, N, D); key, value: (1, H_kv, N, D); returns (1, N, H, D).
    """
    if cu_seq_lens_q is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if query.shape[0] != 1:
        raise ValueError("varlen_sdpa expects packed rows with batch size 1")
    gqa = getattr(module, "num_key_value_groups", 1) > 1  # sdpa shares each kv head itself
    p = dropout if module.training else 0.0
    bounds = cu_seq_lens_q.tolist()
    lengths = [e - s for s, e in itertools.pairwise(bounds)]
    # split (not slicing): its backward concatenates the pieces' gradients instead of
    # zero-filling a full-size buffer per document.
    pieces = zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)
    masks = doc_masks if doc_masks is not None else [None] * len(lengths)
    if doc_context:
        pieces = _with_context(list(pieces), doc_context)
    with sdpa_kernel(_backends(query, max(lengths) + doc_context)):
        outputs = [
            F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=m,
                dropout_p=p,
                is_causal=m is None,
                scale=scaling,
                enable_gqa=gqa,
            )
            for (q, k, v), m in zip(pieces, masks, strict=True)
        ]  # each (1, H, L_d, D)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None  # (1, N, H, D)


def _with_context(
    pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], context: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Prepend the first document's keys and values (the shared context) to every other one.

    Shapes:
        each piece: (1, H, L_d, D); later pieces' keys and values become (1, H, C + L_d, D).
    """
    first, rest = pieces[0], pieces[1:]
    if first[0].shape[2] != context:
        raise ValueError(f"doc_context {context} != length of the first document")
    ck, cv = first[1], first[2]
    return [first] + [(q, torch.cat([ck, k], 2), torch.cat([cv, v], 2)) for q, k, v in rest]


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)
