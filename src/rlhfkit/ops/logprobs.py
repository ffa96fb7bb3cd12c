"""The one place where logits meet labels: chunked fp32 log-probabilities of target tokens.

The language-model head of a 135M model with a 49,152-token vocabulary produces (N, V) logits
that dominate memory and time if materialised in fp32 for every position. ``linear_logprobs``
fuses the head's matmul with the log-softmax and the gather, one chunk of rows at a time, so
that no (N, V) fp32 tensor exists. ``naive_linear_logprobs`` is the readable reference it is
tested against.

Formula, for hidden state h_i, head weight W (V, H), temperature tau and target y_i:

    z_i = (W h_i) / tau,   logprob_i = z_i[y_i] - logsumexp(z_i)

Its derivative in the logits does not depend on the upstream gradient g_i, only its scale
does:

    D_i = d logprob_i / d (W h_i) = (onehot(y_i) - softmax(z_i)) / tau
    dL/dh_i = g_i W^T D_i,   dL/dW = sum_i D_i (g_i h_i)^T

So the forward pass computes D chunk by chunk, in the same fused pass over the logits as the
value (:func:`chunk_logprobs_grad`, compiled for large blocks), and with it W^T D_i, an (N, H)
block. The backward scales that block by g and forms dL/dW from the kept D: no elementwise work
over the (N, V) logits is left for it. When the kept D would exceed ``store_bytes``, the
backward recomputes each chunk's logits and D instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from rlhfkit.ops.compiled import compiled

DEFAULT_CHUNK_ELEMENTS = 1 << 25
"""Elements in one (chunk, V) logits block: 32M (64 MB in bf16)."""

DEFAULT_STORE_BYTES = 1 << 28
"""Keep every chunk's D for the backward when together they fit in this many bytes (256 MB,
about 2,700 positions of a 49,152-token vocabulary in bf16); larger inputs recompute each
chunk's logits in the backward instead."""

COMPILE_MIN_ELEMENTS = 1 << 20
"""Chunks with at least this many logits run the compiled twins of :func:`chunk_logprobs` and
:func:`chunk_logprobs_grad`; smaller ones (tiny test vocabularies) run eagerly, where compiling
would cost more than it saves."""


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """fp32 for low-precision inputs; fp64 stays fp64 (exact reference tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunk_rows(vocab_size: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // vocab_size)


Temperature = float | torch.Tensor
"""A temperature: a float, or a 0-dim tensor (how the compiled twins get it, so that one
compiled kernel serves every temperature)."""


def _div_(x: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    """Divide ``x`` by tau in place (nothing to do for a float 1)."""
    return x if isinstance(temperature, float) and temperature == 1.0 else x.div_(temperature)


def _scaled_logits(logits: torch.Tensor, temperature: Temperature) -> torch.Tensor:
    """The logits divided by tau, in at least fp32, as a new tensor (worked on in place)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True)
    return _div_(z, temperature)


def chunk_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: Temperature
) -> torch.Tensor:
    """Log-softmax(logits / tau) at each row's target, in at least fp32.

    Shapes:
        logits: (n, V); targets: (n,); returns (n,).
    """
    z = _scaled_logits(logits, temperature)
    return z.gather(1, targets[:, None]).squeeze(1).sub_(torch.logsumexp(z, dim=-1))


def chunk_logprobs_grad(
    logits: torch.Tensor, targets: torch.Tensor, temperature: Temperature, grad_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`chunk_logprobs` and its derivative in the logits, D = (onehot - softmax) / tau.

    Shapes:
        logits: (n, V); targets: (n,); returns (n,) in at least fp32 and (n, V) ``grad_dtype``.
    """
    z = _scaled_logits(logits, temperature)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
    value = z.gather(1, targets[:, None]).squeeze(1).sub_(lse.squeeze(1))
    d = z.sub_(lse).exp_().neg_()  # -softmax
    d = _div_(d, temperature).to(grad_dtype)
    # the target's entry (1 - p_y) / tau from the fp32 value: no cancellation in grad_dtype
    at_target = _div_(1.0 - value.exp(), temperature).to(grad_dtype)
    return value, d.scatter_(1, targets[:, None], at_target[:, None])


_chunk_logprobs_compiled = compiled(chunk_logprobs)
_chunk_logprobs_grad_compiled = compiled(chunk_logprobs_grad)


def _chunk_fns(
    elements: int, compile_: bool | None, temperature: float, device: torch.device
) -> tuple:
    """The (value, value-and-gradient) chunk functions, with the temperature bound.

    The compiled twins for blocks of at least :data:`COMPILE_MIN_ELEMENTS` logits, or as
    ``compile_`` says; the eager functions otherwise.
    """
    if elements >= COMPILE_MIN_ELEMENTS if compile_ is None else compile_:
        tau = torch.tensor(temperature, dtype=torch.float32, device=device)
        return (
            lambda z, y: _chunk_logprobs_compiled(z, y, tau),
            lambda z, y, dtype: _chunk_logprobs_grad_compiled(z, y, tau, dtype),
        )
    return (
        lambda z, y: chunk_logprobs(z, y, temperature),
        lambda z, y, dtype: chunk_logprobs_grad(z, y, temperature, dtype),
    )


def _chunk_values(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int, value_fn: Any
) -> torch.Tensor:
    """Log-probabilities only, ``rows`` positions at a time. Shapes: returns (N,) fp32."""
    out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        part = slice(start, start + rows)
        out[part] = value_fn(hidden[part] @ weight.T, targets[part])
    return out


class _LinearLogprobs(torch.autograd.Function):
    """Chunked head matmul + fp32 log-softmax + gather.

    The logits' derivative is formed in the forward pass and kept within ``store_bytes``, or
    else recomputed in the backward.
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
        compile_: bool | None,
    ) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, vocab = hidden.shape[0], weight.shape[0]
        value_fn, grad_fn = _chunk_fns(
            min(n, chunk_rows) * vocab, compile_, temperature, hidden.device
        )
        keep = (need_h or need_w) and n * vocab * hidden.element_size() <= store_bytes
        dh = hidden.new_empty(hidden.shape, dtype=torch.float32) if keep and need_h else None
        ctx.kept = []  # D per chunk, (n_c, V) in the hidden states' dtype
        if not keep:  # the backward recomputes each chunk
            logprobs = _chunk_values(hidden, weight, targets, chunk_rows, value_fn)
        else:
            logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
            for start in range(0, n, chunk_rows):
                rows = slice(start, start + chunk_rows)
                logprobs[rows], d = grad_fn(hidden[rows] @ weight.T, targets[rows], hidden.dtype)
                if need_h:
                    dh[rows] = d @ weight  # W^T D_i, (n_c, H)
                if need_w:
                    ctx.kept.append(d)
        ctx.save_for_backward(hidden, weight, targets, dh)
        ctx.settings = chunk_rows, keep, grad_fn
        return logprobs

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, dh = ctx.saved_tensors
        rows_per, keep, grad_fn = ctx.settings
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad_out.float()[:, None]  # (N, 1)
        grad_h = (dh * g).to(hidden.dtype) if keep and need_h else None
        if not keep and need_h:
            grad_h = torch.empty_like(hidden)
        parts_w: list[torch.Tensor] = []
        for index, start in enumerate(range(0, hidden.shape[0], rows_per)):
            rows = slice(start, start + rows_per)
            if keep:
                if not need_w:
                    break
                d = ctx.kept[index]
            else:
                _, d = grad_fn(hidden[rows] @ weight.T, targets[rows], hidden.dtype)
                if need_h:
                    grad_h[rows] = ((d @ weight).float() * g[rows]).to(hidden.dtype)
            if need_w:
                scaled = (hidden[rows].float() * g[rows]).to(hidden.dtype)  # g_i h_i
                parts_w.append(d.T @ scaled)  # (V, H)
        grad_w = sum_in_fp32(parts_w, weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None, None


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
    compile: bool | None = None,
) -> torch.Tensor:
    """Log-probabilities of ``targets`` under ``softmax(hidden @ weight.T / temperature)``.

    Never materialises more than one (chunk_rows, V) logits block at a time beyond the kept
    derivatives, which are at most ``store_bytes``.

    Args:
        hidden: Final hidden states at the positions that predict the targets.
        weight: Output-embedding (language-model head) weight.
        targets: Token ids to score.
        temperature: Sampling temperature the logits are divided by.
        chunk_rows: Rows per chunk; default keeps a chunk at about 32M logits.
        store_bytes: Keep the logits' derivative for the backward if it fits in this many
            bytes (saves recomputing the head matmul); 0 always recomputes.
        compile: Run each chunk's elementwise work compiled (True), eagerly (False), or
            compiled for chunks of at least :data:`COMPILE_MIN_ELEMENTS` logits (None).

    Returns:
        fp32 log-probabilities, one per row.

    Shapes:
        hidden: (N, H); weight: (V, H); targets: (N,); returns (N,).
    """
    if hidden.dtype == torch.float64 or weight.dtype == torch.float64:
        return naive_linear_logprobs(hidden, weight, targets, temperature=temperature)
    rows = _chunk_rows(weight.shape[0], chunk_rows)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearLogprobs.apply(
            hidden, weight, targets, float(temperature), rows, store_bytes, compile
        )
    elements = min(hidden.shape[0], rows) * weight.shape[0]
    value_fn, _ = _chunk_fns(elements, compile, temperature, hidden.device)
    return _chunk_values(hidden, weight, targets, rows, value_fn)


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
