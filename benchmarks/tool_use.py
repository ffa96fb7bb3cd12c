"""Tool use and multi-turn RL on the embedded model: what the calculator and RL buy, measured.

``calculator`` (3-digit multiplication word problems, ``builtin:calculator``):

1. ``rlhfkit sft`` on ``builtin:calculator_traces`` (the warm start: conversations that call
   the calculator and answer with its result; ``--sft-steps`` steps);
2. ``rlhfkit rl --env.name calculator`` from the SFT model (GRPO on episodes; ``--rl-steps``);
3. greedy held-out evaluation (``--heldout`` problems of the held-out split) of: the untrained
   model answering without the tool (the plain question, ``builtin:calculator`` as
   completions), the untrained model with the tool, the SFT model and the SFT + GRPO model with
   the tool, and the SFT + GRPO model without it.

The headline is the SFT + GRPO model with the tool against the untrained model without it: the
gain in points with its paired 95% interval over problems, and the training wall time (SFT +
GRPO, launch to exit).

``guess_number`` (``builtin:guess_number``, numbers 1 to 20, ``--game-turns`` guesses): an SFT
warm start on ``builtin:guess_number_traces`` (games of a player who guesses uniformly among the
numbers still possible: it follows the feedback but does not bisect), then ``rlhfkit rl
--env.name guess_number`` (``--game-steps`` steps); the success rate of sampled episodes (T = 1,
``--game-samples`` per game, ``--games`` held-out games) of the untrained, warm-started and
RL-trained models, with 95% intervals, and RL's gain over the warm start (paired interval).

Every figure is printed as ``BENCH tool_use.<name> <value>`` and written with the commands and
timings to ``benchmarks/results/tool_use-<UTC time>.json``.

    python benchmarks/tool_use.py [--tasks calculator guess_number] [--sft-steps 40]
        [--rl-steps 20] [--heldout 200] [--run-dir runs/tool_use]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import common
from grpo_arithmetic import run_command, train
from rlhfkit.eval.intervals import mean_interval, paired_difference

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
TARGET_POINTS = 20.0
"""Required gain of the trained model with the tool over the untrained one without it."""
BUDGET_S = 15 * 60.0
"""Training wall-time budget (SFT + GRPO) on the 2-core CPU."""


def rlhfkit(*args: str) -> list[str]:
    """A ``python -m rlhfkit`` command line."""
    return [sys.executable, "-m", "rlhfkit", *args]


def evaluate(run_dir: Path, name: str, model: str, flags: list[str]) -> dict[str, Any]:
    """``rlhfkit eval`` of ``model``: its report and each row's mean success, in row order."""
    out = run_dir / "eval" / name
    out.mkdir(parents=True, exist_ok=True)
    command = rlhfkit(
        "eval", "--model.name", model, "--output", str(out / "report.json"),
        "--samples-output", str(out / "samples.jsonl"), "--cache-dir", "None", *flags,
    )  # fmt: skip
    timing = run_command(command, out / "eval.log")
    report = json.loads((out / "report.json").read_text())
    by_row: dict[int, list[float]] = {}
    for k, line in enumerate((out / "samples.jsonl").read_text().splitlines()):
        record = json.loads(line)
        row = record.get("row", k // max(1, report["samples_per_prompt"]))
        by_row.setdefault(row, []).append(float(record["reward"] or 0.0) >= 1.0)
    per_row = [sum(v) / len(v) for _, v in sorted(by_row.items())]
    return {"report": report, "per_row": per_row, "seconds": timing["wall_s"]}


def calculator(args: argparse.Namespace, report: common.Reporter) -> None:
    """Warm start, GRPO, and the five evaluations of the calculator task."""
    runs = args.run_dir / "calculator"
    runs.mkdir(parents=True, exist_ok=True)
    sft_dir, rl_dir = runs / "sft", runs / "rl"
    sft = train(rlhfkit(
        "sft", "--data.train", "builtin:calculator_traces", "--data.eval", "None",
        "--data.mask-mode", "all_assistant_turns", "--loop.max-steps", str(args.sft_steps),
        "--loop.batch-size", "8", "--optim.lr", "5e-5", "--loop.save-every", "0",
        "--log.run-dir", str(sft_dir), "--log.tensorboard", "False",
    ), sft_dir)  # fmt: skip
    rl = train(rlhfkit(
        "rl", "--model.name", str(sft_dir / "final"), "--env.name", "calculator",
        "--env.max-turns", "3", "--loop.max-steps", str(args.rl_steps), "--loop.batch-size", "4",
        "--sampling.num-samples", "4", "--sampling.max-new-tokens", "48",
        "--optim.lr", "2e-6", "--loop.save-every", "0", "--sample-every", "5",
        "--log.run-dir", str(rl_dir), "--log.tensorboard", "False",
    ), rl_dir)  # fmt: skip
    held = ["--data.limit", str(args.heldout), "--sampling.max-new-tokens", "48"]
    tool = ["--env.name", "calculator", "--env.max-turns", "3", *held]
    plain = ["--data.source", "builtin:calculator", "--sampling.max-new-tokens", "64",
             "--data.limit", str(args.heldout)]  # fmt: skip
    evals = {
        "base_no_tool": evaluate(runs, "base_no_tool", MODEL, plain),
        "base_tool": evaluate(runs, "base_tool", MODEL, tool),
        "sft_tool": evaluate(runs, "sft_tool", str(sft_dir / "final"), tool),
        "rl_tool": evaluate(runs, "rl_tool", str(rl_dir / "final"), tool),
        "rl_no_tool": evaluate(runs, "rl_no_tool", str(rl_dir / "final"), plain),
    }
    for name, result in evals.items():
        interval = mean_interval(result["per_row"])
        report.figure(f"calculator.{name}.accuracy", interval["mean"])
        report.figure(f"calculator.{name}.low", interval["low"])
        report.figure(f"calculator.{name}.high", interval["high"])
        for key in ("valid_calls", "right_tool", "right_arguments", "turns", "tool_errors"):
            if key in result["report"].get("episodes", {}):
                report.figure(f"calculator.{name}.{key}", result["report"]["episodes"][key])
    gain = paired_difference(evals["rl_tool"]["per_row"], evals["base_no_tool"]["per_row"])
    rl_gain = paired_difference(evals["rl_tool"]["per_row"], evals["sft_tool"]["per_row"])
    wall = sft["wall_s"] + rl["wall_s"]
    report.figure("calculator.gain_points", 100 * gain["mean"])
    report.figure("calculator.gain_low", 100 * gain["low"])
    report.figure("calculator.gain_high", 100 * gain["high"])
    report.figure("calculator.rl_over_sft_points", 100 * rl_gain["mean"])
    report.figure("calculator.rl_over_sft_low", 100 * rl_gain["low"])
    report.figure("calculator.rl_over_sft_high", 100 * rl_gain["high"])
    report.figure("calculator.sft_wall_s", sft["wall_s"])
    report.figure("calculator.rl_wall_s", rl["wall_s"])
    report.figure("calculator.train_wall_s", wall)
    report.figure("calculator.passed",
                  float(100 * gain["mean"] >= TARGET_POINTS and wall <= BUDGET_S))  # fmt: skip
    report.details["calculator"] = {
        "sft": sft, "rl": rl, "evals": {k: v["report"] for k, v in evals.items()},
    }  # fmt: skip


def guess_number(args: argparse.Namespace, report: common.Reporter) -> None:
    """Warm start on random-guesser games, then GRPO; sampled success before and after."""
    runs = args.run_dir / "guess_number"
    runs.mkdir(parents=True, exist_ok=True)
    sft_dir, rl_dir = runs / "sft", runs / "rl"
    game = ["--env.name", "guess_number", "--env.max-turns", str(args.game_turns)]
    sft = train(rlhfkit(
        "sft", "--data.train", "builtin:guess_number_traces", "--data.eval", "None",
        "--data.mask-mode", "all_assistant_turns", "--loop.max-steps", str(args.game_sft_steps),
        "--loop.batch-size", "8", "--optim.lr", "5e-5", "--loop.save-every", "0",
        "--log.run-dir", str(sft_dir), "--log.tensorboard", "False",
    ), sft_dir)  # fmt: skip
    rl = train(rlhfkit(
        "rl", "--model.name", str(sft_dir / "final"), *game,
        "--loop.max-steps", str(args.game_steps), "--loop.batch-size", "4",
        "--sampling.num-samples", "8", "--sampling.max-new-tokens", "8",
        "--optim.lr", str(args.game_lr), "--loop.save-every", "0", "--sample-every", "10",
        "--log.run-dir", str(rl_dir), "--log.tensorboard", "False",
    ), rl_dir)  # fmt: skip
    flags = [
        *game, "--data.limit", str(args.games), "--sampling.temperature", "1.0",
        "--sampling.num-samples", str(args.game_samples), "--sampling.max-new-tokens", "8",
    ]  # fmt: skip
    evals = {
        "base": evaluate(runs, "base", MODEL, flags),
        "sft": evaluate(runs, "sft", str(sft_dir / "final"), flags),
        "rl": evaluate(runs, "rl", str(rl_dir / "final"), flags),
    }
    for name, result in evals.items():
        interval = mean_interval(result["per_row"])
        episodes = result["report"]["episodes"]
        report.figure(f"guess_number.{name}.success", interval["mean"])
        report.figure(f"guess_number.{name}.low", interval["low"])
        report.figure(f"guess_number.{name}.high", interval["high"])
        report.figure(f"guess_number.{name}.turns", episodes["turns"])
        report.figure(f"guess_number.{name}.inconsistent", episodes.get("inconsistent", 0.0))
    gain = paired_difference(evals["rl"]["per_row"], evals["sft"]["per_row"])
    report.figure("guess_number.rl_over_sft_points", 100 * gain["mean"])
    report.figure("guess_number.rl_over_sft_low", 100 * gain["low"])
    report.figure("guess_number.rl_over_sft_high", 100 * gain["high"])
    report.figure("guess_number.sft_wall_s", sft["wall_s"])
    report.figure("guess_number.rl_wall_s", rl["wall_s"])
    report.details["guess_number"] = {
        "sft": sft, "rl": rl, "evals": {k: v["report"] for k, v in evals.items()},
    }  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["calculator", "guess_number"],
                        choices=["calculator", "guess_number"])  # fmt: skip
    parser.add_argument("--sft-steps", type=int, default=40, help="warm-start SFT steps")
    parser.add_argument("--rl-steps", type=int, default=20, help="GRPO steps on the calculator")
    parser.add_argument("--heldout", type=int, default=200, help="held-out problems")
    parser.add_argument("--game-sft-steps", type=int, default=20, help="warm-start SFT steps")
    parser.add_argument("--game-steps", type=int, default=40, help="GRPO steps on the game")
    parser.add_argument("--game-lr", type=float, default=5e-6, help="GRPO learning rate")
    parser.add_argument("--game-turns", type=int, default=5, help="guesses per game")
    parser.add_argument("--games", type=int, default=100, help="held-out games")
    parser.add_argument("--game-samples", type=int, default=4, help="episodes per game")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "tool_use")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the chosen tasks and write the result file."""
    args = parse_args(argv)
    args.run_dir = args.run_dir.resolve()
    report = common.Reporter("tool_use")
    report.details["environment"] = common.environment()
    report.details["args"] = {k: str(v) for k, v in vars(args).items()}
    if "calculator" in args.tasks:
        calculator(args, report)
    if "guess_number" in args.tasks:
        guess_number(args, report)
    print("written:", report.write(), flush=True)


if __name__ == "__main__":
    main()
