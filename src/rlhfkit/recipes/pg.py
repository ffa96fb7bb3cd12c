"""Policy-gradient RL with critic-free estimators (RLHF book chapter 6; METHODS.md sections 5-6).

REINFORCE, RLOO, GRPO, Dr. GRPO, GSPO, CISPO, SAPO and MaxRL.

Every algorithm is a row of ``PG_PRESETS``: an advantage estimator, an objective, a loss
aggregation and a KL placement; ``--algo.preset grpo`` picks the row and the other ``--algo``
fields override single axes.

Loop, for each step:
    1. The next ``loop.batch_size`` prompts of a seeded shuffle, rendered with the chat template.
    2. Sample ``sampling.num_samples`` completions per prompt from the policy (KV cache, one
       prefill per prompt; :class:`rlhfkit.rollout.sampler.HFGenerator`), with the sampler's
       per-token log-probs and finish reasons.
    3. Rewards: every ``--rewards`` entry (``module:function`` or ``rm:<dir>``) scores the
       completion text with the example's fields; the weighted sum is the reward, each component
       logged. Completions cut at ``max_new_tokens`` get ``truncation_penalty`` instead (when
       set), without calling the rewards (EOS-only scoring).
    4. KL placed in the reward: R <- R - beta * sum_t k1_t (per sequence).
    5. Advantages from the rewards shaped (prompts, G), broadcast over each completion's tokens.
    6. Policy loss per token (objective, TIS weight against the sampler, KL in the loss), reduced
       with the preset's aggregation under one global normaliser over all micro-batches; clip;
       AdamW. With ``algo.epochs`` > 1, log pi_old is recomputed on the learner first and the
       batch is reused; with 1 epoch pi_old = sg(pi_theta) (the ratio is 1: clipping inactive).
    7. Log reward mean/std and per component, KL, clip fraction, approximate KL, completion
       lengths, finish reasons, advantage statistics, the share of zero-variance groups, and a
       few samples every ``log.sample_every`` steps (``samples.jsonl``).

ReMax decodes each prompt greedily once more for its baseline; REINFORCE++ puts the KL in the
reward per token (k1 against the sampler's log-probs), takes returns-to-go and whitens them over
every token of the batch. Not yet here (stated, not faked): the critic (PPO, GAE), process
rewards and DAPO's dynamic sampling; those presets raise a clear error. The reference model
for a KL is the starting model, held in memory (eval mode, compute dtype) or, under LoRA, the
policy with its adapter disabled.
"""

from __future__ import annotations

import contextlib
import json
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
from rlhfkit.data.schemas import load_examples
from rlhfkit.data.templates import render_prompt
from rlhfkit.losses.policy import PG_PRESETS, PGPreset, policy_loss, tis_weights
from rlhfkit.models.forward import completion_logprobs
from rlhfkit.ops import advantages as adv_ops
from rlhfkit.ops.kl import KL_ESTIMATORS
from rlhfkit.ops.masking import Aggregation, masked_mean, normaliser_count
from rlhfkit.recipes.common import RunContext, batch_order, build_run, finish_run
from rlhfkit.rewards import load_reward_fn, score_completions
from rlhfkit.rewards.shaping import kl_in_reward, weighted_sum
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.sampler import HFGenerator
from rlhfkit.training.accumulate import accumulate
from rlhfkit.training.distributed import all_reduce_sum

log = logging.getLogger(__name__)

GROUP_ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {
    "batch_baseline": lambda r, cfg, extra: adv_ops.batch_baseline(r),
    "leave_one_out": lambda r, cfg, extra: adv_ops.leave_one_out(r),
    "group_zscore": lambda r, cfg, extra: adv_ops.group_zscore(r, std=cfg.std, eps=cfg.std_eps),
    "group_center": lambda r, cfg, extra: adv_ops.group_center(r),
    "maxrl": lambda r, cfg, extra: adv_ops.maxrl(r),
    "greedy_baseline": lambda r, cfg, extra: adv_ops.greedy_baseline(r, extra["greedy"]),
    "batch_whiten": lambda r, cfg, extra: r,  # token level: see token_advantages
}
"""Advantage estimators on (prompts, G) rewards that this recipe runs (GAE needs a critic and
process_group step rewards: not yet). ``extra`` carries the greedy rewards for ReMax."""


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


@dataclass
class PGAlgoConfig:
    """Which preset, and overrides of its axes (None: the preset's value)."""

    preset: str = "grpo"
    """reinforce, rloo, remax, reinforce_pp, grpo, dr_grpo, gspo, cispo, sapo or maxrl (ppo, dapo
    and grpo_process are in the table but not yet runnable here)."""
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
    tis_cap: float = 2.0
    """Truncated importance sampling cap C against the sampler's log-probs (inf: plain IS)."""
    truncation_penalty: float | None = None
    """Reward of a completion cut at max_new_tokens (None: score it like the others)."""
    epochs: int = 1
    """Optimiser passes over each rollout batch."""


@dataclass
class PGConfig:
    """rlhfkit rl: policy-gradient RL against rewards."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PGDataConfig = field(default_factory=PGDataConfig)
    algo: PGAlgoConfig = field(default_factory=PGAlgoConfig)
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=1.0, num_samples=8)
    )
    rewards: tuple[str, ...] = ("rlhfkit.rewards.answers:exact_answer",)
    """Rewards: 'module:function', 'path/file.py:function' or 'rm:<reward model dir>'."""
    weights: tuple[float, ...] = ()
    """Weight of each reward (default 1 each)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, warmup_ratio=0.0))
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(batch_size=4, max_steps=100))
    log: LogConfig = field(default_factory=lambda: LogConfig(run_dir="runs/rl"))
    sample_every: int = 10
    """Write a few completions to samples.jsonl every N steps (0: never)."""


def resolve_preset(cfg: PGAlgoConfig) -> PGPreset:
    """The preset row with the overrides applied."""
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
    preset = replace(preset, params=params, beta=preset.beta if cfg.beta is None else cfg.beta)
    if cfg.epochs < 1:
        raise ValueError(f"algo.epochs must be >= 1, got {cfg.epochs}")
    missing = []
    if preset.advantage not in GROUP_ESTIMATORS:
        missing.append(f"advantage {preset.advantage!r}")
    if preset.critic or preset.dynamic_sampling:
        missing.append("a critic" if preset.critic else "dynamic sampling")
    if preset.kl_per == "token" and preset.kl_placement == "reward" and preset.critic:
        missing.append("per-token rewards for a critic")
    if missing:
        raise NotImplementedError(
            f"preset {cfg.preset!r} needs {', '.join(missing)}, which rlhfkit rl does not have yet"
        )
    return preset


@dataclass
class PromptRow:
    """A prompt with its rendered ids and the fields the rewards see."""

    ids: list[int]
    fields: dict[str, Any]


def load_prompts(tokenizer: Any, cfg: PGConfig) -> list[PromptRow]:
    """Prompts of the source, rendered for sampling."""
    data = cfg.data
    result = load_examples(data.train, data.schema, split=data.train_split, limit=data.limit)
    rows = []
    for example in result.examples:
        fields = {**(getattr(example, "meta", None) or {}), "prompt": list(example.prompt)}
        if hasattr(example, "answer"):
            fields["answer"] = example.answer
        rows.append(
            PromptRow(render_prompt(tokenizer, example.prompt, max_len=data.max_prompt_len), fields)
        )
    if not rows:
        raise ValueError(f"{data.train}: no prompts")
    return rows


def score(
    rollout_texts: list[str], fields: list[dict], finished: list[bool], cfg: PGConfig, fns: list
) -> tuple[list[float], dict[str, list[float | None]]]:
    """Step 3: the weighted reward of every completion and each component."""
    weights = list(cfg.weights) or [1.0] * len(fns)
    if len(weights) != len(fns):
        raise ValueError(f"{len(fns)} rewards but {len(weights)} weights")
    penalise = cfg.algo.truncation_penalty is not None
    scored = [i for i, f in enumerate(finished) if f or not penalise]
    components: dict[str, list[float | None]] = {}
    for spec, fn in zip(cfg.rewards, fns, strict=True):
        values = score_completions(
            fn, [rollout_texts[i] for i in scored], [fields[i] for i in scored]
        )
        column: list[float | None] = [None] * len(rollout_texts)
        for i, v in zip(scored, values, strict=True):
            column[i] = v
        components[spec] = column
    total = weighted_sum(components, dict(zip(cfg.rewards, weights, strict=True)))
    kept = set(scored)
    return [
        (0.0 if value is None else value) if i in kept else float(cfg.algo.truncation_penalty)
        for i, value in enumerate(total)
    ], components


@contextlib.contextmanager
def no_reference() -> Iterator[None]:
    """Stand-in when no KL is computed."""
    yield None


def make_step_loss(
    model: torch.nn.Module, preset: PGPreset, cfg: PGConfig, temperature: float
) -> Callable[[dict[str, torch.Tensor], float], Any]:
    """Step 6 for one micro-batch: log-probs, TIS weights, KL, the preset's objective."""
    agg = Aggregation(preset.aggregation, max_len=cfg.sampling.max_new_tokens)
    estimator = KL_ESTIMATORS[preset.kl_estimator]
    kl_in_loss = preset.kl_placement == "loss" and preset.beta > 0

    def step_loss(batch: dict[str, torch.Tensor], normaliser: float) -> Any:
        mask = batch["completion_mask"]
        logp = completion_logprobs(
            model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], mask,
            temperature=temperature,
        )  # fmt: skip
        old = batch.get("old_logp", logp.detach())
        weights = tis_weights(old, batch["sampler_logp"], cap=cfg.algo.tis_cap)
        kl = estimator(logp, batch["ref_logp"]) if kl_in_loss else None
        out = policy_loss(
            logp, old, batch["advantages"], mask, objective=preset.objective,
            params=preset.params, aggregation=agg, normaliser=normaliser, weights=weights,
            kl=kl, beta=preset.beta,
        )  # fmt: skip
        if kl is None and "ref_logp" in batch:
            out.metrics["kl"] = float(
                torch.where(mask, logp.detach() - batch["ref_logp"], 0.0).sum()
            )
        return out

    def count(batch: dict[str, torch.Tensor]) -> float:
        return float(normaliser_count(batch["completion_mask"], agg))

    return step_loss, count


@torch.no_grad()
def attach_logprobs(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], key: str, temperature: float
) -> None:
    """Store detached completion log-probs of ``model`` under ``key`` in every micro-batch."""
    was_training = model.training
    model.eval()
    for b in batches:
        b[key] = completion_logprobs(
            model, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"],
            temperature=temperature,
        ).float()  # fmt: skip
    model.train(was_training)


def reference_model(ctx: RunContext) -> Callable[[], contextlib.AbstractContextManager]:
    """pi_ref for the KL: the adapter-less policy under LoRA, else one frozen copy kept loaded."""
    if getattr(ctx.model, "disable_adapter", None) is not None:
        return ctx.starting_model
    stack = contextlib.ExitStack()
    frozen = stack.enter_context(ctx.starting_model())
    return lambda: contextlib.nullcontext(frozen)


def rollout_metrics(
    rewards: torch.Tensor, components: dict[str, list], rollout: Any, advantages: torch.Tensor
) -> dict[str, float]:
    """Reward, length, finish-reason and advantage statistics of one rollout batch."""
    lengths = [len(c) for c in rollout.completion_ids]
    reasons = Counter(rollout.finish_reasons)
    flat = rewards.flatten().tolist()
    out = {
        "rollout/reward": statistics.fmean(flat),
        "rollout/reward_std": statistics.pstdev(flat),
        "rollout/length": statistics.fmean(lengths),
        "rollout/length_max": float(max(lengths)),
        "rollout/zero_variance_groups": float((rewards == rewards[:, :1]).all(1).float().mean()),
        "rollout/advantage_mean": float(advantages.mean()),
        "rollout/advantage_std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
        "rollout/advantage_abs_max": float(advantages.abs().max()),
    }
    for reason in ("eos", "stop", "length"):
        out[f"rollout/finish_{reason}"] = reasons.get(reason, 0) / len(lengths)
    for name, values in components.items():
        valid = [v for v in values if v is not None]
        if valid:
            out[f"rollout/reward/{name}"] = statistics.fmean(valid)
    return out


@dataclass
class RolloutBatch:
    """Steps 1-5 of one training step: micro-batches with advantages, and what to log."""

    batches: list[dict[str, torch.Tensor]]
    rewards: torch.Tensor  # (P, G)
    components: dict[str, list[float | None]]
    advantages: torch.Tensor  # (P*G,)
    rollout: Any
    texts: list[str]
    prompts: list[PromptRow]


def collect(ctx: RunContext, cfg: PGConfig, run: dict[str, Any]) -> RolloutBatch:
    """Sample, score, shape and compute advantages for the next prompts."""
    prompts, preset = run["prompts"], run["preset"]
    size = min(cfg.loop.batch_size, len(prompts))
    position = int(ctx.extra.get("rollouts", 0))  # rollout batches so far (epochs reuse one)
    order = batch_order(len(prompts), size, cfg.loop.seed, position)
    chosen = [prompts[i] for i in ctx.dist.shard(order)]
    sampling = replace(cfg.sampling, seed=cfg.loop.seed * 1_000_003 + position)
    rollout = run["generator"].generate([p.ids for p in chosen], sampling)
    texts = ctx.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    fields = [chosen[i].fields for i in rollout.prompt_index]
    finished = [r != "length" for r in rollout.finish_reasons]
    flat, components = score(texts, fields, finished, cfg, run["fns"])
    rewards = torch.tensor(flat, dtype=torch.float64).view(len(chosen), sampling.num_samples)
    batches = rollout_micro_batches(
        rollout.prompt_ids, rollout.completion_ids, rollout.logprobs, ctx.pad_id,
        cfg.loop.micro_batch_tokens,
    )  # fmt: skip
    batches = [ctx.to_device(b) for b in batches]
    shaped = rewards
    if run["needs_ref"]:
        with run["reference"]() as ref:
            attach_logprobs(ref, batches, "ref_logp", run["temperature"])
        if preset.kl_placement == "reward":
            shaped = rewards - preset.beta * _sequence_k1(batches, len(flat)).view_as(rewards)
    extra = {}
    if preset.advantage == "greedy_baseline":  # ReMax: one greedy decode per prompt
        extra["greedy"] = greedy_rewards(ctx, cfg, run, chosen)
    token_level = preset.kl_per == "token" and preset.kl_placement == "reward"
    if token_level:
        shaped = rewards  # the KL goes in per token (token_advantages)
    adv = GROUP_ESTIMATORS[preset.advantage](shaped, cfg.algo, extra).flatten()
    _set_advantages(batches, adv)
    if token_level:  # log each sequence's mean token advantage, not its raw score
        token_advantages(batches, preset.beta if run["needs_ref"] else 0.0)
        adv = torch.zeros_like(adv)
        for b in batches:
            mean = masked_mean(b["advantages"], b["completion_mask"], dim=-1)
            adv[b["rows"].cpu()] = mean.double().cpu()
    return RolloutBatch(batches, rewards, components, adv, rollout, texts, chosen)


def greedy_rewards(
    ctx: RunContext, cfg: PGConfig, run: dict[str, Any], chosen: list[PromptRow]
) -> torch.Tensor:
    """ReMax's baseline: the reward of each prompt's greedy completion.

    Shapes:
        returns (P,) fp64.
    """
    greedy = replace(cfg.sampling, temperature=0.0, num_samples=1)
    rollout = run["generator"].generate([p.ids for p in chosen], greedy)
    texts = ctx.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    finished = [r != "length" for r in rollout.finish_reasons]
    values, _ = score(texts, [p.fields for p in chosen], finished, cfg, run["fns"])
    return torch.tensor(values, dtype=torch.float64)


def token_advantages(batches: list[dict[str, torch.Tensor]], beta: float) -> None:
    """REINFORCE++ advantages, in place: whitened returns-to-go of per-token rewards.

    Per-token rewards are -beta k1_t plus the score at the last token; the returns are whitened
    over every token of the batch (all micro-batches and ranks together). On entry each
    micro-batch's ``advantages`` holds its sequences' scores (broadcast over tokens).
    """
    returns = []
    for b in batches:
        mask = b["completion_mask"]
        k1 = b["sampler_logp"] - b["ref_logp"] if beta else torch.zeros_like(b["sampler_logp"])
        scores = b["advantages"][:, 0].double()
        token_rewards = kl_in_reward(scores, k1.double(), mask, beta, per_token=True)
        returns.append(adv_ops.returns_to_go(token_rewards, mask))
    pairs = list(zip(batches, returns, strict=True))
    total = sum(float(torch.where(b["completion_mask"], r, 0.0).sum()) for b, r in pairs)
    squares = sum(float(torch.where(b["completion_mask"], r, 0.0).square().sum()) for b, r in pairs)
    count = sum(float(b["completion_mask"].sum()) for b in batches)
    stats = tuple(
        torch.tensor(all_reduce_sum(v), dtype=torch.float64) for v in (total, squares, count)
    )
    for b, r in zip(batches, returns, strict=True):
        b["advantages"] = adv_ops.masked_whiten(r, b["completion_mask"], stats=stats).float()


def run_state(ctx: RunContext, cfg: PGConfig, preset: PGPreset) -> dict[str, Any]:
    """What the loop needs besides the run context: prompts, rewards, reference, sampler."""
    needs_ref = preset.kl_placement != "none" and preset.beta > 0
    return {
        "preset": preset, "prompts": load_prompts(ctx.tokenizer, cfg),
        "fns": [load_reward_fn(spec) for spec in cfg.rewards], "needs_ref": needs_ref,
        "reference": reference_model(ctx) if needs_ref else no_reference,
        "temperature": cfg.sampling.temperature if cfg.sampling.temperature > 0 else 1.0,
        "generator": HFGenerator(
            ctx.model, pad_id=ctx.pad_id, eos_ids=[ctx.tokenizer.eos_token_id],
            tokenizer=ctx.tokenizer,
        ),
    }  # fmt: skip


def main(cfg: PGConfig) -> Path:
    """Run policy-gradient RL; returns the run directory (model under ``<run_dir>/final``)."""
    preset = resolve_preset(cfg.algo)
    if preset.min_group_size > cfg.sampling.num_samples:
        raise ValueError(
            f"preset {cfg.algo.preset!r} needs sampling.num_samples >= {preset.min_group_size}"
        )
    ctx = build_run(cfg.model, cfg.log, cfg.loop.seed, to_dict(cfg))
    run = run_state(ctx, cfg, preset)
    per_epoch = max(1, len(run["prompts"]) // cfg.loop.batch_size)
    total = cfg.loop.max_steps or cfg.algo.epochs * max(1, math.ceil(cfg.loop.epochs * per_epoch))
    ctx.start_training(cfg.optim, total, resume=cfg.loop.resume)
    step_loss, count = make_step_loss(ctx.model, preset, cfg, run["temperature"])
    with ctx.progress(total) as bar:
        while ctx.step < total:
            batch = collect(ctx, cfg, run)
            ctx.extra["rollouts"] = int(ctx.extra.get("rollouts", 0)) + 1
            if cfg.algo.epochs > 1:
                attach_logprobs(ctx.model, batch.batches, "old_logp", run["temperature"])
            for _ in range(min(cfg.algo.epochs, total - ctx.step)):
                stats = accumulate(
                    batch.batches, step_loss, count_fn=count,
                    after_backward=ctx.master.collect_grads,
                )  # fmt: skip
                stepped = ctx.apply_step(stats, cfg.optim.max_grad_norm, cfg.loop.max_nonfinite)
            if not stepped:
                continue
            metrics = step_metrics(stats, batch)
            tokens = int(sum(len(c) for c in batch.rollout.completion_ids))
            bar.update(loss=metrics["train/loss"], tokens=tokens)
            ctx.log_step(metrics, cfg.log.log_every)
            if cfg.sample_every and ctx.step % cfg.sample_every == 0 and ctx.dist.is_main:
                _write_samples(ctx, batch)
            if cfg.loop.save_every and ctx.step % cfg.loop.save_every == 0:
                ctx.save(cfg.loop.keep_last)
    return finish_run(ctx, cfg.loop.keep_last)


def step_metrics(stats: Any, batch: RolloutBatch) -> dict[str, float]:
    """Loss-side and rollout-side metrics of one step (metric sums all-reduced)."""
    sums = {k: all_reduce_sum(v) for k, v in sorted(stats.metrics.items())}
    tokens = max(sums.get("tokens", 1.0), 1.0)
    metrics = {
        "train/loss": all_reduce_sum(stats.loss),
        "train/clip_frac": sums.get("clipped", 0.0) / tokens,
        "train/approx_kl": sums.get("approx_kl", 0.0) / tokens,
        "train/ratio_mean": sums.get("ratio", tokens) / tokens,
        **rollout_metrics(batch.rewards, batch.components, batch.rollout, batch.advantages),
    }
    if "kl" in sums:
        metrics["train/kl_per_token"] = sums["kl"] / tokens
    return metrics


def _sequence_k1(batches: list[dict[str, torch.Tensor]], n: int) -> torch.Tensor:
    """Per sequence sum_t (log pi_sampler - log pi_ref), in rollout order (KL in the reward)."""
    out = torch.zeros(n, dtype=torch.float64)
    for b in batches:
        k1 = torch.where(b["completion_mask"], b["sampler_logp"] - b["ref_logp"], 0.0).sum(1)
        out[b["rows"].cpu()] = k1.double().cpu()
    return out


def _set_advantages(batches: list[dict[str, torch.Tensor]], adv: torch.Tensor) -> None:
    """Broadcast each completion's advantage over its tokens."""
    for b in batches:
        values = adv[b["rows"].cpu()].to(b["advantages"].dtype).to(b["advantages"].device)
        b["advantages"] = values[:, None].expand_as(b["completion_mask"]).clone()


def _write_samples(ctx: RunContext, batch: RolloutBatch) -> None:
    """Append a few completions of this step to samples.jsonl."""
    rollout, flat = batch.rollout, batch.rewards.flatten().tolist()
    rows = [
        {
            "step": ctx.step,
            "prompt": batch.prompts[rollout.prompt_index[i]].fields["prompt"][-1]["content"],
            "completion": batch.texts[i],
            "reward": flat[i],
            "finish": rollout.finish_reasons[i],
        }
        for i in range(min(4, len(batch.texts)))
    ]
    with (ctx.run_dir / "samples.jsonl").open("a") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
