"""The frame shared by the rlhfkit-vs-TRL benchmarks (bench_sft.py, bench_rm.py).

Settings and command line; the rlhfkit worker's command loop; the TRL config arguments, the
callback that hands control to the driver between steps and the worker body around the trainer;
the warm-up and measured rounds with matmul samples between them, TRL's own token counts, the
figures and the JSON details. What each benchmark measures stays in its script: its data, its
rlhfkit step, its TRL trainer, its checks of equal work and its MFU figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from common import (
    Reporter,
    Worker,
    alternate,
    median,
    model_facts,
    peak_rss_mib,
    peak_sample,
    profiled,
    ratio_of_medians,
    rss_mib,
)

# ---------------------------------------------------------------------------------------------
# Settings and command line


@dataclass(frozen=True)
class BenchSettings:
    """What both sides of an rlhfkit-vs-TRL benchmark are asked to do.

    Each benchmark subclasses it and overrides the defaults that differ (``lr``, ``data``).
    """

    steps: int = 6
    """Measured optimiser steps per side."""
    warmup: int = 1
    """Warm-up optimiser steps per side (alternating too, not measured)."""
    batch_size: int = 16
    """Rows (or preference pairs) per optimiser step."""
    max_len: int = 512
    """Maximum tokens per sequence (no sequence of the default data reaches it)."""
    lr: float = 1e-5
    """Constant AdamW learning rate."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    seed: int = 0
    """Seed of both sides."""
    threads: int = 2
    """torch threads in every process."""
    data: str = ""
    """Row source (train split)."""

    @property
    def total_steps(self) -> int:
        """Optimiser steps each side runs."""
        return self.warmup + self.steps


SettingsT = TypeVar("SettingsT", bound=BenchSettings)


def parse_settings(
    cls: type[SettingsT], description: str, data_help: str, argv: list[str] | None = None
) -> tuple[SettingsT, bool]:
    """Command line -> (settings of class ``cls``, profile one extra rlhfkit step?)."""
    parser = argparse.ArgumentParser(description=description)
    defaults = cls()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="warm-up steps")
    parser.add_argument("--max-len", type=int, default=defaults.max_len)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--data", default=defaults.data, help=data_help)
    parser.add_argument(
        "--profile", action="store_true", help="profile one extra rlhfkit step (not measured)"
    )
    args = vars(parser.parse_args(argv))
    profile = args.pop("profile")
    return cls(**args), profile


# ---------------------------------------------------------------------------------------------
# Worker sides


def step_answer(
    start: float, cpu_start: float, stats: Any, stepped: bool, parts: Sequence[Any], **extra: Any
) -> dict[str, Any]:
    """The answer of one rlhfkit step that began at ``start`` / ``cpu_start``.

    Wall and process CPU seconds since then, the step's loss (``stats.loss``), whether the
    optimiser stepped, the micro-batches and the tokens they hold (``processed_tokens``: the
    positions computed), and ``extra``.
    """
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_start,
        "loss": stats.loss,
        "stepped": stepped,
        **extra,
        "micro_batches": len(parts),
        "processed_tokens": sum(int(p["input_ids"].numel()) for p in parts),
    }


def serve_steps(
    conn: Any,
    step: Callable[[], dict[str, Any]],
    *,
    close: Callable[[], None],
    profile_step: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """The command loop of an rlhfkit worker: answer "step" and "profile" until "stop".

    Every answer gets the process's peak memory and thread count. On "stop", ``close`` runs
    (the run's logger) and the final peak memory is the last message.

    Args:
        conn: The worker's end of the pipe.
        step: One measured optimiser step; returns its answer.
        close: Called once on "stop".
        profile_step: One extra step under the profiler (default: ``profiled(step)``).
    """
    import torch

    while (command := conn.recv()) != "stop":
        if command == "profile":
            answer = profile_step() if profile_step is not None else profiled(step)
        else:
            answer = step()
        answer.update(peak_rss_mib=peak_rss_mib(), threads=torch.get_num_threads())
        conn.send(answer)
    close()
    conn.send({"peak_rss_mib": peak_rss_mib()})


def trl_args(settings: BenchSettings, output_dir: str) -> dict[str, Any]:
    """The TRL config arguments both benchmarks share (SFTConfig / RewardConfig keywords).

    One micro-batch of ``batch_size`` rows per step, constant learning rate without warm-up or
    weight decay, bf16 autocast on CPU, no activation checkpointing (TRL's default is True:
    recomputation; rlhfkit's is False), sequential sampling, one log record per step, no
    evaluation, no saving, no progress bar.
    """
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": settings.total_steps,
        "learning_rate": settings.lr,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": settings.max_grad_norm,
        "bf16": True,
        "max_length": settings.max_len,
        "activation_checkpointing": False,
        "train_sampling_strategy": "sequential",
        "report_to": [],
        "logging_strategy": "steps",
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": settings.seed,
        "dataloader_num_workers": 0,
    }


def trl_step_callback(conn: Any, logged: Sequence[str] = ()) -> Any:
    """A TrainerCallback that hands control to the driver between optimiser steps.

    It waits for the driver's command before the first step and after each step's log line, so
    the trainer computes only when the driver asked for a step; a step's time runs from the
    command to that step's ``on_log`` (batch collation, forward, backward, clipping, AdamW,
    scheduler and TRL's per-step metrics and logging included). Its ``ready`` dict is sent when
    training begins. Each step's answer holds the times, the loss, TRL's running ``num_tokens``
    and the log values named in ``logged`` (NaN when absent).
    """
    import torch
    from transformers import TrainerCallback

    class DriverCallback(TrainerCallback):
        def __init__(self) -> None:
            self.ready: dict[str, Any] = {}
            self.start = self.cpu_start = 0.0
            self.done = False

        def wait(self, control: Any) -> None:
            if conn.recv() == "stop":
                self.done = True
                control.should_training_stop = True
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = kwargs["model"]  # as trained (Trainer switches checkpointing on in train())
            checkpointing = getattr(model, "is_activation_checkpointing", None)
            self.ready.update(activation_checkpointing=checkpointing, rss_mib=rss_mib())
            conn.send(self.ready)
            self.wait(control)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if self.done or not logs or "loss" not in logs:
                return  # the end-of-training summary, or a step after "stop"
            seconds = time.perf_counter() - self.start
            answer = {
                "seconds": seconds,
                "cpu_seconds": time.process_time() - self.cpu_start,
                "loss": float(logs["loss"]),
                **{name: float(logs.get(name, float("nan"))) for name in logged},
                "num_tokens_total": float(logs.get("num_tokens", float("nan"))),
                "peak_rss_mib": peak_rss_mib(),
                "threads": torch.get_num_threads(),
            }
            conn.send(answer)
            self.wait(control)

    return DriverCallback()


def trl_model_dir() -> str:
    """The embedded model's directory, for a TRL worker (transformers' warnings and the datasets
    progress bars silenced)."""
    import datasets
    import transformers

    from rlhfkit.models.embedded import embedded_model_dir

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return str(embedded_model_dir())


def train_trl(
    conn: Any,
    model: Any,
    make_trainer: Callable[[str, list[Any]], Any],
    describe: Callable[[Any], dict[str, Any]],
    *,
    prefix: str,
    logged: Sequence[str] = (),
) -> None:
    """The TRL side of a worker: build the trainer, describe it, train step by step.

    Args:
        conn: The worker's end of the pipe.
        model: The model the trainer trains (fp32 weights, bf16 autocast).
        make_trainer: ``(output_dir, callbacks) -> trainer``.
        describe: ``trainer -> dict`` of side-specific facts for the ready message (besides
            the model facts and the optimiser).
        prefix: Prefix of the temporary output directory.
        logged: TRL log values to record with every step (see :func:`trl_step_callback`).
    """
    from transformers import PrinterCallback

    callback = trl_step_callback(conn, logged)
    with tempfile.TemporaryDirectory(prefix=prefix) as output_dir:
        trainer = make_trainer(output_dir, [callback])
        trainer.remove_callback(PrinterCallback)  # log lines to stdout; rlhfkit's go to JSONL
        dtype = next(model.parameters()).dtype
        callback.ready = {
            **model_facts(model, f"{dtype} weights, bf16 autocast"),
            **describe(trainer),
            "optimizer": trainer.args.optim,
        }
        trainer.train()
    conn.send({"peak_rss_mib": peak_rss_mib()})


# ---------------------------------------------------------------------------------------------
# Driver and figures


def measure(workers: Sequence[Worker], settings: BenchSettings, profile: bool) -> dict[str, Any]:
    """Warm up, alternate the measured steps with peak samples between rounds, stop.

    The first worker is rlhfkit's: with ``profile`` it runs one more step under the profiler.

    Returns:
        ``{"warm", "measured"}`` (step answers by worker name), ``"peak_samples"``,
        ``"profile"`` (the table or None) and ``"final"`` (each worker's last message).
    """
    samples = [peak_sample()]
    warm, _ = alternate(workers, settings.warmup)
    measured, between = alternate(workers, settings.steps, before_round=peak_sample)
    samples += [*between, peak_sample()]
    table = workers[0].request("profile")["profile"] if profile else None
    final = {w.name: w.request("stop") for w in workers}
    return {
        "warm": warm,
        "measured": measured,
        "peak_samples": samples,
        "profile": table,
        "final": final,
    }


def trl_token_counts(warm: dict, measured: dict) -> list[float]:
    """TRL's own non-padding tokens of each step (differences of its running ``num_tokens``)."""
    totals = [s["num_tokens_total"] for s in warm["trl"] + measured["trl"]]
    return [b - a for a, b in zip([0.0, *totals], totals, strict=False)]


def summarise(
    report: Reporter,
    answers: dict[str, list[dict]],
    efficiency: Callable[[str, list[dict]], dict[str, float]],
    memory_figure: str,
) -> None:
    """Turn the measured steps into the figures (medians and ratios of medians).

    Args:
        report: Where the figures go.
        answers: The measured steps by side (``"rlhfkit"``, ``"trl"``).
        efficiency: ``(side, steps) -> {figure name: value}``, the side's MFU figures
            (reported after its tokens/s).
        memory_figure: Name of the rlhfkit / TRL peak RSS ratio.
    """
    rates: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    for side, steps in answers.items():
        seconds[side] = [s["seconds"] for s in steps]
        rates[side] = [s["tokens"] / s["seconds"] for s in steps]
        report.figure(f"{side}.s_per_step", median(seconds[side]))
        report.figure(f"{side}.tokens_per_s", median(rates[side]))
        for name, value in efficiency(side, steps).items():
            report.figure(f"{side}.{name}", value)
        report.figure(f"{side}.cpu_s_per_step", median([s["cpu_seconds"] for s in steps]))
        report.figure(f"{side}.peak_rss_mib", steps[-1]["peak_rss_mib"])
    report.figure("speedup_tokens_per_s", ratio_of_medians(rates["rlhfkit"], rates["trl"]))
    report.figure("speedup_s_per_step", ratio_of_medians(seconds["trl"], seconds["rlhfkit"]))
    # Secondary: each round's TRL/rlhfkit time ratio, whose two steps ran back to back under
    # about the same machine load; its median shows how much load swings moved the main figure.
    rounds = [t / r for t, r in zip(seconds["trl"], seconds["rlhfkit"], strict=True)]
    report.figure("speedup_median_round_ratio", median(rounds))
    report.figure(
        memory_figure, answers["rlhfkit"][-1]["peak_rss_mib"] / answers["trl"][-1]["peak_rss_mib"]
    )


def report_result(
    report: Reporter,
    result: dict[str, Any],
    settings: BenchSettings,
    summarise_steps: Callable[[Reporter, dict, dict, float], None],
    **details: Any,
) -> None:
    """Report a driven run: the peak, the side figures, the first losses and the JSON details.

    Args:
        report: Where figures and details go.
        result: ``ready``, ``work`` and the keys of :func:`measure`.
        settings: Stored as ``settings``.
        summarise_steps: ``(report, measured, ready, peak)``, the benchmark's side figures.
        **details: More JSON details (for example the data's name).
    """
    warm, measured = result["warm"], result["measured"]
    if not all(s["stepped"] for s in warm["rlhfkit"] + measured["rlhfkit"]):
        print("warning: rlhfkit skipped a non-finite step; its timings cover less work")
    peak = median([x for s in result["peak_samples"] for x in s["samples"]])
    report.figure("peak_bf16_tflops", peak / 1e12)
    summarise_steps(report, measured, result["ready"], peak)
    for side, steps in warm.items():
        if steps:  # the same weights and rows: the losses agree up to bf16 rounding
            report.figure(f"{side}.first_step_loss", steps[0]["loss"])
    report.details.update(
        settings=asdict(settings),
        **details,
        work=result["work"],
        sides=result["ready"],
        warmup_steps=warm,
        measured_steps=measured,
        final=result["final"],
        matmul_peak_samples=result["peak_samples"],
        profile=result["profile"],
    )


def main(
    cls: type[SettingsT],
    run: Callable[[SettingsT, bool], Reporter],
    description: str,
    data_help: str,
    argv: list[str] | None = None,
) -> None:
    """Parse the command line, run the benchmark, print the figures and write the JSON result.

    Args:
        cls: The benchmark's settings class.
        run: ``(settings, profile?) -> report`` (the figures are printed as they are made).
        description: The command's description.
        data_help: Help of ``--data``.
        argv: The arguments (default: the command line).
    """
    settings, profile = parse_settings(cls, description, data_help, argv)
    report = run(settings, profile)
    if report.details.get("profile"):
        print(report.details["profile"])
    print(f"wrote {report.write()}")


def trl_preference_rows(plan: list[list[dict[str, Any]]], spec: str) -> list[dict[str, Any]]:
    """TRL's conversational preference rows, in rlhfkit's batch order (one row per pair).

    Shared by the reward-model and DPO benchmarks: ``plan`` holds each step's pairs with their
    ``source`` location; the rows are looked up in the train split of ``spec``.
    """
    from rlhfkit.data.sources import load_rows

    by_location = {row.location: row.data for row in load_rows(spec, split="train")}
    rows = []
    for pair in (p for step in plan for p in step):
        data = by_location[pair["source"]]
        rows.append(
            {
                "prompt": data["prompt"],
                "chosen": [{"role": "assistant", "content": data["chosen"]}],
                "rejected": [{"role": "assistant", "content": data["rejected"]}],
            }
        )
    return rows
