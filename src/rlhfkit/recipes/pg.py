"""Policy-gradient RL (RLHF book chapter 6; METHODS.md sections 5-6): ``rlhfkit rl``.

REINFORCE, RLOO, ReMax, REINFORCE++, PPO, GRPO, Dr. GRPO, DAPO, GSPO, CISPO, SAPO and MaxRL.

Every algorithm is a row of ``PG_PRESETS``: an advantage estimator, an objective, a loss
aggregation and a KL placement, plus modifiers; ``--algo.preset grpo`` picks the row and the
other ``--algo`` fields override single axes.

Loop, for each rollout batch (steps 1-5 in :mod:`rlhfkit.recipes.pg_collect`):
    1. The next ``loop.batch_size`` prompts of a seeded shuffle, rendered with the chat template.
    2. Sample ``sampling.num_samples`` completions per prompt from the policy (KV cache, one
       prefill per prompt; :class:`rlhfkit.rollout.sampler.HFGenerator`), with the sampler's
       per-token log-probs, entropies and finish reasons.
    3. Rewards: every ``--rewards`` entry (``module:function`` or ``rm:<dir>``) scores the
       completion text with the example's fields; the weighted sum is the reward, each component
       logged. Completions cut at ``max_new_tokens`` get ``truncation_penalty`` instead (when
       set), without calling the rewards (EOS-only scoring). DAPO adds its overlong penalty. A
       reward of None skips the completion.
    4. DAPO's dynamic sampling drops groups with all-equal rewards and samples more prompts.
    5. KL in the reward (per sequence, or per token for REINFORCE++ and PPO), then advantages:
       a group estimator broadcast over each completion's tokens, REINFORCE++'s whitened
       returns-to-go, or PPO's GAE with the critic (:mod:`rlhfkit.recipes.ppo`).
    6. ``algo.epochs`` x ``algo.minibatches`` optimiser steps on the batch: policy loss per token
       (objective, TIS weight against the sampler, KL in the loss), reduced with the preset's
       aggregation under one global normaliser per minibatch; clip; AdamW. With more than one
       step per batch, log pi_old is computed on the learner before the first; with one,
       pi_old = sg(pi_theta) (the ratio is 1: clipping inactive).
    7. Log reward mean/std and per component, KL, entropy, clip fraction, approximate KL,
       completion lengths, finish reasons, advantage statistics, the share of zero-variance
       groups, and a few samples every ``sample_every`` steps (``samples.jsonl``).

The reference model for a KL is the starting model, held in memory (eval mode, compute dtype)
or, under LoRA, the policy with its adapter disabled. Not yet here (stated, not faked): process
rewards (``grpo_process`` raises a clear error).
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig, to_dict
from rlhfkit.data.rollouts import rollout_micro_batches
from rlhfkit.losses.policy import OBJECTIVES, PG_PRESETS, PGPreset, policy_loss, tis_weights
from rlhfkit.models.forward import fused_head, rollout_logprobs
from rlhfkit.models.heads import supports_prefix_trees
from rlhfkit.ops.kl import KL_ESTIMATORS, adaptive_kl_coef, linear_full_kl
from rlhfkit.ops.masking import Aggregation, normaliser_count
from rlhfkit.recipes.pg_advantages import (
    ESTIMATORS,
    _sequence_k1,
    _set_advantages,
    token_advantages,
)
from rlhfkit.recipes.pg_collect import (
    PromptRow,
    RolloutBatch,
    attach_logprobs,
    collect,
    greedy_rewards,
    load_prompts,
    score,
)
from rlhfkit.rewards import load_reward_fn
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.sampler import HFGenerator
from rlhfkit.training.accumulate import accumulate
from rlhfkit.training.distributed import all_reduce_sum
from rlhfkit.training.run import RunContext, build_run, finish_run

log = logging.getLogger(__name__)


@dataclass
class PGDataConfig:
    """Prompts to sample from (any schema with a prompt; the row's fields reach the rewards)."""

    train: str = "builtin:arithmetic"
    """Prompt source: a .jsonl/.json/.parquet/.csv file, a hub dataset, or builtin:NAME."""
    train_split: str = "train"
    """Split of the source."""
    schema: str = "verifiable"
    """Row format (docs/data_formats.md)."""
    max_prompt_len: int = 512
    """Prompt tokens kept (cut from the left)."""
    limit: int | None = None
    """Use only the first N rows."""
    share_prefix: bool = True
    """Train on prefix trees: each prompt computed once for its completions, no padding (needs
    the varlen_sdpa attention; otherwise padded rows)."""


@dataclass
class PGAlgoConfig:
    """Which preset, and overrides of its axes and modifiers (None: the preset's value)."""

    preset: str = "grpo"
    """reinforce, rloo, remax, reinforce_pp, ppo, grpo, dr_grpo, dapo, gspo, cispo, sapo or
    maxrl (grpo_process is in the table but not yet runnable)."""
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
    beta: float | None = None
    """KL coefficient."""
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
    """Adaptive KL controller (Ziegler 2019): target sequence KL in nats (None: fixed beta)."""
    kl_horizon: int = 10_000
    """Adaptive KL controller: horizon in samples."""
    tis_cap: float = 2.0
    """Truncated importance sampling cap C against the sampler's log-probs (inf: plain IS)."""
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
    epochs: int | None = None
    """Optimiser passes over each rollout batch (None: the preset's; PPO 4, others 1)."""
    minibatches: int = 1
    """Optimiser steps per pass: the rollout batch is cut into this many minibatches."""


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


@dataclass
class PGConfig:
    """rlhfkit rl: policy-gradient RL against rewards."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PGDataConfig = field(default_factory=PGDataConfig)
    algo: PGAlgoConfig = field(default_factory=PGAlgoConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=1.0, num_samples=8)
    )
    rewards: tuple[str, ...] = ("rlhfkit.rewards.answers:exact_answer",)
    """Rewards: 'module:function', 'path/file.py:function' or 'rm:<reward model dir>'."""
    weights: tuple[float, ...] = ()
    """Weight of each reward (default 1 each)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_ratio=0.0))
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(batch_size=4, max_steps=100))
    """Batching and run length. Here ``batch_size`` counts prompts per rollout batch, each
    sampled ``sampling.num_samples`` times; ``max_steps`` counts optimiser steps."""
    log: LogConfig = field(default_factory=lambda: LogConfig(run_dir="runs/rl"))
    sample_every: int = 10
    """Write a few completions to samples.jsonl every N steps (0: never)."""


_AXES = ("advantage", "objective", "aggregation", "kl_placement", "kl_estimator", "beta",
         "dynamic_sampling", "overlong_penalty", "epochs")  # fmt: skip
"""Preset fields that an ``--algo`` field of the same name overrides when set."""


def resolve_preset(cfg: PGAlgoConfig) -> PGPreset:
    """The preset row with the overrides applied."""
    band = cfg.pass_rate_band
    if band is not None and not (len(band) == 2 and 0.0 <= band[0] <= band[1] <= 1.0):
        raise ValueError(f"algo.pass_rate_band: need 0 <= LOW <= HIGH <= 1, got {band}")
    if cfg.preset not in PG_PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose from {sorted(PG_PRESETS)}")
    preset = PG_PRESETS[cfg.preset]
    params = preset.params
    if cfg.eps_low is not None or cfg.eps_high is not None:
        params = replace(
            params,
            eps_low=cfg.eps_low if cfg.eps_low is not None else params.eps_low,
            eps_high=cfg.eps_high if cfg.eps_high is not None else params.eps_high,
        )
    overrides = {k: getattr(cfg, k) for k in _AXES if getattr(cfg, k) is not None}
    preset = replace(preset, params=params, **overrides)
    if preset.epochs < 1 or cfg.minibatches < 1:
        raise ValueError(
            f"algo.epochs and algo.minibatches must be >= 1, got {preset.epochs}, {cfg.minibatches}"
        )
    choices = {
        "advantage": (*ESTIMATORS, "process_group"), "objective": tuple(OBJECTIVES),
        "kl_placement": ("none", "reward", "loss"), "kl_estimator": (*KL_ESTIMATORS, "full"),
    }  # fmt: skip
    for axis, allowed in choices.items():
        if getattr(preset, axis) not in allowed:
            raise ValueError(
                f"unknown algo.{axis} {getattr(preset, axis)!r}; choose from {', '.join(allowed)}"
            )
    Aggregation(preset.aggregation)  # validates the mode
    if preset.advantage not in ESTIMATORS:
        raise NotImplementedError(
            f"preset {cfg.preset!r} needs advantage {preset.advantage!r} (step rewards from a "
            "process reward model), which rlhfkit rl does not have yet"
        )
    if (preset.advantage == "gae") != preset.critic:
        raise ValueError("the 'gae' advantage and a critic go together (preset 'ppo')")
    return preset


@contextlib.contextmanager
def no_reference() -> Iterator[None]:
    """Stand-in when no KL is computed."""
    yield None


def make_step_loss(
    model: torch.nn.Module,
    preset: PGPreset,
    cfg: PGConfig,
    temperature: float,
    beta: Callable[[], float] | None = None,
    run: dict[str, Any] | None = None,
) -> tuple[Callable[[dict[str, torch.Tensor], float], Any], Callable[..., float]]:
    """Step 6 for one micro-batch: log-probs, TIS weights, KL, the preset's objective.

    ``beta`` gives the current KL coefficient (the adaptive controller's), else the preset's.
    The full-vocabulary KL in the loss reads the reference head from ``run["ref_head"]``.
    """
    beta = beta or (lambda: preset.beta)
    agg = Aggregation(preset.aggregation, max_len=cfg.sampling.max_new_tokens)
    kl_in_loss = preset.kl_placement == "loss" and preset.beta > 0

    def loss_kl(logp: torch.Tensor, hidden: torch.Tensor | None, batch: dict) -> torch.Tensor:
        if preset.kl_estimator != "full":
            return KL_ESTIMATORS[preset.kl_estimator](logp, batch["ref_logp"])
        kl = torch.zeros_like(logp)
        kl[batch["completion_mask"]] = linear_full_kl(
            hidden, fused_head(model).weight, batch["ref_hidden"], run["ref_head"],
            temperature=temperature,
        ).to(kl.dtype)  # fmt: skip
        return kl

    def step_loss(batch: dict[str, torch.Tensor], normaliser: float) -> Any:
        mask = batch["completion_mask"]
        logp, hidden = rollout_logprobs(model, batch, temperature=temperature)
        old = batch.get("old_logp", logp.detach())
        weights = tis_weights(old, batch["sampler_logp"], cap=cfg.algo.tis_cap)
        kl = loss_kl(logp, hidden, batch) if kl_in_loss else None
        out = policy_loss(
            logp, old, batch["advantages"], mask, objective=preset.objective,
            params=preset.params, aggregation=agg, normaliser=normaliser, weights=weights,
            kl=kl, beta=beta(),
        )  # fmt: skip
        if kl is None and "ref_logp" in batch:
            out.metrics["kl"] = float(
                torch.where(mask, logp.detach() - batch["ref_logp"], 0.0).sum()
            )
        out.metrics["sampler_gap"] = float(
            torch.where(mask, (logp.detach() - batch["sampler_logp"]).abs(), 0.0).sum()
        )
        return out

    def count(batch: dict[str, torch.Tensor]) -> float:
        return float(normaliser_count(batch["completion_mask"], agg))

    return step_loss, count


def reference_model(ctx: RunContext) -> Callable[[], contextlib.AbstractContextManager]:
    """pi_ref for the KL: the adapter-less policy under LoRA, else one frozen copy kept loaded."""
    if getattr(ctx.model, "disable_adapter", None) is not None:
        return ctx.starting_model
    stack = contextlib.ExitStack()
    frozen = stack.enter_context(ctx.starting_model())
    return lambda: contextlib.nullcontext(frozen)


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Reward, length, entropy, finish-reason and advantage statistics of one rollout batch."""
    rewards, rollout, advantages = batch.rewards, batch.rollout, batch.advantages
    lengths = [len(c) for c in rollout.completion_ids]
    reasons = Counter(rollout.finish_reasons)
    flat = [v for v in rewards.flatten().tolist() if not math.isnan(v)]
    out = {
        "rollout/reward": statistics.fmean(flat) if flat else 0.0,
        "rollout/reward_std": statistics.pstdev(flat) if flat else 0.0,
        "rollout/skipped": 1.0 - len(flat) / rewards.numel(),
        "rollout/length": statistics.fmean(lengths),
        "rollout/length_max": float(max(lengths)),
        "rollout/zero_variance_groups": float(
            (torch.nan_to_num(rewards, nan=0.0) == torch.nan_to_num(rewards[:, :1], nan=0.0))
            .all(1).float().mean()
        ),
        "rollout/advantage_mean": float(advantages.mean()),
        "rollout/advantage_std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
        "rollout/advantage_abs_max": float(advantages.abs().max()),
        **batch.stats,
    }  # fmt: skip
    if rollout.entropies:
        tokens = [h for row in rollout.entropies for h in row]
        out["rollout/entropy"] = statistics.fmean(tokens) if tokens else 0.0
    for reason in ("eos", "stop", "length"):
        out[f"rollout/finish_{reason}"] = reasons.get(reason, 0) / len(lengths)
    for name, values in batch.components.items():
        valid = [v for v in values if v is not None]
        if valid:
            out[f"rollout/reward/{name}"] = statistics.fmean(valid)
    return out


def run_state(ctx: RunContext, cfg: PGConfig, preset: PGPreset) -> dict[str, Any]:
    """What the loop needs besides the run context: prompts, rewards, reference, sampler."""
    needs_ref = preset.kl_placement != "none" and preset.beta > 0
    return {
        "preset": preset, "prompts": load_prompts(ctx.tokenizer, cfg),
        "fns": [load_reward_fn(spec) for spec in cfg.rewards], "needs_ref": needs_ref,
        "reference": reference_model(ctx) if needs_ref else no_reference,
        "temperature": cfg.sampling.temperature if cfg.sampling.temperature > 0 else 1.0,
        "minibatches": cfg.algo.minibatches,
        # each prompt once per micro-batch, its completions as branches (exact; no padding)
        "trees": cfg.data.share_prefix and supports_prefix_trees(ctx.model),
        "beta": lambda: float(ctx.extra.get("kl_coef", preset.beta)),
        # pi_old on the learner when a batch serves several steps, for PPO's KL reward, and for
        # a full-vocabulary KL in the reward
        "needs_old": preset.epochs * cfg.algo.minibatches > 1 or preset.critic
        or (needs_ref and preset.kl_estimator == "full" and preset.kl_placement == "reward"),
        "generator": HFGenerator(
            ctx.model, pad_id=ctx.pad_id, eos_ids=[ctx.tokenizer.eos_token_id],
            tokenizer=ctx.tokenizer,
        ),
    }  # fmt: skip


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


def update(
    ctx: RunContext,
    cfg: PGConfig,
    batch: RolloutBatch,
    steps: int,
    step_loss: Callable,
    count: Callable,
    after_backward: Callable[[], None],
) -> Any:
    """Step 6: up to ``steps`` optimiser steps, epochs over the batch's minibatches.

    Returns:
        The accumulated statistics of the last step that was taken (None if none was).
    """  # fmt: skip
    last = None
    for _ in range(steps // len(batch.minibatches) + 1):
        for minibatch in batch.minibatches:
            if steps <= 0:
                return last
            stats = accumulate(minibatch, step_loss, count_fn=count, after_backward=after_backward)
            steps -= 1
            if ctx.apply_step(stats, cfg.optim.max_grad_norm, cfg.loop.max_nonfinite):
                last = stats
    return last


def main(cfg: PGConfig) -> Path:
    """Run policy-gradient RL; returns the run directory (model under ``<run_dir>/final``)."""
    preset = resolve_preset(cfg.algo)
    if preset.critic:  # PPO trains a value model next to the policy
        from rlhfkit.recipes import ppo

        return ppo.main(cfg)
    if preset.min_group_size > cfg.sampling.num_samples:
        raise ValueError(
            f"preset {cfg.algo.preset!r} needs sampling.num_samples >= {preset.min_group_size}"
        )
    ctx = build_run(cfg.model, cfg.log, cfg.loop.seed, to_dict(cfg))
    run = run_state(ctx, cfg, preset)
    total = total_steps(cfg, preset, len(run["prompts"]))
    ctx.start_training(cfg.optim, total, resume=cfg.loop.resume)
    step_loss, count = make_step_loss(ctx.model, preset, cfg, run["temperature"], run["beta"], run)
    train(ctx, cfg, run, total, step_loss, count, ctx.master.collect_grads)
    return finish_run(ctx, cfg.loop.keep_last)


def train(
    ctx: RunContext,
    cfg: PGConfig,
    run: dict[str, Any],
    total: int,
    step_loss: Callable,
    count: Callable,
    after_backward: Callable[[], None],
) -> None:
    """The loop: collect a rollout batch, update on it, log, sample, checkpoint."""  # fmt: skip
    per_batch = run["preset"].epochs * cfg.algo.minibatches
    with ctx.progress(total) as bar:
        while ctx.step < total:
            batch = collect(ctx, cfg, run)
            before = ctx.step
            stats = update(
                ctx, cfg, batch, min(per_batch, total - ctx.step), step_loss, count,
                after_backward,
            )  # fmt: skip
            if stats is None:
                continue
            metrics = {**step_metrics(stats, batch), "train/kl_coef": run["beta"]()}
            if cfg.algo.kl_target is not None and "rollout/kl_seq" in batch.stats:
                ctx.extra["kl_coef"] = adaptive_kl_coef(
                    run["beta"](), batch.stats["rollout/kl_seq"], cfg.algo.kl_target,
                    n_steps=int(batch.rewards.numel()), horizon=cfg.algo.kl_horizon,
                )  # fmt: skip
            tokens = int(sum(len(c) for c in batch.rollout.completion_ids))
            bar.update(ctx.step - before, loss=metrics["train/loss"], tokens=tokens)
            ctx.log_step(metrics, cfg.log.log_every)
            if cfg.sample_every and ctx.step % cfg.sample_every == 0 and ctx.dist.is_main:
                _write_samples(ctx, batch)
            if cfg.loop.save_every and ctx.step % cfg.loop.save_every == 0:
                ctx.save(cfg.loop.keep_last)


def step_metrics(stats: Any, batch: RolloutBatch) -> dict[str, float]:
    """Loss-side metrics of the last step and rollout-side metrics (sums all-reduced)."""
    sums = {k: all_reduce_sum(v) for k, v in sorted(stats.metrics.items())}
    tokens = max(sums.get("tokens", 1.0), 1.0)
    metrics = {
        "train/loss": all_reduce_sum(stats.loss),
        "train/clip_frac": sums.get("clipped", 0.0) / tokens,
        "train/approx_kl": sums.get("approx_kl", 0.0) / tokens,
        "train/ratio_mean": sums.get("ratio", tokens) / tokens,
        "train/sampler_gap": sums.get("sampler_gap", 0.0) / tokens,
        **rollout_metrics(batch),
    }
    if "kl" in sums:
        metrics["train/kl_per_token"] = sums["kl"] / tokens
    for key in ("value_loss", "value_clipped", "value_mean", "returns_mean"):
        if key in sums:
            metrics[f"critic/{key}"] = sums[key] / tokens
    return metrics


def _write_samples(ctx: RunContext, batch: RolloutBatch) -> None:
    """A table of a few completions of this step (samples.jsonl and TensorBoard text)."""
    rollout, flat = batch.rollout, batch.rewards.flatten().tolist()
    rows = [
        {
            "prompt": batch.prompts[rollout.prompt_index[i]].fields["prompt"][-1]["content"],
            "completion": batch.texts[i],
            "reward": None if math.isnan(flat[i]) else flat[i],
            "finish": rollout.finish_reasons[i],
        }
        for i in range(min(4, len(batch.texts)))
    ]
    ctx.logger.table(ctx.step, "samples", rows)


__all__ = [
    "PromptRow", "_sequence_k1", "_set_advantages", "attach_logprobs", "greedy_rewards",
    "rollout_micro_batches", "score", "token_advantages",
]  # fmt: skip
