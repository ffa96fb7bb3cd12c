"""Time to quality of distillation: a GRPO-trained teacher teaches the untrained embedded model.

The teacher is the embedded SmolLM2-135M-Instruct after ``grpo_arithmetic.py`` (GRPO on 2-digit
addition; run it first with ``--run-dir runs/opd_teacher``, which also writes the prompt
files); the student is the untrained embedded model. On the same training prompts, each method
runs as its own ``rlhfkit`` command, timed from launch to exit, and the student's greedy
held-out accuracy (200 problems, 64 new tokens, exact answer) is measured before and after:

- ``opd``: ``rlhfkit rl --algo.preset opd --algo.teacher TEACHER`` with the reward's weight 0
  (the teacher's per-token signal alone): 4 prompts x 8 samples x up to 16 tokens per step;
- ``grpo``: ``rlhfkit rl --config configs/grpo_arithmetic.yaml`` on the same prompts, steps,
  batch and samples (so about the same generated tokens), against the exact-answer reward;
- ``seqkd``: sequence-level KD: the teacher's greedy answers to the first ``--seqkd-prompts``
  training prompts, then ``rlhfkit sft`` of the student on them (the teacher's decoding time
  counted in its wall time);
- ``opd_half``: ``opd`` on a student cut to every other layer of the embedded model
  (``--model.keep-layers 0 2 ... 28``).

Every figure is printed as ``BENCH distill_arithmetic.<name> <value>`` and written with the
commands, timings and accuracies to ``benchmarks/results/distill_arithmetic-<UTC time>.json``.

    python benchmarks/distill_arithmetic.py [--teacher-run runs/opd_teacher] [--steps 30]
        [--methods opd grpo seqkd opd_half]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import common
from grpo_arithmetic import greedy_accuracy, read_metrics, run_command, write_jsonl
from rlhfkit.models.load import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
TARGET_POINTS = 20.0
"""Required gain of on-policy distillation in greedy held-out accuracy, in points."""
BUDGET_S = 10 * 60.0
"""Its training wall-time budget (10 minutes on the 2-core CPU)."""


def rl_command(run: Path, train: Path, steps: int, extra: list[str]) -> list[str]:
    """``rlhfkit rl`` with the GRPO benchmark's settings on ``train``, then ``extra``."""
    config = ROOT / "configs" / "grpo_arithmetic.yaml"
    return [
        sys.executable, "-m", "rlhfkit", "rl", "--config", str(config),
        "--data.train", str(train), "--log.run-dir", str(run), "--loop.max-steps", str(steps),
        "--sample-every", "0", *extra,
    ]  # fmt: skip


def seqkd_data(teacher: str, rows: list[dict], path: Path) -> dict[str, float]:
    """The teacher's greedy answers to ``rows`` as SFT conversations; its decoding time."""
    import torch

    from rlhfkit.data.templates import render_prompt
    from rlhfkit.models.precision import resolve_precision
    from rlhfkit.rollout.hf import SamplingConfig
    from rlhfkit.rollout.sampler import chat_generator

    start = time.perf_counter()
    tokenizer = load_tokenizer(teacher)
    dtype = resolve_precision("auto", torch.device("cpu")).compute
    generator = chat_generator(load_model(teacher, dtype=dtype).eval(), tokenizer)
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0)
    out, tokens = [], 0
    for i in range(0, len(rows), 64):
        part = rows[i : i + 64]
        prompts = [
            render_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in part
        ]
        ids = generator.generate(prompts, greedy).completion_ids
        tokens += sum(len(c) for c in ids)
        for r, text in zip(
            part, tokenizer.batch_decode(ids, skip_special_tokens=True), strict=True
        ):
            out.append({"messages": [{"role": "user", "content": r["prompt"]},
                                     {"role": "assistant", "content": text.strip()}]})  # fmt: skip
    write_jsonl(path, out)
    return {"seconds": time.perf_counter() - start, "tokens": float(tokens)}


def generated_tokens(records: list[dict[str, Any]], per_step: int) -> float:
    """Completion tokens an RL run sampled: mean length x completions, summed over steps."""
    return float(sum(r.get("rollout/length", 0.0) * per_step for r in records))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-run", type=Path, default=ROOT / "runs" / "opd_teacher")
    parser.add_argument("--steps", type=int, default=30, help="RL steps of opd and grpo")
    parser.add_argument("--seqkd-prompts", type=int, default=960, help="teacher answers for seqkd")
    parser.add_argument("--methods", nargs="+", default=["opd", "grpo", "seqkd", "opd_half"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "distill_arithmetic")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Evaluate the teacher and the student, run each method, evaluate again, report."""
    args = parse_args(argv)
    run_dir, teacher_run = args.run_dir.resolve(), args.teacher_run.resolve()
    teacher = str(teacher_run / "grpo" / "final")
    if not Path(teacher).is_dir():
        raise SystemExit(f"no teacher at {teacher}: run grpo_arithmetic.py --run-dir {teacher_run}")
    heldout_path, train_path = (
        teacher_run / "data" / "heldout.jsonl",
        teacher_run / "data" / "train.jsonl",
    )
    heldout = [json.loads(x) for x in heldout_path.read_text().splitlines()]
    train = [json.loads(x) for x in train_path.read_text().splitlines()]
    common.set_threads(args.threads)
    report = common.Reporter("distill_arithmetic")
    report.details["environment"] = common.environment()
    budgets = [64]
    accuracy = {
        "teacher": greedy_accuracy(teacher, heldout, budgets)["accuracy"][64],
        "student": greedy_accuracy(MODEL, heldout, budgets)["accuracy"][64],
    }
    half = [str(i) for i in range(0, 30, 2)]
    if "opd_half" in args.methods:  # the cut student's own starting accuracy
        cut = run_dir / "half_start"
        load_model(MODEL, keep_layers=[int(i) for i in half]).save_pretrained(cut)
        load_tokenizer(MODEL).save_pretrained(cut)
        accuracy["half_student"] = greedy_accuracy(str(cut), heldout, budgets)["accuracy"][64]
    per_step = 4 * 8
    commands = {
        "opd": rl_command(run_dir / "opd", train_path, args.steps,
                          ["--algo.preset", "opd", "--algo.teacher", teacher, "--weights", "0"]),
        "grpo": rl_command(run_dir / "grpo", train_path, args.steps, []),
        "opd_half": rl_command(run_dir / "opd_half", train_path, args.steps,
                               ["--algo.preset", "opd", "--algo.teacher", teacher, "--weights", "0",
                                "--model.keep-layers", *half]),
        "seqkd": [sys.executable, "-m", "rlhfkit", "sft",
                  "--data.train", str(run_dir / "seqkd.jsonl"), "--data.eval", "None",
                  "--log.run-dir", str(run_dir / "seqkd"),
                  "--loop.batch-size", "16", "--loop.epochs", "1", "--optim.lr", "1e-5"],
    }  # fmt: skip
    results: dict[str, Any] = {}
    for method in args.methods:
        out = run_dir / method
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        extra = {"seconds": 0.0, "tokens": 0.0}
        if method == "seqkd":
            extra = seqkd_data(teacher, train[: args.seqkd_prompts], run_dir / "seqkd.jsonl")
        print("running:", " ".join(commands[method]), flush=True)
        timing = run_command(commands[method], run_dir / f"{method}.log")
        wall = timing["wall_s"] + extra["seconds"]
        records = read_metrics(out) if method != "seqkd" else []
        tokens = extra["tokens"] if method == "seqkd" else generated_tokens(records, per_step)
        acc = greedy_accuracy(str(out / "final"), heldout, budgets)["accuracy"][64]
        before = accuracy["half_student" if method == "opd_half" else "student"]
        results[method] = {
            "before": before, "after": acc, "gain_points": 100.0 * (acc - before),
            "wall_s": wall, "generated_tokens": tokens, "command": commands[method],
        }  # fmt: skip
        for name in ("before", "after", "gain_points", "wall_s", "generated_tokens"):
            report.figure(f"{method}.{name}", results[method][name])
    report.figure("teacher.accuracy", accuracy["teacher"])
    report.figure("student.accuracy", accuracy["student"])
    if "opd" in results:
        opd = results["opd"]
        passed = opd["gain_points"] >= TARGET_POINTS and opd["wall_s"] <= BUDGET_S
        report.figure("opd.passed", float(passed))
    report.details.update(results=results, accuracy=accuracy, steps=args.steps)
    print(f"wrote {report.write()}")


if __name__ == "__main__":
    main()
