"""Advantage estimation of the policy-gradient recipes (steps 5 of :mod:`rlhfkit.recipes.pg`).

Sequence-level estimators on (P, G) rewards with skipped completions (NaN), REINFORCE++'s
whitened returns-to-go and PPO's GAE with the critic, on rollout micro-batches. The math lives
in :mod:`rlhfkit.ops.advantages`; this module applies it to batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rlhfkit.models.heads import rollout_values
from rlhfkit.ops import advantages as adv_ops
from rlhfkit.rewards.shaping import kl_in_reward
from rlhfkit.training.distributed import all_reduce_sum

if TYPE_CHECKING:
    from rlhfkit.recipes.pg import PGAlgoConfig, PGConfig


@dataclass(frozen=True)
class Estimator:
    """One advantage estimator of (P, G) rewards.

    Attributes:
        fn: ``fn(rewards, algo_cfg, extra)`` -> advantages of the same shape.
        scope: "group" (rows are prompts' groups) or "batch" (one pool of all rewards).
        min_size: Fewest scored samples a group needs; smaller groups get A = 0.
    """

    fn: Callable[[torch.Tensor, Any, dict[str, Any]], torch.Tensor]
    scope: str = "group"
    min_size: int = 1


ESTIMATORS: dict[str, Estimator] = {
    "batch_baseline": Estimator(lambda r, c, e: adv_ops.batch_baseline(r), "batch"),
    "ema_baseline": Estimator(
        lambda r, c, e: adv_ops.ema_baseline(r, e.get("ema"), c.ema_decay)[0], "batch"
    ),
    "leave_one_out": Estimator(lambda r, c, e: adv_ops.leave_one_out(r), min_size=2),
    "group_zscore": Estimator(
        lambda r, c, e: adv_ops.group_zscore(r, std=c.std, eps=c.std_eps), min_size=2
    ),
    "group_center": Estimator(lambda r, c, e: adv_ops.group_center(r)),
    "maxrl": Estimator(lambda r, c, e: adv_ops.maxrl(r)),
    "greedy_baseline": Estimator(lambda r, c, e: adv_ops.greedy_baseline(r, e["greedy"])),
    "batch_whiten": Estimator(lambda r, c, e: r, "batch"),  # token level: token_advantages
    # REINFORCE++-baseline: the group mean subtracted first, then whitened like batch_whiten
    "group_whiten": Estimator(lambda r, c, e: adv_ops.group_center(r)),
    "gae": Estimator(lambda r, c, e: r, "batch"),  # token level, needs a critic: gae_advantages
}
"""Advantage estimators this recipe runs (``process_group`` needs step rewards: not yet)."""

TOKEN_LEVEL = ("gae", "batch_whiten", "group_whiten")
"""Estimators whose advantages are per token (computed after the sequence-level step)."""


def estimate(
    rewards: torch.Tensor, name: str, algo: PGAlgoConfig, extra: dict[str, Any]
) -> torch.Tensor:
    """Advantages of (P, G) rewards where NaN marks a skipped completion (A = 0 there).

    With every completion scored the estimator sees the full tensor. Otherwise a group estimator
    runs on each group's scored samples alone (a group below ``min_size`` gets 0) and a batch
    estimator on all scored samples, so a skipped completion moves no baseline.

    Shapes:
        rewards: (P, G) fp64; returns (P, G).
    """
    est = ESTIMATORS[name]
    valid = ~torch.isnan(rewards)
    if bool(valid.all()):
        return est.fn(rewards, algo, extra)
    out = torch.zeros_like(rewards)
    if est.scope == "batch":
        if bool(valid.any()):
            out[valid] = est.fn(rewards[valid], algo, extra)
        return out
    for i in range(rewards.shape[0]):
        row = rewards[i, valid[i]]
        if row.numel() < max(est.min_size, 1):
            continue
        sub = {k: v[i : i + 1] if torch.is_tensor(v) else v for k, v in extra.items()}
        out[i, valid[i]] = est.fn(row[None], algo, sub)[0]
    return out


def _token_kl(b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token KL for the reward.

    The exact full-vocabulary KL when it was computed, else k1 = log pi_old (or the sampler's
    log-prob when pi_old was not computed) - log pi_ref.
    """
    if "kl_tokens" in b:
        return b["kl_tokens"]
    return b.get("old_logp", b["sampler_logp"]) - b["ref_logp"]


def global_whiten(batches: list[dict[str, torch.Tensor]], values: list[torch.Tensor]) -> None:
    """Set ``advantages`` of every micro-batch to ``values`` whitened over all masked tokens.

    The mean and the unbiased std are taken over every completion token of every micro-batch
    and every rank (METHODS.md 6.4: global whitening, eps 1e-8).
    """
    pairs = list(zip(batches, values, strict=True))
    total = sum(float(torch.where(b["completion_mask"], r, 0.0).sum()) for b, r in pairs)
    squares = sum(float(torch.where(b["completion_mask"], r, 0.0).square().sum()) for b, r in pairs)
    count = sum(float(b["completion_mask"].sum()) for b in batches)
    stats = tuple(
        torch.tensor(all_reduce_sum(v), dtype=torch.float64) for v in (total, squares, count)
    )
    for b, r in pairs:
        b["advantages"] = adv_ops.masked_whiten(r, b["completion_mask"], stats=stats).float()


def token_advantages(batches: list[dict[str, torch.Tensor]], beta: float) -> None:
    """REINFORCE++ advantages, in place: whitened returns-to-go of per-token rewards.

    Per-token rewards are -beta k1_t plus the score at the last token; the returns are whitened
    over every token of the batch (all micro-batches and ranks together). On entry each
    micro-batch's ``advantages`` holds its sequences' scores (broadcast over tokens).
    """
    returns = []
    for b in batches:
        mask = b["completion_mask"]
        k1 = _token_kl(b) if beta else torch.zeros_like(b["sampler_logp"])
        scores = b["advantages"][:, 0].double()
        token_rewards = kl_in_reward(scores, k1.double(), mask, beta, per_token=True)
        returns.append(adv_ops.returns_to_go(token_rewards, mask))
    global_whiten(batches, returns)


@torch.no_grad()
def gae_advantages(
    batches: list[dict[str, torch.Tensor]],
    critic: torch.nn.Module,
    cfg: PGConfig,
    beta: float,
    *,
    whiten: bool,
) -> None:
    """PPO advantages, in place: GAE on per-token rewards with the critic's values, whitened.

    Per-token rewards are -beta k1_t plus the score at the last completion token; V_old comes
    from the critic before the update (stored as ``old_values``), the returns R = A + V_old as
    ``returns``, and with ``whiten`` the advantages are whitened over the global batch.
    On entry ``advantages`` holds each sequence's score broadcast over its tokens.
    """
    was_training = critic.training
    critic.eval()
    raw = []
    for b in batches:
        mask = b["completion_mask"]
        values = rollout_values(critic, b).float()
        k1 = _token_kl(b) if beta else torch.zeros_like(b["sampler_logp"])
        rewards = kl_in_reward(b["advantages"][:, 0].double(), k1.double(), mask, beta, True)
        adv, returns = adv_ops.gae(
            rewards, values.double(), mask, gamma=cfg.critic.gamma, lam=cfg.critic.lam
        )
        b["old_values"], b["returns"] = values, returns.float()
        raw.append(adv)
    critic.train(was_training)
    if whiten:
        global_whiten(batches, raw)
    else:
        for b, a in zip(batches, raw, strict=True):
            b["advantages"] = a.float()


def _sequence_k1(batches: list[dict[str, torch.Tensor]], n: int) -> torch.Tensor:
    """Per sequence sum_t KL_t (see :func:`_token_kl`), in rollout order (KL in the reward)."""
    out = torch.zeros(n, dtype=torch.float64)
    for b in batches:
        k1 = torch.where(b["completion_mask"], _token_kl(b), 0.0).sum(1)
        out[b["rows"].cpu()] = k1.double().cpu()
    return out


def _set_advantages(batches: list[dict[str, torch.Tensor]], adv: torch.Tensor) -> None:
    """Broadcast each completion's advantage over its tokens."""
    for b in batches:
        values = adv[b["rows"].cpu()].to(b["advantages"].dtype).to(b["advantages"].device)
        b["advantages"] = values[:, None].expand_as(b["completion_mask"]).clone()
