"""``rlhfkit filter``: keep the prompts of useful difficulty (docs/methods/sampling.md).

RL with verifiable rewards learns nothing from a prompt the model always or never solves: every
sample of its group gets the same reward, so its advantage is zero. The offline filter:

1. Sample N = ``sampling.num_samples`` completions per prompt (16 by default) with the model
   to be trained (the ``rlhfkit eval`` engine; cached).
2. Score them; a sample passes when its reward reaches ``threshold``.
3. Keep the prompts whose pass rate c/N lies in [``low``, ``high``], both ends included
   (:func:`rlhfkit.ops.selection.pass_rate_band`; [0.2, 0.8] keeps c in {4, ..., 12} of 16).
4. Write the kept rows (every original field, plus ``pass_rate``) as JSONL, ready for
   ``rlhfkit rl --data.train``, and print how many were kept.

The online counterpart during RL is ``rlhfkit rl --algo.pass-rate-band LOW HIGH`` (groups whose
pass rate leaves the band are dropped and refilled, as with DAPO's dynamic sampling).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import ModelConfig
from rlhfkit.data.sources import load_rows
from rlhfkit.inference.evaluate import EvalDataConfig, evaluate_prompts
from rlhfkit.ops.selection import pass_rate_band
from rlhfkit.rewards.base import rewards_problems
from rlhfkit.rollout.hf import SamplingConfig


@dataclass
class FilterConfig:
    """rlhfkit filter: keep prompts whose pass rate over N samples lies in a band."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: EvalDataConfig = field(default_factory=lambda: EvalDataConfig(split="train"))
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=128, temperature=1.0, num_samples=16)
    )
    rewards: tuple[str, ...] = ("verifier:auto",)
    """Scorers: verifier:NAME (auto: each row's own), rm:DIR, rm-ensemble:MODE:DIR,DIR,
    judge:MODEL, rubric:FILE (|judge:MODEL, |implicit), module:function or file.py:fn."""
    weights: tuple[float, ...] = ()
    """One weight per reward (default 1 each)."""
    threshold: float = 1.0
    """A sample passes when its reward is at least this."""
    low: float = 0.2
    """Smallest kept pass rate."""
    high: float = 0.8
    """Largest kept pass rate."""
    chunk: int = 32
    """Prompts per generator call."""
    cache_dir: str | None = "~/.cache/rlhfkit/samples"
    """Where samples and scores are cached (None: no cache)."""
    output: str = "filtered.jsonl"
    """The kept rows, as JSONL."""

    def problems(self) -> list[tuple[str, str]]:
        """Rewards that cannot load, found before any model loads."""
        return rewards_problems(self.rewards)


def main(cfg: FilterConfig) -> dict[str, Any]:
    """Steps 1-4; returns counts of kept prompts and the pass-count histogram."""
    prompts, grid = evaluate_prompts(
        cfg.model, None, cfg.data, cfg.sampling, cfg.rewards, cfg.weights,
        chunk=cfg.chunk, cache_dir=cfg.cache_dir,
    )  # fmt: skip
    rewards = grid.reward_matrix()  # (M, N)
    correct = rewards.nan_to_num(nan=-torch.inf) >= cfg.threshold  # (M, N)
    keep = pass_rate_band(correct, cfg.low, cfg.high).tolist()
    raw = load_rows(cfg.data.source, split=cfg.data.split, limit=cfg.data.limit)
    if len(raw) != len(prompts):
        raise RuntimeError(f"{cfg.data.source}: {len(raw)} rows but {len(prompts)} prompts")
    n = correct.shape[1]
    lines = [
        json.dumps({**row.data, "pass_rate": float(c) / n})
        for row, k, c in zip(raw, keep, correct.sum(dim=1).tolist(), strict=True)
        if k
    ]
    atomic_write_text(cfg.output, "\n".join(lines) + ("\n" if lines else ""))
    histogram = dict(sorted(Counter(correct.sum(dim=1).tolist()).items()))
    Console().print(
        f"kept {len(lines)} of {len(keep)} prompts with pass rate in [{cfg.low}, {cfg.high}] "
        f"over {n} samples -> {cfg.output}\npass counts: {histogram}"
    )
    return {"kept": len(lines), "total": len(keep), "pass_counts": histogram}
