"""What a policy-gradient step works on: the run's objects, the loop state, the rollout batch.

- :class:`PGRun`: the objects built once (configuration, preset row, prompts, reward functions,
  reference model, sampler); nothing here is saved.
- :class:`LoopState`: what must survive a resume (the prompt-batch counter, the EMA baseline,
  the adaptive KL coefficient, the running reward moments); written into every checkpoint and
  read back on resume.
- :class:`RolloutMicroBatch`: one micro-batch of completions, the model input plus the
  completion-space tensors (B, T) that each stage fills in.
- :class:`RolloutBatch`: one rollout batch as minibatches of micro-batches, with what to log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from rlhfkit.data.prompts import PromptRow
from rlhfkit.envs.base import Environment
from rlhfkit.recipes.policy_gradient.config import PGConfig
from rlhfkit.recipes.policy_gradient.presets import PGPreset
from rlhfkit.rewards.shaping import Moments
from rlhfkit.rollout.multiturn import TurnLimits
from rlhfkit.rollout.sampler import HFGenerator
from rlhfkit.training.run import RunContext
from rlhfkit.types import LossOutput, Rollout


@dataclass
class LoopState:
    """The loop's own state: saved with every checkpoint, restored on resume.

    Attributes:
        rollouts: Prompt batches drawn so far (the position in the seeded prompt order; dynamic
            sampling draws several per step).
        kl_coef: The KL coefficient now (the adaptive controller moves it; None before the
            first step: the preset's).
        ema_baseline: The running reward baseline of ``ema_baseline`` (None before the first
            batch).
        reward_count: ``--algo.reward-norm running``: rewards seen so far (skipped ones not
            counted).
        reward_mean: Their running mean.
        reward_m2: Their running sum of squared deviations from the mean, M2.
    """

    rollouts: int = 0
    kl_coef: float | None = None
    ema_baseline: float | None = None
    reward_count: int = 0
    reward_mean: float = 0.0
    reward_m2: float = 0.0

    @property
    def reward_moments(self) -> Moments:
        """The running reward moments (count, mean, M2)."""
        return self.reward_count, self.reward_mean, self.reward_m2

    @reward_moments.setter
    def reward_moments(self, value: Moments) -> None:
        count, mean, m2 = value
        self.reward_count, self.reward_mean, self.reward_m2 = int(count), float(mean), float(m2)

    def current_kl_coef(self, preset: PGPreset) -> float:
        """The KL coefficient of this step: the controller's, else the preset row's."""
        return preset.kl_coef if self.kl_coef is None else float(self.kl_coef)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> LoopState:
        """The state written by :meth:`to_dict` (a fresh state for None)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (values or {}).items() if k in known})


@dataclass
class PGRun:
    """The objects one run builds once and every step uses.

    Attributes:
        ctx: The policy, tokenizer, optimiser and step counter.
        cfg: The run's configuration.
        preset: The resolved preset row.
        prompts: Every prompt of the source, rendered.
        reward_fns: One loaded reward function per ``cfg.rewards`` entry.
        generator: The sampler on the policy.
        reference: Opens pi_ref for a pass (the adapter-less policy under LoRA, else one frozen
            copy kept loaded); None when no KL is computed.
        trees: Train on prefix trees (each prompt once per micro-batch, no padding).
        ref_head: pi_ref's output-embedding weight, kept for the exact KL in the loss.
        teacher: On-policy distillation's teacher (frozen), or None.
        self_teacher: Self-distillation's teacher (the policy with privileged context), or
            None.
        env: Makes a fresh environment per episode (``--env.name``), or None.
        turns: An episode's bounds (turns, tokens).
    """

    ctx: RunContext
    cfg: PGConfig
    preset: PGPreset
    prompts: list[PromptRow]
    reward_fns: list[Callable[..., Any]]
    generator: HFGenerator
    reference: Callable[[], contextlib.AbstractContextManager] | None
    trees: bool
    ref_head: torch.Tensor | None = None
    teacher: torch.nn.Module | None = None
    self_teacher: Any = None
    env: Callable[[], Environment] | None = None
    turns: TurnLimits = field(default_factory=TurnLimits)

    @property
    def temperature(self) -> float:
        """The temperature the learner's log-probs are taken at (the sampler's; 1 if greedy)."""
        t = self.cfg.sampling.temperature
        return t if t > 0 else 1.0

    @property
    def steps_per_batch(self) -> int:
        """Optimiser steps each rollout batch serves: epochs x minibatches."""
        return self.preset.epochs * self.cfg.algo.minibatches

    @property
    def needs_old(self) -> bool:
        """Whether log pi_old is computed on the learner before the update.

        Needed when a batch serves several steps (pi_old then differs from pi_theta), for the
        critic's GAE, and for an exact KL in the reward (it needs pi_old's hidden states).
        """
        preset = self.preset
        exact_in_reward = preset.kl.needs_hidden and preset.kl_placement == "reward"
        return self.steps_per_batch > 1 or preset.critic or (preset.uses_kl and exact_in_reward)


@dataclass
class RolloutMicroBatch:
    """One micro-batch of completions: the model input and completion-space tensors.

    Attributes:
        inputs: The model input, padded (``prompt_ids``, ``prompt_mask``, ``completion_ids``,
            ``completion_mask``) or prefix-tree packed (:mod:`rlhfkit.data.rollouts`).
        rows: Each row's index in the rollout, (B,).
        sampler_logprobs: The sampler's log-probs, (B, T).
        advantages: A per token, (B, T) (a sequence's advantage broadcast over its tokens).
        old_logprobs: log pi_old on the learner before the update, (B, T), when computed.
        ref_logprobs: log pi_ref, (B, T), when a KL is computed.
        ref_hidden: pi_ref's (N, H) final hidden states at the masked positions (exact KL in
            the loss).
        kl: Per-token KL(pi_old || pi_ref) for the reward, (B, T), when exact (else k1 from the
            log-probs).
        old_values: V_old(s_t) from the critic before the update, (B, T) (PPO).
        returns: R_t = A_t + V_old(s_t), the value targets, (B, T) (PPO).
        teacher_logprobs: log pi_T of the sampled tokens, (B, T) (on-policy distillation).
        teacher_rows: Rows that get the teacher's term, (B,) bool (self-distillation: those
            with a privileged context); None: every row.
    """

    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor
    sampler_logprobs: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    ref_hidden: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None
    teacher_rows: torch.Tensor | None = None

    @classmethod
    def from_collated(
        cls, batch: dict[str, torch.Tensor], device: torch.device
    ) -> RolloutMicroBatch:
        """Wrap a collated rollout micro-batch (:mod:`rlhfkit.data.rollouts`) on ``device``."""
        moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        sampler, rows = moved.pop("sampler_logprobs"), moved.pop("rows")
        return cls(moved, rows, sampler, moved.pop("advantages"))

    @property
    def mask(self) -> torch.Tensor:
        """True on the completion tokens that count, (B, T)."""
        return self.inputs["completion_mask"]

    @property
    def kl_logprobs(self) -> torch.Tensor:
        """Log pi_old where computed, else the sampler's: the side a KL in the reward reads."""
        return self.old_logprobs if self.old_logprobs is not None else self.sampler_logprobs


StepLoss = Callable[[RolloutMicroBatch, float], LossOutput]
"""``loss(micro_batch, normaliser)``: this micro-batch's share of an optimiser step's loss."""


@dataclass
class Sampled:
    """Scored groups: G completions for each of P prompts (rows grouped by prompt).

    Attributes:
        prompts: The P prompts.
        rollout: The P x G completions.
        texts: The decoded completions.
        rewards: (P, G) fp64, NaN where a completion is skipped.
        components: Each reward component's value per completion (None: not scored).
        greedy: Each prompt's greedy-completion reward, (P,) (ReMax), or None.
        episodes: With an environment, each episode's counters (turns, tool calls, ...);
            empty otherwise.
    """

    prompts: list[PromptRow]
    rollout: Rollout
    texts: list[str]
    rewards: torch.Tensor
    components: dict[str, list[float | None]]
    greedy: torch.Tensor | None = None
    episodes: list[dict[str, float]] = field(default_factory=list)


@dataclass
class RolloutBatch:
    """One rollout batch: minibatches of micro-batches, and what to log.

    Attributes:
        minibatches: The optimiser steps' micro-batches (whole sequences under a token budget).
        sampled: The scored groups.
        advantages: Each completion's advantage, (P*G,) (the token mean for a token-level
            estimator; 0 for skipped completions).
        stats: Sampling statistics to log (dynamic rounds, the sequence KL, ...).
    """

    minibatches: list[list[RolloutMicroBatch]]
    sampled: Sampled
    advantages: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def batches(self) -> list[RolloutMicroBatch]:
        """Every micro-batch of every minibatch."""
        return [b for mb in self.minibatches for b in mb]

    @property
    def rewards(self) -> torch.Tensor:
        """(P, G) rewards, NaN where skipped."""
        return self.sampled.rewards

    @property
    def rollout(self) -> Rollout:
        """The completions."""
        return self.sampled.rollout

    @property
    def prompts(self) -> list[PromptRow]:
        """The prompts of the groups."""
        return self.sampled.prompts

    @property
    def components(self) -> dict[str, list[float | None]]:
        """Each reward component per completion."""
        return self.sampled.components

    @property
    def texts(self) -> list[str]:
        """The decoded completions."""
        return self.sampled.texts
