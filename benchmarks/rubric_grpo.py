"""GRPO with a rubric reward on the built-in instruction task: the held-out rubric score, measured.

1. ``rlhfkit sft`` on ``builtin:instructions`` (the pipeline's SFT stage: ``--sft-steps``);
2. ``rlhfkit rl`` (GRPO) from the SFT model on the training prompts of ``builtin:preferences``
   with ``--rewards rubric:builtin:instructions`` (seven criteria, every one decided by a
   deterministic rule: correct answer, states the answer, answer line, concise, house format,
   and the pitfalls refusal and repetition);
3. ``rlhfkit eval`` of the untrained model, the SFT model and the GRPO model on the 84 held-out
   prompts (``--samples`` samples each at T = 0.7) with the same rubric.

The headline is GRPO's gain over its starting point (the SFT model): the mean per-prompt rubric
score before and after, the paired 95% interval of the difference, and the training wall time
(SFT + GRPO). Figures are printed as ``BENCH rubric_grpo.<name> <value>`` and written with the
commands to ``benchmarks/results/rubric_grpo-<UTC time>.json``.

    python benchmarks/rubric_grpo.py [--sft-steps 30] [--rl-steps 30] [--samples 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import common
from grpo_arithmetic import read_metrics, run_command, train
from rlhfkit.eval.intervals import mean_interval, paired_difference

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
RUBRIC = "rubric:builtin:instructions"
BUDGET_S = 15 * 60.0


def rlhfkit(*args: str) -> list[str]:
    """A ``python -m rlhfkit`` command line."""
    return [sys.executable, "-m", "rlhfkit", *args]


def evaluate(runs: Path, name: str, model: str, samples: int) -> dict[str, Any]:
    """Held-out rubric scores of ``model``: per distinct prompt, the mean over its samples."""
    out = runs / "eval" / name
    out.mkdir(parents=True, exist_ok=True)
    command = rlhfkit(
        "eval", "--model.name", model, "--data.source", "builtin:preferences",
        "--data.split", "heldout", "--data.schema", "preference", "--rewards", RUBRIC,
        "--threshold", "0.999", "--sampling.num-samples", str(samples),
        "--sampling.temperature", "0.7", "--sampling.max-new-tokens", "64",
        "--output", str(out / "report.json"), "--samples-output", str(out / "samples.jsonl"),
        "--cache-dir", "None",
    )  # fmt: skip
    print("running:", " ".join(command), flush=True)
    timing = run_command(command, out / "eval.log")
    by_prompt: dict[str, list[float]] = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        key = json.dumps(record["prompt"], sort_keys=True)  # builtin:preferences repeats prompts
        by_prompt.setdefault(key, []).append(float(record["reward"] or 0.0))
    keys = sorted(by_prompt)
    return {"keys": keys, "per_prompt": [sum(by_prompt[k]) / len(by_prompt[k]) for k in keys],
            "seconds": timing["wall_s"]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Train, evaluate and write the result file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--rl-steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-5, help="GRPO learning rate")
    parser.add_argument("--samples", type=int, default=4, help="held-out samples per prompt")
    args, runs, report = common.Reporter.start("rubric_grpo", parser, argv, "rubric_grpo")
    sft_dir, rl_dir = runs / "sft", runs / "rl"
    sft = train(rlhfkit(
        "sft", "--data.train", "builtin:instructions", "--data.eval", "None",
        "--data.mask-mode", "all_assistant_turns", "--loop.max-steps", str(args.sft_steps),
        "--loop.batch-size", "16", "--optim.lr", "5e-5", "--optim.warmup-ratio", "0.1",
        "--loop.save-every", "0", "--log.run-dir", str(sft_dir), "--log.tensorboard", "False",
    ), sft_dir)  # fmt: skip
    rl = train(rlhfkit(
        "rl", "--model.name", str(sft_dir / "final"), "--algo.preset", "grpo",
        "--data.train", "builtin:preferences", "--data.schema", "preference",
        "--rewards", RUBRIC, "--sampling.num-samples", "8", "--sampling.temperature", "1.0",
        "--sampling.max-new-tokens", "64", "--loop.batch-size", "8",
        "--loop.max-steps", str(args.rl_steps), "--optim.lr", str(args.lr),
        "--loop.save-every", "0", "--log.run-dir", str(rl_dir), "--log.tensorboard", "False",
    ), rl_dir)  # fmt: skip
    evals = {
        "base": evaluate(runs, "base", MODEL, args.samples),
        "sft": evaluate(runs, "sft", str(sft_dir / "final"), args.samples),
        "grpo": evaluate(runs, "grpo", str(rl_dir / "final"), args.samples),
    }
    for name, result in evals.items():
        interval = mean_interval(result["per_prompt"])
        for key in ("mean", "low", "high"):
            report.figure(f"{name}.rubric_{key}", interval[key])
    assert evals["grpo"]["keys"] == evals["sft"]["keys"] == evals["base"]["keys"]
    gain = paired_difference(evals["grpo"]["per_prompt"], evals["sft"]["per_prompt"])
    total = paired_difference(evals["grpo"]["per_prompt"], evals["base"]["per_prompt"])
    for key in ("mean", "low", "high"):
        report.figure(f"grpo_over_sft.{key}", gain[key])
        report.figure(f"grpo_over_base.{key}", total[key])
    wall = sft["wall_s"] + rl["wall_s"]
    report.figure("prompts", float(len(evals["sft"]["keys"])))
    report.figure("sft_wall_s", sft["wall_s"])
    report.figure("rl_wall_s", rl["wall_s"])
    report.figure("train_wall_s", wall)
    report.figure("passed", float(gain["low"] > 0 and wall <= BUDGET_S))
    records = read_metrics(rl_dir)
    report.details["rl_reward_curve"] = [(r["step"], r.get("rollout/reward")) for r in records]
    report.details["timings"] = {"sft": sft, "rl": rl,
                                 "eval_s": {k: v["seconds"] for k, v in evals.items()}}  # fmt: skip
    print("written:", report.write(), flush=True)


if __name__ == "__main__":
    main()
