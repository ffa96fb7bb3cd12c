"""PPO against a reward model: the RM's reward before and after, and the KL it cost.

Evaluates a finished ``rlhfkit rl --config configs/ppo.yaml`` run (train the reward model first
with ``rlhfkit rm train --config configs/rm.yaml``) on held-out prompts of the built-in
preference task, the same way for the starting model and for the trained policy:

1. ``--samples`` completions per prompt at the training temperature (0.7) and length limit,
   with the RL recipe's sampler (:class:`rlhfkit.rollout.sampler.HFGenerator`, bf16);
2. EOS-only scoring as in training: a finished completion gets the reward model's score, one cut
   at ``--max-new-tokens`` gets ``--penalty`` (``--score-truncated``: the RM scores every
   completion, as with ``--algo.truncation-penalty None``); reported: the mean reward, the mean
   RM score of the scored completions and the finished share;
3. the KL of the trained policy to the starting model, KL(pi || pi_ref) summed over each sampled
   completion (k1 and k3 on one ancestral sample per prompt, :func:`rlhfkit.eval.kl.sampled_kl`).

Figures are printed as ``BENCH ppo_rm.<name> <value>`` and written with per-sample details to
``benchmarks/results/ppo_rm-<UTC time>.json``.

    python benchmarks/ppo_reward_model.py [--run-dir runs/ppo] [--rm runs/rm/final]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
from pathlib import Path
from typing import Any

import common


def rewards_of(
    model_name: str,
    rm: Any,
    prompts: list[list[dict]],
    args: argparse.Namespace,
    meta: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Sampled completions of one model and their EOS-only rewards."""
    import torch

    from rlhfkit.data.templates import render_prompt
    from rlhfkit.models.load import load_model, load_tokenizer
    from rlhfkit.models.precision import resolve_precision
    from rlhfkit.rollout.hf import SamplingConfig
    from rlhfkit.rollout.sampler import HFGenerator

    tokenizer = load_tokenizer(model_name)
    dtype = resolve_precision("auto", torch.device("cpu")).compute
    model = load_model(model_name, dtype=dtype).eval()
    generator = HFGenerator(model, pad_id=tokenizer.pad_token_id, eos_ids=[tokenizer.eos_token_id])
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, num_samples=args.samples,
        seed=args.seed,
    )  # fmt: skip
    ids = [render_prompt(tokenizer, p, max_len=256) for p in prompts]
    rollout = generator.generate(ids, sampling)
    texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
    finished = [r != "length" or args.penalty is None for r in rollout.finish_reasons]
    fields = [{"prompt": prompts[i]} for i in rollout.prompt_index]
    scores = rm.score_batch(
        [t for t, f in zip(texts, finished, strict=True) if f],
        [x for x, f in zip(fields, finished, strict=True) if f],
    )
    it = iter(scores)
    shaped = [next(it) if f else args.penalty for f in finished]
    shaped = [math.nan if v is None else float(v) for v in shaped]  # None: nothing to score
    rm_scores = [s for s in scores if s is not None]
    gold = math.nan
    if meta is not None:  # the task's programmatic gold judge, on every completion
        from rlhfkit.data.tasks.preferences import gold_score

        gold = statistics.fmean(
            gold_score(texts[i], meta[p]["reference"], meta[p].get("task"))
            for i, p in enumerate(rollout.prompt_index)
        )
    return {
        "gold": gold,
        "reward": statistics.fmean(v for v in shaped if not math.isnan(v)),
        "rm_score_finished": statistics.fmean(rm_scores) if rm_scores else float("nan"),
        "finished": sum(r != "length" for r in rollout.finish_reasons) / len(finished),
        "length": statistics.fmean(len(c) for c in rollout.completion_ids),
        "samples": [
            {
                "prompt": prompts[rollout.prompt_index[i]][-1]["content"],
                "completion": texts[i],
                "reward": None if math.isnan(shaped[i]) else shaped[i],
            }
            for i in range(min(12, len(texts)))
        ],
    }


def main(argv: list[str] | None = None) -> None:
    """Evaluate the starting model and the PPO policy; print and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/ppo"))
    parser.add_argument("--rm", default="runs/rm/final")
    parser.add_argument("--start", default="runs/sft/final", help="the starting policy")
    parser.add_argument("--prompts", type=int, default=84, help="distinct held-out prompts")
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7, help="as in configs/ppo.yaml")
    parser.add_argument(
        "--penalty",
        type=float,
        default=-6.0,
        help="reward of a cut completion (none: the RM scores it like the others)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--score-truncated", action="store_true", help="no penalty: RM scores all")
    args = parser.parse_args(argv)
    if args.score_truncated:
        args.penalty = None
    common.set_threads(args.threads)

    import torch

    from rlhfkit.data.schemas import load_examples
    from rlhfkit.eval.kl import sampled_kl
    from rlhfkit.models.load import load_model, load_tokenizer
    from rlhfkit.models.precision import resolve_precision
    from rlhfkit.rewards.model import RewardModelScorer

    report = common.Reporter("ppo_rm")
    report.details["environment"] = common.environment()
    report.details["settings"] = {k: str(v) for k, v in vars(args).items()}
    heldout = load_examples("builtin:preferences", "preference", split="heldout").examples
    unique = list({json.dumps(e.prompt): e for e in heldout}.values())[: args.prompts]
    prompts = [list(e.prompt) for e in unique]
    meta = [e.meta for e in unique]
    rm = RewardModelScorer(args.rm)
    policy = str(args.run_dir / "final")
    results = {name: rewards_of(path, rm, prompts, args, meta) for name, path in
               (("start", args.start), ("final", policy))}  # fmt: skip
    for name, r in results.items():
        for key in ("reward", "rm_score_finished", "finished", "length", "gold"):
            report.figure(f"{name}.{key}", r[key])
    report.figure("reward_gain", results["final"]["reward"] - results["start"]["reward"])
    dtype = resolve_precision("auto", torch.device("cpu")).compute
    tokenizer = load_tokenizer(policy)
    trained = load_model(policy, dtype=dtype).eval()
    reference = load_model(args.start, dtype=dtype).eval()
    kl = sampled_kl(
        trained, contextlib.nullcontext(reference), tokenizer, prompts,
        max_new_tokens=args.max_new_tokens, seed=args.seed,
    )  # fmt: skip
    for key in ("k1", "k3", "k1_per_token"):
        report.figure(f"kl.{key}", kl[key])
    report.details["results"] = results
    print("wrote", report.write())


if __name__ == "__main__":
    main()
