"""Policy-gradient objectives, the value loss and the preset table (METHODS.md sections 6.0-6.8).

Per-token loss: l_{i,t} = -w_{i,t} * obj(rho_{i,t}, A_{i,t}) + [KL in loss] beta k_{i,t}, with
rho = exp(log pi_theta - log pi_old) and w the truncated importance-sampling weight; then
L = aggregate(l, mask, mode) with a global normaliser (:mod:`rlhfkit.ops.masking`).

Objectives (each returns the per-token loss -obj and where it is clipped):

- ``reinforce``: obj = A * exp(logp - sg(logp)) (value A, gradient A grad log pi).
- ``ppo_clip``: obj = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A); optional dual clip for
  A < 0 (loss capped at -c A).
- ``gspo``: one ratio per sequence, s_i = exp(mean_t (logp - logp_old)), clipped like PPO and
  applied to every token of the sequence.
- ``cispo``: obj = sg(clip(rho, 1 - eps_low, 1 + eps_high)) A log pi (every token keeps a
  gradient; ``eps_low=None`` leaves rho unbounded below).
- ``sapo``: obj = f(rho) A with the soft gate f(rho) = (4 / tau) sigma(tau (rho - 1)), tau = 1.0
  for A > 0 and 1.05 for A < 0; f'(1) = 1, so it is the policy gradient on-policy.

Shapes: logp, old_logp, advantages, mask: (B, T) in completion space (``types`` glossary).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from rlhfkit.ops.masking import Aggregation, aggregate, masked_mean
from rlhfkit.types import LossOutput

ObjectiveName = Literal["reinforce", "ppo_clip", "gspo", "cispo", "sapo"]
AdvantageName = Literal[
    "batch_baseline", "ema_baseline", "leave_one_out", "group_zscore", "group_center", "maxrl",
    "batch_whiten", "group_whiten", "greedy_baseline", "gae", "process_group",
]  # fmt: skip

LOG_RATIO_CLAMP = 10.0
"""|log pi_learner - log pi_sampler| is clamped to this before exp in the TIS weight."""


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


Objective = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, ObjectiveParams],
    tuple[torch.Tensor, torch.Tensor],
]


def _clip(ratio: torch.Tensor, p: ObjectiveParams) -> torch.Tensor:
    low = None if p.eps_low is None else 1.0 - p.eps_low
    return ratio.clamp(min=low, max=1.0 + p.eps_high)


def reinforce(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, p: ObjectiveParams
) -> tuple[Tensor, Tensor]:
    """-A * exp(logp - sg(logp)): the REINFORCE gradient, never clipped."""
    surrogate = torch.exp(logp - logp.detach())
    return -adv * surrogate, torch.zeros_like(mask)


def ppo_clip(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, p: ObjectiveParams
) -> tuple[Tensor, Tensor]:
    """max(-A rho, -A clip(rho)) (min of the objectives), optional dual clip for A < 0."""
    ratio = torch.exp(logp - old_logp)
    pg1, pg2 = -adv * ratio, -adv * _clip(ratio, p)
    loss = torch.maximum(pg1, pg2)
    if p.dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -p.dual_clip * adv), loss)
    return loss, pg2 > pg1


def gspo(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, p: ObjectiveParams
) -> tuple[Tensor, Tensor]:
    """Sequence ratio s_i = exp(masked mean_t (logp - old)), clipped PPO-style, on every token."""
    seq_ratio = torch.exp(masked_mean(logp - old_logp, mask, dim=-1)).unsqueeze(-1)  # (B, 1)
    ratio = seq_ratio.expand_as(logp)
    pg1, pg2 = -adv * ratio, -adv * _clip(ratio, p)
    return torch.maximum(pg1, pg2), pg2 > pg1


def cispo(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, p: ObjectiveParams
) -> tuple[Tensor, Tensor]:
    """-sg(clip(rho)) A log pi: clipped weight, gradient on every token."""
    ratio = torch.exp(logp - old_logp).detach()
    weight = _clip(ratio, p)
    return -weight * adv * logp, weight != ratio


def sapo(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, p: ObjectiveParams
) -> tuple[Tensor, Tensor]:
    """-(4 / tau) sigma(tau (rho - 1)) A with tau by the sign of A."""
    ratio = torch.exp(logp - old_logp)
    tau = torch.where(adv > 0, p.tau_pos, p.tau_neg).to(ratio.dtype)
    gate = 4.0 / tau * torch.sigmoid(tau * (ratio - 1.0))
    return -gate * adv, torch.zeros_like(mask)


OBJECTIVES: dict[str, Objective] = {
    "reinforce": reinforce,
    "ppo_clip": ppo_clip,
    "gspo": gspo,
    "cispo": cispo,
    "sapo": sapo,
}
"""The objectives by name (METHODS.md section 6.0, axis 2)."""


def tis_weights(
    learner_logp: torch.Tensor, sampler_logp: torch.Tensor, cap: float = 2.0
) -> torch.Tensor:
    """Truncated importance weights w = min(exp(clamp(lp_learner - lp_sampler, -10, 10)), C).

    Detached, per token, one-sided (METHODS.md section 6.6); ``cap=inf`` is plain IS.

    Shapes:
        (B, T) -> (B, T).
    """
    delta = (learner_logp - sampler_logp).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(delta).clamp(max=cap)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    objective: str,
    params: ObjectiveParams,
    aggregation: Aggregation,
    normaliser: float | torch.Tensor,
    weights: torch.Tensor | None = None,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
) -> LossOutput:
    """This micro-batch's share of the policy loss, with detached metric sums.

    Args:
        logp: log pi_theta of the completion tokens (differentiable).
        old_logp: log pi_old (recomputed on the learner), detached.
        advantages: A broadcast over tokens.
        mask: True on completion tokens that count.
        objective: Name in :data:`OBJECTIVES`.
        params: Clip ranges and gates.
        aggregation: Loss aggregation mode.
        normaliser: Global normaliser of the aggregation (:func:`normaliser_count` summed).
        weights: TIS weights (None: 1).
        kl: Per-token KL estimate to pi_ref for KL-in-loss (differentiable), or None.
        beta: KL coefficient.

    Returns:
        LossOutput with metric sums over masked tokens: ``clipped``, ``approx_kl`` (1/2
        (log rho)^2), ``ratio``, ``ratio_max``, ``kl`` and ``tokens``.

    Shapes:
        every tensor: (B, T).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose from {sorted(OBJECTIVES)}")
    per_token, clipped = OBJECTIVES[objective](
        logp, old_logp.detach(), advantages.detach(), mask, params
    )
    if weights is not None:
        per_token = per_token * weights.detach()
    if kl is not None and beta:
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, normaliser)
    with torch.no_grad():
        log_ratio = torch.where(mask, logp - old_logp, 0.0)
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
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    aggregation: Aggregation,
    normaliser: float | torch.Tensor,
    clip: float | None = 0.2,
) -> LossOutput:
    """1/2 (V - R)^2, or with ``clip`` max(1/2 (V - R)^2, 1/2 (clamp(V, V_old +- clip) - R)^2).

    Shapes:
        values, old_values, returns, mask: (B, T).
    """
    returns, old_values = returns.detach(), old_values.detach()
    loss = 0.5 * (values - returns).square()
    clipped = torch.zeros_like(mask)
    if clip is not None:
        bounded = old_values + (values - old_values).clamp(-clip, clip)
        loss_clipped = 0.5 * (bounded - returns).square()
        clipped = loss_clipped > loss
        loss = torch.maximum(loss, loss_clipped)
    out = aggregate(loss, mask, aggregation, normaliser)
    return LossOutput(out, {"value_clipped": float(clipped[mask].sum())})


@dataclass(frozen=True)
class PGPreset:
    """One row of the preset table: a value on each of the four axes plus modifiers."""

    advantage: AdvantageName
    objective: ObjectiveName
    aggregation: Literal["seq_mean_token_mean", "token_mean", "fixed_length"]
    kl_placement: Literal["none", "reward", "loss"] = "none"
    kl_estimator: Literal["k1", "k2", "k3", "full"] = "k1"
    kl_per: Literal["token", "seq"] = "token"
    beta: float = 0.0
    params: ObjectiveParams = field(default_factory=ObjectiveParams)
    critic: bool = False
    whiten_advantages: bool = False
    dynamic_sampling: bool = False
    overlong_penalty: bool = False
    min_group_size: int = 1
    epochs: int = 1


_SEQ_KL = {"kl_placement": "reward", "kl_estimator": "k1", "kl_per": "seq", "beta": 0.05}
_TOKEN_KL = {"kl_placement": "reward", "kl_estimator": "k1", "kl_per": "token", "beta": 0.05}
_LOSS_KL = {"kl_placement": "loss", "kl_estimator": "k3", "kl_per": "token", "beta": 0.04}
_GROUP = {"min_group_size": 2}

PG_PRESETS: dict[str, PGPreset] = {
    "reinforce": PGPreset("batch_baseline", "reinforce", "seq_mean_token_mean", **_SEQ_KL),
    "rloo": PGPreset("leave_one_out", "reinforce", "fixed_length", **_SEQ_KL, **_GROUP),
    "remax": PGPreset("greedy_baseline", "reinforce", "fixed_length", **_SEQ_KL),
    "reinforce_pp": PGPreset("batch_whiten", "ppo_clip", "token_mean", **_TOKEN_KL),
    "ppo": PGPreset(
        "gae", "ppo_clip", "seq_mean_token_mean", **_TOKEN_KL, critic=True, whiten_advantages=True,
        epochs=4,
    ),
    "grpo": PGPreset("group_zscore", "ppo_clip", "seq_mean_token_mean", **_LOSS_KL, **_GROUP),
    "dr_grpo": PGPreset("group_center", "ppo_clip", "fixed_length", **_GROUP),
    "dapo": PGPreset(
        "group_zscore", "ppo_clip", "token_mean", params=ObjectiveParams(0.2, 0.28),
        dynamic_sampling=True, overlong_penalty=True, **_GROUP,
    ),
    "gspo": PGPreset(
        "group_zscore", "gspo", "seq_mean_token_mean", params=ObjectiveParams(3e-4, 4e-4), **_GROUP
    ),
    "cispo": PGPreset(
        "group_zscore", "cispo", "token_mean", params=ObjectiveParams(0.2, 0.4), **_GROUP
    ),
    "sapo": PGPreset("group_zscore", "sapo", "seq_mean_token_mean", **_GROUP),
    "maxrl": PGPreset("maxrl", "reinforce", "seq_mean_token_mean"),
    "grpo_process": PGPreset(
        "process_group", "ppo_clip", "seq_mean_token_mean", **_LOSS_KL, **_GROUP
    ),
}  # fmt: skip
"""METHODS.md section 6.8: each algorithm is a row of choices on the four axes."""
