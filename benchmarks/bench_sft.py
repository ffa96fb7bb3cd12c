"""SFT benchmark: rlhfkit's SFT step vs TRL's SFTTrainer on the same work.

Both sides train the embedded SmolLM2-135M-Instruct on the same chat rows in the same order
(16 rows per optimiser step, one micro-batch on TRL), with the same maximum length, bf16
compute, AdamW at the same constant learning rate, gradient clipping at 1.0, and the loss on the
assistant tokens only (content plus end-of-turn token). Each side runs in its own persistent
process; the driver asks them for one optimiser step at a time, alternating rlhfkit, TRL,
rlhfkit, TRL ... after warm-up steps, and measures the machine's bf16 matmul rate before and
after. See benchmarks/README.md for what is measured and what could not be made equal.

    python benchmarks/bench_sft.py [--steps 6] [--warmup 1] [--profile]
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import versus

TEMPLATE = Path(__file__).resolve().parent / "templates" / "smollm2_assistant_mask.jinja"
"""SmolLM2's chat template plus {% generation %} markers, for TRL's assistant_only_loss."""


@dataclass(frozen=True)
class Settings(versus.BenchSettings):
    """What both sides are asked to do: ``batch_size`` rows per optimiser step.

    ``seed`` seeds both sides, but neither uses randomness (no dropout, sequential order).
    """

    lr: float = 1e-5
    """Constant AdamW learning rate."""
    data: str = "builtin:instructions"
    """Row source (rlhfkit.data.sources.load_rows); generated rows if it cannot be read."""


# ---------------------------------------------------------------------------------------------
# Data


def generated_rows(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Deterministic single-turn chat rows of about 50-80 tokens with SmolLM2's template."""
    rng = random.Random(seed)
    words = ["planet", "harbour", "lantern", "meadow", "circuit", "journey", "orchard", "signal"]

    def one() -> tuple[str, str]:
        kind = rng.randrange(5)
        a, b = rng.randrange(10, 99), rng.randrange(10, 99)
        if kind == 0:
            return (
                f"What is {a} + {b}?",
                f"Add the tens and then the ones: {a} + {b} = {a + b}. The answer is {a + b}.",
            )
        if kind == 1:
            c = rng.randrange(-20, 40)
            f = c * 9 / 5 + 32
            return (
                f"Convert {c} degrees Celsius to Fahrenheit.",
                f"Multiply by 9/5 and add 32: {c} * 9/5 + 32 = {f:g}. So {c} C is {f:g} F.",
            )
        if kind == 2:
            w = rng.choice(words)
            return (f"Spell the word '{w}' backwards.", f"The word '{w}' backwards is '{w[::-1]}'.")
        if kind == 3:
            k = rng.randrange(2, 30)
            return (
                f"How many days are in {k} weeks?",
                f"A week has 7 days, so {k} weeks have 7 * {k} = {7 * k} days.",
            )
        nums = [rng.randrange(100) for _ in range(rng.randrange(4, 9))]
        listed = ", ".join(map(str, nums))
        return (
            f"Sort these numbers from smallest to largest: {listed}.",
            f"In order from smallest to largest: {', '.join(map(str, sorted(nums)))}.",
        )

    rows = []
    for _ in range(n):
        question, answer = one()
        rows.append(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        )
    return rows


def load_conversations(spec: str, needed: int) -> tuple[list[list[dict[str, Any]]], str]:
    """The first ``needed`` conversations of ``spec`` (cycled if it has fewer), and their name.

    Falls back to :func:`generated_rows` when the source cannot be read (for example before
    the built-in instruction data exists).
    """
    from rlhfkit.data.sources import load_rows

    try:
        rows = [row.data["messages"] for row in load_rows(spec, split="train")]
        name = spec
    except (ValueError, OSError, KeyError) as err:
        print(f"note: cannot read {spec} ({err}); using generated rows", file=sys.stderr)
        rows, name = generated_rows(needed), "generated (bench_sft.generated_rows)"
    if not rows:
        raise ValueError(f"{spec}: no rows")
    if len(rows) < needed:
        name += f" (cycled: {len(rows)} rows)"
    return [rows[i % len(rows)] for i in range(needed)], name


# ---------------------------------------------------------------------------------------------
# rlhfkit side


def _rlhfkit_setup(settings: Settings, conversations: list, run_dir: str) -> dict[str, Any]:
    """Build the run exactly as recipes/sft.py does; returns the objects the steps use."""
    from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig
    from rlhfkit.data.collate import supports_padding_free
    from rlhfkit.data.templates import render_messages
    from rlhfkit.recipes.sft import make_step_loss
    from rlhfkit.training.run import build_run

    ctx = build_run(
        ModelConfig(precision="bf16"),
        LogConfig(run_dir=run_dir, tensorboard=False, progress=False),
        settings.seed,
        {},
    )
    ctx.packing = supports_padding_free(ctx.model)
    examples = []
    for i, messages in enumerate(conversations):
        example = render_messages(
            ctx.tokenizer,
            messages,
            mask_mode="all_assistant_turns",
            max_len=settings.max_len,
            truncation="right",
            source=f"row {i}",
        )
        if example is None:
            raise ValueError(f"row {i} was dropped by render_messages; pick other data")
        examples.append(example)
    optim = OptimConfig(
        lr=settings.lr, schedule="constant", warmup_ratio=0.0, max_grad_norm=settings.max_grad_norm
    )
    ctx.start_training(optim, settings.total_steps + 1, resume=False)  # +1: optional profile
    return {
        "ctx": ctx,
        "examples": examples,
        "step_loss": make_step_loss(ctx.model),
        "budget": LoopConfig().micro_batch_tokens,
    }


def _rlhfkit_step(run: dict[str, Any], settings: Settings, index: int) -> dict[str, Any]:
    """One optimiser step on batch ``index``, as the loop of recipes/sft.py runs it."""
    from rlhfkit.recipes.sft import label_count, micro_batches
    from rlhfkit.training.accumulate import accumulate

    ctx = run["ctx"]
    size = settings.batch_size
    batch = run["examples"][index * size : (index + 1) * size]
    start, cpu_start = time.perf_counter(), time.process_time()
    parts = micro_batches(batch, packing=ctx.packing, budget=run["budget"], pad_id=ctx.pad_id)
    stats = accumulate(
        parts, run["step_loss"], count_fn=label_count, after_backward=ctx.master.collect_grads
    )
    stepped = ctx.apply_step(stats, settings.max_grad_norm, 3)
    ctx.log_step({"train/loss": stats.loss, "train/tokens": stats.normaliser}, 1)
    tokens = sum(len(e.input_ids) for e in batch)
    return versus.step_answer(
        start, cpu_start, stats, stepped, parts, tokens=tokens, loss_tokens=stats.normaliser
    )


def rlhfkit_worker(
    conn: Any, settings: Any, conversations: list, setup: Any = None, prefix: str = "bench-sft-"
) -> None:
    """Worker process of the rlhfkit side (answers "step", "profile", "stop").

    ``setup(settings, conversations, run_dir)`` builds the run (default: the SFT recipe's); its
    ``step_loss`` makes the step a distillation step, for instance. "profile" runs the last
    measured batch again under the profiler.
    """

    def body() -> None:
        common.set_threads(settings.threads)
        with tempfile.TemporaryDirectory(prefix=f"{prefix}rlhfkit-") as run_dir:
            run = (setup or _rlhfkit_setup)(settings, conversations, run_dir)
            conn.send(
                {
                    **common.model_facts(run["ctx"].model),
                    "packing": run["ctx"].packing,
                    "input_ids": [e.input_ids for e in run["examples"]],
                    "loss_masks": [e.loss_mask for e in run["examples"]],
                    "rss_mib": common.rss_mib(),
                }
            )
            done = 0

            def step() -> dict[str, Any]:
                nonlocal done
                done += 1
                return _rlhfkit_step(run, settings, done - 1)

            def again() -> dict[str, Any]:
                return common.profiled(lambda: _rlhfkit_step(run, settings, done - 1))

            versus.serve_steps(conn, step, close=run["ctx"].logger.close, profile_step=again)

    common.worker_main(conn, body)


# ---------------------------------------------------------------------------------------------
# TRL side


def _trl_config(settings: Settings, output_dir: str) -> Any:
    """SFTConfig for the same work: the shared arguments, loss on the assistant tokens only."""
    from trl import SFTConfig

    return SFTConfig(
        **versus.trl_args(settings, output_dir),
        assistant_only_loss=True,
        chat_template_path=str(TEMPLATE),
        packing=False,
        padding_free=False,
    )


def trl_worker(conn: Any, settings: Settings, conversations: list) -> None:
    """Worker process of the TRL side (answers "step", "stop")."""

    def body() -> None:
        common.set_threads(settings.threads)
        import datasets
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTTrainer

        path = versus.trl_model_dir()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        rows = datasets.Dataset.from_list([{"messages": m} for m in conversations])

        def make_trainer(output_dir: str, callbacks: list[Any]) -> Any:
            return SFTTrainer(
                model=model,
                args=_trl_config(settings, output_dir),
                train_dataset=rows,
                processing_class=tokenizer,
                callbacks=callbacks,
            )

        def describe(trainer: Any) -> dict[str, Any]:
            prepared = trainer.train_dataset
            return {
                "padding_free": trainer.padding_free,
                "packing": trainer.args.packing,
                "input_ids": [list(x) for x in prepared["input_ids"]],
                "loss_masks": [[t != -100 for t in x] for x in prepared["labels"]],
            }

        versus.train_trl(conn, model, make_trainer, describe, prefix="bench-sft-trl-")

    common.worker_main(conn, body)


# ---------------------------------------------------------------------------------------------
# Driver


def check_same_work(ours: dict[str, Any], theirs: dict[str, Any], settings: Settings) -> dict:
    """Compare what the two sides will train on; raise if the token ids differ."""
    if ours["input_ids"] != theirs["input_ids"]:
        raise RuntimeError("rlhfkit and TRL tokenise the rows differently: not the same work")
    same_mask = ours["loss_masks"] == theirs["loss_masks"]
    size = settings.batch_size
    steps = []
    for k in range(settings.total_steps):
        ids = ours["input_ids"][k * size : (k + 1) * size]
        masks = ours["loss_masks"][k * size : (k + 1) * size]
        steps.append(
            {
                "tokens": sum(map(len, ids)),
                "loss_tokens": sum(sum(m[1:]) for m in masks),
                "trl_padded_tokens": size * max(map(len, ids)),
            }
        )
    return {"same_input_ids": True, "same_loss_mask": same_mask, "per_step": steps}


def summarise(
    report: common.Reporter, answers: dict[str, list[dict]], ready: dict[str, dict], peak: float
) -> None:
    """The shared figures; MFU is 6 * params * non-padding tokens / seconds / peak."""

    def efficiency(side: str, steps: list[dict]) -> dict[str, float]:
        return {"mfu": common.median_mfu(ready[side]["params"], steps, peak)}

    versus.summarise(report, answers, efficiency, "memory_ratio")


def check_trl_tokens(warm: dict, measured: dict, work: dict) -> bool:
    """Whether TRL's own non-padding token count per step equals the planned one."""
    per_step = versus.trl_token_counts(warm, measured)
    return per_step == [float(s["tokens"]) for s in work["per_step"]]


def drive(workers: list[common.Worker], settings: Settings, profile: bool) -> dict[str, Any]:
    """Check the work, warm up, alternate the measured steps with peak samples, stop."""
    ready = {w.name: w.wait_ready() for w in workers}
    work = check_same_work(ready["rlhfkit"], ready["trl"], settings)
    for info in ready.values():
        del info["input_ids"], info["loss_masks"]
    return {"ready": ready, "work": work, **versus.measure(workers, settings, profile)}


def run(settings: Settings, profile: bool) -> common.Reporter:
    """Start both workers, alternate them, and report."""
    common.set_threads(settings.threads)
    report = common.Reporter("sft")
    report.details["environment"] = common.environment()
    conversations, data_name = load_conversations(
        settings.data, settings.total_steps * settings.batch_size
    )
    workers = [
        common.Worker.start("rlhfkit", rlhfkit_worker, settings, conversations),
        common.Worker.start("trl", trl_worker, settings, conversations),
    ]
    try:
        result = drive(workers, settings, profile)
    finally:
        for worker in workers:
            worker.close()
    work, measured = result["work"], result["measured"]
    for steps in measured.values():
        for k, step in enumerate(steps):
            step["tokens"] = work["per_step"][settings.warmup + k]["tokens"]
    work["trl_token_count_matches"] = check_trl_tokens(result["warm"], measured, work)
    versus.report_result(report, result, settings, summarise, data=data_name)
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the figures and write the JSON result."""
    versus.main(Settings, run, __doc__.splitlines()[0], "row source for load_rows", argv)


if __name__ == "__main__":
    main()
