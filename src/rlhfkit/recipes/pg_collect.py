"""Steps 1-5 of a policy-gradient step: sample, score, filter, shape and estimate advantages.

Used by ``rlhfkit rl`` (:mod:`rlhfkit.recipes.pg`) and its PPO loop (:mod:`rlhfkit.recipes.ppo`).

1. The next prompt batch of a seeded shuffle (a counter in the checkpoint, ``rollouts``).
2. ``num_samples`` completions per prompt from the policy, with sampler log-probs, entropies
   and finish reasons.
3. Rewards (:func:`score`): the weighted sum of every reward component; a completion cut at
   ``max_new_tokens`` gets ``truncation_penalty`` without a reward call when that is set, or is
   skipped with ``mask_truncated`` (EOS-only scoring, METHODS.md 6.7); DAPO's overlong penalty
   is one more component. A reward
   that returns None skips the completion: it takes no part in its group's baseline nor in the
   loss.
4. Dynamic sampling (DAPO): groups whose rewards are all equal carry no signal; they are dropped
   and further prompt batches are sampled until the batch is full again (at most
   ``algo.max_refills`` more rounds).
5. KL in the reward (per sequence or per token), then the preset's advantage estimator.

The completions are cut into micro-batches (whole sequences under a token budget) per
minibatch, so that ``algo.epochs x algo.minibatches`` optimiser steps can reuse one rollout.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from rlhfkit.data.prompts import PromptRow, load_prompt_rows
from rlhfkit.data.rollouts import rollout_micro_batches, rollout_tree_batches
from rlhfkit.losses.policy import PGPreset
from rlhfkit.models.forward import fused_head, rollout_logprobs
from rlhfkit.ops import advantages as adv_ops
from rlhfkit.ops.kl import linear_full_kl
from rlhfkit.ops.masking import masked_mean
from rlhfkit.recipes.pg_advantages import (
    TOKEN_LEVEL,
    _sequence_k1,
    _set_advantages,
    estimate,
    gae_advantages,
    token_advantages,
)
from rlhfkit.rewards import score_completions
from rlhfkit.rewards.shaping import length_penalty, overlong_penalty, weighted_sum
from rlhfkit.training.distributed import all_reduce_sum
from rlhfkit.training.run import RunContext, batch_order
from rlhfkit.types import Rollout

if TYPE_CHECKING:
    from rlhfkit.recipes.pg import PGConfig

log = logging.getLogger(__name__)

OVERLONG = "overlong"
"""Name of DAPO's overlong-penalty reward component."""
LENGTH = "length"
"""Name of the length-penalty reward component."""


def load_prompts(tokenizer: Any, cfg: PGConfig) -> list[PromptRow]:
    """Prompts of the source, rendered for sampling (:func:`rlhfkit.eval.run.load_prompt_rows`)."""
    data = cfg.data
    return load_prompt_rows(
        tokenizer, data.train, data.schema, split=data.train_split, limit=data.limit,
        max_prompt_len=data.max_prompt_len,
    )  # fmt: skip


def score(
    rollout_texts: list[str],
    fields: list[dict],
    finished: list[bool],
    cfg: PGConfig,
    fns: list,
    *,
    lengths: list[int] | None = None,
    overlong: bool = False,
) -> tuple[list[float], dict[str, list[float | None]]]:
    """Step 3: the weighted reward of every completion (NaN: skipped) and each component.

    Args:
        rollout_texts: Decoded completions.
        fields: Each completion's example fields (what the reward functions may ask for).
        finished: Whether each completion ended with a stop token.
        cfg: The run configuration (rewards, weights, truncation penalty, overlong cache).
        fns: The loaded reward functions, one per ``cfg.rewards`` entry.
        lengths: Completion token counts (needed with ``overlong``).
        overlong: Add DAPO's overlong penalty as the component ``overlong`` (weight 1); with
            ``algo.length_penalty`` the component ``length`` is added too.

    Returns:
        The rewards and the components (None where a component did not score a completion).
    """
    weights = list(cfg.weights) or [1.0] * len(fns)
    if len(weights) != len(fns):
        raise ValueError(f"{len(fns)} rewards but {len(weights)} weights")
    if cfg.algo.mask_truncated and cfg.algo.truncation_penalty is not None:
        raise ValueError("set algo.truncation_penalty or algo.mask_truncated, not both")
    unscored = math.nan if cfg.algo.mask_truncated else cfg.algo.truncation_penalty
    scored = [i for i, f in enumerate(finished) if f or unscored is None]
    components: dict[str, list[float | None]] = {}
    for spec, fn in zip(cfg.rewards, fns, strict=True):
        values = score_completions(
            fn, [rollout_texts[i] for i in scored], [fields[i] for i in scored]
        )
        column: list[float | None] = [None] * len(rollout_texts)
        for i, v in zip(scored, values, strict=True):
            column[i] = v
        components[spec] = column
    named = dict(zip(cfg.rewards, weights, strict=True))
    for name, column in length_components(cfg, lengths, overlong).items():
        components[name] = [v if i in set(scored) else None for i, v in enumerate(column)]
        named[name] = 1.0
    total = weighted_sum({k: components[k] for k in named}, named)
    kept = set(scored)
    return [
        (math.nan if value is None else value) if i in kept else float(unscored)
        for i, value in enumerate(total)
    ], components


def length_components(
    cfg: PGConfig, lengths: list[int] | None, overlong: bool
) -> dict[str, list[float]]:
    """Length shaping components: DAPO's ``overlong`` penalty and the ``length`` penalty.

    overlong: 0 up to L_max - L_cache tokens, then falling linearly to -1 at L_max
    (L_max = ``max_new_tokens``, L_cache = ``algo.overlong_cache``). length:
    -``algo.length_penalty`` per token beyond ``algo.length_budget``.
    """
    shaping = {}
    if (overlong or cfg.algo.length_penalty) and lengths is None:
        raise ValueError("length shaping needs the completion lengths")
    if overlong:
        max_len = cfg.sampling.max_new_tokens
        cache = cfg.algo.overlong_cache or max(1, max_len // 4)
        shaping[OVERLONG] = [overlong_penalty(n, max_len, cache) for n in lengths]
    if cfg.algo.length_penalty:
        budget, rate = cfg.algo.length_budget, cfg.algo.length_penalty
        shaping[LENGTH] = [length_penalty(n, budget, rate) for n in lengths]
    return shaping


@dataclass
class Sampled:
    """Scored groups: G completions for each of P prompts (rows grouped by prompt)."""

    prompts: list[PromptRow]
    rollout: Rollout
    texts: list[str]
    rewards: torch.Tensor  # (P, G) fp64, NaN = skipped
    components: dict[str, list[float | None]]

    def select(self, groups: list[int]) -> Sampled:
        """Only the given groups, in that order."""
        g = self.rewards.shape[1]
        rows = [p * g + j for p in groups for j in range(g)]
        r = self.rollout
        rollout = Rollout(
            prompt_index=[k // g for k in range(len(rows))],
            prompt_ids=[r.prompt_ids[i] for i in rows],
            completion_ids=[r.completion_ids[i] for i in rows],
            logprobs=[r.logprobs[i] for i in rows],
            finish_reasons=[r.finish_reasons[i] for i in rows],
            entropies=[r.entropies[i] for i in rows] if r.entropies else [],
        )
        return Sampled(
            [self.prompts[p] for p in groups], rollout, [self.texts[i] for i in rows],
            self.rewards[groups], {k: [v[i] for i in rows] for k, v in self.components.items()},
        )  # fmt: skip

    @staticmethod
    def concat(parts: list[Sampled]) -> Sampled:
        """The groups of several rounds, one after another."""
        if len(parts) == 1:
            return parts[0]
        first, offset, index = parts[0], 0, []
        for part in parts:
            index += [offset + i for i in part.rollout.prompt_index]
            offset += len(part.prompts)

        def cat(attr: str) -> list:
            return [x for part in parts for x in getattr(part.rollout, attr)]

        rollout = Rollout(
            index, cat("prompt_ids"), cat("completion_ids"), cat("logprobs"),
            cat("finish_reasons"), cat("entropies"),
        )  # fmt: skip
        return Sampled(
            [p for part in parts for p in part.prompts], rollout,
            [t for part in parts for t in part.texts], torch.cat([p.rewards for p in parts]),
            {k: [x for part in parts for x in part.components[k]] for k in first.components},
        )  # fmt: skip


def sample_round(ctx: RunContext, cfg: PGConfig, run: dict[str, Any]) -> Sampled:
    """Steps 1-3 for the next prompt batch (advances the ``rollouts`` counter)."""
    prompts, preset = run["prompts"], run["preset"]
    size = min(cfg.loop.batch_size, len(prompts))
    position = int(ctx.extra.get("rollouts", 0))
    ctx.extra["rollouts"] = position + 1
    order = batch_order(len(prompts), size, cfg.loop.seed, position)
    chosen = [prompts[i] for i in ctx.dist.shard(order)]
    sampling = replace(cfg.sampling, seed=cfg.loop.seed * 1_000_003 + position)
    rollout = run["generator"].generate([p.ids for p in chosen], sampling)
    texts = ctx.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    fields = [chosen[i].fields for i in rollout.prompt_index]
    finished = [r != "length" for r in rollout.finish_reasons]
    flat, components = score(
        texts, fields, finished, cfg, run["fns"],
        lengths=[len(c) for c in rollout.completion_ids], overlong=preset.overlong_penalty,
    )  # fmt: skip
    rewards = torch.tensor(flat, dtype=torch.float64).view(len(chosen), sampling.num_samples)
    return Sampled(chosen, rollout, texts, rewards, components)


def informative_groups(
    rewards: torch.Tensor, band: tuple[float, float] | None = None, threshold: float = 1.0
) -> list[int]:
    """Groups to keep: rewards not all equal (DAPO), or with ``band`` a pass rate inside it.

    With ``band = (low, high)`` a group is kept when the share of its scored samples whose reward
    is at least ``threshold`` lies in [low, high] (the online difficulty filter of METHODS 9).

    Shapes:
        rewards: (P, G) with NaN for skipped samples.
    """
    keep = []
    for i, row in enumerate(rewards):
        valid = row[~torch.isnan(row)]
        if valid.numel() < 2:
            continue
        if band is None:
            informative = bool((valid != valid[0]).any())
        else:
            rate = float((valid >= threshold).double().mean())
            informative = band[0] - 1e-9 <= rate <= band[1] + 1e-9
        if informative:
            keep.append(i)
    return keep


def sample_groups(ctx: RunContext, cfg: PGConfig, run: dict[str, Any]) -> tuple[Sampled, dict]:
    """Steps 1-4: one prompt batch, or with dynamic sampling as many rounds as fill it.

    Returns:
        The groups to train on and sampling statistics for the log.
    """
    first = sample_round(ctx, cfg, run)
    band = cfg.algo.pass_rate_band
    if not (run["preset"].dynamic_sampling or band):
        return first, {}
    need, parts, rounds, seen = len(first.prompts), [], 0, 0
    current = first
    while True:
        rounds, seen = rounds + 1, seen + len(current.prompts)
        keep = informative_groups(current.rewards, band, cfg.algo.pass_threshold)
        parts.append(current.select(keep))
        have = sum(len(p.prompts) for p in parts)
        # every rank samples the same number of rounds, so the prompt counter stays in step
        short = all_reduce_sum(float(max(0, need - have)))
        if short == 0 or rounds > cfg.algo.max_refills:
            break
        current = sample_round(ctx, cfg, run)
    kept = Sampled.concat(parts)
    stats = {
        "rollout/dynamic_rounds": float(rounds),
        "rollout/kept_groups": float(len(kept.prompts)) / need,
        "rollout/informative_share": sum(len(p.prompts) for p in parts) / seen,
    }
    if not kept.prompts:  # nothing informative: train on the last round (A = 0 but KL)
        log.warning("dynamic sampling found no group with differing rewards in %d rounds", rounds)
        return current, stats
    return kept.select(list(range(min(need, len(kept.prompts))))), stats


@dataclass
class RolloutBatch:
    """Steps 1-5 of one training step: micro-batches with advantages, and what to log."""

    minibatches: list[list[dict[str, torch.Tensor]]]
    rewards: torch.Tensor  # (P, G), NaN = skipped
    components: dict[str, list[float | None]]
    advantages: torch.Tensor  # (P*G,) per sequence (0 for skipped)
    rollout: Rollout
    texts: list[str]
    prompts: list[PromptRow]
    stats: dict[str, float]

    @property
    def batches(self) -> list[dict[str, torch.Tensor]]:
        """Every micro-batch of every minibatch."""
        return [b for mb in self.minibatches for b in mb]


def split_minibatches(rows: list[int], parts: int, seed: int) -> list[list[int]]:
    """``rows`` shuffled (seeded) and cut into ``parts`` near-equal minibatches."""
    if parts <= 1:
        return [rows]
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    return [sorted(shuffled[k::parts]) for k in range(parts) if shuffled[k::parts]]


def micro_batches(
    ctx: RunContext, rollout: Rollout, rows: list[int], budget: int, *, trees: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of the given rollout rows; ``rows`` of each holds rollout indices.

    With ``trees`` each prompt and its completions form one prefix-tree document (the prompt
    computed once, no padding); otherwise rows are padded.
    """
    if trees:
        parts = rollout_tree_batches(
            rollout.prompt_ids, rollout.completion_ids, rollout.logprobs, rows, ctx.pad_id, budget
        )
        return [ctx.to_device(b) for b in parts]
    parts = rollout_micro_batches(
        [rollout.prompt_ids[i] for i in rows], [rollout.completion_ids[i] for i in rows],
        [rollout.logprobs[i] for i in rows], ctx.pad_id, budget,
    )  # fmt: skip
    index = torch.tensor(rows, dtype=torch.long)
    for b in parts:
        b["rows"] = index[b["rows"]]
    return [ctx.to_device(b) for b in parts]


def collect(ctx: RunContext, cfg: PGConfig, run: dict[str, Any]) -> RolloutBatch:
    """Sample, score, filter, shape and compute advantages for the next prompts."""
    preset: PGPreset = run["preset"]
    sampled, stats = sample_groups(ctx, cfg, run)
    rewards, rollout = sampled.rewards, sampled.rollout
    n = rewards.numel()
    valid = [i for i, v in enumerate(rewards.flatten().tolist()) if not math.isnan(v)]
    position = int(ctx.extra.get("rollouts", 0))
    minibatches = [
        micro_batches(ctx, rollout, rows, cfg.loop.micro_batch_tokens, trees=run["trees"])
        for rows in split_minibatches(valid, run["minibatches"], cfg.loop.seed + position)
    ]
    batches = [b for mb in minibatches for b in mb]
    full = run["needs_ref"] and preset.kl_estimator == "full"
    temperature = run["temperature"]
    if run["needs_old"]:
        hidden_key = "old_hidden" if full and preset.kl_placement == "reward" else None
        attach_logprobs(ctx.model, batches, "old_logp", temperature, hidden_key)
    shaped = rewards
    if run["needs_ref"]:
        with run["reference"]() as ref:
            attach_logprobs(ref, batches, "ref_logp", temperature, "ref_hidden" if full else None)
            if full:
                run["ref_head"] = fused_head(ref).weight.detach()
        if full and preset.kl_placement == "reward":
            head = fused_head(ctx.model).weight.detach()
            attach_full_kl(batches, head, run["ref_head"], temperature)
        k1 = _sequence_k1(batches, n)
        stats["rollout/kl_seq"] = float(k1[valid].mean()) if valid else 0.0
        if preset.kl_placement == "reward" and preset.kl_per == "seq":
            shaped = rewards - run["beta"]() * k1.view_as(rewards)
    extra: dict[str, Any] = {"ema": ctx.extra.get("ema_baseline")}
    if preset.advantage == "greedy_baseline":  # ReMax: one greedy decode per prompt
        extra["greedy"] = greedy_rewards(ctx, cfg, run, sampled.prompts)
    adv = estimate(shaped, preset.advantage, cfg.algo, extra)
    if preset.advantage == "ema_baseline" and valid:
        update = adv_ops.ema_baseline(rewards.flatten()[valid], extra["ema"], cfg.algo.ema_decay)
        ctx.extra["ema_baseline"] = update[1]
    adv = torch.nan_to_num(adv.flatten(), nan=0.0)
    _set_advantages(batches, adv)
    if preset.advantage in TOKEN_LEVEL:
        adv = _token_level(batches, cfg, run, adv)
    return RolloutBatch(
        minibatches, rewards, sampled.components, adv, rollout, sampled.texts, sampled.prompts,
        stats,
    )  # fmt: skip


def _token_level(
    batches: list[dict[str, torch.Tensor]], cfg: PGConfig, run: dict[str, Any], adv: torch.Tensor
) -> torch.Tensor:
    """PPO's GAE or REINFORCE++'s returns, in place; returns each sequence's mean advantage."""
    preset: PGPreset = run["preset"]
    beta = run["beta"]() if run["needs_ref"] and preset.kl_placement == "reward" else 0.0
    if preset.advantage == "gae":
        gae_advantages(batches, run["critic"], cfg, beta, whiten=preset.whiten_advantages)
    else:
        token_advantages(batches, beta)
    out = torch.zeros_like(adv)
    for b in batches:
        mean = masked_mean(b["advantages"], b["completion_mask"], dim=-1)
        out[b["rows"].cpu()] = mean.double().cpu()
    return out


def greedy_rewards(
    ctx: RunContext, cfg: PGConfig, run: dict[str, Any], chosen: list[PromptRow]
) -> torch.Tensor:
    """ReMax's baseline: the reward of each prompt's greedy completion (NaN if skipped).

    Shapes:
        returns (P,) fp64.
    """
    greedy = replace(cfg.sampling, temperature=0.0, num_samples=1)
    rollout = run["generator"].generate([p.ids for p in chosen], greedy)
    texts = ctx.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    finished = [r != "length" for r in rollout.finish_reasons]
    values, _ = score(
        texts, [p.fields for p in chosen], finished, cfg, run["fns"],
        lengths=[len(c) for c in rollout.completion_ids],
        overlong=run["preset"].overlong_penalty,
    )  # fmt: skip
    return torch.tensor(values, dtype=torch.float64)


@torch.no_grad()
def attach_logprobs(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    key: str,
    temperature: float,
    hidden_key: str | None = None,
) -> None:
    """Store detached completion log-probs of ``model`` under ``key`` in every micro-batch.

    With ``hidden_key`` the (N, H) final hidden states at the completion positions are kept
    too (for the full-vocabulary KL).
    """
    was_training = model.training
    model.eval()
    for b in batches:
        logp, hidden = rollout_logprobs(model, b, temperature=temperature)
        b[key] = logp.float()
        if hidden_key is not None:
            if hidden is None:
                raise ValueError("the full-vocabulary KL needs a model with a linear LM head")
            b[hidden_key] = hidden
    model.train(was_training)


@torch.no_grad()
def attach_full_kl(
    batches: list[dict[str, torch.Tensor]],
    head: torch.Tensor,
    ref_head: torch.Tensor,
    temperature: float,
) -> None:
    """Exact per-token KL(pi_old || pi_ref) over the vocabulary as ``kl_tokens`` (B, T).

    Consumes the hidden states stored by :func:`attach_logprobs` (``old_hidden``,
    ``ref_hidden``): a KL in the reward needs them only here.
    """  # fmt: skip
    for b in batches:
        mask = b["completion_mask"]
        kl = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        kl[mask] = linear_full_kl(
            b.pop("old_hidden"), head, b.pop("ref_hidden"), ref_head, temperature=temperature
        )
        b["kl_tokens"] = kl
