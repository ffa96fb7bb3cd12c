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

DEFAULT_CHUNK_ELEMENTS = 1 << 24
"""Elements in one fp32 (chunk, V) block: 16M floats = 64 MB."""


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 for low-precision inputs; fp64 stays fp64 (exact reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_rows(vocab_size: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // vocab_size)


class _LinearLogprobs(torch.autograd.Function):
    """Chunked head-matmul + fp32 log-softmax + gather with a recomputing backward."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        chunk_rows: int,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_rows):
            stop = min(start + chunk_rows, n)
            logits = (hidden[start:stop] @ weight.T).float()  # (n_c, V)
            if temperature != 1.0:
                logits.div_(temperature)
            lse[start:stop] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, targets[start:stop, None]).squeeze(1)
            logprobs[start:stop] = picked - lse[start:stop]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        return logprobs

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, lse = ctx.saved_tensors
        temperature, chunk_rows = ctx.temperature, ctx.chunk_rows
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_out = grad_out.float()
        for start in range(0, hidden.shape[0], chunk_rows):
            stop = min(start + chunk_rows, hidden.shape[0])
            h = hidden[start:stop]
            logits = (h @ weight.T).float()  # (n_c, V)
            if temperature != 1.0:
                logits.div_(temperature)
            probs = logits.sub_(lse[start:stop, None]).exp_()  # softmax, in place
            g = grad_out[start:stop, None]
            grad_logits = probs.mul_(-g)  # (n_c, V): g * (onehot - p)
            grad_logits.scatter_add_(1, targets[start:stop, None], g)
            if temperature != 1.0:
                grad_logits.div_(temperature)
            grad_logits = grad_logits.to(hidden.dtype)
            if need_h:
                grad_h[start:stop] = grad_logits @ weight
            if need_w:
                grad_w += (grad_logits.T @ h).float()  # (V, H)
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Log-probabilities of ``targets`` under ``softmax(hidden @ weight.T / temperature)``.

    Never materialises more than one (chunk_rows, V) fp32 block, in forward or backward.

    Args:
        hidden: Final hidden states at the positions that predict the targets.
        weight: Output-embedding (language-model head) weight.
        targets: Token ids to score.
        temperature: Sampling temperature the logits are divided by.
        chunk_rows: Rows per chunk; default keeps a chunk at about 64 MB of fp32 logits.

    Returns:
        fp32 log-probabilities, one per row.

    Shapes:
        hidden: (N, H); weight: (V, H); targets: (N,); returns (N,).
    """
    if hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        return naive_linear_logprobs(hidden, weight, targets, temperature=temperature)
    rows = _chunk_rows(weight.shape[0], chunk_rows)
    return _LinearLogprobs.apply(hidden, weight, targets, float(temperature), rows)


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
