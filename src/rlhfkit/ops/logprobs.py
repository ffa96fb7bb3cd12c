"""The one place where logits meet labels: chunked fp32 log-probabilities of target tokens.

The language-model head of a 135M model with a 49,152-token vocabulary produces (N, V) logits
that dominate memory and time if materialised in fp32 for every position. ``linear_logprobs``
fuses the head's matmul with the log-softmax and the gather, one chunk of rows at a time, and
recomputes each chunk in the backward pass, so that at most one (chunk, V) fp32 block exists at
any moment. ``naive_linear_logprobs`` is the readable reference it is tested against.

Formula, for hidden state h_i, head weight W (V, H), temperature tau and target y_i:

    z_i = (W h_i) / tau,   logprob_i = z_i[y_i] - logsumexp(z_i)

Backward, for upstream gradient g_i and softmax p_i = softmax(z_i):

    dL/dz_i = g_i * (onehot(y_i) - p_i),   dL/dh_i = W^T dL/dz_i / tau,
    dL/dW = sum_i (dL/dz_i / tau) h_i^T
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_ELEMENTS = 1 << 25
"""Elements in one fp32 (chunk, V) block: 32M floats = 128 MB."""

DEFAULT_STORE_BYTES = 1 << 28
"""Keep the fp32 softmax for the backward when all chunks together fit in this many bytes
(256 MB); larger inputs recompute each chunk's logits in the backward instead."""


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 for low-precision inputs; fp64 stays fp64 (exact reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_rows(vocab_size: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // vocab_size)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 logits of one chunk. Shapes: h (n_c, H), weight (V, H); returns (n_c, V)."""
    logits = (h @ weight.T).float()  # (n_c, V)
    return logits.div_(temperature) if temperature != 1.0 else logits


class _LinearLogprobs(torch.autograd.Function):
    """Chunked head-matmul + fp32 log-softmax + gather.

    The backward uses the softmax kept from the forward when it is small enough
    (``store_bytes``), else recomputes each chunk's logits.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        chunk_rows: int,
        store_bytes: int,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        store = n * weight.shape[0] * 4 <= store_bytes
        ctx.probs = []
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            logits = _chunk_logits(hidden[start:stop], weight, temperature)  # (n_c, V)
            lse[start:stop] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[start:stop, None]).squeeze(1)
            logprobs[start:stop] = picked - lse[start:stop]
            if store:
                ctx.probs.append(logits.sub_(lse[start:stop, None]).exp_())  # softmax (n_c, V)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        return logprobs

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, lse = ctx.saved_tensors
        temperature, rows, n = ctx.temperature, ctx.chunk_rows, hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        parts_w: list[torch.Tensor] = []
        grad_out = grad_out.float()
        for index, start in enumerate(range(0, n, rows)):
            stop = min(start + rows, n)
            h = hidden[start:stop]
            if ctx.probs:
                probs = ctx.probs[index]  # (n_c, V), kept from the forward
            else:
                probs = _chunk_logits(h, weight, temperature).sub_(lse[start:stop, None]).exp_()
            g = grad_out[start:stop, None]
            grad_logits = probs.mul(-g)  # (n_c, V): g * (onehot - p)
            grad_logits.scatter_add_(1, targets[start:stop, None], g)
            if temperature != 1.0:
                grad_logits.div_(temperature)
            grad_logits = grad_logits.to(hidden.dtype)
            if need_h:
                grad_h[start:stop] = grad_logits @ weight
            if need_w:
                parts_w.append(grad_logits.T @ h)  # (V, H)
        return (
            grad_h,
            sum_in_fp32(parts_w, weight.dtype) if need_w else None,
            None,
            None,
            None,
            None,
        )


def sum_in_fp32(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Sum chunk gradients, accumulating in fp32 when there is more than one; cast to ``dtype``."""
    if len(parts) == 1:
        return parts[0].to(dtype)
    total = parts[0].float()
    for part in parts[1:]:
        total += part
    return total.to(dtype)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
    store_bytes: int = DEFAULT_STORE_BYTES,
) -> torch.Tensor:
    """Log-probabilities of ``targets`` under ``softmax(hidden @ weight.T / temperature)``.

    Never materialises more than one (chunk_rows, V) fp32 block at a time beyond the kept
    softmax, which is at most ``store_bytes``.

    Args:
        hidden: Final hidden states at the positions that predict the targets.
        weight: Output-embedding (language-model head) weight.
        targets: Token ids to score.
        temperature: Sampling temperature the logits are divided by.
        chunk_rows: Rows per chunk; default keeps a chunk at about 128 MB of fp32 logits.
        store_bytes: Keep the fp32 softmax for the backward if it fits in this many bytes
            (saves recomputing the head matmul); 0 always recomputes.

    Returns:
        fp32 log-probabilities, one per row.

    Shapes:
        hidden: (N, H); weight: (V, H); targets: (N,); returns (N,).
    """
    if hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        return naive_linear_logprobs(hidden, weight, targets, temperature=temperature)
    rows = _chunk_rows(weight.shape[0], chunk_rows)
    return _LinearLogprobs.apply(hidden, weight, targets, float(temperature), rows, store_bytes)


def naive_linear_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """Reference for :func:`linear_logprobs`: full logits, log-softmax, gather.

    Shapes:
        hidden: (N, H); weight: (V, H); targets: (N,); returns (N,).
    """
    logits = _at_least_fp32(hidden @ weight.T) / temperature  # (N, V)
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def logits_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``targets`` from already computed logits, in fp32.

    Used when a model's head cannot be fused (logit soft-capping, scaling, biases).

    Shapes:
        logits: (..., V); targets: (...); returns (...) fp32.
    """
    return F.log_softmax(_at_least_fp32(logits), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


@torch.no_grad()
def linear_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Entropy of ``softmax(hidden @ weight.T / temperature)`` per row, chunked, no gradient.

    H_i = logsumexp(z_i) - sum_v p_iv z_iv.

    Shapes:
        hidden: (N, H); weight: (V, H); returns (N,) fp32.
    """
    rows = _chunk_rows(weight.shape[0], chunk_rows)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        logits = (hidden[start : start + rows] @ weight.T).float() / temperature  # (n_c, V)
        lse = torch.logsumexp(logits, dim=-1)
        out[start : start + rows] = lse - (logits.softmax(-1) * logits).sum(-1)
    return out
