"""Held-out evaluation of the direct-alignment recipe.

- Pairs: the loss and its metrics on held-out pairs (implicit-reward accuracy, rewards and
  margins, reply log-probs, log-ratio to the reference, preference displacement).
- KL: KL(pi_theta || pi_ref) estimated (k1, k3) on one temperature-1 sample per held-out prompt
  from the policy, scored by the policy and by the starting model (:mod:`rlhfkit.eval.kl`).
- Gold: on the built-in preference task, greedy replies to held-out prompts before and after
  training, compared by the gold judge (win rate of the trained model against the starting one,
  and mean gold scores).

Both samples come from the KV-cache sampler every command uses
(:func:`rlhfkit.rollout.sampler.chat_generator` on the policy; prompts rendered with the chat
template).
"""

from __future__ import annotations

from typing import Any

import torch

from rlhfkit.data.prompts import conversation_rows
from rlhfkit.data.schemas import load_examples
from rlhfkit.data.sources import load_rows
from rlhfkit.eval.gold import gold_win_rate
from rlhfkit.eval.kl import sampled_kl
from rlhfkit.eval.run import sample_grid
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.sampler import chat_generator
from rlhfkit.training.accumulate import accumulate
from rlhfkit.training.distributed import all_reduce_sum
from rlhfkit.training.run import RunContext

GOLD_SOURCE = "builtin:preferences"


def pair_metrics(sums: dict[str, float], prefix: str) -> dict[str, float]:
    """Means over pairs of a loss's metric sums (accuracy, rewards, margins, log-probs)."""
    pairs = max(sums.get("pairs", sums.get("examples", 0.0)), 1.0)
    names = {
        "correct": "accuracy",
        "chosen_rewards_sum": "rewards/chosen",
        "rejected_rewards_sum": "rewards/rejected",
        "margin_sum": "rewards/margin",
        "chosen_logprobs_sum": "logprobs/chosen",
        "rejected_logprobs_sum": "logprobs/rejected",
        "delta_chosen_sum": "logratio/chosen",
        "delta_rejected_sum": "logratio/rejected",
        "displaced": "displacement",
    }
    out = {f"{prefix}/{v}": sums[k] / pairs for k, v in names.items() if k in sums}
    for side in ("desirable", "undesirable"):  # KTO: per-class means
        if f"{side}_rewards_sum" in sums:
            n = max(sums.get(side, 0.0), 1.0)
            out[f"{prefix}/rewards/{side}"] = sums[f"{side}_rewards_sum"] / n
            out[f"{prefix}/logprobs/{side}"] = sums[f"{side}_logprobs_sum"] / n
    return out


@torch.no_grad()
def heldout_metrics(
    ctx: RunContext, held_out: Any, step_loss: Any, count_fn: Any, cfg: Any
) -> dict[str, float]:
    """Loss and pair metrics over every held-out pair (each rank takes a share)."""
    ctx.model.eval()
    mine = ctx.dist.shard(list(range(len(held_out.pairs))))
    batches = [ctx.to_device(b) for b in held_out.micro_batches(mine, cfg.loop.micro_batch_tokens)]

    stats = accumulate(batches, step_loss, count_fn=count_fn, backward=False, models=ctx.models)
    ctx.model.train()
    sums = {k: all_reduce_sum(v) for k, v in sorted(stats.metrics.items())}
    return {"eval/loss": all_reduce_sum(stats.loss), **pair_metrics(sums, "eval")}


def distinct_prompts(source: str, split: str, schema: str, limit: int) -> list[list[dict]]:
    """The first ``limit`` distinct prompts of a preference source."""
    prompts, seen = [], set()
    for example in load_examples(source, schema, split=split, on_error="skip").examples:
        key = repr(example.prompt)
        if key not in seen:
            seen.add(key)
            prompts.append(list(example.prompt))
        if len(prompts) == limit:
            break
    return prompts


def kl_metrics(ctx: RunContext, cfg: Any) -> dict[str, float]:
    """Sampled KL(pi_theta || pi_ref) on held-out prompts (rank 0; empty when disabled)."""
    if not cfg.eval.kl_prompts or not cfg.data.eval or not ctx.dist.is_main:
        return {}
    prompts = distinct_prompts(
        cfg.data.eval, cfg.data.eval_split, cfg.data.schema, cfg.eval.kl_prompts
    )
    kl = sampled_kl(
        ctx.model,
        ctx.starting_model(local=True),
        ctx.tokenizer,
        prompts,
        max_new_tokens=cfg.eval.max_new_tokens,
        seed=cfg.loop.seed,
    )
    return {
        "eval/kl/k1": kl["k1"],
        "eval/kl/k3": kl["k3"],
        "eval/kl/k1_per_token": kl["k1_per_token"],
    }


def gold_prompts(limit: int) -> tuple[list[list[dict[str, str]]], list[dict[str, Any]]]:
    """The first ``limit`` distinct held-out prompts of the built-in task with their references."""
    prompts, refs, seen = [], [], set()
    for row in load_rows(GOLD_SOURCE, split="heldout"):
        key = repr(row.data["prompt"])
        if key in seen:
            continue
        seen.add(key)
        prompts.append(row.data["prompt"])
        refs.append({"reference": row.data["reference"], "task": row.data.get("task")})
        if len(prompts) == limit:
            break
    return prompts, refs


def gold_comparison(ctx: RunContext, cfg: Any, before: dict | None) -> dict | None:
    """Greedy replies now; with ``before`` (the starting model's), the gold comparison.

    Returns:
        None when disabled or not on the built-in task; else ``{"replies": [...]}`` and, given
        ``before``, ``summary`` (win rate, mean gold of both) and ``samples``.
    """
    if not cfg.eval.win_rate or cfg.data.eval != GOLD_SOURCE or not ctx.dist.is_main:
        return None
    prompts, refs = gold_prompts(cfg.eval.prompts)
    sampling = SamplingConfig(max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0)
    generator = chat_generator(ctx.model, ctx.tokenizer)
    rows = conversation_rows(ctx.tokenizer, prompts)
    replies = [r[0] for r in sample_grid(generator, ctx.tokenizer, rows, sampling).texts]
    if before is None:
        return {"replies": replies}
    summary = gold_win_rate(replies, before["replies"], refs)
    samples = [
        {"prompt": p[-1]["content"], "before": b, "after": a}
        for p, b, a in zip(prompts, before["replies"], replies, strict=True)
    ]
    return {"replies": replies, "summary": summary, "samples": samples}
