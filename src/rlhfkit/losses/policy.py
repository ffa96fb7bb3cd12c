"""Policy-gradient objectives and the value loss (the preset table is in the recipe).

Per-token loss: l_{i,t} = -w_{i,t} * obj(rho_{i,t}, A_{i,t}) + [KL in loss] c_KL k_{i,t}, with
rho = exp(min(log pi_theta - log pi_old, C)), C = :data:`LOG_RATIO_CLAMP`, and w the truncated
importance-sampling weight; then L = aggregate(l, mask, mode) with a global normaliser
(:mod:`rlhfkit.ops.masking`). Masked-out entries of every input are zeroed first, so that
padding can reach neither the loss nor its gradient.

Why the clamp: exp overflows at a log-ratio of ~89 in fp32 (~710 in fp64), and the zero
gradient of a clipped (PPO) or saturated (SAPO) term times d rho / d log pi = inf is NaN where
the exact gradient is 0. Up to rho = e^C (22026) values and gradients are exact. Above it,
the clipped and saturated cases keep their exact value and gradient (0); only ppo_clip / gspo
with A < 0 and no dual clip change: the loss is held at -A e^C with zero gradient, like a dual
clip at e^C, instead of growing without bound. No lower clamp is needed: exp underflows to 0
with a finite derivative, so small ratios stay exact.

Objectives (each returns the per-token loss -obj and where it is clipped):

- ``reinforce``: obj = A * exp(log pi - sg(log pi)) (value A, gradient A grad log pi).
- ``ppo_clip``: obj = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A); optional dual clip for
  A < 0 (loss capped at -c A).
- ``gspo``: one ratio per sequence, s_i = exp(mean_t (log pi - log pi_old)), clipped like PPO and
  applied to every token of the sequence.
- ``cispo``: obj = sg(clip(rho, 1 - eps_low, 1 + eps_high)) A log pi (every token keeps a
  gradient; ``eps_low=None`` leaves rho unbounded below).
- ``sapo``: obj = f(rho) A with the soft gate f(rho) = (4 / tau) sigma(tau (rho - 1)), tau = 1.0
  for A > 0 and 1.05 for A < 0; f'(1) = 1, so it is the policy gradient on-policy.

Every tensor argument is keyword-only, so that ``logprobs`` and ``old_logprobs`` cannot be
swapped by position.

Shapes: logprobs, old_logprobs, advantages, mask: (B, T) in completion space (``types``
glossary).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rlhfkit.ops.masking import Aggregation, aggregate, fill_masked, masked_mean
from rlhfkit.types import LossOutput

ObjectiveName = Literal["reinforce", "ppo_clip", "gspo", "cispo", "sapo"]

LOG_RATIO_CLAMP = 10.0
"""Log-ratio bound before exp: |log pi_learner - log pi_sampler| in the TIS weight, and
log pi_theta - log pi_old from above in the ratio of ppo_clip, gspo and sapo."""


@dataclass(frozen=True)
class ObjectiveParams:
    """Clip ranges and gates of the objectives (each uses the fields it names)."""

    eps_low: float | None = 0.2
    """Lower clip: rho >= 1 - eps_low (None: no lower bound; cispo)."""
    eps_high: float = 0.2
    """Upper clip: rho <= 1 + eps_high."""
    dual_clip: float | None = None
    """ppo_clip: for A < 0 cap the loss at -dual_clip * A (3.0 in Ye et al. 2020)."""
    tau_pos: float = 1.0
    """sapo: gate temperature for A > 0."""
    tau_neg: float = 1.05
    """sapo: gate temperature for A < 0."""


Objective = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``objective(*, logprobs, old_logprobs, advantages, mask, params)`` -> (per-token loss,
where clipped), both (B, T)."""


def _ratio(log_ratio: Tensor) -> Tensor:
    """The ratio rho = exp(min(log rho, C)): exact up to e^C, then e^C with zero gradient.

    Shapes:
        any; returns the same shape.
    """
    return torch.exp(log_ratio.clamp(max=LOG_RATIO_CLAMP))


def _clip(ratio: torch.Tensor, p: ObjectiveParams) -> torch.Tensor:
    low = None if p.eps_low is None else 1.0 - p.eps_low
    return ratio.clamp(min=low, max=1.0 + p.eps_high)


def reinforce(
    *,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    params: ObjectiveParams,
) -> tuple[Tensor, Tensor]:
    """-A * exp(logprobs - sg(logprobs)): the REINFORCE gradient, never clipped."""
    surrogate = torch.exp(logprobs - logprobs.detach())
    return -advantages * surrogate, torch.zeros_like(mask)


def ppo_clip(
    *,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    params: ObjectiveParams,
) -> tuple[Tensor, Tensor]:
    """max(-A rho, -A clip(rho)) (min of the objectives), optional dual clip for A < 0."""
    ratio = _ratio(logprobs - old_logprobs)
    pg1, pg2 = -advantages * ratio, -advantages * _clip(ratio, params)
    loss = torch.maximum(pg1, pg2)
    if params.dual_clip is not None:
        loss = torch.where(
            advantages < 0, torch.minimum(loss, -params.dual_clip * advantages), loss
        )
    return loss, pg2 > pg1


def gspo(
    *,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    params: ObjectiveParams,
) -> tuple[Tensor, Tensor]:
    """Sequence ratio s_i = exp(masked mean_t log rho), clipped PPO-style, on every token.

    The sequence log-ratio (not each token's) is bounded above by :data:`LOG_RATIO_CLAMP`.
    """
    log_ratio = masked_mean(logprobs - old_logprobs, mask, dim=-1)  # (B,)
    seq_ratio = _ratio(log_ratio).unsqueeze(-1)  # (B, 1)
    ratio = seq_ratio.expand_as(logprobs)
    pg1, pg2 = -advantages * ratio, -advantages * _clip(ratio, params)
    return torch.maximum(pg1, pg2), pg2 > pg1


def cispo(
    *,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    params: ObjectiveParams,
) -> tuple[Tensor, Tensor]:
    """-sg(clip(rho)) A log pi: clipped weight, gradient on every token.

    No log-ratio clamp: rho is detached (no gradient flows through exp) and the clip bounds
    it above, so an overflowing rho can make neither the value nor the gradient non-finite.
    """
    ratio = torch.exp(logprobs - old_logprobs).detach()
    weight = _clip(ratio, params)
    return -weight * advantages * logprobs, weight != ratio


def sapo(
    *,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    params: ObjectiveParams,
) -> tuple[Tensor, Tensor]:
    """-(4 / tau) sigma(tau (rho - 1)) A with tau by the sign of A."""
    ratio = _ratio(logprobs - old_logprobs)
    tau = torch.where(advantages > 0, params.tau_pos, params.tau_neg).to(ratio.dtype)
    gate = 4.0 / tau * torch.sigmoid(tau * (ratio - 1.0))
    return -gate * advantages, torch.zeros_like(mask)


OBJECTIVES: dict[str, Objective] = {
    "reinforce": reinforce,
    "ppo_clip": ppo_clip,
    "gspo": gspo,
    "cispo": cispo,
    "sapo": sapo,
}
"""The objectives by name (``--algo.objective``; the method reference lists each formula)."""


def _token_truncate(ratio: Tensor, mask: Tensor, cap: float) -> Tensor:
    """w_t = min(rho_t, C)."""
    return ratio.clamp(max=cap)


def _token_mask(ratio: Tensor, mask: Tensor, cap: float) -> Tensor:
    """w_t = rho_t if rho_t <= C else 0 (the token is left out)."""
    return torch.where(ratio <= cap, ratio, torch.zeros_like(ratio))


def _sequence_mask(ratio: Tensor, mask: Tensor, cap: float) -> Tensor:
    """w_t = rho_t if the sequence's geometric-mean ratio is in [1/C, C], else 0 for the row.

    The sequence ratio is exp(mean over the row's tokens of log rho_t), so the test does not
    grow with the length.
    """
    log_ratio = torch.where(mask, ratio.log(), torch.zeros_like(ratio))
    tokens = mask.sum(-1, keepdim=True).clamp(min=1)
    seq = torch.exp(log_ratio.sum(-1, keepdim=True) / tokens)  # (B, 1)
    keep = (seq <= cap) & (seq >= 1.0 / cap)
    return torch.where(keep, ratio, torch.zeros_like(ratio))


TIS_MODES: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {
    "token_truncate": _token_truncate,
    "token_mask": _token_mask,
    "sequence_mask": _sequence_mask,
}
"""Importance-weight corrections of the sampler/learner mismatch (``--algo.tis-mode``)."""


def tis_weights(
    *,
    learner_logprobs: torch.Tensor,
    sampler_logprobs: torch.Tensor,
    cap: float = 2.0,
    mode: str = "token_truncate",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance weights of the learner against the sampler, rho_t = pi_learner / pi_sampler.

    rho_t = exp(clamp(lp_learner - lp_sampler, -10, 10)), detached. ``mode`` picks the
    correction (:data:`TIS_MODES`):

    - ``token_truncate``: w_t = min(rho_t, C), truncated IS (Espeholt et al. 2018; the
      off-policy correction of Yao et al. 2025); ``cap=inf`` is plain IS;
    - ``token_mask``: w_t = rho_t where rho_t <= C, else 0 (masked IS: a token the sampler
      drew far more often than the learner would is dropped, not down-weighted);
    - ``sequence_mask``: w_t = rho_t, and 0 on every token of a row whose geometric-mean ratio
      exp(mean_t log rho_t) lies outside [1/C, C].

    When the sampler's and the learner's log-probs agree, every mode gives w = 1.

    Shapes:
        (B, T) -> (B, T); ``mask`` (B, T) marks the tokens of each row (all when None).
    """
    if mode not in TIS_MODES:
        raise ValueError(f"unknown TIS mode {mode!r}; choose from {sorted(TIS_MODES)}")
    delta = (learner_logprobs - sampler_logprobs).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    mask = torch.ones_like(delta, dtype=torch.bool) if mask is None else mask.bool()
    return TIS_MODES[mode](torch.exp(delta), mask, cap)


def sampler_mismatch(
    *, learner_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor
) -> dict[str, float]:
    """Sums over masked tokens measuring how far the sampler is from the learner.

    ``sampler_gap``: |lp_learner - lp_sampler|; ``sampler_kl``: the k3 estimate of
    KL(pi_sampler || pi_learner) on the sampler's own tokens, r - 1 - log r with
    r = pi_learner / pi_sampler (unbiased, >= 0 per token, exactly 0 when they agree).

    Shapes:
        (B, T) each; returns float sums (divide by the token count).
    """
    delta = (learner_logprobs - sampler_logprobs).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    delta = torch.where(mask, delta, torch.zeros_like(delta))
    k3 = torch.expm1(delta) - delta
    return {"sampler_gap": float(delta.abs()[mask].sum()), "sampler_kl": float(k3[mask].sum())}


def policy_loss(
    *,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    objective: str,
    params: ObjectiveParams,
    aggregation: Aggregation,
    normaliser: float | torch.Tensor,
    weights: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> LossOutput:
    """This micro-batch's share of the policy loss, with detached metric sums.

    Args:
        logprobs: log pi_theta of the completion tokens (differentiable).
        old_logprobs: log pi_old (recomputed on the learner), detached.
        advantages: A broadcast over tokens.
        mask: True on completion tokens that count.
        objective: Name in :data:`OBJECTIVES`.
        params: Clip ranges and gates.
        aggregation: Loss aggregation mode.
        normaliser: Global normaliser of the aggregation (:func:`normaliser_count` summed).
        weights: TIS weights (None: 1).
        kl: Per-token KL estimate to pi_ref for KL-in-loss (differentiable), or None.
        kl_coef: KL coefficient c_KL.

    Returns:
        LossOutput with metric sums over masked tokens: ``clipped``, ``approx_kl`` (1/2
        (log rho)^2), ``ratio``, ``ratio_max``, ``kl`` and ``tokens`` (the metrics use the
        unclamped log-ratio).

    Shapes:
        every tensor: (B, T).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {sorted(OBJECTIVES)}")
    # Padding zeroed before any op: non-finite padded inputs cannot make the gradient NaN.
    logprobs, old_logprobs, advantages = (
        fill_masked(x, mask) for x in (logprobs, old_logprobs, advantages)
    )
    weights = None if weights is None else fill_masked(weights, mask)
    kl = None if kl is None else fill_masked(kl, mask)
    per_token, clipped = OBJECTIVES[objective](
        logprobs=logprobs, old_logprobs=old_logprobs.detach(), advantages=advantages.detach(),
        mask=mask, params=params,
    )  # fmt: skip
    if weights is not None:
        per_token = per_token * weights.detach()
    if kl is not None and kl_coef:
        per_token = per_token + kl_coef * kl
    loss = aggregate(per_token, mask, aggregation, normaliser)
    with torch.no_grad():
        log_ratio = logprobs - old_logprobs  # 0 at padding (both filled above)
        ratio = torch.exp(log_ratio)
        metrics = {
            "clipped": float(clipped[mask].sum()),
            "approx_kl": float((0.5 * log_ratio.square())[mask].sum()),
            "ratio": float(ratio[mask].sum()),
            "ratio_max": float(ratio[mask].max()) if bool(mask.any()) else 1.0,
            "tokens": float(mask.sum()),
        }
        if kl is not None:
            metrics["kl"] = float(kl.detach()[mask].sum())
    return LossOutput(loss, metrics)


def value_loss(
    *,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Aggregation,
    normaliser: float | torch.Tensor,
    clip: float | None = 0.2,
) -> LossOutput:
    """1/2 (V - R)^2, or with ``clip`` max(1/2 (V - R)^2, 1/2 (clamp(V, V_old +- clip) - R)^2).

    Masked-out entries of the inputs are zeroed first (padding reaches no gradient).

    Shapes:
        values, old_values, returns, mask: (B, T).
    """
    values = fill_masked(values, mask)
    returns, old_values = (
        fill_masked(returns.detach(), mask),
        fill_masked(old_values.detach(), mask),
    )
    loss = 0.5 * (values - returns).square()
    clipped = torch.zeros_like(mask)
    if clip is not None:
        bounded = old_values + (values - old_values).clamp(-clip, clip)
        loss_clipped = 0.5 * (bounded - returns).square()
        clipped = loss_clipped > loss
        loss = torch.maximum(loss, loss_clipped)
    out = aggregate(loss, mask, aggregation, normaliser)
    return LossOutput(out, {"value_clipped": float(clipped[mask].sum())})
