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
- ``grpo_wall``: ``grpo`` for as long as ``opd`` took (its steps scaled by the ratio of the two
  walls; needs ``opd`` and ``grpo`` first), so the two compare at equal wall time as well as
  at equal generated tokens;
- ``opd_half``: ``opd`` on a student cut to every other layer of the embedded model
  (``--model.keep-layers 0 2 ... 28``);
- ``half``: a half-depth student built from the teacher, as DistilBERT builds its student: the
  teacher's first 8 and last 7 of its 30 layers (``HALF_LAYERS``), healed by sequence-level KD
  on the teacher's greedy answers to ``--half-prompts`` training prompts (``rlhfkit sft``,
  ``--half-epochs`` epochs at lr ``--half-lr``), then ``opd`` from there; the accuracy is
  measured after each stage, and the wall time counts the teacher's decoding and both stages.

Every figure is printed as ``BENCH distill_arithmetic.<name> <value>`` and written with the
commands, timings and accuracies to ``benchmarks/results/distill_arithmetic-<UTC time>.json``.

    python benchmarks/distill_arithmetic.py [--teacher-run runs/opd_teacher] [--steps 30]
        [--methods opd grpo grpo_wall seqkd opd_half half]
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
HALF_LAYERS = [*range(8), *range(23, 30)]
"""The teacher's layers the ``half`` student keeps. Of the 15-layer cuts measured (every other
layer; the first k and last 15 - k for k = 1, 2, 4, 6, 8, 10, 12, 14), this one gave the
lowest starting loss on the teacher's answers (6.0 nats per token against 12.4 for every other
layer)."""


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


def half_student(
    args: argparse.Namespace, teacher: str, train: list[dict], heldout: list[dict]
) -> dict[str, Any]:
    """The ``half`` method: cut the teacher, heal it by sequence-level KD, then ``opd``.

    Returns:
        ``before`` (the cut's accuracy), ``after_kd``, ``after`` (after opd), ``gain_points``
        (after - before), ``opd_gain_points`` (after - after_kd), ``wall_s`` (teacher decoding,
        SFT and opd, loading included), ``kd_wall_s``, ``generated_tokens`` (the teacher's and
        the student's) and the commands.
    """
    run = args.run_dir.resolve() / "half"
    keep = [str(i) for i in HALF_LAYERS]
    cut = run / "start"
    load_model(teacher, keep_layers=HALF_LAYERS).save_pretrained(cut)
    load_tokenizer(teacher).save_pretrained(cut)
    before = greedy_accuracy(str(cut), heldout, [64])["accuracy"][64]
    data = seqkd_data(teacher, train[: args.half_prompts], run / "seqkd.jsonl")
    sft = [sys.executable, "-m", "rlhfkit", "sft", "--model.name", teacher,
           "--model.keep-layers", *keep, "--data.train", str(run / "seqkd.jsonl"),
           "--data.eval", "None", "--log.run-dir", str(run / "kd"), "--loop.batch-size", "16",
           "--loop.epochs", str(args.half_epochs), "--optim.lr", str(args.half_lr)]  # fmt: skip
    print("running:", " ".join(sft), flush=True)
    kd_wall = data["seconds"] + run_command(sft, run / "kd.log")["wall_s"]
    after_kd = greedy_accuracy(str(run / "kd" / "final"), heldout, [64])["accuracy"][64]
    opd = rl_command(run / "opd", args.teacher_run.resolve() / "data" / "train.jsonl", args.steps,
                     ["--algo.preset", "opd", "--algo.teacher", teacher, "--weights", "0",
                      "--model.name", str(run / "kd" / "final")])  # fmt: skip
    print("running:", " ".join(opd), flush=True)
    opd_wall = run_command(opd, run / "opd.log")["wall_s"]
    after = greedy_accuracy(str(run / "opd" / "final"), heldout, [64])["accuracy"][64]
    return {
        "before": before, "after_kd": after_kd, "after": after,
        "gain_points": 100.0 * (after - before), "opd_gain_points": 100.0 * (after - after_kd),
        "wall_s": kd_wall + opd_wall, "kd_wall_s": kd_wall,
        "generated_tokens": data["tokens"] + generated_tokens(read_metrics(run / "opd"), 32),
        "command": [sft, opd],
    }  # fmt: skip


def one_command(
    args: argparse.Namespace,
    method: str,
    command: list[str],
    teacher: str,
    train: list[dict],
    heldout: list[dict],
) -> dict[str, Any]:
    """Run one method's command (after the teacher's answers, for ``seqkd``) and evaluate it.

    Returns:
        ``after`` (the trained student's accuracy), ``wall_s`` (the teacher's decoding
        included), ``generated_tokens`` and the command.
    """
    run_dir = args.run_dir.resolve()
    out = run_dir / method
    out.mkdir(parents=True)
    extra = {"seconds": 0.0, "tokens": 0.0}
    if method == "seqkd":
        extra = seqkd_data(teacher, train[: args.seqkd_prompts], run_dir / "seqkd.jsonl")
    print("running:", " ".join(command), flush=True)
    wall = run_command(command, run_dir / f"{method}.log")["wall_s"] + extra["seconds"]
    records = read_metrics(out) if method != "seqkd" else []
    tokens = extra["tokens"] if method == "seqkd" else generated_tokens(records, 4 * 8)
    acc = greedy_accuracy(str(out / "final"), heldout, [64])["accuracy"][64]
    return {"after": acc, "wall_s": wall, "generated_tokens": tokens, "command": command}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-run", type=Path, default=ROOT / "runs" / "opd_teacher")
    parser.add_argument("--steps", type=int, default=30, help="RL steps of opd and grpo")
    parser.add_argument("--seqkd-prompts", type=int, default=960, help="teacher answers for seqkd")
    parser.add_argument("--half-prompts", type=int, default=2000, help="teacher answers for half")
    parser.add_argument("--half-epochs", type=float, default=3.0, help="SFT epochs of half")
    parser.add_argument("--half-lr", type=float, default=2e-4, help="SFT learning rate of half")
    methods = ["opd", "grpo", "grpo_wall", "seqkd", "opd_half", "half"]
    parser.add_argument("--methods", nargs="+", choices=methods, default=methods)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "distill_arithmetic")
    args = parser.parse_args(argv)
    methods = args.methods
    if "grpo_wall" in methods and not {"opd", "grpo"} <= set(methods[: methods.index("grpo_wall")]):
        parser.error("--methods: grpo_wall needs opd and grpo before it")
    return args


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
        if method == "grpo_wall":  # GRPO for as long as opd took: steps scaled by the walls
            steps = round(args.steps * results["opd"]["wall_s"] / results["grpo"]["wall_s"])
            commands[method] = rl_command(out, train_path, steps, [])
        if method == "half":
            results[method] = half_student(args, teacher, train, heldout)
        else:
            before = accuracy["half_student" if method == "opd_half" else "student"]
            results[method] = one_command(args, method, commands[method], teacher, train, heldout)
            results[method]["before"] = before
            results[method]["gain_points"] = 100.0 * (results[method]["after"] - before)
        for name in ("before", "after_kd", "after", "gain_points", "wall_s", "generated_tokens"):
            if name in results[method]:
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
