"""How far best-of-n by a reward model lifts the pipeline's SFT model, judged by gold.

Reads a finished pipeline run (``runs/demo`` or ``runs/gain-seed<N>``): its SFT model's held-out
samples are in the run's cache, so nothing is sampled again. Each reward model given scores them
(``rm:<dir>``, cached beside them), and the script prints per model:

- the best-of-n gold reward for n = 1, 2, 4, 8 with the unbiased estimator over the 8 samples of
  each prompt (``rlhfkit.eval.overopt.bon_curve_unbiased``): what the reward model could buy at
  best, since best-of-n is the most KL-efficient way to optimise it;
- how often it orders a right answer above a wrong one among those samples, overall and by task
  type: the comparisons RL against it depends on. A pair counts when its gold scores differ by
  more than the format reward and the largest length penalty together can make them differ,
  so by whether the answer is right.

``--gold`` adds the gold judge itself as a reward model (the ceiling).

    python benchmarks/rm_bon.py runs/gain-seed0 runs/gain-seed0/rm/final other_rm/final --gold
"""

from __future__ import annotations

import argparse
import collections
from dataclasses import replace
from pathlib import Path

from rlhfkit.data.tasks.preferences import FORMAT_REWARD, MAX_LENGTH_PENALTY
from rlhfkit.eval.overopt import bon_curve_unbiased
from rlhfkit.inference.evaluate import EvalDataConfig, evaluate_prompts
from rlhfkit.pipeline.config import PipelineConfig
from rlhfkit.pipeline.run import GOLD
from rlhfkit.rollout.hf import SamplingConfig

NS = (1, 2, 4, 8)


def grid_for(run: Path, proxy: str) -> tuple[list, list, list]:
    """Tasks, proxy scores (M, N) and gold scores (M, N) of the SFT model's held-out samples."""
    cfg, ev = PipelineConfig(), PipelineConfig().eval
    data = EvalDataConfig(
        source=ev.source, split=ev.split, schema="preference", distinct=True,
        max_prompts=ev.max_prompts, max_prompt_len=cfg.rl.data.max_prompt_len,
    )  # fmt: skip
    sampling = SamplingConfig(
        max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
        num_samples=max(ev.bon_n, ev.samples),
    )  # fmt: skip
    rewards = (proxy, GOLD) if proxy != GOLD else (GOLD,)
    prompts, grid = evaluate_prompts(
        replace(cfg.model, name=str(run / "sft" / "final")), None, data, sampling, rewards,
        (1.0,) + (0.0,) * (len(rewards) - 1), cache_dir=str(run / "cache"),
    )  # fmt: skip
    tasks = [p.fields.get("task") for p in prompts]
    return tasks, grid.components[proxy], grid.components[GOLD]


def right_vs_wrong(tasks: list, proxy: list, gold: list) -> dict[str, tuple[int, int]]:
    """Per task: (pairs the proxy orders as gold does, pairs) over right-vs-wrong sample pairs."""
    gap = FORMAT_REWARD + MAX_LENGTH_PENALTY  # the most that anything but the answer moves gold
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for task, p, g in zip(tasks, proxy, gold, strict=True):
        for i in range(len(p)):
            for j in range(i + 1, len(p)):
                if abs(g[i] - g[j]) > gap:
                    counts[task][0] += (p[i] - p[j]) * (g[i] - g[j]) > 0
                    counts[task][1] += 1
    return {t: (c[0], c[1]) for t, c in counts.items()}


def main() -> None:
    """Print one block per reward model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished pipeline run directory")
    parser.add_argument("models", nargs="*", help="reward-model directories")
    parser.add_argument("--gold", action="store_true", help="also the gold judge (the ceiling)")
    args = parser.parse_args()
    specs = [f"rm:{Path(m).resolve()}" for m in args.models] + ([GOLD] if args.gold else [])
    for spec in specs:
        tasks, proxy, gold = grid_for(args.run, spec)
        curve = bon_curve_unbiased(proxy, gold, NS)
        acc = right_vs_wrong(tasks, proxy, gold)
        right, pairs = sum(a for a, _ in acc.values()), sum(n for _, n in acc.values())
        print(
            f"{spec}\n  best-of-n gold: " + ", ".join(f"n={c['n']} {c['gold']:.3f}" for c in curve)
        )
        by_task = ", ".join(f"{t} {a / n:.2f}" for t, (a, n) in sorted(acc.items()) if n)
        print(f"  right vs wrong: {right / max(pairs, 1):.3f} of {pairs} pairs; by task: {by_task}")


if __name__ == "__main__":
    main()
