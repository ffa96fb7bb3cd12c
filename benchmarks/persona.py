"""Persona vectors, steering, preventative steering and character training on the embedded model.

For each trait of ``--traits``:

1. ``rlhfkit persona extract``: the vector at every layer; the chosen layer's held-out AUROC
   separating eliciting from suppressing answers (over the answers the marker filter keeps, and
   over all answers labelled by their system prompt).
2. ``rlhfkit persona steer`` over ``--alphas`` on the held-out questions (no system prompt,
   ``--steer-samples`` sampled answers per question): the trait scorer per alpha, the answers'
   perplexity under the unsteered model and their distinct-2, which alphas stay within the
   coherence bound (perplexity at most 2x, distinct-2 at least 0.9x the unsteered answers'), and
   Spearman(alpha, score) over all alphas and over the coherent ones.

For the first trait also:

3. Drift and preventative steering: SFT on trait-heavy rows (the extract's eliciting answers to
   the training questions, now without the system prompt), once plainly and once with
   ``--model.steer`` at each of ``--prevent-alphas``. Each model answers the held-out questions
   and the projection of its answers on the vector (read in that model) is compared with the
   starting model's: the shift, and how much of it preventative steering removed,
   1 - |shift_prevented| / |shift_plain|.
4. Character training: ``rlhfkit persona pairs`` from the trait's shipped constitution, ``rlhfkit
   dpo`` on them, then ``rlhfkit persona reflect`` (self-reflection rows written by the DPO model
   with the constitution in context) and ``rlhfkit sft`` on those. The trait score of
   ``--character-samples`` sampled answers per held-out question before, after DPO and after
   the reflection SFT, with paired 95% intervals over questions; samples before and after go
   to ``<run dir>/<trait>/character.md``.

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


def trait_study(report: common.Reporter, runs: Path, trait: str, alphas: list[str],
                samples: int) -> Path:  # fmt: skip
    """Steps 1-2 for one trait; returns the vector's directory."""
    vector = runs / trait / "vector"
    if not (vector / "persona.json").exists():
        run(runs, f"{trait}-extract", "persona", "extract", "--trait", trait, "--output",
            str(vector))  # fmt: skip
    meta = json.loads((vector / "persona.json").read_text())
    report.figure(f"{trait}.layer", meta["layer"])
    report.figure(f"{trait}.heldout_auroc", meta["heldout_auroc_at_layer"])
    report.figure(f"{trait}.heldout_auroc_unfiltered", meta["heldout_auroc_unfiltered_at_layer"])
    report.figure(f"{trait}.best_heldout_auroc", max(meta["heldout_auroc"]))
    for side in ("positive", "negative"):
        report.figure(f"{trait}.kept_{side}", meta["kept"][side])
        report.figure(f"{trait}.heldout_kept_{side}", meta["heldout_kept"][side])
    steer = runs / trait / "steer"
    if not (steer / "steer.json").exists():
        run(runs, f"{trait}-steer", "persona", "steer", "--vector", str(vector), "--alphas",
            *alphas, "--sampling.temperature", "0.7", "--sampling.num-samples", str(samples),
            "--output", str(steer))  # fmt: skip
    result = json.loads((steer / "steer.json").read_text())
    report.figure(f"{trait}.steer_spearman", result["spearman"])
    report.figure(f"{trait}.steer_spearman_coherent", result["spearman_coherent"])
    report.figure(f"{trait}.steer_coherent_max_alpha", max(result["coherent_alphas"], default=0))
    for r in result["results"]:
        for key in ("trait_score", "perplexity", "distinct_2"):
            report.figure(f"{trait}.alpha_{r['alpha']:g}.{key}", r[key])
    report.details[f"{trait}_steer"] = result
    return vector


def drift_study(report: common.Reporter, runs: Path, trait: str, vector: Path,
                alphas: list[str], samples: int) -> None:  # fmt: skip
    """Step 3: SFT on trait-heavy rows, plainly and with preventative steering at each alpha."""
    rows = [json.loads(x) for x in (vector / "samples.jsonl").read_text().splitlines()]
    heavy = [r for r in rows if r["split"] == "train" and r["side"] == "positive"]
    data = runs / trait / "trait_heavy.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["text"]},
    ]}) + "\n" for r in heavy if r["text"].strip()))  # fmt: skip
    base_rows = answers(runs, f"{trait}-base-answers", MODEL, vector, samples)
    base = projection(runs, f"{trait}-base", MODEL, vector, base_rows)
    report.figure(f"{trait}.drift.base_projection", base)
    report.figure(f"{trait}.drift.base_trait_score",
                  sum(r["score"] for r in base_rows) / len(base_rows))  # fmt: skip
    shifts = {}
    runs_ = [("plain", [])] + [
        (f"prevented_{a}", ["--model.steer", str(vector), "--model.steer-alpha", a]) for a in alphas
    ]
    for name, extra in runs_:
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
        if name != "plain" and shifts["plain"]:
            report.figure(f"{trait}.drift.{name}.reduction",
                          1.0 - abs(shifts[name]) / abs(shifts["plain"]))  # fmt: skip


def scores(runs: Path, name: str, model: str, vector: Path, samples: int) -> tuple[dict, list]:
    """Mean trait score per held-out question of ``model``'s sampled answers, and the answers."""
    rows = answers(runs, name, model, vector, samples)
    return per_question(rows), rows


def character_study(report: common.Reporter, runs: Path, trait: str, vector: Path,
                    samples: int) -> None:  # fmt: skip
    """Step 4: character DPO from the trait's shipped constitution, then self-reflection SFT."""
    pairs = runs / trait / "pairs.jsonl"
    if not pairs.exists():
        run(runs, f"{trait}-pairs", "persona", "pairs", "--trait", trait, "--output", str(pairs))
    dpo = runs / trait / "dpo"
    if not (dpo / "final").exists():
        run(runs, f"{trait}-dpo", "dpo", "--data.train", str(pairs), "--data.eval", "None",
            "--loop.epochs", "2", "--loop.batch-size", "8", "--optim.lr", "2e-5",
            "--loop.save-every", "0", "--log.run-dir", str(dpo), "--log.tensorboard", "False",
            "--eval.win-rate", "False")  # fmt: skip
    reflection = runs / trait / "reflection.jsonl"
    if not reflection.exists():
        run(runs, f"{trait}-reflect", "persona", "reflect", "--model.name", str(dpo / "final"),
            "--trait", trait, "--output", str(reflection))  # fmt: skip
    reflected = runs / trait / "reflect-sft"
    if not (reflected / "final").exists():
        run(runs, f"{trait}-reflect-sft", "sft", "--model.name", str(dpo / "final"),
            "--data.train", str(reflection), "--data.eval", "None", "--loop.epochs", "1",
            "--loop.batch-size", "8", "--optim.lr", "1e-5", "--loop.save-every", "0",
            "--log.run-dir", str(reflected), "--log.tensorboard", "False")  # fmt: skip
    before, before_rows = scores(runs, f"{trait}-char-before", MODEL, vector, samples)
    keys = sorted(before)
    report.figure(f"{trait}.character.before", sum(before.values()) / len(before))
    report.figure(f"{trait}.character.pairs", len(pairs.read_text().splitlines()))
    report.figure(f"{trait}.character.reflection_rows", len(reflection.read_text().splitlines()))
    shown = {"before": before_rows}
    for name, model in (("dpo", dpo / "final"), ("reflect", reflected / "final")):
        after, rows = scores(runs, f"{trait}-char-{name}", str(model), vector, samples)
        shown[name] = rows
        gain = paired_difference([after[k] for k in keys], [before[k] for k in keys])
        report.figure(f"{trait}.character.{name}.after", sum(after.values()) / len(after))
        for key in ("mean", "low", "high"):
            report.figure(f"{trait}.character.{name}.gain_{key}", gain[key])
    write_samples(runs / trait / "character.md", trait, shown)


def write_samples(path: Path, trait: str, shown: dict[str, list[dict]]) -> None:
    """The first sampled answer to each held-out question before and after character training."""
    first = {name: {} for name in shown}
    for name, rows in shown.items():
        for r in rows:
            first[name].setdefault(r["question"], r)
    lines = [f"# Character training ({trait}): held-out answers before and after", ""]
    for question in first["before"]:
        lines += [f"## {question}", ""]
        for name, label in (("before", "before"), ("dpo", "after DPO"),
                            ("reflect", "after DPO + self-reflection SFT")):  # fmt: skip
            row = first[name][question]
            text = " ".join(row["text"].split())
            lines += [f"- **{label}** (score {row['score']:g}): {text}"]
        lines.append("")
    path.write_text("\n".join(lines))
    print("samples:", path, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run the studies and write the result file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traits", nargs="+", default=["enthusiasm", "formality"])
    grid = ["0", "0.25", "0.5", "0.75", "1", "1.25", "1.5", "1.75", "2"]
    parser.add_argument("--alphas", nargs="+", default=grid)
    parser.add_argument("--prevent-alphas", nargs="+", default=["0.5", "1", "2"])
    parser.add_argument("--samples", type=int, default=4, help="answers per held-out question")
    parser.add_argument("--steer-samples", type=int, default=8,
                        help="answers per held-out question and alpha when steering")  # fmt: skip
    parser.add_argument("--character-samples", type=int, default=8,
                        help="answers per held-out question in the character study")  # fmt: skip
    args, runs, report = common.Reporter.start("persona", parser, argv, "bench_persona")
    vectors: dict[str, Any] = {}
    for trait in args.traits:
        vectors[trait] = trait_study(report, runs, trait, args.alphas, args.steer_samples)
    first = args.traits[0]
    drift_study(report, runs, first, vectors[first], args.prevent_alphas, args.samples)
    character_study(report, runs, first, vectors[first], args.character_samples)
    print("written:", report.write(), flush=True)


if __name__ == "__main__":
    main()
