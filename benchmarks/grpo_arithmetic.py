"""Time to quality: GRPO on 2-digit addition raises greedy held-out accuracy of the embedded model.

The script:

1. writes addition-only prompt files into the run directory: every ``a + b`` with both operands
   in 10..99, shuffled with a fixed seed; the first ``--heldout`` problems are the held-out
   set, the next ``--train`` the training set (no prompt in both);
2. measures the greedy held-out accuracy of the starting checkpoint (the embedded
   SmolLM2-135M-Instruct): temperature 0, at most 64 new tokens (also scored at 32 and 16),
   exact answer (``rlhfkit.rewards.answers:exact_answer``: the completion's last number is the
   sum);
3. runs ``rlhfkit rl --config configs/grpo_arithmetic.yaml`` (the ``grpo`` preset) on the
   training prompts in a subprocess, timed from launch to exit (model loading and saving
   included);
4. measures the greedy held-out accuracy of the trained model the same way and reports the
   gain in points, the wall and CPU time of training, the reward curve and sample answers.

Every figure is printed as ``BENCH grpo_arithmetic.<name> <value>`` and written with the
settings, the per-step training metrics and the environment to
``benchmarks/results/grpo_arithmetic-<UTC time>.json``.

    python benchmarks/grpo_arithmetic.py [--steps N] [--heldout 200] [-- extra rlhfkit rl flags]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "grpo_arithmetic.yaml"
PROMPT = "What is {a} + {b}? Answer with just the number."
"""The built-in arithmetic task's prompt wording (``rlhfkit.data.tasks.arithmetic``)."""
BUDGET_S = 15 * 60.0
"""Training wall-time budget of the requirement (15 minutes on the 2-core CPU)."""
TARGET_POINTS = 15.0
"""Required gain in greedy held-out accuracy, in percentage points."""


def addition_splits(n_heldout: int, n_train: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out and training rows of 2-digit addition (operands 10..99), disjoint.

    Args:
        n_heldout: Held-out problems.
        n_train: Training problems (at most 8100 - n_heldout).
        seed: Seed of the shuffle of all 8100 ordered pairs.

    Returns:
        ``(heldout, train)`` lists of verifiable rows ``{"prompt", "answer", "task"}``.
    """
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    if n_heldout + n_train > len(pairs):
        raise ValueError(f"only {len(pairs)} distinct problems; asked for {n_heldout + n_train}")
    random.Random(seed).shuffle(pairs)
    rows = [
        {"prompt": PROMPT.format(a=a, b=b), "answer": str(a + b), "task": "addition"}
        for a, b in pairs[: n_heldout + n_train]
    ]
    return rows[:n_heldout], rows[n_heldout:]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def greedy_accuracy(
    model_name: str, rows: list[dict], budgets: list[int], batch_size: int = 50
) -> dict[str, Any]:
    """Greedy exact-answer accuracy of a model on verifiable rows, at several length budgets.

    Decodes with the RL recipe's sampler (:class:`rlhfkit.rollout.sampler.HFGenerator`,
    temperature 0) in the compute dtype that training uses (bf16 where the CPU has it), on the
    chat-rendered prompts, ``batch_size`` prompts per call, up to ``max(budgets)`` new tokens.
    A greedy completion bounded at ``b`` tokens is the first ``b`` tokens of the longer one, so
    each budget is scored on that prefix.

    Args:
        model_name: Embedded model name or a saved model directory.
        rows: Rows with ``prompt`` and ``answer``.
        budgets: Completion length bounds (max new tokens) to score.
        batch_size: Prompts decoded together.

    Returns:
        ``{"accuracy": {budget: share of exact answers}, "bare_number_rate": {budget: share of
        completions that are just the correct number}, "mean_tokens", "seconds", "samples"}``:
        mean completion length and the first 20 (prompt, completion, correct) at the largest
        budget, and the decoding time.
    """
    import torch

    from rlhfkit.data.templates import render_prompt
    from rlhfkit.models.load import load_model, load_tokenizer
    from rlhfkit.models.precision import resolve_precision
    from rlhfkit.rewards.answers import exact_answer
    from rlhfkit.rollout.hf import SamplingConfig
    from rlhfkit.rollout.sampler import HFGenerator

    tokenizer = load_tokenizer(model_name)
    dtype = resolve_precision("auto", torch.device("cpu")).compute
    model = load_model(model_name, dtype=dtype).eval()
    generator = HFGenerator(model, pad_id=tokenizer.pad_token_id, eos_ids=[tokenizer.eos_token_id])
    sampling = SamplingConfig(max_new_tokens=max(budgets), temperature=0.0)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    start = time.perf_counter()
    completions: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        completions += generator.generate(prompts[i : i + batch_size], sampling).completion_ids
    seconds = time.perf_counter() - start
    accuracy, bare, texts = {}, {}, []
    for budget in sorted(budgets):
        texts = tokenizer.batch_decode([c[:budget] for c in completions], skip_special_tokens=True)
        correct = [exact_answer(t, r["answer"]) for t, r in zip(texts, rows, strict=True)]
        accuracy[budget] = sum(correct) / len(rows)
        bare[budget] = sum(t.strip() == r["answer"] for t, r in zip(texts, rows, strict=True))
        bare[budget] /= len(rows)
    samples = [
        {"prompt": r["prompt"], "completion": t, "correct": bool(exact_answer(t, r["answer"]))}
        for r, t in list(zip(rows, texts, strict=True))[:20]
    ]
    return {
        "accuracy": accuracy,
        "bare_number_rate": bare,
        "mean_tokens": sum(len(c) for c in completions) / len(completions),
        "seconds": seconds,
        "samples": samples,
    }


def run_command(command: list[str], log_path: Path) -> dict[str, float]:
    """Run a training command (output to ``log_path``); its wall and CPU seconds.

    Raises:
        subprocess.CalledProcessError: The command failed (the log's tail is printed).
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()
    start = time.perf_counter()
    with log_path.open("w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        print(log_path.read_text()[-4000:], file=sys.stderr)
        raise subprocess.CalledProcessError(done.returncode, command)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "load_average_before": load_before[0],
        "load_average_after": os.getloadavg()[0],
    }


def train(command: list[str], run: Path) -> dict[str, float]:
    """Run a training command from scratch in ``run``; its timing and step count."""
    if run.exists():
        shutil.rmtree(run)
    print("running:", " ".join(command), flush=True)
    timing = run_command(command, run.parent / f"{run.name}.log")
    return {**timing, "steps": len(read_metrics(run))}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-step records of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def reward_curve(records: list[dict[str, Any]], window: int = 10) -> list[tuple[int, float]]:
    """Mean rollout reward over consecutive windows of ``window`` steps: (last step, mean)."""
    rewards = [(r["step"], r["rollout/reward"]) for r in records if "rollout/reward" in r]
    return [
        (chunk[-1][0], sum(v for _, v in chunk) / len(chunk))
        for chunk in (rewards[i : i + window] for i in range(0, len(rewards), window))
    ]


def step_seconds(records: list[dict[str, Any]]) -> list[float]:
    """Seconds between consecutive metrics records (one per optimiser step)."""
    times = [r["time"] for r in records if "time" in r]
    return [b - a for a, b in itertools.pairwise(times)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="rlhfkit rl YAML preset")
    parser.add_argument("--steps", type=int, default=None, help="override loop.max_steps")
    parser.add_argument("--heldout", type=int, default=200, help="held-out problems")
    parser.add_argument("--train", type=int, default=2000, help="training problems")
    parser.add_argument("--seed", type=int, default=0, help="seed of the problem split")
    parser.add_argument(
        "--eval-tokens", type=int, nargs="+", default=[64, 32, 16],
        help="greedy max new tokens; the first is the headline budget",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "grpo_arithmetic")
    parser.add_argument("extra", nargs="*", help="extra flags for rlhfkit rl (after --)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build the data, evaluate, train with GRPO, evaluate again and report."""
    args = parse_args(argv)
    args.run_dir = args.run_dir.resolve()  # the training subprocess runs in the repository root
    common.set_threads(args.threads)
    report = common.Reporter("grpo_arithmetic")
    report.details["environment"] = common.environment()
    headline = args.eval_tokens[0]

    heldout, train = addition_splits(args.heldout, args.train, args.seed)
    if {r["prompt"] for r in heldout} & {r["prompt"] for r in train}:
        raise AssertionError("held-out and training prompts overlap")
    data_dir = args.run_dir / "data"
    write_jsonl(data_dir / "heldout.jsonl", heldout)
    write_jsonl(data_dir / "train.jsonl", train)

    base = greedy_accuracy("smollm2-135m-instruct", heldout, args.eval_tokens)
    for budget in args.eval_tokens:
        report.figure(f"base.accuracy_at_{budget}", base["accuracy"][budget])

    grpo_dir = args.run_dir / "grpo"
    if grpo_dir.exists():  # a fresh run: metrics.jsonl is appended to, checkpoints are kept
        shutil.rmtree(grpo_dir)
    command = [
        sys.executable, "-m", "rlhfkit", "rl", "--config", str(args.config),
        "--data.train", str(data_dir / "train.jsonl"), "--log.run-dir", str(grpo_dir),
        *(["--loop.max-steps", str(args.steps)] if args.steps is not None else []),
        *args.extra,
    ]  # fmt: skip
    print("running:", " ".join(command), flush=True)
    timing = run_command(command, args.run_dir / "grpo.log")
    records = read_metrics(grpo_dir)

    final = greedy_accuracy(str(grpo_dir / "final"), heldout, args.eval_tokens)
    for budget in args.eval_tokens:
        report.figure(f"final.accuracy_at_{budget}", final["accuracy"][budget])
        gain_at = 100.0 * (final["accuracy"][budget] - base["accuracy"][budget])
        report.figure(f"gain_points_at_{budget}", gain_at)
    gain = 100.0 * (final["accuracy"][headline] - base["accuracy"][headline])
    seconds = step_seconds(records)
    report.figure("base.accuracy", base["accuracy"][headline])
    report.figure("final.accuracy", final["accuracy"][headline])
    report.figure("final.bare_number_rate", final["bare_number_rate"][headline])
    report.figure("gain_points", gain)
    report.figure("train.wall_s", timing["wall_s"])
    report.figure("train.cpu_s", timing["cpu_s"])
    report.figure("train.steps", len(records))
    report.figure("train.median_step_s", common.median(seconds) if seconds else float("nan"))
    report.figure("eval.base_s", base["seconds"])
    report.figure("eval.final_s", final["seconds"])
    report.figure("within_budget", float(timing["wall_s"] <= BUDGET_S))
    report.figure("passed", float(gain >= TARGET_POINTS and timing["wall_s"] <= BUDGET_S))
    curve = reward_curve(records)
    for step, value in curve:
        print(f"steps ..{step:4d}  mean rollout reward {value:.3f}")
    report.details.update(
        command=command,
        config=args.config.read_text(),
        split={"heldout": len(heldout), "train": len(train), "seed": args.seed},
        eval={"budgets": args.eval_tokens, "headline": headline, "temperature": 0.0},
        base=base,
        final=final,
        timing=timing,
        step_seconds=seconds,
        reward_curve=curve,
        metrics=records,
    )
    print(f"wrote {report.write()}")


if __name__ == "__main__":
    main()
