"""Per-document attention for packed rows: ``varlen_sdpa``.

A packed row holds several documents end to end. Transformers turns restarting position ids
into a block-diagonal (N, N) mask, so plain ``sdpa`` computes attention over the whole row and
masks most of it away: with 16 documents of 60 tokens that is 16x the attention FLOPs, and the
masked CPU kernel is slower than the causal one. ``varlen_sdpa`` receives the documents'
boundaries (``cu_seq_lens_q``, the same keyword transformers passes to flash-attention varlen
kernels) and runs causal sdpa on each document separately: exact, and O(sum of L_d^2) instead of
O(N^2). Without boundaries (padded batches, generation) it is plain ``sdpa``. A document may
carry its own mask (``doc_masks``): a prompt shared by several completions is then computed
once (:func:`rlhfkit.ops.masking.prefix_tree_mask`). On CPU, plain causal documents of similar
length are batched into one padded call instead of one call each
(:func:`rlhfkit.models.doc_attention.packed_attention`).

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

from rlhfkit.models.doc_attention import doc_attention, packed_attention

VARLEN_SDPA = "varlen_sdpa"

MATH_MAX_LEN = 1024
"""On CPU, rows whose documents are all up to this long use the explicit kernels of
:mod:`rlhfkit.models.doc_attention` (matmuls); longer ones use sdpa's kernels. For short
documents sdpa's math kernel beats the CPU flash kernel (16 documents of 52-80 tokens, 9 heads
of 64, bf16: 12.6 ms against 25.8 ms per layer), and the explicit form beats the math kernel by
about 28% forward + backward (a 120-token document with a 24-token context, 9 query / 3
key-value heads: 1.07 ms against 1.49 ms): no key/value repeat for grouped-query heads and no
fully-masked-row guard, which cannot fire here (every query sees at least itself). Memory is
O(L^2) per head, small at these lengths. Forwards without gradients take the same path,
although the flash kernel would be faster there (2.3 against 5.8 ms per layer for 16 documents
of 50-135 tokens): reference and old-policy log-probabilities must be computed exactly as the
trained policy's are, so that a policy equal to its reference has a KL of exactly 0 and
importance ratios of exactly 1."""


BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""sdpa's kernels in order of preference (every kernel computes the same function)."""


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
    if cu_seq_lens_q is None and _explicit_decode(query, key, attention_mask, kwargs):
        mask = None if attention_mask is None else attention_mask[:, :, None]  # (B, 1, 1, 1, L)
        out = doc_attention(query, key, value, mask, scaling, 0.0)  # (B, H, 1, D)
        return out.transpose(1, 2), None  # (B, 1, H, D): contiguous, as L_q = 1
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
    plain = not doc_context and not p and (doc_masks is None or all(m is None for m in doc_masks))
    if plain and query.device.type == "cpu" and max(lengths) <= MATH_MAX_LEN:
        return packed_attention(query, key, value, lengths, scaling), None
    # split (not slicing): its backward concatenates the pieces' gradients instead of
    # zero-filling a full-size buffer per document.
    pieces = zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)
    masks = doc_masks if doc_masks is not None else [None] * len(lengths)
    if doc_context:
        pieces = _with_context(list(pieces), doc_context)
    longest = max(lengths) + doc_context
    if query.device.type == "cpu" and longest <= MATH_MAX_LEN:
        outputs = [
            doc_attention(q, k, v, m, scaling, p)
            for (q, k, v), m in zip(pieces, masks, strict=True)
        ]  # each (1, H, L_d, D)
    else:
        with sdpa_kernel(BACKENDS):
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


DECODE_KWARGS = frozenset(
    {"position_ids", "use_cache", "cache_position", "is_causal", "sliding_window"}
)
"""Keywords transformers passes to attention that the explicit decode path may ignore: the
mask already holds causality and any sliding window."""


def _explicit_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, object],
) -> bool:
    """Is this a CPU decode step (one query per row) that :func:`doc_attention` computes exactly?

    In decoding, sdpa's CPU flash kernel takes 0.56 ms per layer where the explicit form takes
    0.25 ms (64 rows, 9 query / 3 key-value heads of 64, 78 keys, bf16): at one query per row the
    kernel's tiling buys nothing. A single query always sees at least itself, so no row of the
    softmax is fully masked. Anything the explicit form does not implement stays with sdpa:
    float masks, very long caches, and any keyword outside :data:`DECODE_KWARGS` that is set
    (soft-capping, position biases, attention sinks, ...).
    """
    return (
        query.device.type == "cpu"
        and query.shape[2] == 1
        and key.shape[2] <= MATH_MAX_LEN
        and (attention_mask is None or attention_mask.dtype == torch.bool)
        and all(k in DECODE_KWARGS or v is None or v is False for k, v in kwargs.items())
    )


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
