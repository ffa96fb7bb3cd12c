"""KL estimators between the policy and the reference (Schulman 2020, "Approximating KL").

Standard convention: samples y ~ pi_theta, Delta = log pi_theta(y) - log pi_ref(y),
r = pi_ref / pi_theta = exp(-Delta).

- ``k1 = -log r = Delta``: unbiased for KL(pi_theta || pi_ref), high variance, can be negative.
- ``k2 = Delta^2 / 2``: biased, low variance.
- ``k3 = r - 1 - log r = expm1(-Delta) + Delta``: unbiased and >= 0 (expm1 keeps it accurate
  for small Delta, where the naive form cancels catastrophically). Delta is clamped to [-20, 20].

As differentiable losses on fixed on-policy samples, E[grad k1] = 0, E[grad k2] is the gradient of
KL(pi_theta || pi_ref), and E[grad k3] is the gradient of the forward KL(pi_ref || pi_theta).
(The book's reference code uses the inverted ratio; rlhfkit does not.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Estimator = Literal["k1", "k2", "k3", "full"]

DELTA_CLAMP = 20.0


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi_theta - log pi_ref, elementwise (any shape, e.g. (B, T))."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi_theta - log pi_ref)^2 / 2, elementwise."""
    return 0.5 * (logprobs - ref_logprobs).square()


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = expm1(-Delta) + Delta with Delta = log pi_theta - log pi_ref clamped to [-20, 20]."""
    delta = (logprobs - ref_logprobs).clamp(-DELTA_CLAMP, DELTA_CLAMP)
    return torch.expm1(-delta) + delta


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
"""The estimators by name (docs/methods/policy.md, KL estimators)."""


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact per-position KL(pi_theta || pi_ref) over the vocabulary.

    KL_t = sum_v pi_theta(v | s_t) (log pi_theta - log pi_ref)(v | s_t), in fp32.

    Shapes:
        logits, ref_logits: (..., V); returns (...).
    """
    logprobs = F.log_softmax(logits.float(), dim=-1)
    ref = F.log_softmax(ref_logits.float(), dim=-1)
    return F.kl_div(ref, logprobs, log_target=True, reduction="none").sum(-1)


def adaptive_kl_coef(
    beta: float, kl: float, target: float, n_steps: int, horizon: int, clip: float = 0.2
) -> float:
    """Adaptive KL controller (Ziegler et al. 2019).

    beta <- beta * (1 + clip(KL / target - 1, -clip, clip) * n_steps / horizon).
    """
    error = min(max(kl / target - 1.0, -clip), clip)
    return beta * (1.0 + error * n_steps / horizon)


def linear_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    divergence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    temperature: float = 1.0,
    chunk_rows: int = 512,
) -> torch.Tensor:
    """Per-position ``divergence(logits, ref_logits)`` from final hidden states and head weights.

    Logits are h W^T / T for both models (fp32). Differentiable in ``hidden`` and ``weight``
    only (the reference's logits are computed without gradient); chunked over rows, each
    chunk's (rows, V) logits recomputed in the backward (activation checkpointing), so at most
    one chunk of each model's logits exists at a time.

    Shapes:
        hidden: (N, H); weight: (V, H); ref_hidden: (N, H'); ref_weight: (V, H');
        returns (N,) fp32.
    """

    def chunk(h: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return divergence((h @ w.T).float() / temperature, ref)

    parts = []
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        with torch.no_grad():
            ref = (ref_hidden[rows] @ ref_weight.T).float() / temperature  # (n, V)
        parts.append(checkpoint(chunk, hidden[rows], weight, ref, use_reentrant=False))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def linear_full_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_rows: int = 512,
) -> torch.Tensor:
    """Exact per-position KL(pi_theta || pi_ref) from final hidden states and head weights.

    KL_i = sum_v p_iv (log p_iv - log q_iv), p = softmax(h_i W^T / T), q = softmax(h'_i W'^T / T)
    (:func:`linear_divergence` with :func:`full_kl`).

    Shapes:
        hidden, ref_hidden: (N, H); weight, ref_weight: (V, H); returns (N,) fp32.
    """
    return linear_divergence(
        hidden, weight, ref_hidden, ref_weight, full_kl, temperature=temperature,
        chunk_rows=chunk_rows,
    )  # fmt: skip
