"""Iterative (online) DPO: sample pairs from the current policy, label them, train; repeat.

RLHF book chapter 8 (online and iterative direct alignment); the loop of Xu et al. 2023
("Some things are more CRINGE than others"), Guo et al. 2024 (online AI feedback) and Xiong et
al. 2024 (iterative DPO with a reward model). Offline DPO learns from pairs some other model
wrote; here every round's pairs come from the policy being trained, labelled by a reward.

Loop, for round k = 1 .. ``rounds``:
    1. Prompts: the next ``prompts_per_round`` distinct prompts of the training source (a seeded
       shuffle, cycled).
    2. Sample ``num_samples`` completions per prompt from the current policy, with the KV-cache
       sampler every command uses (:func:`rlhfkit.rollout.sampler.chat_generator`, prompts
       rendered with the chat template, :func:`rlhfkit.eval.run.sample_grid`), or with
       ``--engine.backend vllm`` on a vLLM server that gets the policy's weights before each
       round (:mod:`rlhfkit.recipes.engine`). The seed of a prompt's chunk is
       ``loop.seed * 1_000_003`` plus the prompt's position in the stream of round prompts, so
       no two chunks of a run share a random stream (the vLLM engine takes no per-request seed).
    3. Score them with the reward: ``rm:<checkpoint>`` (a reward model from ``rlhfkit rm train``)
       or any ``module:function`` (:mod:`rlhfkit.rewards`); None skips a completion.
    4. Pair the best completion of each prompt with its worst; prompts whose best and worst
       differ by no more than ``min_gap`` give no pair (counted as ties). The score gap is the
       pair's margin and the scores feed ODPO's offset.
    5. Reference log-probs of the new pairs, before any update of the round: ``round`` uses the
       policy as it starts the round (each round is anchored to the previous iterate; no second
       model), ``initial`` the starting model (the adapter disabled under LoRA, else loaded again
       for this pass and freed).
    6. ``steps_per_round`` optimiser steps on the round's pairs, the same step as ``rlhfkit dpo``
       (one prefix-tree document per pair, the loss picked by ``--algo.loss``).
    7. Log the round (reward mean and spread of the samples, reward of chosen and rejected,
       pairs and ties), write its samples to ``rounds/round-<k>.jsonl`` and a checkpoint.
    Then the held-out pair metrics, the sampled KL to the starting model and (built-in task) the
    gold win rate against the starting model, as in offline DPO.

Deviations: held-out pair metrics always use the starting model's cached reference (so they are
comparable across rounds), whatever ``reference`` is. A run resumes at the last finished round.
Under torchrun every rank samples and scores the same round (replicated, same seed); the
optimiser steps are sharded as in offline DPO.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import EngineConfig, LogConfig, Problems, to_dict
from rlhfkit.data.collate import supports_padding_free
from rlhfkit.data.groups import TokenizedGroup, tokenize_groups
from rlhfkit.data.preferences import RankedGroup
from rlhfkit.data.prompts import PromptRow
from rlhfkit.data.schemas import load_examples
from rlhfkit.data.templates import render_prompt
from rlhfkit.errors import ConfigError
from rlhfkit.eval.run import sample_grid
from rlhfkit.losses.preference import PREFERENCE_LOSSES
from rlhfkit.models.heads import supports_prefix_trees
from rlhfkit.recipes.dpo import (
    DPOConfig,
    PairBatches,
    example_count,
    final_evaluation,
    load_pairs,
    make_step_loss,
    train_steps,
)
from rlhfkit.recipes.dpo_eval import gold_comparison, heldout_metrics
from rlhfkit.recipes.engine import synced, vllm_policy
from rlhfkit.rewards import load_reward_fn, reward_models, score_completions
from rlhfkit.rewards.base import reward_spec_problem
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.sampler import Generator, chat_generator
from rlhfkit.rollout.vllm_server import require_engine
from rlhfkit.training.distributed import gather_objects
from rlhfkit.training.reference import cached_reference, compute_reference
from rlhfkit.training.run import RunContext, build_run, finish_run

log = logging.getLogger(__name__)


@dataclass
class OnlineConfig:
    """The sample-label-train rounds."""

    reward: str = "rlhfkit.data.tasks.preferences:gold_score"
    """Labeller: 'rm:<reward model directory>' or 'module:function' / 'path/file.py:function'
    (called with the completion and the example fields it names; the default is the built-in
    task's gold judge)."""
    rounds: int = 3
    """Sample-label-train rounds."""
    prompts_per_round: int = 64
    """Prompts sampled per round."""
    num_samples: int = 4
    """Completions sampled per prompt (>= 2)."""
    temperature: float = 0.8
    """Sampling temperature (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 96
    """Completion length limit."""
    steps_per_round: int = 4
    """Optimiser steps on each round's pairs (``loop.batch_size`` pairs per step)."""
    reference: Literal["round", "initial"] = "round"
    """pi_ref of a round's pairs: the policy as it starts the round, or the starting model."""
    min_gap: float = 0.0
    """Keep a prompt's pair only when best - worst score exceeds this."""
    rm_max_tokens: int = 8192
    """Tokens per forward pass of a reward-model labeller."""

    def problems(self) -> Problems:
        """Invalid values and a reward that cannot load (checked before loading the model)."""
        out = [
            (name, f"must be at least {low}, got {getattr(self, name)}")
            for name, low in (("rounds", 1), ("prompts_per_round", 1), ("num_samples", 2),
                              ("steps_per_round", 1), ("max_new_tokens", 1), ("rm_max_tokens", 1))
            if getattr(self, name) < low
        ]  # fmt: skip
        if not self.temperature > 0:
            out.append(("temperature", f"must be positive, got {self.temperature}"))
        if not 0.0 < self.top_p <= 1.0:
            out.append(("top_p", f"must be in (0, 1], got {self.top_p}"))
        problem = reward_spec_problem(self.reward)
        if problem:
            out.append(("reward", problem))
        return out


@dataclass
class OnlineDPOConfig(DPOConfig):
    """rlhfkit dpo online: iterative DPO on pairs sampled from the policy and labelled."""

    online: OnlineConfig = field(default_factory=OnlineConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Where each round samples: the policy itself, or a vLLM server given the policy's weights
    before each round (one process only)."""
    log: LogConfig = field(default_factory=lambda: LogConfig(run_dir="runs/dpo_online"))


def round_prompts(cfg: OnlineDPOConfig) -> list[dict[str, Any]]:
    """Distinct prompts of the training source, each with its row's fields (for the reward)."""
    data = cfg.data
    result = load_examples(
        data.train, data.schema, split=data.train_split, on_error=data.on_error, limit=data.limit
    )
    out, seen = [], set()
    for example in result.examples:
        key = repr(example.prompt)
        if key not in seen:
            seen.add(key)
            meta = getattr(example, "meta", {}) or {}
            out.append({**meta, "prompt": list(example.prompt), "location": example.location})
    if not out:
        raise ConfigError(f"{data.train}: no prompts to sample from")
    return out


def pick_prompts(prompts: list[dict[str, Any]], k: int, per_round: int, seed: int) -> list[dict]:
    """The prompts of round ``k``: consecutive slices of seeded shuffles (one per pass)."""
    out = []
    for position in range(k * per_round, (k + 1) * per_round):
        epoch, index = divmod(position, len(prompts))
        order = list(range(len(prompts)))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(prompts[order[index]])
    return out


def best_vs_worst(
    fields: dict[str, Any], completions: list[str], scores: list[float | None], min_gap: float
) -> RankedGroup | None:
    """The pair (best, worst) of one prompt's scored completions, or None for a tie.

    Ties among the best (or worst) go to the earliest sample; skipped (None) completions and
    empty ones are left out.
    """
    scored = [(s, i) for i, s in enumerate(scores) if s is not None and completions[i].strip()]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda t: (t[0], -t[1]))
    worst = min(scored, key=lambda t: (t[0], t[1]))
    if best[0] - worst[0] <= min_gap:
        return None
    return RankedGroup(
        prompt=fields["prompt"],
        completions=[[{"role": "assistant", "content": completions[i]}] for _, i in (best, worst)],
        scores=[best[0], worst[0]],
        margin=best[0] - worst[0],
        meta={"source": fields.get("location", "")},
        location=f"round sample of {fields.get('location', 'prompt')}",
    )


def _sample_share(
    ctx: RunContext,
    reward: Any,
    chosen: list[dict[str, Any]],
    sampling: SamplingConfig,
    generator: Generator | None = None,
) -> tuple[list[list[str]], list[list[float | None]]]:
    """Completions and rewards of every prompt of the round, each rank sampling its share.

    Every rank gets the whole round back, in prompt order, so that all ranks build the same
    pairs (and train on their share of them). ``generator`` samples (None: the policy itself).
    """
    mine = ctx.dist.shard(list(range(len(chosen))))
    rows = [PromptRow(render_prompt(ctx.tokenizer, chosen[i]["prompt"]), chosen[i]) for i in mine]
    generator = generator or chat_generator(ctx.model, ctx.tokenizer)
    samples = sample_grid(generator, ctx.tokenizer, rows, sampling).texts if rows else []
    flat = [c for completions in samples for c in completions]
    fields = [chosen[i] for i, completions in zip(mine, samples, strict=True) for _ in completions]
    flat_scores = score_completions(reward, flat, fields) if flat else []
    local, offset = [], 0
    for i, completions in zip(mine, samples, strict=True):
        local.append((i, completions, flat_scores[offset : offset + len(completions)]))
        offset += len(completions)
    everything = sorted(x for part in gather_objects(local) for x in part)
    return [c for _, c, _ in everything], [v for _, _, v in everything]


def sample_round(
    ctx: RunContext,
    cfg: OnlineDPOConfig,
    reward: Any,
    prompts: list[dict[str, Any]],
    k: int,
    generator: Generator | None = None,
) -> tuple[list[TokenizedGroup], dict[str, float], list[dict[str, Any]]]:
    """Steps 1-4 of round ``k``: pairs, round metrics and the records written to disk.

    ``generator`` samples (None: rlhfkit's sampler on the policy).
    """
    on = cfg.online
    chosen = pick_prompts(prompts, k, on.prompts_per_round, cfg.loop.seed)
    sampling = SamplingConfig(
        max_new_tokens=on.max_new_tokens,
        temperature=on.temperature,
        top_p=on.top_p,
        num_samples=on.num_samples,
        seed=cfg.loop.seed * 1_000_003 + k * on.prompts_per_round,  # + the prompt's index
    )
    samples, scored = _sample_share(ctx, reward, chosen, sampling, generator)
    flat_scores = [v for scores in scored for v in scores]
    flat = [c for completions in samples for c in completions]
    groups, records = [], []
    for p, completions, scores in zip(chosen, samples, scored, strict=True):
        group = best_vs_worst(p, completions, scores, on.min_gap)
        if group is not None:
            groups.append(group)
        records.append({"prompt": p["prompt"], "completions": completions, "scores": scores})
    pairs, counts = tokenize_groups(ctx.tokenizer, groups, max_len=cfg.data.max_len)
    valid = [s for s in flat_scores if s is not None]
    metrics = {
        "online/round": float(k + 1),
        "online/reward_mean": statistics.fmean(valid) if valid else float("nan"),
        "online/reward_std": statistics.pstdev(valid) if valid else float("nan"),
        "online/skipped": float(len(flat) - len(valid)),
        "online/ties": float(len(chosen) - len(groups)),
        "online/pairs": float(len(pairs)),
        "online/dropped": float(counts["dropped_identical"] + counts["dropped_empty"]),
    }
    if pairs:
        metrics["online/reward_chosen"] = statistics.fmean(g.scores[0] for g in pairs)
        metrics["online/reward_rejected"] = statistics.fmean(g.scores[1] for g in pairs)
    return pairs, metrics, records


def round_reference(
    ctx: RunContext, cfg: OnlineDPOConfig, pairs: list[TokenizedGroup], share: bool
) -> torch.Tensor | None:
    """Step 5: reference sums of the round's pairs (None for a reference-free loss).

    Shapes:
        returns (G, 2) fp32.
    """
    if PREFERENCE_LOSSES[cfg.algo.loss].reference_free:
        return None
    options = {
        "max_tokens": cfg.loop.micro_batch_tokens, "packing": ctx.packing, "pad_id": ctx.pad_id,
        "share_prefix": share, "disable_adapter": False,
    }  # fmt: skip
    if cfg.online.reference == "round":
        with ctx.gathered():  # each rank has its own pairs
            return compute_reference(ctx.model, pairs, **options)[0]
    with ctx.starting_model() as reference, ctx.gathered(reference):
        return compute_reference(reference, pairs, **options)[0]


@contextlib.contextmanager
def round_sampler(
    ctx: RunContext, cfg: OnlineDPOConfig
) -> Iterator[Callable[[], tuple[Generator | None, dict[str, float]]]]:
    """Per round: the sampler of the policy's current weights and its metrics.

    ``hf``: None (rlhfkit's sampler on the policy itself). ``vllm``: a server started once,
    given the policy's weights before each round where they moved (their load time is logged;
    0 when nothing was loaded).
    """
    if cfg.engine.backend == "hf":
        yield lambda: (None, {})
        return
    with vllm_policy(ctx, cfg.engine, cfg.loop.seed) as engine:

        def sampler() -> tuple[Generator | None, dict[str, float]]:
            loads = engine.pending or engine.latest != ctx.step
            synced(engine, ctx)
            return engine.generator, {"online/sync_s": engine.sync_seconds if loads else 0.0}

        yield sampler


@dataclass
class RoundBatches:
    """What every round trains with besides its own pairs.

    Attributes:
        held_out: The held-out pairs (None: none).
        loss: The step loss and its example count.
        share: Pairs as prefix trees (one document per prompt).
    """

    held_out: PairBatches | None
    loss: tuple[Any, Any]
    share: bool


def one_round(
    ctx: RunContext,
    cfg: OnlineDPOConfig,
    k: int,
    reward: Any,
    prompts: list[dict[str, Any]],
    sampler: tuple[Generator | None, dict[str, float]],
    batches: RoundBatches,
    bar: Any,
) -> None:
    """Round ``k``: sample, label and pair (steps 1-4), log and write them, train, checkpoint."""
    generator, engine_metrics = sampler
    with ctx.gathered(*reward_models([reward])):  # each rank samples its share
        pairs, metrics, records = sample_round(ctx, cfg, reward, prompts, k, generator)
    metrics.update(engine_metrics)
    ctx.logger.log(ctx.step, metrics)
    log.info("round %d: %s", k + 1, {n: round(v, 4) for n, v in metrics.items()})
    if ctx.dist.is_main:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        path = ctx.run_dir / "rounds" / f"round-{k + 1:03d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    if pairs:
        share = batches.share
        train = PairBatches(
            pairs, round_reference(ctx, cfg, pairs, share), ctx.packing, ctx.pad_id, share
        )
        train_steps(
            ctx, cfg, train, batches.held_out, batches.loss, bar,
            stop_step=ctx.step + cfg.online.steps_per_round, batch_limit=None, save_every=0,
            batch_offset=ctx.batches_done,
        )  # fmt: skip
    else:
        log.warning("round %d: every prompt tied; no update this round", k + 1)
    ctx.resume_state["round"] = k + 1
    ctx.save(cfg.loop.keep_last)


def main(cfg: OnlineDPOConfig) -> Path:
    """Run iterative DPO; returns the run directory (model under ``<run_dir>/final``)."""
    on = cfg.online
    if on.num_samples < 2 or on.temperature <= 0 or on.rounds < 1 or on.steps_per_round < 1:
        raise ConfigError(
            "online DPO needs num_samples >= 2, temperature > 0, rounds >= 1, steps_per_round >= 1"
        )
    if cfg.engine.backend == "vllm" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--engine.backend vllm runs with one process; under torchrun use hf")
    require_engine(cfg.engine, cfg.model)  # not installed: say how, before loading anything
    ctx = build_run(
        cfg.model, cfg.log, cfg.loop.seed, to_dict(cfg), resume=cfg.loop.resume,
        batch_size=cfg.loop.batch_size,
    )  # fmt: skip
    ctx.packing = supports_padding_free(ctx.model)
    share = cfg.data.share_prefix and ctx.packing and supports_prefix_trees(ctx.model)
    reward = load_reward_fn(on.reward, place=ctx.place.frozen, max_tokens=on.rm_max_tokens)
    prompts = round_prompts(cfg)
    held_out = None
    if cfg.data.eval:
        held = load_pairs(ctx.tokenizer, cfg.data.eval, cfg.data.eval_split, cfg, 1)[0]
        with ctx.gathered():  # a rank may find the cache that another is still writing
            ref = cached_reference(
                ctx.model, held, max_tokens=cfg.loop.micro_batch_tokens, packing=ctx.packing,
                pad_id=ctx.pad_id, share_prefix=share,
            )[0] if held else None  # fmt: skip
        held_out = PairBatches(held, ref, ctx.packing, ctx.pad_id, share) if held else None
    total = on.rounds * on.steps_per_round
    ctx.start_training(cfg.optim, total)
    saved = ctx.resume_state.get("gold_before")
    with ctx.gathered():  # rank 0 samples alone
        before = gold_comparison(ctx, cfg, None) if ctx.step == 0 else saved
    if before is not None:
        ctx.resume_state["gold_before"] = before
    loss = (make_step_loss(ctx.model, cfg.algo), example_count(cfg.algo))
    if ctx.step == 0 and held_out is not None:
        ctx.logger.log(0, heldout_metrics(ctx, held_out, *loss, cfg))
    batches = RoundBatches(held_out, loss, share)
    with ctx.progress(total) as bar, round_sampler(ctx, cfg) as sampler:
        for k in range(int(ctx.resume_state.get("round", 0)), on.rounds):
            one_round(ctx, cfg, k, reward, prompts, sampler(), batches, bar)
    final_evaluation(ctx, cfg, held_out, *loss)
    ctx.resume_state.pop("gold_before", None)
    return finish_run(ctx, cfg.loop.keep_last)
