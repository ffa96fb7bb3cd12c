"""Step 7 of a policy-gradient step: what is logged, and a few samples.

Reward mean and spread and each component, the KL, entropy, clip fraction, approximate KL,
completion lengths, finish reasons, advantage statistics, the share of zero-variance groups, the
critic's losses (PPO), and every ``sample_every`` steps a few completions (``samples.jsonl``).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter

import torch

from rlhfkit.recipes.policy_gradient.state import RolloutBatch
from rlhfkit.rollout.multiturn import episode_means
from rlhfkit.training.accumulate import StepStats
from rlhfkit.training.distributed import all_reduce_sum, gather_objects
from rlhfkit.training.run import RunContext
from rlhfkit.types import Rollout


def _rollout_parts(batch: RolloutBatch) -> dict[str, list]:
    """This rank's share of what :func:`rollout_metrics` summarises, as plain lists."""
    rewards, rollout = batch.rewards, batch.rollout
    flat_group = torch.nan_to_num(rewards, nan=0.0)
    return {
        "rewards": rewards.flatten().tolist(),
        "flat_groups": (flat_group == flat_group[:, :1]).all(1).tolist(),
        "lengths": [len(c) for c in rollout.completion_ids],
        "reasons": list(rollout.finish_reasons),
        "entropies": _policy_entropies(rollout) if rollout.entropies else None,
        "episodes": batch.sampled.episodes,
        "advantages": batch.advantages.flatten().tolist(),
        "components": {
            name: [v for v in values if v is not None] for name, values in batch.components.items()
        },
    }


def _policy_entropies(rollout: Rollout) -> list[float]:
    """The sampler's entropy at every token the policy sampled (not at tool output)."""
    if not rollout.masks:
        return [h for row in rollout.entropies for h in row]
    return [
        h for row, mask in zip(rollout.entropies, rollout.masks, strict=True)
        for h, m in zip(row, mask, strict=True) if m
    ]  # fmt: skip


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Reward, length, entropy, finish-reason and advantage statistics of one rollout batch.

    Over the whole batch: every rank's share is gathered first.
    """
    parts = gather_objects(_rollout_parts(batch))

    def joined(key: str) -> list:
        return [x for part in parts for x in part[key]]

    everything = joined("rewards")
    flat = [v for v in everything if not math.isnan(v)]
    lengths, reasons, groups = joined("lengths"), Counter(joined("reasons")), joined("flat_groups")
    advantages = torch.tensor(joined("advantages"), dtype=torch.float64)
    out = {
        "rollout/reward": statistics.fmean(flat) if flat else 0.0,
        "rollout/reward_std": statistics.pstdev(flat) if flat else 0.0,
        "rollout/skipped": 1.0 - len(flat) / len(everything),
        "rollout/length": statistics.fmean(lengths),
        "rollout/length_max": float(max(lengths)),
        "rollout/zero_variance_groups": sum(groups) / len(groups),
        "rollout/advantage_mean": float(advantages.mean()),
        "rollout/advantage_std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
        "rollout/advantage_abs_max": float(advantages.abs().max()),
        **batch.stats,
    }
    if parts[0]["entropies"] is not None:
        tokens = joined("entropies")
        out["rollout/entropy"] = statistics.fmean(tokens) if tokens else 0.0
    for reason in ("eos", "stop", "length"):
        out[f"rollout/finish_{reason}"] = reasons.get(reason, 0) / len(lengths)
    for name in batch.components:
        valid = [v for part in parts for v in part["components"].get(name, [])]
        if valid:
            out[f"rollout/reward/{name}"] = statistics.fmean(valid)
    out.update(episode_means(joined("episodes")))  # env/turns, env/calls, ... with --env
    return out


def step_metrics(stats: StepStats, batch: RolloutBatch) -> dict[str, float]:
    """Loss-side metrics of the last step and rollout-side metrics (sums all-reduced)."""
    sums = {k: all_reduce_sum(v) for k, v in sorted(stats.metrics.items())}
    tokens = max(sums.get("tokens", 1.0), 1.0)
    metrics = {
        "train/loss": all_reduce_sum(stats.loss),
        "train/clip_frac": sums.get("clipped", 0.0) / tokens,
        "train/approx_kl": sums.get("approx_kl", 0.0) / tokens,
        "train/ratio_mean": sums.get("ratio", tokens) / tokens,
        "train/sampler_gap": sums.get("sampler_gap", 0.0) / tokens,
        "train/sampler_kl": sums.get("sampler_kl", 0.0) / tokens,
        "train/tis_weight": sums.get("tis_weight", tokens) / tokens,
        "train/tis_dropped": sums.get("tis_dropped", 0.0) / tokens,
        **rollout_metrics(batch),
    }
    if "kl" in sums:
        metrics["train/kl_per_token"] = sums["kl"] / tokens
    for key in ("value_loss", "value_clipped", "value_mean", "returns_mean"):
        if key in sums:
            metrics[f"critic/{key}"] = sums[key] / tokens
    return metrics


def write_samples(ctx: RunContext, batch: RolloutBatch) -> None:
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
