"""Collection, steps 1-4 of a policy-gradient step: sample, score, filter, cut into batches.

1. The next prompt batch of a seeded shuffle (the loop state's ``rollouts`` counter).
2. ``num_samples`` completions per prompt from the policy, with the sampler's log-probs,
   entropies and finish reasons.
   With an environment (``--env.name``) each sample is a multi-turn episode
   (:func:`rlhfkit.rollout.multiturn.run_episodes`): tool output and observations are holes in
   the completion's mask, and the episode's reward is the component ``env``.
3. Rewards (:func:`score`): the weighted sum of every reward component. A completion cut at
   ``max_new_tokens`` gets ``truncation_penalty`` without a reward call when that is set, or is
   skipped with ``mask_truncated`` (EOS-only scoring); DAPO's overlong penalty is one more
   component. A reward that returns None skips the completion: it takes no part in its group's
   baseline nor in the loss.
4. Dynamic sampling (DAPO) or the online difficulty filter: groups that carry no signal are
   dropped and further prompt batches are sampled until the batch is full again (at most
   ``algo.max_refills`` more rounds). ReMax's greedy decode happens here too.

The scored completions are cut into micro-batches (whole sequences under a token budget) per
minibatch, so that ``algo.epochs x algo.minibatches`` optimiser steps can reuse one rollout.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import replace
from typing import Any

import torch

from rlhfkit.data.prompts import PromptRow, load_prompt_rows
from rlhfkit.data.rollouts import rollout_micro_batches, rollout_tree_batches
from rlhfkit.recipes.policy_gradient.config import PGConfig
from rlhfkit.recipes.policy_gradient.state import (
    LoopState,
    PGRun,
    RolloutBatch,
    RolloutMicroBatch,
    Sampled,
)
from rlhfkit.rewards import score_completions
from rlhfkit.rewards.shaping import length_penalty, overlong_penalty, weighted_sum
from rlhfkit.rollout.multiturn import run_episodes
from rlhfkit.training.distributed import all_reduce_sum
from rlhfkit.training.run import batch_order
from rlhfkit.types import Rollout

log = logging.getLogger(__name__)

OVERLONG = "overlong"
"""Name of DAPO's overlong-penalty reward component."""
LENGTH = "length"
"""Name of the length-penalty reward component."""
ENV = "env"
"""Name of the environment's reward component (the sum of an episode's step rewards)."""


def load_prompts(tokenizer: Any, cfg: PGConfig) -> list[PromptRow]:
    """Prompts of the source, rendered for sampling."""
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
    extra: dict[str, list[float]] | None = None,
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
        extra: Components computed elsewhere, weight 1 (an environment's episode rewards).

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
    kept = set(scored)
    for name, column in {**(extra or {}), **length_components(cfg, lengths, overlong)}.items():
        components[name] = [v if i in kept else None for i, v in enumerate(column)]
        named[name] = 1.0
    total = weighted_sum({k: components[k] for k in named}, named)
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


def select_groups(sampled: Sampled, groups: list[int]) -> Sampled:
    """Only the given groups of ``sampled``, in that order."""
    g = sampled.rewards.shape[1]
    rows = [p * g + j for p in groups for j in range(g)]
    rollout = sampled.rollout.select(rows, [k // g for k in range(len(rows))])
    return Sampled(
        [sampled.prompts[p] for p in groups], rollout, [sampled.texts[i] for i in rows],
        sampled.rewards[groups], {k: [v[i] for i in rows] for k, v in sampled.components.items()},
        episodes=[sampled.episodes[i] for i in rows] if sampled.episodes else [],
    )  # fmt: skip


def concat_groups(parts: list[Sampled]) -> Sampled:
    """The groups of several sampling rounds, one after another."""
    if len(parts) == 1:
        return parts[0]
    first, offset, index = parts[0], 0, []
    for part in parts:
        index += [offset + i for i in part.rollout.prompt_index]
        offset += len(part.prompts)

    rollout = Rollout.concat([part.rollout for part in parts], index)
    return Sampled(
        [p for part in parts for p in part.prompts], rollout,
        [t for part in parts for t in part.texts], torch.cat([p.rewards for p in parts]),
        {k: [x for part in parts for x in part.components[k]] for k in first.components},
        episodes=[e for part in parts for e in part.episodes],
    )  # fmt: skip


def sample_round(run: PGRun, state: LoopState) -> Sampled:
    """Steps 1-3 for the next prompt batch (advances ``state.rollouts``)."""
    cfg, ctx, prompts = run.cfg, run.ctx, run.prompts
    size = min(cfg.loop.batch_size, len(prompts))
    position = state.rollouts
    state.rollouts += 1
    order = batch_order(len(prompts), size, cfg.loop.seed, position)
    chosen = [prompts[i] for i in ctx.dist.shard(order)]
    sampling = replace(cfg.sampling, seed=cfg.loop.seed * 1_000_003 + position)
    episodes, extra = None, None
    if run.env is None:
        rollout = run.generator.generate([p.ids for p in chosen], sampling)
    else:  # multi-turn: each sample is an episode with the environment
        episodes = run_episodes(
            run.generator, ctx.tokenizer, chosen, run.env, sampling, run.turns,
            native_tools=cfg.env.native_tools,
        )  # fmt: skip
        rollout, extra = episodes.rollout, {ENV: episodes.rewards}
    texts = ctx.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    fields = [chosen[i].fields for i in rollout.prompt_index]
    finished = [r != "length" for r in rollout.finish_reasons]
    flat, components = score(
        episodes.replies if episodes else texts, fields, finished, cfg, run.reward_fns,
        lengths=[len(c) for c in rollout.completion_ids], overlong=run.preset.overlong_penalty,
        extra=extra,
    )  # fmt: skip
    rewards = torch.tensor(flat, dtype=torch.float64).view(len(chosen), sampling.num_samples)
    return Sampled(chosen, rollout, texts, rewards, components,
                   episodes=episodes.info if episodes else [])  # fmt: skip


def informative_groups(
    rewards: torch.Tensor, band: tuple[float, float] | None = None, threshold: float = 1.0
) -> list[int]:
    """Groups to keep: rewards not all equal (DAPO), or with ``band`` a pass rate inside it.

    With ``band = (low, high)`` a group is kept when the share of its scored samples whose reward
    is at least ``threshold`` lies in [low, high] (the online difficulty filter).

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


def sample_groups(run: PGRun, state: LoopState) -> tuple[Sampled, dict[str, float]]:
    """Steps 1-4: one prompt batch, or with dynamic sampling as many rounds as fill it.

    Returns:
        The groups to train on and sampling statistics for the log.
    """
    cfg = run.cfg
    first = sample_round(run, state)
    band = cfg.algo.pass_rate_band
    if not (run.preset.dynamic_sampling or band):
        return first, {}
    need, parts, rounds, seen = len(first.prompts), [], 0, 0
    current = first
    while True:
        rounds, seen = rounds + 1, seen + len(current.prompts)
        keep = informative_groups(current.rewards, band, cfg.algo.pass_threshold)
        parts.append(select_groups(current, keep))
        have = sum(len(p.prompts) for p in parts)
        # every rank samples the same number of rounds, so the prompt counter stays in step
        short = all_reduce_sum(float(max(0, need - have)))
        if short == 0 or rounds > cfg.algo.max_refills:
            break
        current = sample_round(run, state)
    kept = concat_groups(parts)
    stats = {
        "rollout/dynamic_rounds": float(rounds),
        "rollout/kept_groups": float(len(kept.prompts)) / need,
        "rollout/informative_share": sum(len(p.prompts) for p in parts) / seen,
    }
    if not kept.prompts:  # nothing informative: train on the last round (A = 0 but KL)
        log.warning("dynamic sampling found no group with differing rewards in %d rounds", rounds)
        return current, stats
    return select_groups(kept, list(range(min(need, len(kept.prompts))))), stats


def greedy_rewards(run: PGRun, chosen: list[PromptRow]) -> torch.Tensor:
    """ReMax's baseline: the reward of each prompt's greedy completion (NaN if skipped).

    Shapes:
        returns (P,) fp64.
    """
    cfg = run.cfg
    greedy = replace(cfg.sampling, temperature=0.0, num_samples=1)
    rollout = run.generator.generate([p.ids for p in chosen], greedy)
    texts = run.ctx.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    finished = [r != "length" for r in rollout.finish_reasons]
    values, _ = score(
        texts, [p.fields for p in chosen], finished, cfg, run.reward_fns,
        lengths=[len(c) for c in rollout.completion_ids], overlong=run.preset.overlong_penalty,
    )  # fmt: skip
    return torch.tensor(values, dtype=torch.float64)


def split_minibatches(rows: list[int], parts: int, seed: int) -> list[list[int]]:
    """``rows`` shuffled (seeded) and cut into ``parts`` near-equal minibatches."""
    if parts <= 1:
        return [rows]
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    return [sorted(shuffled[k::parts]) for k in range(parts) if shuffled[k::parts]]


def micro_batches(
    run: PGRun, rollout: Rollout, rows: list[int], budget: int
) -> list[RolloutMicroBatch]:
    """Micro-batches of the given rollout rows (``rows`` of each holds rollout indices).

    On prefix trees (``run.trees``) each prompt and its completions form one document (the
    prompt computed once, no padding); otherwise rows are padded.
    """
    device, pad = run.ctx.dist.device, run.ctx.pad_id
    if run.trees:
        parts = rollout_tree_batches(
            rollout.prompt_ids, rollout.completion_ids, rollout.logprobs, rows, pad, budget,
            masks=rollout.masks or None,
        )  # fmt: skip
    else:
        parts = rollout_micro_batches(
            [rollout.prompt_ids[i] for i in rows], [rollout.completion_ids[i] for i in rows],
            [rollout.logprobs[i] for i in rows], pad, budget,
            masks=[rollout.masks[i] for i in rows] if rollout.masks else None,
        )  # fmt: skip
        index = torch.tensor(rows, dtype=torch.long)
        for b in parts:
            b["rows"] = index[b["rows"]]
    return [RolloutMicroBatch.from_collated(b, device) for b in parts]


def draw(run: PGRun, state: LoopState) -> tuple[Sampled, dict[str, float]]:
    """Steps 1-4 on the sampling side: the next groups, scored and filtered.

    With ReMax also each prompt's greedy baseline. Advances ``state.rollouts``; uses only
    ``run.generator`` and the rewards, so an engine can draw ahead of the learner.
    """
    sampled, stats = sample_groups(run, state)
    if "greedy" in run.preset.estimator.needs:  # ReMax: one greedy decode per prompt
        sampled.greedy = greedy_rewards(run, sampled.prompts)
    return sampled, stats


def assemble(run: PGRun, sampled: Sampled, stats: dict[str, float], rollouts: int) -> RolloutBatch:
    """Cut drawn groups into minibatches of micro-batches for the learner.

    ``rollouts`` is the prompt-batch counter after the draw (it seeds the minibatch split).
    """
    flat = sampled.rewards.flatten().tolist()
    scored = [i for i, v in enumerate(flat) if not math.isnan(v)]
    seed = run.cfg.loop.seed + rollouts
    minibatches = [
        micro_batches(run, sampled.rollout, rows, run.cfg.loop.micro_batch_tokens)
        for rows in split_minibatches(scored, run.cfg.algo.minibatches, seed)
    ]
    return RolloutBatch(minibatches, sampled, stats=stats)


def collect(run: PGRun, state: LoopState) -> RolloutBatch:
    """Steps 1-4: sample and score the next groups, filter them, cut them into micro-batches."""
    sampled, stats = draw(run, state)
    return assemble(run, sampled, stats, state.rollouts)
