"""The policy-gradient family as tables: every named algorithm is a row of independent choices.

Four axes (each a table here or in the layer below) and a few modifiers:

- advantage estimator (:data:`ESTIMATORS`): how rewards become advantages; each declares its
  level (one value per sequence, or per token) and what it needs besides the rewards (a greedy
  decode, the running EMA baseline, a critic);
- objective (:data:`rlhfkit.losses.policy.OBJECTIVES`): reinforce, ppo_clip, gspo, cispo, sapo;
- loss aggregation (:data:`rlhfkit.ops.masking.AGGREGATIONS`): seq_mean_token_mean, token_mean,
  fixed_length;
- KL to the reference (:data:`KL_SOURCES` and :data:`KL_PLACEMENTS`): which estimate of the
  per-token KL and where it enters (the reward or the loss).

:data:`PG_PRESETS` maps ``reinforce``, ``rloo``, ``grpo``, ``ppo``, ... to rows. A new variant is
one row and, when it is truly new, one pure function with its tests. The method reference
(``docs/methods/policy.md#presets``) documents each row with its paper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from rlhfkit.losses.policy import ObjectiveParams
from rlhfkit.ops import advantages as adv_ops
from rlhfkit.ops.kl import KL_ESTIMATORS, linear_full_kl

# -- advantage estimators ---------------------------------------------------------------------

Needs = Literal["greedy", "ema", "critic"]
"""What an estimator needs besides the rewards: each prompt's greedy-decode reward (ReMax), the
running EMA baseline (kept in the loop state), or a value model (PPO's GAE)."""


@dataclass(frozen=True)
class BaselineInputs:
    """What an estimator may read besides the rewards.

    Attributes:
        ema: The running baseline before this batch (None on the first batch).
        greedy: Each prompt's greedy-completion reward, (P,) fp64 (ReMax), or None.
    """

    ema: float | None = None
    greedy: torch.Tensor | None = None

    def row(self, i: int) -> BaselineInputs:
        """The inputs of group ``i`` alone."""
        greedy = None if self.greedy is None else self.greedy[i : i + 1]
        return BaselineInputs(self.ema, greedy)


@dataclass(frozen=True)
class Estimator:
    """One advantage estimator of (P, G) rewards (NaN: a skipped completion).

    Attributes:
        fn: ``fn(rewards, inputs, algo)`` -> the sequence-level advantages, same shape; for a
            token-level estimator, the sequence scores its token stage starts from.
        scope: "group" (each row is a prompt's group) or "batch" (one pool of all rewards).
        level: "sequence" (one advantage broadcast over a completion's tokens) or "token"
            (REINFORCE++'s whitened returns-to-go, PPO's GAE).
        min_size: Fewest scored samples a group needs; smaller groups get A = 0.
        needs: Inputs besides the rewards (:data:`Needs`).
    """

    fn: Callable[[torch.Tensor, BaselineInputs, Any], torch.Tensor]
    scope: Literal["group", "batch"] = "group"
    level: Literal["sequence", "token"] = "sequence"
    min_size: int = 1
    needs: frozenset[str] = frozenset()


def _scores(rewards: torch.Tensor, inputs: BaselineInputs, algo: Any) -> torch.Tensor:
    """The rewards unchanged: a token-level estimator starts from each sequence's score."""
    return rewards


ESTIMATORS: dict[str, Estimator] = {
    "batch_baseline": Estimator(lambda r, i, a: adv_ops.batch_baseline(r), "batch"),
    "ema_baseline": Estimator(
        lambda r, i, a: adv_ops.ema_baseline(r, i.ema, a.ema_decay)[0], "batch",
        needs=frozenset({"ema"}),
    ),
    "leave_one_out": Estimator(lambda r, i, a: adv_ops.leave_one_out(r), min_size=2),
    "group_zscore": Estimator(
        lambda r, i, a: adv_ops.group_zscore(r, std=a.std, eps=a.std_eps), min_size=2
    ),
    "group_center": Estimator(lambda r, i, a: adv_ops.group_center(r)),
    "maxrl": Estimator(lambda r, i, a: adv_ops.maxrl(r)),
    "greedy_baseline": Estimator(
        lambda r, i, a: adv_ops.greedy_baseline(r, i.greedy), needs=frozenset({"greedy"})
    ),
    "batch_whiten": Estimator(_scores, "batch", level="token"),
    # REINFORCE++-baseline: the group mean subtracted first, then whitened like batch_whiten
    "group_whiten": Estimator(lambda r, i, a: adv_ops.group_center(r), level="token"),
    "gae": Estimator(_scores, "batch", level="token", needs=frozenset({"critic"})),
}  # fmt: skip
"""The advantage estimators ``rlhfkit rl`` runs, by name (``--algo.advantage``)."""

PLANNED_ESTIMATORS = ("process_group",)
"""Named in the preset table but not runnable yet: step rewards from a process reward model."""


# -- KL to the reference ----------------------------------------------------------------------


@dataclass(frozen=True)
class KLSide:
    """One model's view of the completion tokens, what a KL source reads.

    Attributes:
        logprobs: (B, T) log-probs of the sampled tokens.
        hidden: (N, H) final hidden states at the N masked positions, or None.
        head: (V, H) output-embedding weight, or None.
    """

    logprobs: torch.Tensor
    hidden: torch.Tensor | None = None
    head: torch.Tensor | None = None


def _exact(policy: KLSide, ref: KLSide, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Exact per-token KL(pi || pi_ref) over the vocabulary, (B, T) with 0 off the mask."""
    if policy.hidden is None or ref.hidden is None:
        raise ValueError("the full-vocabulary KL needs a model with a linear LM head")
    kl = torch.zeros(mask.shape, dtype=policy.logprobs.dtype, device=mask.device)
    kl[mask] = linear_full_kl(
        policy.hidden, policy.head, ref.hidden, ref.head, temperature=temperature
    ).to(kl.dtype)
    return kl


def _sampled(name: str) -> Callable[[KLSide, KLSide, torch.Tensor, float], torch.Tensor]:
    estimator = KL_ESTIMATORS[name]
    return lambda policy, ref, mask, temperature: estimator(policy.logprobs, ref.logprobs)


_sampled_k1 = _sampled("k1")


@dataclass(frozen=True)
class KLSource:
    """One estimate of the per-token KL(pi || pi_ref).

    Attributes:
        loss: The per-token estimate a KL-in-the-loss term differentiates, (B, T).
        reward: The per-token estimate a KL-in-the-reward penalty uses, (B, T). For the sampled
            estimators it is k1 = log pi_old - log pi_ref, whose per-sequence sum is unbiased
            for the sequence KL.
        needs_hidden: Both models' final hidden states and output heads are needed (the exact
            KL over the vocabulary), not only the sampled tokens' log-probs.
    """

    loss: Callable[[KLSide, KLSide, torch.Tensor, float], torch.Tensor]
    reward: Callable[[KLSide, KLSide, torch.Tensor, float], torch.Tensor] = _sampled_k1
    needs_hidden: bool = False


KL_SOURCES: dict[str, KLSource] = {
    "k1": KLSource(_sampled("k1")),
    "k2": KLSource(_sampled("k2")),
    "k3": KLSource(_sampled("k3")),
    "full": KLSource(_exact, _exact, needs_hidden=True),
}
"""The KL estimates by name (``--algo.kl_estimator``)."""

KL_PLACEMENTS = ("none", "reward", "loss")
"""Where the KL enters (``--algo.kl_placement``): nowhere, the reward, or the loss."""


# -- the preset table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PGPreset:
    """One row of the preset table: a value on each of the four axes plus modifiers.

    Attributes:
        advantage: Name in :data:`ESTIMATORS`.
        objective: Name in :data:`rlhfkit.losses.policy.OBJECTIVES`.
        aggregation: Loss aggregation mode.
        kl_placement: Name in :data:`KL_PLACEMENTS`.
        kl_estimator: Name in :data:`KL_SOURCES`.
        kl_coef: The KL coefficient (the adaptive controller's starting value).
        params: Clip ranges and gates of the objective.
        critic: Train a value model (PPO).
        whiten_advantages: Whiten GAE's advantages over the global batch.
        dynamic_sampling: Drop groups whose rewards are all equal and sample more (DAPO).
        overlong_penalty: Add DAPO's soft overlong penalty to the reward.
        min_group_size: Fewest samples per prompt the row runs with.
        epochs: Optimiser passes over each rollout batch.
        teacher: The row is on-policy distillation and needs ``--algo.teacher``.
    """

    advantage: str
    objective: str
    aggregation: Literal["seq_mean_token_mean", "token_mean", "fixed_length"]
    kl_placement: Literal["none", "reward", "loss"] = "none"
    kl_estimator: Literal["k1", "k2", "k3", "full"] = "k1"
    kl_coef: float = 0.0
    params: ObjectiveParams = field(default_factory=ObjectiveParams)
    critic: bool = False
    whiten_advantages: bool = False
    dynamic_sampling: bool = False
    overlong_penalty: bool = False
    min_group_size: int = 1
    epochs: int = 1
    teacher: bool = False

    @property
    def estimator(self) -> Estimator:
        """The advantage estimator of this row."""
        return ESTIMATORS[self.advantage]

    @property
    def kl(self) -> KLSource:
        """The KL source of this row."""
        return KL_SOURCES[self.kl_estimator]

    @property
    def kl_per(self) -> Literal["token", "seq"]:
        """Where a KL in the reward lands, read from the estimator's level.

        "seq" (the sequence sum taken off the sequence reward) for a sequence-level estimator,
        else "token" (on each token's reward, before the token stage), so a per-token KL can
        never be computed and then silently dropped.
        """
        if self.kl_placement == "reward" and self.estimator.level == "sequence":
            return "seq"
        return "token"

    @property
    def uses_kl(self) -> bool:
        """A KL to the reference enters the reward or the loss (so pi_ref is needed)."""
        return self.kl_placement != "none" and self.kl_coef > 0


_REWARD_KL = {"kl_placement": "reward", "kl_estimator": "k1", "kl_coef": 0.05}
_LOSS_KL = {"kl_placement": "loss", "kl_estimator": "k3", "kl_coef": 0.04}
_GROUP = {"min_group_size": 2}

PG_PRESETS: dict[str, PGPreset] = {
    "reinforce": PGPreset("batch_baseline", "reinforce", "seq_mean_token_mean", **_REWARD_KL),
    "rloo": PGPreset("leave_one_out", "reinforce", "fixed_length", **_REWARD_KL, **_GROUP),
    "remax": PGPreset("greedy_baseline", "reinforce", "fixed_length", **_REWARD_KL),
    "reinforce_pp": PGPreset("batch_whiten", "ppo_clip", "token_mean", **_REWARD_KL),
    "ppo": PGPreset(
        "gae", "ppo_clip", "seq_mean_token_mean", **_REWARD_KL, critic=True, whiten_advantages=True,
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
    # on-policy distillation: the teacher's per-token advantage (--algo.teacher), plus any
    # reward centred per group
    "opd": PGPreset("group_center", "ppo_clip", "token_mean", teacher=True),
    "grpo_process": PGPreset(
        "process_group", "ppo_clip", "seq_mean_token_mean", **_LOSS_KL, **_GROUP
    ),
}  # fmt: skip
"""Each named algorithm as a row of choices on the four axes (``--algo.preset``)."""
