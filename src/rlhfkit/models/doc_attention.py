"""Explicit attention kernels for short documents on CPU (the math behind ``varlen_sdpa``).

:func:`doc_attention` is causal (or masked) attention over one document, or a batch of equally
long ones, with grouped-query heads stacked instead of repeated and the scale and mask applied
inside the product; :class:`_BiasedAttention` is its product-with-bias path with a hand-written
backward. :func:`packed_attention` runs every plain causal document of a packed row through it,
documents of similar length batched into one right-padded call (:func:`length_groups` chooses
the groups, :func:`group_plan` indexes them). :mod:`rlhfkit.models.attention` decides when these
kernels are used.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def doc_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    dropout: float,
) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for one document, grouped-query heads without a repeat.

    Query head h uses key/value head h // G (G = H / H_kv, transformers' ``repeat_kv`` order), so
    the G query heads of a key/value head are stacked along the query axis and share one matmul.
    The softmax runs in fp32 at least (as transformers' eager attention does). With one mask
    for all rows, the scale and the mask (an additive 0 / -inf bias) are applied by the product
    itself (``baddbmm``): no scaled copy and no masked copy of the (G L_q, L_k) scores, 7-24%
    less time forward + backward for 80-263 keys (9 query / 3 key-value heads of 64, bf16, AMD
    EPYC), and the same values where the scale is a power of two (head size 64: 1/8). That path
    (without dropout) runs as :class:`_BiasedAttention`, whose backward differentiates the
    probabilities the forward multiplied (see there); the causal bias is cached per shape.

    Args:
        query: Queries.
        key: Keys.
        value: Values.
        mask: (L_q, L_k) bool, True = may attend, or (B, 1, 1, L_q, L_k) for one mask per batch
            row (broadcast over the key/value heads and their query groups); None = causal with
            the queries at the end of the keys (L_q == L_k for a plain document).
        scale: Softmax scale (default 1/sqrt(D)).
        dropout: Dropout probability on the attention weights.

    Shapes:
        query: (B, H, L_q, D); key, value: (B, H_kv, L_k, D); returns (B, H, L_q, D).
    """
    b, heads, lq, d = query.shape
    kv_heads, lk = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = scale if scale is not None else d**-0.5
    if mask is None or mask.dim() == 2:  # one mask for every head: scale and mask in the product
        if mask is None:
            bias = _causal_bias(lq, lk, groups, query.dtype, query.device)
        else:
            bias = torch.zeros(mask.shape, dtype=query.dtype, device=query.device)
            bias = bias.masked_fill_(~mask, float("-inf")).repeat(groups, 1)  # (G*L_q, L_k)
        q3 = query.reshape(b * kv_heads, groups * lq, d)
        k3, v3 = key.reshape(b * kv_heads, lk, d), value.reshape(b * kv_heads, lk, d)
        if not dropout:
            return _BiasedAttention.apply(q3, k3, v3, bias, scale).view(b, heads, lq, d)
        scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=scale)
        scores = scores.view(b, kv_heads, groups, lq, lk)
    else:
        scores = query.reshape(b, kv_heads, groups * lq, d) @ key.transpose(-1, -2)
        scores = scores * scale  # (B, H_kv, G*L_q, L_k)
        scores = scores.view(b, kv_heads, groups, lq, lk).masked_fill(~mask, float("-inf"))
    dtype = torch.promote_types(query.dtype, torch.float32)
    weights = torch.softmax(scores, dim=-1, dtype=dtype).to(query.dtype)
    if dropout:
        weights = F.dropout(weights, p=dropout, training=True)
    out = weights.view(b, kv_heads, groups * lq, lk) @ value  # (1, H_kv, G*L_q, D)
    return out.view(b, heads, lq, d)


@functools.lru_cache(maxsize=16)
def _causal_bias(
    lq: int, lk: int, groups: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive causal bias (0 where key j <= query i + L_k - L_q, else -inf), G times stacked.

    One tensor per shape, shared by every layer and step that meets the shape (never written);
    a step meets a few shapes, so a small cache serves it. Built outside inference mode, so a
    bias first made under ``torch.inference_mode`` still serves a training forward.

    Args:
        lq: Queries.
        lk: Keys (the queries are the last L_q of them).
        groups: Query heads per key/value head (the bias is stacked that many times).
        dtype: The scores' dtype.
        device: Where the scores live.

    Returns:
        The bias.

    Shapes:
        returns (G * L_q, L_k).
    """
    with torch.inference_mode(False):
        mask = torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)
        bias = torch.zeros(lq, lk, dtype=dtype, device=device)
        return bias.masked_fill_(~mask, float("-inf")).repeat(groups, 1)


class _BiasedAttention(torch.autograd.Function):
    """O = softmax(Q K^T * scale + bias) V with a hand-written backward.

    Forward as :func:`doc_attention` writes it: S = baddbmm(bias, Q, K^T, alpha=scale), the
    softmax in fp32 (at least) rounded once to the compute dtype, P; O = P V. Backward:

        dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dP * P)),
        dQ = dS K * scale,   dK = dS^T Q * scale

    with P the rounded probabilities the forward multiplied (the softmax gradient is taken from
    those compute-dtype tensors by ``_softmax_backward_data``, whose CPU kernel accumulates
    reduced-precision inputs in fp32). Autograd of the same forward would keep P in fp32 for
    the softmax gradient: in bf16 that is twice the memory per score, and for several
    documents batched together (:func:`packed_attention`) the fp32 scores fall out of cache,
    1.5-2x slower forward + backward (16 documents of 100 tokens, 9 query / 3 key-value heads
    of 64, AMD EPYC). In fp32 and fp64 the two are the same computation. First derivatives
    only (``once_differentiable``), and only those asked for.

    Shapes:
        q: (B, M, D); k, v: (B, L_k, D); bias: broadcastable to (B, M, L_k); returns (B, M, D).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
        dtype = torch.promote_types(q.dtype, torch.float32)
        weights = torch.softmax(scores, dim=-1, dtype=dtype).to(q.dtype)
        ctx.save_for_backward(q, k, v, weights)
        ctx.scale = scale
        return torch.bmm(weights, v)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, weights = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        grad_q = grad_k = grad_v = None
        if need_v:
            grad_v = torch.bmm(weights.transpose(1, 2), grad)
        if need_q or need_k:
            grad_weights = torch.bmm(grad, v.transpose(1, 2))
            grad_scores = torch._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
            if need_q:
                grad_q = torch.bmm(grad_scores, k).mul_(ctx.scale)
            if need_k:
                grad_k = torch.bmm(grad_scores.transpose(1, 2), q).mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None, None


GROUP_OVERHEAD = 9_000
"""Fixed cost of one attention call, in (query, key) position pairs of one document: a call
costs about 0.3 ms forward + backward whatever its size, and one pair of all 9 query heads
about 32 ns (SmolLM2-135M's 9 query / 3 key-value heads of 64, bf16, AMD EPYC, 1-16 documents
of 32-250 tokens)."""

GROUP_MAX_DOCS = 64
"""At most this many documents share one padded call (bounds the grouping search)."""


@dataclass(frozen=True)
class GroupPlan:
    """Documents of a packed row batched by length for :func:`packed_attention`.

    Attributes:
        shapes: Per group, its document count ``b`` and padded length ``L``.
        gather: (sum of b * L,) row positions, group after group: each document's positions,
            then its last position repeated up to ``L`` (the repeats are padding queries and
            keys; the causal mask keeps every real query off them).
        back: (N,) index into the groups' outputs stacked (b * L rows per group, in group
            order) of each position of the row.
        slots: (sum of b * L,) the row position each stacked slot holds, N for a padding slot.
    """

    shapes: tuple[tuple[int, int], ...]
    gather: torch.Tensor
    back: torch.Tensor
    slots: torch.Tensor


def length_groups(
    lengths: tuple[int, ...], overhead: int = GROUP_OVERHEAD, max_docs: int = GROUP_MAX_DOCS
) -> list[list[int]]:
    """Partition documents into groups, each padded to its longest, at the least modelled cost.

    cost = sum over groups g of (overhead + |g| * max_g^2), minimised over groups of
    consecutive documents in descending length order (an optimal partition has that form: a
    group's cost depends only on its size and longest member) of at most ``max_docs``
    documents, by dynamic programming over prefixes of that order.

    Args:
        lengths: Document lengths (tokens).
        overhead: Cost of one call in (query, key) pairs.
        max_docs: Largest group.

    Returns:
        Document indices per group, longest documents first.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: least cost of the first j documents of order
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_docs), j):
            cost = best[i] + overhead + (j - i) * lengths[order[i]] ** 2
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


@functools.lru_cache(maxsize=8)
def group_plan(lengths: tuple[int, ...], device: torch.device) -> GroupPlan:
    """The gather and scatter indices of :func:`length_groups`' partition.

    Cached (every layer of a forward meets the same lengths), and built outside inference
    mode, so a plan first made under ``torch.inference_mode`` still serves a training forward.
    Empty documents hold no position and join no group.

    Args:
        lengths: Document lengths of the packed row (sum N).
        device: Where the indices live.

    Returns:
        The plan.

    Shapes:
        gather, slots: (S,) with S = sum over groups of b * L; back: (N,).
    """
    with torch.inference_mode(False):
        return _group_plan(lengths, device)


def _group_plan(lengths: tuple[int, ...], device: torch.device) -> GroupPlan:
    """:func:`group_plan` itself."""
    starts = [0, *itertools.accumulate(lengths)]
    shapes, gather, slots, back = [], [], [], [0] * starts[-1]
    nonempty = tuple(i for i, size in enumerate(lengths) if size)
    for part in length_groups(tuple(lengths[i] for i in nonempty)):
        members = [nonempty[i] for i in part]
        longest = max(lengths[i] for i in members)
        for doc in members:
            first, size = starts[doc], lengths[doc]
            for t in range(size):
                back[first + t] = len(gather) + t
            gather.extend(range(first, first + size))
            gather.extend([first + size - 1] * (longest - size))
            slots.extend(range(first, first + size))
            slots.extend([starts[-1]] * (longest - size))
        shapes.append((len(members), longest))
    as_index = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return GroupPlan(tuple(shapes), as_index(gather), as_index(back), as_index(slots))


class _PadDocuments(torch.autograd.Function):
    """x.index_select(1, gather) whose backward reads each position's own slot only.

    Autograd's backward of a gather zero-fills the input's shape and scatter-adds every slot
    into it (0.9 ms for 9 heads x 1,344 positions, bf16). Here the gradient reaching a padding
    slot is exactly zero: no real query attends to a padding key (causal, right padding), and a
    padding query's output is dropped, so its probabilities' gradient is zero and so are the
    key and value gradients it would send. The input's gradient is then the gradient at each
    position's own slot, one ``index_select`` through ``back`` (0.06 ms), the same values.

    Shapes:
        x: (H, N, D); gather: (S,); back: (N,); returns (H, S, D).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        gather: torch.Tensor,
        back: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(back)
        return x.index_select(1, gather)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (back,) = ctx.saved_tensors
        return grad.index_select(1, back), None, None


class _UnpadDocuments(torch.autograd.Function):
    """stacked.index_select(0, back): the row's positions from the groups' padded outputs.

    Backward: each slot's gradient is its position's (a zero row appended for the padding
    slots, ``slots`` pointing there), one ``index_select`` instead of autograd's zero-fill and
    scatter-add; the same values.

    Shapes:
        stacked: (S, H, D); back: (N,); slots: (S,); returns (N, H, D).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        stacked: torch.Tensor,
        back: torch.Tensor,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(slots)
        return stacked.index_select(0, back)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (slots,) = ctx.saved_tensors
        padded = torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])])
        return padded.index_select(0, slots), None, None


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: list[int],
    scale: float | None,
) -> torch.Tensor:
    """Causal attention within each document of a packed row, documents batched by length.

    Per document, :func:`doc_attention` is a few small products plus their bookkeeping, run once
    per document per layer (16 documents x 30 layers a step for SmolLM2 SFT). Here documents of
    similar length are gathered into one right-padded batch per group (:func:`length_groups`
    trades padding against calls) and each group is one causal :func:`doc_attention` call:
    right padding under a causal mask leaves every real query's keys exactly the document's
    own. The padded positions' outputs are dropped, so they get no gradient. Per layer
    forward + backward, 16 documents of 50-135 tokens (SmolLM2-135M heads, bf16, AMD EPYC):
    about 10 ms against 14.6 ms one document at a time.

    Args:
        query: Queries of the packed row.
        key: Keys.
        value: Values.
        lengths: Document lengths (sum N).
        scale: Softmax scale.

    Returns:
        The attention output, positions in row order.

    Shapes:
        query: (1, H, N, D); key, value: (1, H_kv, N, D); returns (1, N, H, D).
    """
    plan = group_plan(tuple(lengths), query.device)
    heads, d = query.shape[1], query.shape[3]
    sizes = [b * longest for b, longest in plan.shapes]
    pieces = [
        _PadDocuments.apply(t[0], plan.gather, plan.back).split(sizes, dim=1)
        for t in (query, key, value)
    ]
    outputs = []
    for (b, longest), q, k, v in zip(plan.shapes, *pieces, strict=True):
        q, k, v = (t.view(t.shape[0], b, longest, d).transpose(0, 1) for t in (q, k, v))
        out = doc_attention(q, k, v, None, scale, 0.0)  # (b, H, L, D)
        outputs.append(out.transpose(1, 2).reshape(b * longest, heads, d))
    return _UnpadDocuments.apply(torch.cat(outputs), plan.back, plan.slots)[None]
