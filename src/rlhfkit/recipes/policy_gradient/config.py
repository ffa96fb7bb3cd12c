"""Configuration of ``rlhfkit rl``: the option groups and the preset row they resolve to."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Literal

from rlhfkit.config import (
    EngineConfig,
    EnvConfig,
    LogConfig,
    LoopConfig,
    ModelConfig,
    OptimConfig,
    Problems,
)
from rlhfkit.data.schemas import SCHEMAS
from rlhfkit.data.sources import data_section_problems
from rlhfkit.errors import ConfigError
from rlhfkit.losses.policy import OBJECTIVES
from rlhfkit.ops.masking import AGGREGATIONS
from rlhfkit.recipes.policy_gradient.presets import (
    ESTIMATORS,
    KL_PLACEMENTS,
    KL_SOURCES,
    PG_PRESETS,
    PLANNED_ESTIMATORS,
    PGPreset,
)
from rlhfkit.rewards.base import reward_spec_problem
from rlhfkit.rewards.shaping import REWARD_NORMS
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.validation import did_you_mean, model_path_problem

log = logging.getLogger(__name__)


@dataclass
class PGDataConfig:
    """Prompts to sample from (any schema with a prompt; the row's fields reach the rewards)."""

    train: str = "builtin:arithmetic"
    """Prompt source: a .jsonl/.json/.parquet/.csv file, a hub dataset, or builtin:NAME."""
    train_split: str = "train"
    """Split of the source."""
    schema: str = "verifiable"
    """Row format (see the data formats page of the documentation)."""
    max_prompt_len: int = 512
    """Prompt tokens kept (cut from the left)."""
    limit: int | None = None
    """Use only the first N rows."""
    share_prefix: bool = True
    """Train on prefix trees: each prompt computed once for its completions, no padding (needs
    the varlen_sdpa attention; otherwise padded rows)."""

    def problems(self) -> Problems:
        """A missing, empty or unreadable prompt source, an unknown schema, invalid limits."""
        out = data_section_problems(self, ("train",))
        if self.schema not in SCHEMAS:
            names = list(SCHEMAS)
            hint = did_you_mean(self.schema, names)
            out.append(
                ("schema", f"unknown schema {self.schema!r}{hint} (valid: {', '.join(names)})")
            )
        return out


@dataclass
class PGAlgoConfig:
    """Which preset, and overrides of its axes and modifiers (None: the preset's value)."""

    preset: str = "grpo"
    """reinforce, rloo, remax, reinforce_pp, ppo, grpo, dr_grpo, dapo, gspo, cispo, sapo, maxrl
    or opd (on-policy distillation, with --algo.teacher; grpo_process is in the table but not
    yet runnable)."""
    advantage: str | None = None
    """Advantage estimator (batch_baseline, ema_baseline, leave_one_out, group_zscore, ...)."""
    objective: str | None = None
    """reinforce, ppo_clip, gspo, cispo or sapo."""
    aggregation: str | None = None
    """seq_mean_token_mean, token_mean or fixed_length."""
    kl_placement: str | None = None
    """none, reward or loss."""
    kl_estimator: str | None = None
    """k1, k2, k3 or full (exact over the vocabulary, from both models' hidden states)."""
    kl_coef: float | None = None
    """KL coefficient c_KL (the adaptive controller's starting value)."""
    beta: float | None = None
    """Deprecated spelling of --algo.kl_coef, accepted for one release (in rlhfkit ``beta`` is
    the DPO family's coefficient)."""
    eps_low: float | None = None
    """Lower clip range."""
    eps_high: float | None = None
    """Upper clip range."""
    std: str = "unbiased"
    """group_zscore: 'unbiased' or 'biased' std."""
    std_eps: float = 1e-4
    """group_zscore: added to the std."""
    ema_decay: float = 0.9
    """ema_baseline: decay of the running baseline."""
    kl_target: float | None = None
    """Adaptive KL controller (Ziegler 2019): target sequence KL in nats (None: fixed kl_coef)."""
    kl_horizon: int = 10_000
    """Adaptive KL controller: horizon in samples."""
    tis_cap: float = 2.0
    """Importance-weight threshold C against the sampler's log-probs (inf: plain IS)."""
    tis_mode: Literal["token_truncate", "token_mask", "sequence_mask"] = "token_truncate"
    """Sampler/learner mismatch correction: 'token_truncate' w = min(rho, C); 'token_mask' drops
    tokens with rho > C; 'sequence_mask' drops rows whose geometric-mean rho is outside
    [1/C, C]."""
    truncation_penalty: float | None = None
    """Reward of a completion cut at max_new_tokens, given without calling the rewards (None:
    score it like the others)."""
    mask_truncated: bool = False
    """Skip completions cut at max_new_tokens (no reward call, no loss; DAPO's overlong filter)."""
    dynamic_sampling: bool | None = None
    """Drop groups whose rewards are all equal and sample more prompts (DAPO)."""
    max_refills: int = 3
    """Dynamic sampling: most extra sampling rounds per batch."""
    pass_rate_band: tuple[float, float] | None = None
    """Online difficulty filter: keep only groups whose pass rate (share of samples with reward
    >= pass_threshold) lies in [low, high], refilling like dynamic sampling (e.g. 0.2 0.8)."""
    pass_threshold: float = 1.0
    """A sample passes the online difficulty filter when its reward is at least this."""
    overlong_penalty: bool | None = None
    """Add DAPO's soft overlong penalty to the reward."""
    overlong_cache: int | None = None
    """Overlong penalty's L_cache (None: max_new_tokens // 4); L_max is max_new_tokens."""
    length_penalty: float = 0.0
    """Reward -length_penalty per completion token beyond length_budget (0: off)."""
    length_budget: int = 0
    """Completion tokens free of the length penalty."""
    reward_norm: Literal["none", "batch", "running"] = "none"
    """Normalise the rewards (after the penalties, before the KL and the estimator):
    r <- (r - mean) / (std + 1e-8) with this batch's population mean and std ('batch') or the
    running ones over every reward so far, this batch included ('running')."""
    reward_clip: float | None = None
    """Clip each reward (after any normalisation) to [-c, c] (None: no clipping)."""
    epochs: int | None = None
    """Optimiser passes over each rollout batch (None: the preset's; PPO 4, others 1)."""
    minibatches: int = 1
    """Optimiser steps per pass: the rollout batch is cut into this many minibatches."""
    teacher: str | None = None
    """On-policy distillation: a teacher model sharing the policy's tokenizer (frozen, in the
    compute dtype, placed like the reference), or 'self' (the policy given privileged context:
    --algo.self-context, --algo.self-teacher). Each sampled token a_t gets the advantage
    teacher_coef * sum_{s >= t} teacher_gamma^(s-t) (log pi_T(a_s) - log pi_old(a_s)), added to
    the preset's (the opd preset has only the centred reward besides)."""
    teacher_coef: float = 1.0
    """On-policy distillation: weight of the teacher's advantage."""
    teacher_gamma: float = 0.0
    """On-policy distillation: discount of the teacher's per-token terms (0: each token's own)."""
    self_context: Literal["answer", "sibling"] = "answer"
    """--algo.teacher self: what the teacher reads besides the prompt: the row's reference answer,
    or a correct completion of another sample of the same prompt."""
    self_teacher: Literal["frozen", "live", "ema"] = "frozen"
    """--algo.teacher self: the teacher's weights: the starting model, the current policy, or an
    exponential moving average of the policy."""
    self_ema: float = 0.01
    """--algo.teacher self with ema: the average's step size alpha."""

    def problems(self) -> Problems:
        """A teacher that is not there, a discount outside [0, 1], a reward clip <= 0."""
        out = []
        if self.reward_clip is not None and not self.reward_clip > 0:
            out.append(("reward_clip", f"must be > 0 (or unset), got {self.reward_clip}"))
        if self.reward_norm not in REWARD_NORMS:
            names = ", ".join(REWARD_NORMS)
            out.append(("reward_norm", f"unknown {self.reward_norm!r} (choose from {names})"))
        if self.teacher not in (None, "self"):
            out += [("teacher", text) for text in [model_path_problem(self.teacher)] if text]
        if not 0.0 < self.self_ema <= 1.0:
            out.append(("self_ema", f"must be in (0, 1], got {self.self_ema}"))
        if not 0.0 <= self.teacher_gamma <= 1.0:
            out.append(("teacher_gamma", f"must be in [0, 1], got {self.teacher_gamma}"))
        return out


@dataclass
class RLEngineConfig(EngineConfig):
    """Where rollouts are sampled, and how far sampling may run ahead of training.

    On vllm the engine starts on the run's starting model and gets the learner's weights after
    every optimiser step (synchronous unless max_staleness > 0).
    """

    max_staleness: int | None = None
    """None: synchronous (each batch is sampled by the policy of the step that trains on it).
    k >= 0: asynchronous: an engine copy of the policy samples the next batches in the
    background while the learner trains, and a batch trained on at optimiser step s was drawn by
    the weights of a step >= s - k (0 reproduces the synchronous run). One process only."""
    sync_every: int = 1
    """Asynchronous: copy the learner's weights into the engine after every N optimiser steps
    (sooner when the staleness bound needs fresher weights)."""

    def problems(self) -> Problems:
        """Negative staleness, a sync interval below 1, and the engine's own problems."""
        out = super().problems()
        if self.max_staleness is not None and self.max_staleness < 0:
            out.append(("max_staleness", f"must be >= 0 (or unset), got {self.max_staleness}"))
        if self.sync_every < 1:
            out.append(("sync_every", f"must be at least 1, got {self.sync_every}"))
        return out


@dataclass
class CriticConfig:
    """PPO's value model (used only by presets with a critic)."""

    init: str = "auto"
    """'reward_model' (the --critic.model reward model, or the rm:<dir> reward's), 'policy'
    (the policy's weights plus a new scalar head), or 'auto' (reward_model when one is known)."""
    model: str | None = None
    """Checkpoint of the value model (default: by ``init``)."""
    lr: float = 1e-5
    """Learning rate of the value model (same schedule as the policy)."""
    vf_coef: float = 0.5
    """c_v: weight of the value loss in L = L_pi + c_v L_V."""
    value_clip: float | None = 0.2
    """eps_v: value clipping around V_old (None: no clipping)."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """lambda of GAE."""
    warmup_steps: int = 0
    """Optimiser steps at the start that train only the value model."""


DEFAULT_REWARDS = ("rlhfkit.rewards.answers:exact_answer",)
"""The reward of a run that names none (without an environment)."""


@dataclass
class PGConfig:
    """rlhfkit rl: policy-gradient RL against rewards."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PGDataConfig = field(default_factory=PGDataConfig)
    algo: PGAlgoConfig = field(default_factory=PGAlgoConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    engine: RLEngineConfig = field(default_factory=RLEngineConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=1.0, num_samples=8)
    )
    rewards: tuple[str, ...] = DEFAULT_REWARDS
    """Rewards: 'module:function', 'path/file.py:function', 'rm:<reward model dir>',
    'rm-ensemble:<mean|min|uwo[=lambda]>:<dir>,<dir>,...',
    'verifier:NAME', 'judge:MODEL' or 'rubric:FILE' (with '|judge:MODEL', '|implicit'). With
    ``--env.name`` the environment's reward is used, plus these when they are set (a reward
    function then scores each episode's last reply)."""
    weights: tuple[float, ...] = ()
    """Weight of each reward (default 1 each)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_ratio=0.0))
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(batch_size=4, max_steps=100))
    """Batching and run length. Here ``batch_size`` counts prompts per rollout batch, each
    sampled ``sampling.num_samples`` times; ``max_steps`` counts optimiser steps."""
    log: LogConfig = field(default_factory=lambda: LogConfig(run_dir="runs/rl"))
    sample_every: int = 10
    """Write a few completions to samples.jsonl every N steps (0: never)."""

    def problems(self) -> Problems:
        """Invalid values found before anything loads.

        The preset and its overrides, the rewards and their weights, sampling settings, the
        critic's model path.
        """
        out = _sampling_problems(self.sampling)
        try:
            preset = resolve_preset(self.algo)
        except (ValueError, NotImplementedError) as err:
            out.append(("", str(err)))
        else:
            if preset.min_group_size > self.sampling.num_samples:
                out.append(("sampling.num_samples", group_size_problem(self.algo.preset, preset)))
        if not self.rewards and self.env.name is None:
            out.append(("rewards", "at least one reward is needed"))
        out += [("rewards", text) for text in map(reward_spec_problem, self.rewards) if text]
        if self.weights and len(self.weights) != len(self.rewards):
            out.append(("weights", f"{len(self.weights)} weights for {len(self.rewards)} rewards"))
        if self.critic.model is not None and (problem := model_path_problem(self.critic.model)):
            out.append(("critic.model", problem))
        if self.sample_every < 0:
            out.append(("sample_every", f"must be >= 0 (0: never), got {self.sample_every}"))
        return out


def _sampling_problems(s: SamplingConfig) -> Problems:
    """Sampling settings that cannot work (as ``sampling.<field>`` problems)."""
    out = [
        (f"sampling.{name}", f"must be at least 1, got {value}")
        for name, value in (("max_new_tokens", s.max_new_tokens), ("num_samples", s.num_samples))
        if value < 1
    ]
    if s.temperature < 0:
        out.append(("sampling.temperature", f"must be >= 0 (0: greedy), got {s.temperature}"))
    if not 0.0 < s.top_p <= 1.0:
        out.append(("sampling.top_p", f"must be in (0, 1], got {s.top_p}"))
    return out


def group_size_problem(name: str, preset: PGPreset) -> str:
    """The message of a group smaller than the preset needs."""
    return f"preset {name!r} needs at least {preset.min_group_size} samples per prompt"


_AXES = ("advantage", "objective", "aggregation", "kl_placement", "kl_estimator", "kl_coef",
         "dynamic_sampling", "overlong_penalty", "epochs")  # fmt: skip
"""Preset fields that an ``--algo`` field of the same name overrides when set."""

CHOICES: dict[str, tuple[str, ...]] = {
    "advantage": (*ESTIMATORS, *PLANNED_ESTIMATORS),
    "objective": tuple(OBJECTIVES),
    "aggregation": AGGREGATIONS[:3],
    "kl_placement": KL_PLACEMENTS,
    "kl_estimator": tuple(KL_SOURCES),
}
"""The values each axis accepts, read from the tables."""


def _kl_coef(cfg: PGAlgoConfig) -> float | None:
    """``--algo.kl_coef``, or the deprecated ``--algo.beta`` (with a warning)."""
    if cfg.beta is None:
        return cfg.kl_coef
    if cfg.kl_coef is not None:
        raise ConfigError("set --algo.kl_coef only (--algo.beta is its deprecated spelling)")
    log.warning("--algo.beta is deprecated for the RL KL coefficient: use --algo.kl_coef")
    return cfg.beta


def resolve_preset(cfg: PGAlgoConfig) -> PGPreset:
    """The preset row with the overrides applied, every axis checked against its table.

    Raises:
        ValueError: An unknown preset or axis value, or settings that do not go together.
        NotImplementedError: A row whose estimator is not runnable yet.
    """
    band = cfg.pass_rate_band
    if band is not None and not (len(band) == 2 and 0.0 <= band[0] <= band[1] <= 1.0):
        raise ConfigError(f"--algo.pass-rate-band: need 0 <= LOW <= HIGH <= 1, got {band}")
    if cfg.preset not in PG_PRESETS:
        raise ConfigError(
            f"--algo.preset: unknown preset {cfg.preset!r}"
            f"{did_you_mean(cfg.preset, sorted(PG_PRESETS))} (choose from {sorted(PG_PRESETS)})"
        )
    preset = PG_PRESETS[cfg.preset]
    params = preset.params
    if cfg.eps_low is not None or cfg.eps_high is not None:
        params = replace(
            params,
            eps_low=cfg.eps_low if cfg.eps_low is not None else params.eps_low,
            eps_high=cfg.eps_high if cfg.eps_high is not None else params.eps_high,
        )
    values = {**{k: getattr(cfg, k, None) for k in _AXES}, "kl_coef": _kl_coef(cfg)}
    preset = replace(preset, params=params, **{k: v for k, v in values.items() if v is not None})
    if preset.epochs < 1 or cfg.minibatches < 1:
        raise ConfigError(
            f"--algo.epochs and --algo.minibatches must be >= 1, got {preset.epochs}, "
            f"{cfg.minibatches}"
        )
    for axis, allowed in CHOICES.items():
        value = getattr(preset, axis)
        if value not in allowed:
            raise ConfigError(
                f"unknown --algo.{axis.replace('_', '-')} {value!r}"
                f"{did_you_mean(str(value), list(allowed))} (choose from {', '.join(allowed)})"
            )
    if preset.advantage not in ESTIMATORS:
        raise NotImplementedError(
            f"preset {cfg.preset!r} needs advantage {preset.advantage!r} (step rewards from a "
            "process reward model), which rlhfkit rl does not have yet"
        )
    if ("critic" in preset.estimator.needs) != preset.critic:
        raise ConfigError("the 'gae' advantage and a critic go together (preset 'ppo')")
    return preset


def total_steps(cfg: PGConfig, preset: PGPreset, prompts: int) -> int:
    """Optimiser steps of the run.

    ``loop.max_steps``, else the rollout batches of ``loop.epochs`` passes over the prompts
    times the steps each batch serves (epochs x minibatches).
    """
    if cfg.loop.max_steps:
        return cfg.loop.max_steps
    per_epoch = max(1, prompts // cfg.loop.batch_size)
    per_batch = preset.epochs * cfg.algo.minibatches
    return per_batch * max(1, math.ceil(cfg.loop.epochs * per_epoch))
