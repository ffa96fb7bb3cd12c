"""Reference-free direct-alignment losses: SimPO and ORPO (docs/methods/direct_alignment.md).

They take the paired inputs of :mod:`rlhfkit.losses.preference` (the reference log-probs are
accepted and ignored, so a recipe calls every row of the table the same way) and build their
implicit rewards from per-token average log-probs, β·avg; ``displaced`` and
``delta_chosen_sum`` are 0. Loss math runs in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rlhfkit.losses._common import Number, loss_dtype, pair_output, per_token_avg
from rlhfkit.types import LossOutput

ORPO_MAX_AVG_LOGP = -1e-7
"""Cap on ORPO's average log-prob ℓ, so that log(1 − e^ℓ) is finite at p = 1. It must be
>= −1e-7, so that p = 1 − 1e-7 keeps its exact log-odds, 16.118096."""


def simpo_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor | None = None,
    ref_rejected_logprobs: torch.Tensor | None = None,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    normaliser: Number | None = None,
) -> LossOutput:
    """SimPO (Meng 2024), reference-free: l = softplus(−β(avg_c − avg_r − γ')).

    ``gamma_beta_ratio`` γ' = γ/β, so the paper's absolute margin is γ = βγ' (1.0 by
    default). The reference log-probs are ignored. Rewards β·avg logprobs.

    Returns:
        LossOutput with the module's metric sums (``displaced`` and ``delta_chosen_sum`` 0).

    Shapes:
        every tensor (N,); loss scalar.
    """
    avg_c = per_token_avg(
        values=chosen_logprobs, tokens=chosen_tokens, name="chosen_tokens"
    )  # (N,)
    avg_r = per_token_avg(
        values=rejected_logprobs, tokens=rejected_tokens, name="rejected_tokens"
    )  # (N,)
    per_pair = F.softplus(-beta * (avg_c - avg_r - gamma_beta_ratio))  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    return pair_output(
        per_pair=per_pair, rewards=(beta * avg_c, beta * avg_r), logprobs=logprobs, deltas=None,
        normaliser=normaliser,
    )  # fmt: skip


def orpo_log_odds(*, avg_logprobs: torch.Tensor) -> torch.Tensor:
    """log(p / (1 − p)) of p = exp(ℓ), computed as ℓ − log1mexp(ℓ) (ORPO).

    log1mexp(ℓ) = log(1 − e^ℓ) is log(−expm1(ℓ)) for ℓ > −log 2, else log1p(−e^ℓ) (both
    branches stay finite, so ``torch.where`` leaks no NaN gradient); ℓ is capped at
    :data:`ORPO_MAX_AVG_LOGP` so that p = 1 stays finite.

    Shapes:
        avg_logprobs: any shape; returns the same shape.
    """
    ell = avg_logprobs.to(loss_dtype(avg_logprobs)).clamp(max=ORPO_MAX_AVG_LOGP)
    near_zero = ell > -math.log(2)
    log1mexp = torch.where(near_zero, torch.log(-torch.expm1(ell)), torch.log1p(-torch.exp(ell)))
    return ell - log1mexp


def orpo_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor | None = None,
    ref_rejected_logprobs: torch.Tensor | None = None,
    beta: float = 0.1,
    lambda_: float = 0.1,
    normaliser: Number | None = None,
) -> LossOutput:
    """ORPO (Hong 2024), reference-free.

    l = −avg_c + λ·softplus(−(logodds(avg_c) − logodds(avg_r))) with avg = logprobs/|y| and
    logodds from :func:`orpo_log_odds`; ``lambda_`` λ = 0 gives the per-sequence SFT NLL of the
    chosen response. ``beta`` only scales the logged rewards β·avg logprobs. The reference
    log-probs are ignored.

    Returns:
        LossOutput with the module's metric sums plus ``nll_sum`` (sum of −avg_c),
        ``odds_loss_sum`` and ``log_odds_ratio_sum``.

    Shapes:
        every tensor (N,); loss scalar.
    """
    avg_c = per_token_avg(
        values=chosen_logprobs, tokens=chosen_tokens, name="chosen_tokens"
    )  # (N,)
    avg_r = per_token_avg(
        values=rejected_logprobs, tokens=rejected_tokens, name="rejected_tokens"
    )  # (N,)
    ratio = orpo_log_odds(avg_logprobs=avg_c) - orpo_log_odds(avg_logprobs=avg_r)  # (N,)
    odds_loss = F.softplus(-ratio)  # (N,)
    per_pair = -avg_c + lambda_ * odds_loss  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    extra = {"nll_sum": -avg_c.sum(), "odds_loss_sum": odds_loss.sum()}
    rewards = (beta * avg_c, beta * avg_r)
    return pair_output(
        per_pair=per_pair, rewards=rewards, logprobs=logprobs, deltas=None, normaliser=normaliser,
        **extra, log_odds_ratio_sum=ratio.sum(),
    )  # fmt: skip
