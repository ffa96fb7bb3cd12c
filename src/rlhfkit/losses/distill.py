"""Distillation losses on per-token distributions (RLHF book ch. 12; GKD, Agarwal et al. 2024).

With the teacher's distribution P = softmax(z_T / tau) and the student's Q = softmax(z_S / tau)
at one position:

- forward KL(P || Q) = sum_v P (log P - log Q): word-level KD (Hinton et al.; SFT on the
  teacher's soft labels up to the constant H(P)); mass-covering.
- reverse KL(Q || P) = sum_v Q (log Q - log P): mode-seeking; what on-policy distillation
  minimises on the student's own samples.
- generalised JSD with interpolation beta in [0, 1] (GKD):

      JSD_beta(P || Q) = beta KL(P || M) + (1 - beta) KL(Q || M),   M = beta P + (1 - beta) Q,

  the mixture M taken in probability space (log M = logsumexp(log beta + log P,
  log(1 - beta) + log Q)). beta = 0 and beta = 1 are defined as the forward and the reverse KL,
  which JSD_beta / beta and JSD_beta / (1 - beta) tend to at the two ends (JSD_beta itself
  vanishes there); beta = 0.5 is the symmetric Jensen-Shannon divergence.

A temperature tau divides both models' logits; the divergence is multiplied by tau^2 so that
gradient magnitudes do not shrink with tau (Hinton et al. 2015).

Top-k with a tail bucket (for large vocabularies): the divergence is taken over the K ids the
student ranks highest plus one bucket holding the rest of each distribution's mass,
log(1 - sum_topK p) = log(-expm1(logsumexp(log p_topK))). With K = V it is the full divergence.

The teacher's side never gets a gradient. :func:`distill_divergence` evaluates any of these from
final hidden states and head weights chunk by chunk (:func:`rlhfkit.ops.kl.linear_divergence`),
so no (tokens x vocabulary) tensor is kept for both models at once.

Shapes: logits (..., V) for both models (the same V: a shared tokenizer); per-position values
(...) fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhfkit.ops.compiled import compiled
from rlhfkit.ops.kl import linear_divergence
from rlhfkit.ops.logprobs import sum_in_fp32

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(student log-probs, teacher log-probs) over the same buckets -> per-position divergence."""


CHUNK_ELEMENTS = 2**26
"""Logits per model in one chunk of the summed training divergence (rows = this // V)."""

LOG_FLOOR = -1e4
"""Log-probabilities are clamped from below here, so that buckets of zero mass (log 0) add 0,
with a zero gradient, instead of 0 * inf."""


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) over the last dimension (0 log 0 = 0)."""
    log_p, log_q = log_p.clamp(min=LOG_FLOOR), log_q.clamp(min=LOG_FLOOR)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def forward_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) from log-probabilities over the same buckets.

    Shapes:
        student, teacher: (..., K) log-probs; returns (...).
    """
    return _kl(teacher, student)


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) from log-probabilities over the same buckets.

    Shapes:
        student, teacher: (..., K) log-probs; returns (...).
    """
    return _kl(student, teacher)


def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float) -> torch.Tensor:
    """GKD's JSD_beta(teacher || student); beta 0 / 1 are the forward / reverse KL.

    JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, with P the
    teacher and Q the student.

    Shapes:
        student, teacher: (..., K) log-probs; returns (...).

    Raises:
        ValueError: beta outside [0, 1].
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student, teacher)
    if beta == 1.0:
        return reverse_kl(student, teacher)
    mixture = torch.logaddexp(teacher + math.log(beta), student + math.log1p(-beta))
    return beta * _kl(teacher, mixture) + (1.0 - beta) * _kl(student, mixture)


def log_tail(top: torch.Tensor) -> torch.Tensor:
    """log(1 - sum_k exp(top_k)): the log of the mass outside the given log-probabilities.

    Computed as log(-expm1(logsumexp(top))), accurate for tails near 0 and near 1, and floored
    at the smallest normal float (mass 1e-38) when the ids hold all the mass.

    Shapes:
        top: (..., K) log-probs; returns (..., 1).
    """
    lse = torch.logsumexp(top, dim=-1, keepdim=True).clamp(max=0.0)
    return torch.log((-torch.expm1(lse)).clamp(min=torch.finfo(torch.float32).tiny))


def top_k_buckets(
    student: torch.Tensor, teacher: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both distributions over the student's top-k ids plus one tail bucket.

    Each row's K + 1 buckets are log p(v) for the K ids the student ranks highest and
    log(1 - sum_topK p) for the rest; they sum (in probability) to 1 for both models.

    Shapes:
        student, teacher: (..., V) log-probs; returns two (..., K + 1) log-prob tensors.
    """
    k = min(k, student.shape[-1])
    ids = student.topk(k, dim=-1).indices  # (..., K)
    out = []
    for logp in (student, teacher):
        top = logp.gather(-1, ids)  # (..., K)
        out.append(torch.cat([top, log_tail(top)], dim=-1))
    return out[0], out[1]


@dataclass(frozen=True)
class DistillLoss:
    """One per-position distillation divergence, as the config names it.

    Attributes:
        beta: GKD's interpolation: 0 forward KL(teacher || student), 1 reverse KL, in between
            the generalised JSD.
        temperature: tau dividing both models' logits (the divergence is scaled by tau^2).
        top_k: Compare over the student's top-k ids plus a tail bucket (None: the whole
            vocabulary).
        compile: In :func:`distill_divergence_sum` over the whole vocabulary, run each chunk's
            elementwise work compiled (:data:`jsd_chunk_compiled`) instead of eagerly.
    """

    beta: float = 0.5
    temperature: float = 1.0
    top_k: int | None = None
    compile: bool = True

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The divergence at each position, from logits already divided by the temperature.

        Shapes:
            student_logits, teacher_logits: (..., V); returns (...) fp32 (fp64 for fp64 input).
        """
        student = F.log_softmax(_at_least_fp32(student_logits), dim=-1)
        teacher = F.log_softmax(_at_least_fp32(teacher_logits), dim=-1)
        if self.top_k is not None:
            student, teacher = top_k_buckets(student, teacher, self.top_k)
        return generalized_jsd(student, teacher, self.beta) * self.temperature**2

    def from_logits(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor
    ) -> torch.Tensor:
        """The divergence at each position from raw logits (divided by the temperature here).

        Shapes:
            student_logits, teacher_logits: (..., V); returns (...) fp32.
        """
        t = self.temperature
        return self(_at_least_fp32(student_logits) / t, _at_least_fp32(teacher_logits.detach()) / t)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log softmax(logits / temperature) in at least fp32, upcast inside the softmax kernel.

    Shapes:
        logits: (n, V) in any float dtype; returns (n, V) fp32 (fp64 for fp64 logits).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if temperature == 1.0:
        return F.log_softmax(logits, dim=-1, dtype=dtype)
    return F.log_softmax(logits.to(dtype) / temperature, dim=-1)


def _jsd_value_and_grad(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """JSD_beta at temperature tau and its gradient with respect to z / tau, sharing their terms.

    With s, t the log-probabilities and Q = exp(s), P = exp(t) the probabilities of the student
    and the teacher, M = beta P + (1 - beta) Q is formed in probability space (one logarithm
    where logaddexp of the log-probabilities takes two transcendental passes) and
    r = (1 - beta)(s - log M). Then JSD_beta = beta sum_v P (t - log M) + sum_v Q r, and since
    d JSD / d Q_v = r_v (the other terms cancel), through the softmax the gradient is
    Q (r - sum_v Q r). beta = 0 is the forward KL (gradient Q - P), beta = 1 the reverse KL
    (r = s - t). The values equal :func:`generalized_jsd`'s; log M is floored at ``LOG_FLOOR``
    where both distributions underflow (those terms carry no mass).

    Shapes:
        student_logits, teacher_logits: (n, V), any float dtype; returns (n,) and (n, V) in
        at least fp32.
    """
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    q, p = s.exp(), t.exp()
    if beta == 0.0:
        return (p * t.sub_(s)).sum(-1), q.sub_(p)
    if beta == 1.0:
        r = s.sub_(t)
        value = None
    else:
        log_m = torch.lerp(q, p, beta).log_().clamp_(min=LOG_FLOOR)
        value = beta * (p * t.sub_(log_m)).sum(-1)
        r = s.sub_(log_m).mul_(1.0 - beta)
    qr = (q * r).sum(-1, keepdim=True)
    value = qr[..., 0] if value is None else value.add_(qr[..., 0])
    return value, q.mul_(r.sub_(qr))


def jsd_chunk(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float,
    grad_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One chunk of the training divergence: tau^2 JSD_beta(z / tau) and its gradient in z.

    d (tau^2 D(z / tau)) / d z = tau dD / d(z / tau). The eager reference of
    :data:`jsd_chunk_compiled`.

    Shapes:
        student_logits, teacher_logits: (n, V); returns (n,) fp32 and (n, V) ``grad_dtype``.
    """
    value, grad = _jsd_value_and_grad(student_logits, teacher_logits, beta, temperature)
    if temperature != 1.0:
        grad = grad.mul_(temperature)
    return value * temperature**2, grad.to(grad_dtype)


jsd_chunk_compiled = compiled(jsd_chunk)
""":func:`jsd_chunk` fused by ``torch.compile`` (eager where compilation fails)."""


class _FusedJSDSum(torch.autograd.Function):
    """The summed divergence over rows, its gradient computed in the forward pass.

    A loss that is a sum (here, the per-token divergence summed, then scaled by the caller)
    has a gradient known up to one scalar before the backward starts. So each chunk's two logit
    blocks are computed once: the value and the closed-form gradient come from the same
    log-probabilities, and the gradients of the student's hidden states and head go straight
    into (N, H) and (V, H) buffers. The backward only scales them by the upstream scalar: half
    the head matmuls of a checkpointed chunk, which recomputes its logits in the backward.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        beta: float,
        temperature: float,
        chunk_rows: int,
        compile_: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        chunk = jsd_chunk_compiled if compile_ else jsd_chunk
        n, t = hidden.shape[0], temperature
        per = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_h = hidden.new_empty(hidden.shape, dtype=torch.float32) if need_h else None
        parts_w: list[torch.Tensor] = []
        for start in range(0, n, chunk_rows):
            rows = slice(start, start + chunk_rows)
            per[rows], grad = chunk(
                hidden[rows] @ weight.T, teacher_hidden[rows] @ teacher_weight.T, beta, t,
                hidden.dtype,
            )  # fmt: skip
            if need_h:
                grad_h[rows] = grad @ weight
            if need_w:
                parts_w.append(grad.T @ hidden[rows])
        grad_w = sum_in_fp32(parts_w, weight.dtype) if need_w else None
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(per)
        return per.sum(), per

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_total: torch.Tensor, _grad_per: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_total.float()
        h_dtype, w_dtype = ctx.dtypes
        out_h = (grad_h * scale).to(h_dtype) if grad_h is not None else None
        out_w = grad_w * scale.to(w_dtype) if grad_w is not None else None
        return out_h, out_w, None, None, None, None, None, None


def distill_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    loss: DistillLoss,
    *,
    chunk_rows: int = 512,
) -> torch.Tensor:
    """Per-position divergence from both models' final hidden states and output heads.

    Each chunk of rows gets its two (rows, V) logit blocks and its divergence, checkpointed
    (the backward recomputes them and differentiates by autograd), so memory holds one chunk of
    logits per model. Gradients reach the student's ``hidden`` and ``weight`` only. For a
    per-token value with its own gradient (weights per position, say); the training loss, a sum,
    is :func:`distill_divergence_sum`, which this function is the autograd reference of.

    Shapes:
        hidden: (N, H); weight: (V, H); teacher_hidden: (N, H'); teacher_weight: (V, H');
        returns (N,) fp32.
    """
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    return linear_divergence(
        hidden, weight, teacher_hidden, teacher_weight, loss,
        temperature=loss.temperature, chunk_rows=chunk_rows,
    )  # fmt: skip


def distill_divergence_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    loss: DistillLoss,
    *,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The divergence summed over positions (differentiable) and per position (detached).

    The training loss of distillation is this sum over a normaliser, so over the whole
    vocabulary it is computed by :class:`_FusedJSDSum`: one pass over each chunk's logits gives
    the value and the gradient, which the backward only scales. With ``top_k`` it is
    :func:`distill_divergence` summed. ``chunk_rows`` None sizes the chunks to
    ``CHUNK_ELEMENTS`` logits per model (1,365 rows of a 49,152-word vocabulary): compiled, a
    chunk holds its two logit blocks and its gradient in the compute dtype, and fewer, larger
    chunks mean fewer partial head gradients to add up.

    Shapes:
        as :func:`distill_divergence`; returns () and (N,) fp32.
    """
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if loss.top_k is None:
        return _FusedJSDSum.apply(
            hidden, weight, teacher_hidden, teacher_weight, loss.beta, loss.temperature,
            chunk_rows, loss.compile,
        )  # fmt: skip
    per = distill_divergence(
        hidden, weight, teacher_hidden, teacher_weight, loss, chunk_rows=chunk_rows
    )
    return per.sum(), per.detach()


def sampled_reverse_kl(
    student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """The sampled-token estimate of KL(student || teacher): log q(a_t) - log p(a_t), a_t ~ q.

    Unbiased for the per-position reverse KL when a_t is the student's own sample; its negative
    is on-policy distillation's per-token advantage.

    Shapes:
        student_logprobs, teacher_logprobs: (...) log-probs of the sampled tokens; returns (...).
    """
    return student_logprobs - teacher_logprobs
