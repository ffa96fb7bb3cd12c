"""Direct-alignment (DPO family) losses (docs/methods/direct_alignment.md).

Paired losses take per-pair sequence quantities: ``chosen_logprobs`` / ``rejected_logprobs`` the
summed response log-probs under the policy (with grad); ``ref_chosen_logprobs`` /
``ref_rejected_logprobs`` the same under the frozen reference (detached here; ``None`` for the
reference-free losses, which ignore them); ``chosen_tokens`` / ``rejected_tokens`` the response
lengths (for per-token averages "avg" = sum / length); ``beta``; ``normaliser``, the global
number of pairs of the optimiser batch (summed over micro-batches and ranks by the caller;
default the local N). Every paired loss accepts all six tensors, so a recipe calls any row of
:data:`PREFERENCE_LOSSES` the same way. Notation: Δ_c = logp_c − ref_c, Δ_r = logp_r − ref_r,
h = Δ_c − Δ_r.

Each loss returns L = sum_i l_i / normaliser and detached metric *sums* (they add up across
micro-batches; divide by ``pairs`` for means): ``pairs``, ``loss_sum``, ``chosen_rewards_sum``
/ ``rejected_rewards_sum`` (the loss's implicit rewards: βΔ, or β·avg logprobs for reference-free
losses), ``margin_sum`` (reward_c − reward_r), ``correct`` (reward_c > reward_r, ties 0.5),
``chosen_logprobs_sum`` / ``rejected_logprobs_sum``, ``displaced`` (pairs with Δ_c < 0 and Δ_r < 0:
preference displacement) and ``delta_chosen_sum`` (summed Δ_c); the last two are 0 for
reference-free losses. Loss math runs in fp32 (fp64 for fp64 inputs).

Every tensor argument, of the losses and of their helpers, is keyword-only, so that chosen and
rejected (or policy and reference) log-probs cannot be swapped by position.

The file is longer than ~400 lines because twelve losses repeat one keyword-only signature
(the uniform call of the table), call their helpers by keyword and each documents its own
formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhfkit.types import LossOutput

Number = float | torch.Tensor
Pair = tuple[torch.Tensor, torch.Tensor]
ORPO_MAX_AVG_LOGP = -1e-7
"""Cap on ORPO's average log-prob ℓ, so that log(1 − e^ℓ) is finite at p = 1. It must be
>= −1e-7, so that p = 1 − 1e-7 keeps its exact log-odds, 16.118096."""


def _dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _safe_div(total: torch.Tensor, normaliser: Number) -> torch.Tensor:
    """``total / normaliser`` where a zero normaliser (nothing to count) gives 0, not NaN."""
    norm = torch.as_tensor(normaliser, dtype=total.dtype, device=total.device)
    return total / torch.where(norm == 0, torch.ones_like(norm), norm)


def _deltas(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor | None,
    ref_rejected_logprobs: torch.Tensor | None,
) -> Pair:
    """(Δ_c, Δ_r) in the loss dtype; the reference log-probs never carry gradient."""
    if ref_chosen_logprobs is None or ref_rejected_logprobs is None:
        raise ValueError(
            "this loss needs ref_chosen_logprobs and ref_rejected_logprobs (reference log-probs); "
            "simpo and orpo train without a reference"
        )
    dt = _dtype(chosen_logprobs)
    d_c = chosen_logprobs.to(dt) - ref_chosen_logprobs.detach().to(dt)  # (N,)
    d_r = rejected_logprobs.to(dt) - ref_rejected_logprobs.detach().to(dt)  # (N,)
    return d_c, d_r


def _avg(*, values: torch.Tensor, tokens: torch.Tensor | None, name: str) -> torch.Tensor:
    """Per-token average ``values / tokens`` (lengths below 1 count as 1)."""
    if tokens is None:
        raise ValueError(f"this loss uses per-token averages: pass {name} (response lengths)")
    v = values.to(_dtype(values))
    return v / tokens.to(v.dtype).clamp(min=1)  # (N,)


def _output(
    *,
    per_pair: torch.Tensor,
    rewards: Pair,
    logprobs: Pair,
    deltas: Pair | None,
    normaliser: Number | None,
    **extra: torch.Tensor,
) -> LossOutput:
    """L = sum_i l_i / normaliser and the module's detached metric sums (plus ``extra``)."""
    total = per_pair.sum()
    loss = _safe_div(total, per_pair.numel() if normaliser is None else normaliser)
    margin = rewards[0] - rewards[1]  # (N,)
    d_c, d_r = deltas if deltas is not None else (torch.zeros_like(margin),) * 2
    metrics = {
        "pairs": torch.tensor(float(per_pair.numel()), device=per_pair.device),
        "loss_sum": total,
        "chosen_rewards_sum": rewards[0].sum(),
        "rejected_rewards_sum": rewards[1].sum(),
        "margin_sum": margin.sum(),
        "correct": (margin > 0).sum() + 0.5 * (margin == 0).sum(),
        "chosen_logprobs_sum": logprobs[0].sum(),
        "rejected_logprobs_sum": logprobs[1].sum(),
        "displaced": ((d_c < 0) & (d_r < 0)).sum(),
        "delta_chosen_sum": d_c.sum(),
        **extra,
    }
    return LossOutput(loss=loss, metrics={k: v.detach().double() for k, v in metrics.items()})


def dpo_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    normaliser: Number | None = None,
) -> LossOutput:
    """DPO (Rafailov 2023, eq. 7): l = −log σ(βh) = softplus(−βh).

    ∂l/∂h = −β σ(−βh); implicit rewards βΔ_c, βΔ_r. The lengths are unused.

    Returns:
        LossOutput with the module's metric sums.

    Shapes:
        every tensor (N,); loss scalar.
    """
    d_c, d_r = _deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    per_pair = F.softplus(-beta * (d_c - d_r))  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    return _output(
        per_pair=per_pair, rewards=(beta * d_c, beta * d_r), logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser,
    )  # fmt: skip


def cdpo_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: Number = 0.1,
    normaliser: Number | None = None,
) -> LossOutput:
    """Conservative DPO (Mitchell 2023): l = −(1−ε) log σ(βh) − ε log σ(−βh).

    ``label_smoothing`` ε is the probability that a label is flipped; the minimiser is finite,
    h* = log((1−ε)/ε)/β, with l(h*) = H_b(ε). ε = 0 gives DPO.

    Returns:
        LossOutput with the module's metric sums (rewards βΔ).

    Shapes:
        every tensor (N,); ``label_smoothing`` scalar or (N,); loss scalar.
    """
    d_c, d_r = _deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    x = beta * (d_c - d_r)  # (N,)
    per_pair = (1 - label_smoothing) * F.softplus(-x) + label_smoothing * F.softplus(x)
    logprobs = (chosen_logprobs, rejected_logprobs)
    return _output(
        per_pair=per_pair, rewards=(beta * d_c, beta * d_r), logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser,
    )  # fmt: skip


def ipo_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    average_logprobs: bool = False,
    normaliser: Number | None = None,
) -> LossOutput:
    """IPO (Azar 2023): l = (h − 1/(2β))², minimised at h = 1/(2β).

    h is built from the summed log-probs (unscaled, 25 at init for β 0.1), or from per-token
    averages with ``average_logprobs`` (which then needs the lengths). Rewards βΔ of that h.

    Returns:
        LossOutput with the module's metric sums.

    Shapes:
        every tensor (N,); loss scalar.
    """
    d_c, d_r = _deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    a_c, a_r = (
        (
            _avg(values=d_c, tokens=chosen_tokens, name="chosen_tokens"),
            _avg(values=d_r, tokens=rejected_tokens, name="rejected_tokens"),
        )
        if average_logprobs
        else (d_c, d_r)
    )
    per_pair = (a_c - a_r - 1 / (2 * beta)) ** 2  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    return _output(
        per_pair=per_pair, rewards=(beta * a_c, beta * a_r), logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser,
    )  # fmt: skip


def dpo_norm_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 2.0,
    normaliser: Number | None = None,
) -> LossOutput:
    """Length-normalised DPO (Tülu 3): l = softplus(−β(Δ_c/|y_c| − Δ_r/|y_r|)).

    DPO on per-token average log-ratios, hence the larger default β 2.0. Rewards β·Δ/|y|.

    Returns:
        LossOutput with the module's metric sums.

    Shapes:
        every tensor (N,); loss scalar.
    """
    d_c, d_r = _deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    a_c = _avg(values=d_c, tokens=chosen_tokens, name="chosen_tokens")  # (N,)
    a_r = _avg(values=d_r, tokens=rejected_tokens, name="rejected_tokens")  # (N,)
    per_pair = F.softplus(-beta * (a_c - a_r))  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    return _output(
        per_pair=per_pair, rewards=(beta * a_c, beta * a_r), logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser,
    )  # fmt: skip


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
    avg_c = _avg(values=chosen_logprobs, tokens=chosen_tokens, name="chosen_tokens")  # (N,)
    avg_r = _avg(values=rejected_logprobs, tokens=rejected_tokens, name="rejected_tokens")  # (N,)
    per_pair = F.softplus(-beta * (avg_c - avg_r - gamma_beta_ratio))  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    return _output(
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
    ell = avg_logprobs.to(_dtype(avg_logprobs)).clamp(max=ORPO_MAX_AVG_LOGP)
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
    avg_c = _avg(values=chosen_logprobs, tokens=chosen_tokens, name="chosen_tokens")  # (N,)
    avg_r = _avg(values=rejected_logprobs, tokens=rejected_tokens, name="rejected_tokens")  # (N,)
    ratio = orpo_log_odds(avg_logprobs=avg_c) - orpo_log_odds(avg_logprobs=avg_r)  # (N,)
    odds_loss = F.softplus(-ratio)  # (N,)
    per_pair = -avg_c + lambda_ * odds_loss  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    extra = {"nll_sum": -avg_c.sum(), "odds_loss_sum": odds_loss.sum()}
    rewards = (beta * avg_c, beta * avg_r)
    return _output(
        per_pair=per_pair, rewards=rewards, logprobs=logprobs, deltas=None, normaliser=normaliser,
        **extra, log_odds_ratio_sum=ratio.sum(),
    )  # fmt: skip


def kto_z0(*, log_ratios: torch.Tensor) -> torch.Tensor:
    """KTO reference point z0 = max(0, mean(log π_θ − log π_ref)), detached (KTO).

    ``log_ratios`` are the mismatched pairs (x_i, y_{i+1}) of an extra forward pass, or the
    undesirable ones (:func:`kto_z0_batch_rejected`). Under data parallelism, all-gather them
    (or all-reduce their sum and count) first. No ratios gives 0.

    Shapes:
        log_ratios: (M,); returns a scalar.
    """
    r = log_ratios.detach().to(_dtype(log_ratios))
    return (r.sum() / max(r.numel(), 1)).clamp(min=0)


def kto_z0_batch_rejected(
    *, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, desirable: torch.Tensor
) -> torch.Tensor:
    """Cheap z0 (``z0="batch_rejected"``): :func:`kto_z0` of the undesirable log-ratios.

    Shapes:
        logprobs, ref_logprobs, desirable: (N,); returns a scalar.
    """
    return kto_z0(log_ratios=(logprobs.detach() - ref_logprobs.detach())[~desirable])


def kto_unpaired_from_pairs(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Split N pairs into 2N KTO examples: chosen desirable, rejected undesirable.

    Returns:
        ``logprobs``, ``ref_logprobs`` and ``desirable``, the keyword inputs of :func:`kto_loss`.

    Shapes:
        inputs (N,); every output (2N,), the N chosen first.
    """
    desirable = torch.arange(2 * chosen_logprobs.numel(), device=chosen_logprobs.device)
    return {
        "logprobs": torch.cat([chosen_logprobs, rejected_logprobs]),  # (2N,)
        "ref_logprobs": torch.cat([ref_chosen_logprobs, ref_rejected_logprobs]),  # (2N,)
        "desirable": desirable < chosen_logprobs.numel(),  # (2N,)
    }


def kto_loss(
    *,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    desirable: torch.Tensor,
    z0: Number,
    beta: float = 0.1,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    normaliser: Number | None = None,
) -> LossOutput:
    """KTO (Ethayarajh 2024), unpaired, with r = logprobs − ref (summed).

    Desirable: l = λ_D(1 − σ(β(r − z0))); undesirable: l = λ_U(1 − σ(β(z0 − r))); both are
    λ·σ(−sβ(r − z0)) with s = ±1. ``z0`` (see :func:`kto_z0`) is detached here. With class
    imbalance set λ_D·n_D/(λ_U·n_U) in [1, 4/3]. ``normaliser`` defaults to N examples.

    Returns:
        LossOutput with metric sums ``examples``, ``desirable``, ``undesirable``, ``loss_sum``,
        ``desirable_rewards_sum`` / ``undesirable_rewards_sum`` (βr) and
        ``desirable_logprobs_sum`` / ``undesirable_logprobs_sum``.

    Shapes:
        logprobs, ref_logprobs, desirable (bool): (N,); z0 scalar; loss scalar.
    """
    dt = _dtype(logprobs)
    r = logprobs.to(dt) - ref_logprobs.detach().to(dt)  # (N,)
    z = torch.as_tensor(z0, device=r.device).detach().to(dt)
    sign = desirable.to(dt) * 2 - 1  # (N,): +1 desirable, -1 undesirable
    weight = torch.where(desirable, lambda_d, lambda_u).to(dt)  # (N,)
    per_example = weight * torch.sigmoid(-sign * beta * (r - z))  # (N,)
    total = per_example.sum()
    loss = _safe_div(total, r.numel() if normaliser is None else normaliser)
    lp = logprobs.to(dt)
    metrics = {
        "examples": torch.tensor(float(r.numel()), device=r.device),
        "desirable": desirable.sum(),
        "undesirable": (~desirable).sum(),
        "loss_sum": total,
        "desirable_rewards_sum": torch.where(desirable, beta * r, 0.0).sum(),
        "undesirable_rewards_sum": torch.where(desirable, 0.0, beta * r).sum(),
        "desirable_logprobs_sum": torch.where(desirable, lp, 0.0).sum(),
        "undesirable_logprobs_sum": torch.where(desirable, 0.0, lp).sum(),
    }
    return LossOutput(loss=loss, metrics={k: v.detach().double() for k, v in metrics.items()})


def apo_zero_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    normaliser: Number | None = None,
) -> LossOutput:
    """APO-zero (D'Oosterlinck 2024): l = 1 − σ(βΔ_c) + σ(βΔ_r).

    Pushes the chosen likelihood up and the rejected one down (chosen better than the model).

    Returns:
        LossOutput with the module's metric sums (rewards βΔ).

    Shapes:
        every tensor (N,); loss scalar.
    """
    d_c, d_r = _deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    per_pair = 1 - torch.sigmoid(beta * d_c) + torch.sigmoid(beta * d_r)  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    return _output(
        per_pair=per_pair, rewards=(beta * d_c, beta * d_r), logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser,
    )  # fmt: skip


def apo_down_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    normaliser: Number | None = None,
) -> LossOutput:
    """APO-down (D'Oosterlinck 2024): l = σ(βΔ_c) + 1 − σ(β(Δ_c − Δ_r)).

    Pushes both likelihoods down, the rejected one more (model better than the chosen).

    Returns:
        LossOutput with the module's metric sums (rewards βΔ).

    Shapes:
        every tensor (N,); loss scalar.
    """
    d_c, d_r = _deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    per_pair = torch.sigmoid(beta * d_c) + 1 - torch.sigmoid(beta * (d_c - d_r))  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    return _output(
        per_pair=per_pair, rewards=(beta * d_c, beta * d_r), logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser,
    )  # fmt: skip


def rpo_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    alpha: float = 1.0,
    normaliser: Number | None = None,
) -> LossOutput:
    """DPO + NLL (Pang 2024; alias ``dpo_nll``): l = softplus(−βh) − α·logp_c/|y_c|.

    α = 0 gives DPO. (Not Nemotron-4's reward-aware "RPO".)

    Returns:
        LossOutput with the module's metric sums plus ``nll_sum`` (sum of −logp_c/|y_c|).

    Shapes:
        every tensor (N,); loss scalar.
    """
    d_c, d_r = _deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    nll = -_avg(values=chosen_logprobs, tokens=chosen_tokens, name="chosen_tokens")  # (N,)
    per_pair = F.softplus(-beta * (d_c - d_r)) + alpha * nll  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    rewards = (beta * d_c, beta * d_r)
    return _output(
        per_pair=per_pair, rewards=rewards, logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser, nll_sum=nll.sum(),
    )  # fmt: skip


dpo_nll_loss = rpo_loss


def _odpo_offsets(
    *,
    score_chosen: torch.Tensor | None,
    score_rejected: torch.Tensor | None,
    offsets: torch.Tensor | None,
    alpha: float,
) -> torch.Tensor:
    if offsets is not None:
        if score_chosen is not None or score_rejected is not None:
            raise ValueError("odpo: pass score_chosen/score_rejected or offsets, not both")
        return offsets.detach()
    if score_chosen is None or score_rejected is None:
        raise ValueError("odpo needs score_chosen and score_rejected (or offsets)")
    gap = (score_chosen - score_rejected).detach()  # (N,)
    if bool((gap <= 0).any()):
        raise ValueError(
            "odpo needs score_chosen > score_rejected for every pair; "
            f"got gaps {gap[gap <= 0].tolist()}"
        )
    return alpha * torch.log(gap)


def odpo_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    score_chosen: torch.Tensor | None = None,
    score_rejected: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    beta: float = 0.1,
    alpha: float = 1.0,
    normaliser: Number | None = None,
) -> LossOutput:
    """DPO with an offset (Amini 2024): l = softplus(−(βh − δ)).

    δ = α·log(s_c − s_r) from the pair's scores (s_c > s_r required, else ValueError), or
    ``offsets`` δ given directly (α not applied). α = 0 gives DPO.

    Returns:
        LossOutput with the module's metric sums (rewards βΔ) plus ``offset_sum``.

    Shapes:
        every tensor (N,); loss scalar.
    """
    d_c, d_r = _deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    delta = _odpo_offsets(
        score_chosen=score_chosen, score_rejected=score_rejected, offsets=offsets, alpha=alpha
    ).to(d_c.dtype)  # (N,)
    per_pair = F.softplus(delta - beta * (d_c - d_r))  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    rewards = (beta * d_c, beta * d_r)
    return _output(
        per_pair=per_pair, rewards=rewards, logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser, offset_sum=delta.sum(),
    )  # fmt: skip


@dataclass(frozen=True)
class PreferenceLossSpec:
    """One row of :data:`PREFERENCE_LOSSES`: how a recipe calls a direct-alignment loss.

    Attributes:
        fn: The loss function.
        reference_free: True if it never reads reference log-probs (no π_ref pass needed).
        paired: False for unpaired losses (KTO: ``logprobs``, ``ref_logprobs``, ``desirable``,
            ``z0`` instead of the paired inputs).
        beta: Default β (equal to the function's own default).
        hyperparameters: Keyword names of its hyperparameters besides ``beta``.
        needs_lengths: True if it reads ``chosen_tokens`` / ``rejected_tokens`` (IPO only with
            ``average_logprobs``).
        extra_inputs: Per-pair data inputs beyond the common ones.
    """

    fn: Callable[..., LossOutput]
    reference_free: bool
    paired: bool
    beta: float
    hyperparameters: tuple[str, ...] = ()
    needs_lengths: bool = False
    extra_inputs: tuple[str, ...] = ()


_RPO = PreferenceLossSpec(rpo_loss, False, True, 0.1, ("alpha",), needs_lengths=True)
PREFERENCE_LOSSES: dict[str, PreferenceLossSpec] = {
    "dpo": PreferenceLossSpec(dpo_loss, False, True, 0.1),
    "cdpo": PreferenceLossSpec(cdpo_loss, False, True, 0.1, ("label_smoothing",)),
    "ipo": PreferenceLossSpec(ipo_loss, False, True, 0.1, ("average_logprobs",)),
    "dpo_norm": PreferenceLossSpec(dpo_norm_loss, False, True, 2.0, needs_lengths=True),
    "simpo": PreferenceLossSpec(simpo_loss, True, True, 2.0, ("gamma_beta_ratio",), True),
    "orpo": PreferenceLossSpec(orpo_loss, True, True, 0.1, ("lambda_",), needs_lengths=True),
    "kto": PreferenceLossSpec(kto_loss, False, False, 0.1, ("lambda_d", "lambda_u"), False),
    "apo_zero": PreferenceLossSpec(apo_zero_loss, False, True, 0.1),
    "apo_down": PreferenceLossSpec(apo_down_loss, False, True, 0.1),
    "rpo": _RPO,
    "dpo_nll": _RPO,
    "odpo": PreferenceLossSpec(
        odpo_loss, False, True, 0.1, ("alpha",), extra_inputs=("score_chosen", "score_rejected")
    ),
}
"""Direct-alignment losses by name; ``rpo`` and ``dpo_nll`` are the same row."""
