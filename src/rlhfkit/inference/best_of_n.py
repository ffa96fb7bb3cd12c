"""``rlhfkit bon``: best-of-N at inference (RLHF book ch. 9).

No training: for every prompt, sample n completions, score them, answer with the best one
(argmax, ties to the first). The report puts the best-of-n reward beside the reward of a single
sample (the first of the n) and gives the analytic KL of the best-of-n policy to the sampling
policy, KL_BoN = log n - (n - 1)/n (exact for continuous rewards without ties; an upper bound
otherwise), the x-axis of Gao et al.'s over-optimisation curves.

1. Load the prompts, sample n per prompt (the ``rlhfkit eval`` engine, on rlhfkit's sampler or
   ``--engine.backend vllm``; cached).
2. Score with the rewards (a reward model, a verifier, any ``module:function``).
3. Pick the argmax per prompt (:func:`rlhfkit.ops.selection.top_per_prompt`).
4. Write the chosen completions (JSONL) and print the report: mean reward of the best and of a
   single sample, accuracy of both when the rewards are verifiers, KL_BoN.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import EngineConfig, ModelConfig
from rlhfkit.inference.evaluate import EvalDataConfig, evaluate_prompts
from rlhfkit.ops.selection import bon_kl, top_per_prompt
from rlhfkit.rewards.base import rewards_problems
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.vllm_server import require_engine


@dataclass
class BoNConfig:
    """rlhfkit bon: answer each prompt with the best of n samples under a reward."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: EvalDataConfig = field(default_factory=lambda: EvalDataConfig(limit=64))
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=128, temperature=0.8, num_samples=8)
    )
    """num_samples is n."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    rewards: tuple[str, ...] = ("verifier:auto",)
    """Scorers: verifier:NAME (auto: each row's own), rm:DIR, rm-ensemble:MODE:DIR,DIR,
    judge:MODEL, rubric:FILE (|judge:MODEL, |implicit), module:function or file.py:fn."""
    weights: tuple[float, ...] = ()
    """One weight per reward (default 1 each)."""
    threshold: float = 1.0
    """A completion is correct when its reward is at least this (for the accuracy figures)."""
    chunk: int = 32
    """Prompts per generator call."""
    cache_dir: str | None = "~/.cache/rlhfkit/samples"
    """Where samples and scores are cached (None: no cache)."""
    output: str | None = None
    """Write the chosen completions (prompt, completion, reward, all rewards) as JSONL here."""

    def problems(self) -> list[tuple[str, str]]:
        """Rewards that cannot load, found before any model loads."""
        return rewards_problems(self.rewards)


def bon_report(rewards: list[list[float]], threshold: float) -> dict[str, Any]:
    """Best-of-n against one sample, from the (M, n) reward matrix (NaN = skipped)."""
    import torch

    matrix = torch.tensor(rewards, dtype=torch.float64)  # (M, n)
    picks = top_per_prompt(matrix)
    best = [float(matrix[i, j]) for i, j in picks]
    single = [r[0] for r in rewards if not math.isnan(r[0])]
    n = matrix.shape[1]
    return {
        "prompts": matrix.shape[0], "n": n, "kl_bon": bon_kl(n),
        "reward_best": statistics.fmean(best) if best else math.nan,
        "reward_single": statistics.fmean(single) if single else math.nan,
        "accuracy_best": statistics.fmean(b >= threshold for b in best) if best else math.nan,
        "accuracy_single": (
            statistics.fmean(s >= threshold for s in single) if single else math.nan
        ),
        "picks": picks,
    }  # fmt: skip


def main(cfg: BoNConfig) -> dict[str, Any]:
    """Steps 1-4; returns the report."""
    require_engine(cfg.engine, cfg.model)
    prompts, grid = evaluate_prompts(
        cfg.model, None, cfg.data, cfg.sampling, cfg.rewards, cfg.weights,
        chunk=cfg.chunk, cache_dir=cfg.cache_dir, engine=cfg.engine,
    )  # fmt: skip
    report = bon_report(grid.rewards, cfg.threshold)
    console = Console()
    console.print(
        f"best-of-{report['n']} on {report['prompts']} prompts: reward "
        f"{report['reward_best']:.3f} (one sample: {report['reward_single']:.3f}), accuracy "
        f"{report['accuracy_best']:.3f} (one sample: {report['accuracy_single']:.3f}), "
        f"KL_BoN = log n - (n-1)/n = {report['kl_bon']:.4f} nats"
    )
    if cfg.output:
        lines = []
        for i, j in report["picks"]:
            rewards = [None if math.isnan(r) else r for r in grid.rewards[i]]
            row = {
                "prompt": prompts[i].fields["prompt"], "completion": grid.texts[i][j],
                "reward": rewards[j], "rewards": rewards, "sample": j,
            }  # fmt: skip
            lines.append(json.dumps(row))
        atomic_write_text(cfg.output, "\n".join(lines) + "\n")
    return report
