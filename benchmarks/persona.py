"""Persona vectors, steering, preventative steering and character DPO on the embedded model.

For each trait of ``--traits``:

1. ``rlhfkit persona extract``: the vector at every layer; the chosen layer's AUROC separating
   held-out eliciting from suppressing answers.
2. ``rlhfkit persona steer`` over ``--alphas`` on the held-out questions (no system prompt,
   greedy): the trait scorer per alpha, Spearman(alpha, score) and the answers' perplexity
   under the unsteered model.

For the first trait also:

3. Drift and preventative steering: SFT on trait-heavy rows (the extract's eliciting answers to
   the training questions, now without the system prompt), once plainly and once with
   ``--model.steer`` at ``--prevent-alpha``. Each model answers the held-out questions and the
   projection of its answers on the vector (read in that model) is compared with the starting
   model's: the shift, and how much of it preventative steering removed.
4. Character DPO: ``rlhfkit persona pairs`` from the trait's shipped constitution, ``rlhfkit
   dpo`` on them, and the trait score of ``--samples`` sampled answers per held-out question
   before and after, with a paired 95% interval over questions.

Figures print as ``BENCH persona.<name> <value>`` and go to
``benchmarks/results/persona-<UTC time>.json``.

    python benchmarks/persona.py [--traits enthusiasm formality]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import common
from grpo_arithmetic import run_command
from rlhfkit.eval.intervals import paired_difference

MODEL = "smollm2-135m-instruct"


def rlhfkit(*args: str) -> list[str]:
    """A ``python -m rlhfkit`` command line."""
    return [sys.executable, "-m", "rlhfkit", *args]


def run(runs: Path, name: str, *args: str) -> float:
    """Run an rlhfkit command (log in ``runs/<name>.log``); its wall seconds."""
    print("running:", " ".join(args), flush=True)
    return run_command(rlhfkit(*args), runs / f"{name}.log")["wall_s"]


def answers(runs: Path, name: str, model: str, vector: Path, samples: int) -> list[dict]:
    """``model``'s sampled answers to the held-out questions (persona steer at alpha 0)."""
    out = runs / name
    run(runs, name, "persona", "steer", "--model.name", model, "--vector", str(vector),
        "--alphas", "0", "--sampling.temperature", "0.7", "--sampling.num-samples",
        str(samples), "--output", str(out))  # fmt: skip
    return [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]


def per_question(rows: list[dict]) -> dict[str, float]:
    """Mean trait score per question."""
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["question"], []).append(r["score"])
    return {q: sum(v) / len(v) for q, v in sorted(by.items())}


def projection(runs: Path, name: str, model: str, vector: Path, rows: list[dict]) -> float:
    """Mean projection of ``rows``' answers on the vector, read in ``model``."""
    data = runs / f"{name}-rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["question"], "completion": r["text"]}) + "\n"
                            for r in rows if r["text"].strip()))  # fmt: skip
    out = runs / f"{name}-projections.jsonl"
    run(runs, f"{name}-monitor", "persona", "monitor", "--model.name", model, "--vector",
        str(vector), "--data", str(data), "--output", str(out))  # fmt: skip
    values = [json.loads(x)["projection"] for x in out.read_text().splitlines()]
    return sum(values) / len(values)


def trait_study(report: common.Reporter, runs: Path, trait: str, alphas: list[str]) -> Path:
    """Steps 1-2 for one trait; returns the vector's directory."""
    vector = runs / trait / "vector"
    if not (vector / "persona.json").exists():
        run(runs, f"{trait}-extract", "persona", "extract", "--trait", trait, "--output",
            str(vector))  # fmt: skip
    meta = json.loads((vector / "persona.json").read_text())
    report.figure(f"{trait}.layer", meta["layer"])
    report.figure(f"{trait}.heldout_auroc", meta["heldout_auroc_at_layer"])
    report.figure(f"{trait}.best_heldout_auroc", max(meta["heldout_auroc"]))
    report.figure(f"{trait}.kept_positive", meta["kept"]["positive"])
    report.figure(f"{trait}.kept_negative", meta["kept"]["negative"])
    steer = runs / trait / "steer"
    run(runs, f"{trait}-steer", "persona", "steer", "--vector", str(vector), "--alphas", *alphas,
        "--output", str(steer))  # fmt: skip
    result = json.loads((steer / "steer.json").read_text())
    report.figure(f"{trait}.steer_spearman", result["spearman"])
    for r in result["results"]:
        report.figure(f"{trait}.alpha_{r['alpha']:g}.trait_score", r["trait_score"])
        report.figure(f"{trait}.alpha_{r['alpha']:g}.perplexity", r["perplexity"])
    report.details[f"{trait}_steer"] = result
    return vector


def drift_study(report: common.Reporter, runs: Path, trait: str, vector: Path, alpha: str,
                samples: int) -> None:  # fmt: skip
    """Step 3: SFT on trait-heavy rows with and without preventative steering."""
    rows = [json.loads(x) for x in (vector / "samples.jsonl").read_text().splitlines()]
    heavy = [r for r in rows if r["split"] == "train" and r["side"] == "positive"]
    data = runs / trait / "trait_heavy.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["text"]},
    ]}) + "\n" for r in heavy if r["text"].strip()))  # fmt: skip
    base_rows = answers(runs, f"{trait}-base-answers", MODEL, vector, samples)
    base = projection(runs, f"{trait}-base", MODEL, vector, base_rows)
    report.figure(f"{trait}.drift.base_projection", base)
    shifts = {}
    for name, extra in (("plain", []), ("prevented", ["--model.steer", str(vector),
                                                      "--model.steer-alpha", alpha])):  # fmt: skip
        out = runs / trait / f"sft-{name}"
        if not (out / "final").exists():
            run(runs, f"{trait}-sft-{name}", "sft", "--data.train", str(data), "--data.eval",
                "None", "--loop.max-steps", "24", "--loop.batch-size", "8", "--optim.lr", "5e-5",
                "--loop.save-every", "0", "--log.run-dir", str(out), "--log.tensorboard",
                "False", *extra)  # fmt: skip
        tuned = answers(runs, f"{trait}-{name}-answers", str(out / "final"), vector, samples)
        value = projection(runs, f"{trait}-{name}", str(out / "final"), vector, tuned)
        shifts[name] = value - base
        report.figure(f"{trait}.drift.{name}.projection_shift", shifts[name])
        report.figure(f"{trait}.drift.{name}.trait_score",
                      sum(r["score"] for r in tuned) / len(tuned))  # fmt: skip
    report.figure(f"{trait}.drift.base_trait_score",
                  sum(r["score"] for r in base_rows) / len(base_rows))  # fmt: skip
    if shifts["plain"]:
        report.figure(f"{trait}.drift.reduction", 1.0 - shifts["prevented"] / shifts["plain"])


def character_study(report: common.Reporter, runs: Path, trait: str, vector: Path,
                    samples: int) -> None:  # fmt: skip
    """Step 4: character DPO from the trait's shipped constitution."""
    pairs = runs / trait / "pairs.jsonl"
    if not pairs.exists():
        run(runs, f"{trait}-pairs", "persona", "pairs", "--trait", trait, "--output", str(pairs))
    dpo = runs / trait / "dpo"
    if not (dpo / "final").exists():
        run(runs, f"{trait}-dpo", "dpo", "--data.train", str(pairs), "--data.eval", "None",
            "--loop.epochs", "2", "--loop.batch-size", "8", "--optim.lr", "5e-6",
            "--loop.save-every", "0", "--log.run-dir", str(dpo), "--log.tensorboard", "False",
            "--eval.win-rate", "False")  # fmt: skip
    before = per_question(answers(runs, f"{trait}-char-before", MODEL, vector, samples))
    after = per_question(answers(runs, f"{trait}-char-after", str(dpo / "final"), vector, samples))
    keys = sorted(before)
    gain = paired_difference([after[k] for k in keys], [before[k] for k in keys])
    report.figure(f"{trait}.character.before", sum(before.values()) / len(before))
    report.figure(f"{trait}.character.after", sum(after.values()) / len(after))
    for key in ("mean", "low", "high"):
        report.figure(f"{trait}.character.gain_{key}", gain[key])
    report.figure(f"{trait}.character.pairs", len(pairs.read_text().splitlines()))


def main(argv: list[str] | None = None) -> None:
    """Run the studies and write the result file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traits", nargs="+", default=["enthusiasm", "formality"])
    parser.add_argument("--alphas", nargs="+", default=["0", "1", "2", "3", "4", "5"])
    parser.add_argument("--prevent-alpha", default="2")
    parser.add_argument("--samples", type=int, default=4, help="answers per held-out question")
    args, runs, report = common.Reporter.start("persona", parser, argv, "bench_persona")
    vectors: dict[str, Any] = {}
    for trait in args.traits:
        vectors[trait] = trait_study(report, runs, trait, args.alphas)
    first = args.traits[0]
    drift_study(report, runs, first, vectors[first], args.prevent_alpha, args.samples)
    character_study(report, runs, first, vectors[first], args.samples)
    print("written:", report.write(), flush=True)


if __name__ == "__main__":
    main()
