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

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import common

TEMPLATE = Path(__file__).resolve().parent / "templates" / "smollm2_assistant_mask.jinja"
"""SmolLM2's chat template plus {% generation %} markers, for TRL's assistant_only_loss."""


@dataclass(frozen=True)
class Settings:
    """What both sides are asked to do."""

    steps: int = 6
    """Measured optimiser steps per side."""
    warmup: int = 1
    """Warm-up optimiser steps per side (alternating too, not measured)."""
    batch_size: int = 16
    """Rows per optimiser step."""
    max_len: int = 512
    """Maximum tokens per row (no row of the data reaches it)."""
    lr: float = 1e-5
    """Constant AdamW learning rate."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    seed: int = 0
    """Seed of both sides (no randomness is used by either: no dropout, sequential order)."""
    threads: int = 2
    """torch threads in every process."""
    data: str = "builtin:instructions"
    """Row source (rlhfkit.data.sources.load_rows); generated rows if it cannot be read."""

    @property
    def total_steps(self) -> int:
        """Optimiser steps each side runs."""
        return self.warmup + self.steps


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
    from rlhfkit.recipes.common import build_run
    from rlhfkit.recipes.sft import make_step_loss

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
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_start,
        "loss": stats.loss,
        "stepped": stepped,
        "tokens": sum(len(e.input_ids) for e in batch),
        "loss_tokens": stats.normaliser,
        "micro_batches": len(parts),
        "processed_tokens": sum(int(p["input_ids"].numel()) for p in parts),
    }


def _profile_step(run: dict[str, Any], settings: Settings, index: int) -> dict[str, Any]:
    """One more step under torch.profiler; returns the top operators by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        answer = _rlhfkit_step(run, settings, index)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    return {**answer, "profile": table, "threads": torch.get_num_threads()}


def rlhfkit_worker(conn: Any, settings: Settings, conversations: list) -> None:
    """Worker process of the rlhfkit side (answers "step", "profile", "stop")."""

    def body() -> None:
        common.set_threads(settings.threads)
        import torch

        with tempfile.TemporaryDirectory(prefix="bench-sft-rlhfkit-") as run_dir:
            run = _rlhfkit_setup(settings, conversations, run_dir)
            model = run["ctx"].model
            conn.send(
                {
                    "params": sum(p.numel() for p in model.parameters()),
                    "attn_implementation": model.config._attn_implementation,
                    "packing": run["ctx"].packing,
                    "compute_dtype": str(next(model.parameters()).dtype),
                    "input_ids": [e.input_ids for e in run["examples"]],
                    "loss_masks": [e.loss_mask for e in run["examples"]],
                    "rss_mib": common.rss_mib(),
                }
            )
            index = 0
            while (command := conn.recv()) != "stop":
                if command == "profile":
                    answer = _profile_step(run, settings, index - 1)
                else:
                    answer = _rlhfkit_step(run, settings, index)
                    index += 1
                answer.update(peak_rss_mib=common.peak_rss_mib(), threads=torch.get_num_threads())
                conn.send(answer)
            run["ctx"].logger.close()
            conn.send({"peak_rss_mib": common.peak_rss_mib()})

    common.worker_main(conn, body)


# ---------------------------------------------------------------------------------------------
# TRL side


def _trl_callback(conn: Any) -> Any:
    """A TrainerCallback that hands control to the driver between optimiser steps.

    It waits for the driver's command before the first step and after each step's log line, so
    the trainer computes only when the driver asked for a step; a step's time runs from the
    command to that step's ``on_log`` (batch collation, forward, backward, clipping, AdamW,
    scheduler and TRL's per-step metrics and logging included).
    """
    import torch
    from transformers import TrainerCallback

    class DriverCallback(TrainerCallback):
        def __init__(self) -> None:
            self.ready: dict[str, Any] = {}
            self.start = self.cpu_start = 0.0
            self.done = False

        def wait(self, control: Any) -> None:
            command = conn.recv()
            if command == "stop":
                self.done = True
                control.should_training_stop = True
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = kwargs["model"]  # as trained: checkpointing is switched on in train()
            checkpointing = getattr(model, "is_activation_checkpointing", None)
            self.ready.update(activation_checkpointing=checkpointing, rss_mib=common.rss_mib())
            conn.send(self.ready)
            self.wait(control)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if self.done or not logs or "loss" not in logs:
                return  # the end-of-training summary, or a step after "stop"
            seconds = time.perf_counter() - self.start
            conn.send(
                {
                    "seconds": seconds,
                    "cpu_seconds": time.process_time() - self.cpu_start,
                    "loss": float(logs["loss"]),
                    "num_tokens_total": float(logs.get("num_tokens", float("nan"))),
                    "peak_rss_mib": common.peak_rss_mib(),
                    "threads": torch.get_num_threads(),
                }
            )
            self.wait(control)

    return DriverCallback()


def _trl_config(settings: Settings, output_dir: str) -> Any:
    """SFTConfig for the same work: one micro-batch of 16 rows per step, no recomputation."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=1,
        max_steps=settings.total_steps,
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=settings.max_grad_norm,
        bf16=True,
        max_length=settings.max_len,
        assistant_only_loss=True,
        chat_template_path=str(TEMPLATE),
        activation_checkpointing=False,  # TRL's default is True (recomputation); rlhfkit's False
        packing=False,
        padding_free=False,
        train_sampling_strategy="sequential",
        report_to=[],
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        seed=settings.seed,
        dataloader_num_workers=0,
    )


def trl_worker(conn: Any, settings: Settings, conversations: list) -> None:
    """Worker process of the TRL side (answers "step", "stop")."""

    def body() -> None:
        common.set_threads(settings.threads)
        import datasets
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
        from trl import SFTTrainer

        from rlhfkit.models.embedded import embedded_model_dir

        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        path = str(embedded_model_dir())
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        rows = datasets.Dataset.from_list([{"messages": m} for m in conversations])
        callback = _trl_callback(conn)
        with tempfile.TemporaryDirectory(prefix="bench-sft-trl-") as output_dir:
            trainer = SFTTrainer(
                model=model,
                args=_trl_config(settings, output_dir),
                train_dataset=rows,
                processing_class=tokenizer,
                callbacks=[callback],
            )
            trainer.remove_callback(PrinterCallback)  # log lines to stdout; rlhfkit's go to JSONL
            prepared = trainer.train_dataset
            callback.ready = {
                "params": sum(p.numel() for p in model.parameters()),
                "attn_implementation": model.config._attn_implementation,
                "padding_free": trainer.padding_free,
                "packing": trainer.args.packing,
                "compute_dtype": f"{next(model.parameters()).dtype} weights, bf16 autocast",
                "input_ids": [list(x) for x in prepared["input_ids"]],
                "loss_masks": [[t != -100 for t in x] for x in prepared["labels"]],
                "optimizer": trainer.args.optim,
            }
            trainer.train()
        conn.send({"peak_rss_mib": common.peak_rss_mib()})

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
    """Turn the measured steps into the figures (medians and ratios of medians)."""
    rates: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    for side, steps in answers.items():
        seconds[side] = [s["seconds"] for s in steps]
        rates[side] = [s["tokens"] / s["seconds"] for s in steps]
        flops = [common.training_flops(ready[side]["params"], s["tokens"]) for s in steps]
        mfus = [common.mfu(f, s["seconds"], peak) for f, s in zip(flops, steps, strict=True)]
        report.figure(f"{side}.s_per_step", common.median(seconds[side]))
        report.figure(f"{side}.tokens_per_s", common.median(rates[side]))
        report.figure(f"{side}.mfu", common.median(mfus))
        report.figure(f"{side}.cpu_s_per_step", common.median([s["cpu_seconds"] for s in steps]))
        report.figure(f"{side}.peak_rss_mib", steps[-1]["peak_rss_mib"])
    report.figure("speedup_tokens_per_s", common.ratio_of_medians(rates["rlhfkit"], rates["trl"]))
    report.figure("speedup_s_per_step", common.ratio_of_medians(seconds["trl"], seconds["rlhfkit"]))
    # Secondary: each round's TRL/rlhfkit time ratio, whose two steps ran back to back under
    # about the same machine load; its median shows how much load swings moved the main figure.
    rounds = [t / r for t, r in zip(seconds["trl"], seconds["rlhfkit"], strict=True)]
    report.figure("speedup_median_round_ratio", common.median(rounds))
    report.figure(
        "memory_ratio", answers["rlhfkit"][-1]["peak_rss_mib"] / answers["trl"][-1]["peak_rss_mib"]
    )


def peak_sample() -> dict[str, Any]:
    """A short matmul-rate sample and the load average (taken between rounds)."""
    sample = common.matmul_peak(iters=10, repeats=3)
    sample["load_average"] = os.getloadavg()
    return sample


def check_trl_tokens(warm: dict, measured: dict, work: dict) -> bool:
    """Whether TRL's own non-padding token count per step equals the planned one."""
    totals = [s["num_tokens_total"] for s in warm["trl"] + measured["trl"]]
    per_step = [b - a for a, b in zip([0.0, *totals], totals, strict=False)]
    return per_step == [float(s["tokens"]) for s in work["per_step"]]


def drive(workers: list[common.Worker], settings: Settings, profile: bool) -> dict[str, Any]:
    """Warm up, alternate the measured steps with peak samples between rounds, stop."""
    ready = {w.name: w.wait_ready() for w in workers}
    work = check_same_work(ready["rlhfkit"], ready["trl"], settings)
    for info in ready.values():
        del info["input_ids"], info["loss_masks"]
    samples = [peak_sample()]
    warm, _ = common.alternate(workers, settings.warmup)
    measured, between = common.alternate(workers, settings.steps, before_round=peak_sample)
    samples += [*between, peak_sample()]
    table = workers[0].request("profile")["profile"] if profile else None
    final = {w.name: w.request("stop") for w in workers}
    return {
        "ready": ready,
        "work": work,
        "warm": warm,
        "measured": measured,
        "peak_samples": samples,
        "profile": table,
        "final": final,
    }


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
    if not all(s["stepped"] for s in result["warm"]["rlhfkit"] + measured["rlhfkit"]):
        print("warning: rlhfkit skipped a non-finite step; its timings cover less work")
    peak = common.median([x for s in result["peak_samples"] for x in s["samples"]])
    report.figure("peak_bf16_tflops", peak / 1e12)
    summarise(report, measured, result["ready"], peak)
    for side, steps in result["warm"].items():
        if steps:  # the same weights and rows: the losses agree up to bf16 rounding
            report.figure(f"{side}.first_step_loss", steps[0]["loss"])
    report.details.update(
        settings=asdict(settings),
        data=data_name,
        work=work,
        sides=result["ready"],
        warmup_steps=result["warm"],
        measured_steps=measured,
        final=result["final"],
        matmul_peak_samples=result["peak_samples"],
        profile=result["profile"],
    )
    return report


def parse_args(argv: list[str] | None = None) -> tuple[Settings, bool]:
    """Command line -> (settings, profile?)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Settings()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="warm-up steps")
    parser.add_argument("--max-len", type=int, default=defaults.max_len)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--data", default=defaults.data, help="row source for load_rows")
    parser.add_argument(
        "--profile", action="store_true", help="profile one extra rlhfkit step (not measured)"
    )
    args = parser.parse_args(argv)
    settings = Settings(
        steps=args.steps,
        warmup=args.warmup,
        max_len=args.max_len,
        lr=args.lr,
        threads=args.threads,
        data=args.data,
    )
    return settings, args.profile


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the figures and write the JSON result."""
    settings, profile = parse_args(argv)
    report = run(settings, profile)
    if report.details.get("profile"):
        print(report.details["profile"])
    print(f"wrote {report.write()}")


if __name__ == "__main__":
    main()
