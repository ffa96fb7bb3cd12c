"""Reward-model benchmark: rlhfkit's reward-model step vs TRL's RewardTrainer on the same work.

Both sides train a Bradley-Terry reward model (the embedded SmolLM2-135M-Instruct backbone with a
fresh ``Linear(576, 1, bias=False)`` head, the same initial head on both) on the same preference
pairs in the same order: 16 pairs per optimiser step, bf16 compute, AdamW at the same constant
learning rate, gradient clipping at 1.0. The rlhfkit side runs the loop body of
``recipes/reward_model.py``; the TRL side is ``RewardTrainer`` fed the pairs in rlhfkit's batch
order with sequential sampling. Each side runs in its own persistent process; the driver asks
them for one optimiser step at a time, alternating rlhfkit, TRL, rlhfkit, TRL ... after warm-up
steps, and samples the machine's bf16 matmul rate between rounds. See benchmarks/README.md for
what is measured and what could not be made equal.

    python benchmarks/bench_rm.py [--steps 6] [--warmup 1] [--profile]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import common


@dataclass(frozen=True)
class Settings:
    """What both sides are asked to do."""

    steps: int = 6
    """Measured optimiser steps per side."""
    warmup: int = 1
    """Warm-up optimiser steps per side (alternating too, not measured)."""
    batch_size: int = 16
    """Preference pairs per optimiser step."""
    max_len: int = 512
    """Maximum tokens of prompt + completion (no pair of the data reaches it)."""
    lr: float = 5e-5
    """Constant AdamW learning rate (the reward-model recipe's default for a small model)."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    seed: int = 0
    """Seed of both sides: the head's initialisation and rlhfkit's batch order."""
    threads: int = 2
    """torch threads in every process."""
    data: str = "builtin:preferences"
    """Preference source (train split), read by the reward-model recipe's ``load_groups``."""

    @property
    def total_steps(self) -> int:
        """Optimiser steps each side runs."""
        return self.warmup + self.steps


# ---------------------------------------------------------------------------------------------
# rlhfkit side


def _rlhfkit_setup(settings: Settings, run_dir: str) -> dict[str, Any]:
    """Build the run and the groups exactly as recipes/reward_model.py does."""
    from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig
    from rlhfkit.data.collate import supports_padding_free
    from rlhfkit.models.heads import supports_prefix_trees
    from rlhfkit.recipes.common import build_run
    from rlhfkit.recipes.reward_model import PairwiseTask, RMConfig, RMDataConfig

    cfg = RMConfig(
        model=ModelConfig(precision="bf16"),
        data=RMDataConfig(train=settings.data, eval=None, max_len=settings.max_len),
        optim=OptimConfig(
            lr=settings.lr,
            schedule="constant",
            warmup_ratio=0.0,
            max_grad_norm=settings.max_grad_norm,
        ),
        loop=LoopConfig(batch_size=settings.batch_size, seed=settings.seed),
        log=LogConfig(run_dir=run_dir, tensorboard=False, progress=False),
    )
    ctx = build_run(cfg.model, cfg.log, cfg.loop.seed, {}, task="score")
    ctx.packing = cfg.data.packing and supports_padding_free(ctx.model)
    task = PairwiseTask(cfg)
    task.share_prefix = cfg.data.share_prefix and ctx.packing and supports_prefix_trees(ctx.model)
    train, counts = task.load(ctx.tokenizer, cfg.data.train, cfg.data.train_split, 0)
    ctx.start_training(cfg.optim, settings.total_steps + 1, resume=False)  # +1: optional profile
    return {
        "ctx": ctx, "cfg": cfg, "train": train, "counts": counts, "task": task,
        "step_loss": task.step_loss(ctx.model),
    }  # fmt: skip


def _plan(run: dict[str, Any], settings: Settings) -> list[list[dict[str, Any]]]:
    """The groups of every step, by ``batch_order`` (source row and token ids of each pair)."""
    from rlhfkit.recipes.common import batch_order

    train, loop = run["train"], run["cfg"].loop
    plan = []
    for position in range(settings.total_steps):
        order = batch_order(len(train), loop.batch_size, loop.seed, position)
        plan.append(
            [
                {"source": train[i].source, "ids": [s.input_ids for s in train[i].sequences]}
                for i in order
            ]
        )
    return plan


def _rlhfkit_step(run: dict[str, Any]) -> dict[str, Any]:
    """One optimiser step: the loop body of recipes/reward_model.py (no evaluation, no save)."""
    from rlhfkit.recipes.common import batch_order
    from rlhfkit.training.accumulate import accumulate
    from rlhfkit.training.distributed import all_reduce_sum

    ctx, cfg, train = run["ctx"], run["cfg"], run["train"]
    start, cpu_start = time.perf_counter(), time.process_time()
    order = batch_order(len(train), cfg.loop.batch_size, cfg.loop.seed, ctx.batches_done)
    batch = ctx.dist.shard([train[i] for i in order])
    task = run["task"]
    parts = task.micro_batches(
        batch, max_tokens=cfg.loop.micro_batch_tokens, packing=ctx.packing, pad_id=ctx.pad_id
    )
    parts = [ctx.to_device(part) for part in parts]
    stats = accumulate(
        parts, run["step_loss"], count_fn=task.count, after_backward=ctx.master.collect_grads
    )
    stepped = ctx.apply_step(stats, cfg.optim.max_grad_norm, cfg.loop.max_nonfinite)
    if stepped:
        loss = all_reduce_sum(stats.loss)
        tokens = int(all_reduce_sum(sum(task.tokens(item) for item in batch)))
        sums = {k: all_reduce_sum(v) for k, v in sorted(stats.metrics.items())}
        metrics = {"train/loss": loss, "train/tokens": tokens, **task.train_metrics(sums)}
        ctx.log_step(metrics, cfg.log.log_every)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_start,
        "loss": stats.loss,
        "stepped": stepped,
        "tokens": sum(g.num_tokens for g in batch),
        "pairs": len(batch),
        "micro_batches": len(parts),
        "processed_tokens": sum(int(p["input_ids"].numel()) for p in parts),
    }


def _profile_step(run: dict[str, Any]) -> dict[str, Any]:
    """One more step under torch.profiler; returns the top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        answer = _rlhfkit_step(run)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    return {**answer, "profile": table}


def rlhfkit_worker(conn: Any, settings: Settings) -> None:
    """Worker process of the rlhfkit side (answers "step", "profile", "stop")."""

    def body() -> None:
        common.set_threads(settings.threads)
        import torch

        from rlhfkit.models.heads import check_pooling_compatible, score_head

        with tempfile.TemporaryDirectory(prefix="bench-rm-rlhfkit-") as run_dir:
            run = _rlhfkit_setup(settings, run_dir)
            ctx = run["ctx"]
            sequences = [s.input_ids for g in run["train"] for s in g.sequences]
            conn.send(
                {
                    "params": sum(p.numel() for p in ctx.model.parameters()),
                    "embedding_params": ctx.model.get_input_embeddings().weight.numel(),
                    "attn_implementation": ctx.model.config._attn_implementation,
                    "packing": ctx.packing,
                    "share_prefix": run["task"].share_prefix,
                    "micro_batch_tokens": run["cfg"].loop.micro_batch_tokens,
                    "compute_dtype": str(next(ctx.model.parameters()).dtype),
                    "group_counts": run["counts"],
                    "sequences_ending_with_pad": check_pooling_compatible(sequences, ctx.pad_id),
                    "head": score_head(ctx.model).weight.detach().float().flatten().tolist(),
                    "plan": _plan(run, settings),
                    "rss_mib": common.rss_mib(),
                }
            )
            while (command := conn.recv()) != "stop":
                answer = _profile_step(run) if command == "profile" else _rlhfkit_step(run)
                answer.update(peak_rss_mib=common.peak_rss_mib(), threads=torch.get_num_threads())
                conn.send(answer)
            ctx.logger.close()
            conn.send({"peak_rss_mib": common.peak_rss_mib()})

    common.worker_main(conn, body)


# ---------------------------------------------------------------------------------------------
# TRL side


def _trl_callback(conn: Any) -> Any:
    """A TrainerCallback that hands control to the driver between optimiser steps.

    It waits for the driver's command before the first step and after each step's log line, so
    the trainer computes only when the driver asked for a step; a step's time runs from the
    command to that step's ``on_log`` (batch collation, forward, backward, clipping, AdamW,
    scheduler and TRL's per-step reward metrics and logging included).
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
            self.ready.update(activation_checkpointing=checkpointing, rss_mib=common.rss_mib())
            conn.send(self.ready)
            self.wait(control)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if self.done or not logs or "loss" not in logs:
                return  # the end-of-training summary, or a step after "stop"
            conn.send(
                {
                    "seconds": time.perf_counter() - self.start,
                    "cpu_seconds": time.process_time() - self.cpu_start,
                    "loss": float(logs["loss"]),
                    "accuracy": float(logs.get("accuracy", float("nan"))),
                    "num_tokens_total": float(logs.get("num_tokens", float("nan"))),
                    "peak_rss_mib": common.peak_rss_mib(),
                    "threads": torch.get_num_threads(),
                }
            )
            self.wait(control)

    return DriverCallback()


def _trl_config(settings: Settings, output_dir: str) -> Any:
    """RewardConfig for the same work: one micro-batch of 16 pairs per step, no recomputation."""
    from trl import RewardConfig

    return RewardConfig(
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
        activation_checkpointing=False,  # TRL's default is True (recomputation); rlhfkit's False
        train_sampling_strategy="sequential",  # rows arrive already in rlhfkit's batch order
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


def trl_worker(conn: Any, settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Worker process of the TRL side (answers "step", "stop")."""

    def body() -> None:
        common.set_threads(settings.threads)
        import datasets
        import torch
        import transformers
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback
        from trl import RewardTrainer

        from rlhfkit.models.embedded import embedded_model_dir

        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        path = str(embedded_model_dir())
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(settings.seed)  # the head's initialisation, as rlhfkit's build_run
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        head = model.score.weight.detach().to(torch.bfloat16).float().flatten().tolist()
        callback = _trl_callback(conn)
        with tempfile.TemporaryDirectory(prefix="bench-rm-trl-") as output_dir:
            trainer = RewardTrainer(
                model=model,
                args=_trl_config(settings, output_dir),
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer,
                callbacks=[callback],
            )
            trainer.remove_callback(PrinterCallback)  # log lines to stdout; rlhfkit's go to JSONL
            prepared = trainer.train_dataset
            callback.ready = {
                "params": sum(p.numel() for p in model.parameters()),
                "embedding_params": model.get_input_embeddings().weight.numel(),
                "attn_implementation": model.config._attn_implementation,
                "compute_dtype": f"{next(model.parameters()).dtype} weights, bf16 autocast",
                "pad_token_id": model.config.pad_token_id,
                "head": head,
                "chosen_ids": [list(x) for x in prepared["chosen_ids"]],
                "rejected_ids": [list(x) for x in prepared["rejected_ids"]],
                "optimizer": trainer.args.optim,
            }
            trainer.train()
        conn.send({"peak_rss_mib": common.peak_rss_mib()})

    common.worker_main(conn, body)


def trl_rows(plan: list[list[dict[str, Any]]], spec: str) -> list[dict[str, Any]]:
    """TRL's conversational preference rows, in rlhfkit's batch order (one row per pair)."""
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


# ---------------------------------------------------------------------------------------------
# Driver


def check_same_work(ours: dict[str, Any], theirs: dict[str, Any], settings: Settings) -> dict:
    """Compare what the two sides will train on; raise if the pairs' token ids differ."""
    pairs = [p["ids"] for step in ours["plan"] for p in step]
    if len(theirs["chosen_ids"]) != len(pairs):
        raise RuntimeError(f"TRL kept {len(theirs['chosen_ids'])} of {len(pairs)} pairs")
    trl_pairs = [list(x) for x in zip(theirs["chosen_ids"], theirs["rejected_ids"], strict=True)]
    if trl_pairs != pairs:
        raise RuntimeError("rlhfkit and TRL tokenise the pairs differently: not the same work")
    size = settings.batch_size
    steps = []
    for k in range(settings.total_steps):
        seqs = [s for p in pairs[k * size : (k + 1) * size] for s in p]
        steps.append({"tokens": sum(map(len, seqs)), "trl_padded": len(seqs) * max(map(len, seqs))})
    return {
        "same_input_ids": True,
        "same_head_init": ours["head"] == theirs["head"],
        "per_step": steps,
    }


def trl_token_counts(warm: dict, measured: dict) -> list[float]:
    """TRL's own non-padding tokens of each step (differences of its running ``num_tokens``)."""
    totals = [s["num_tokens_total"] for s in warm["trl"] + measured["trl"]]
    return [b - a for a, b in zip([0.0, *totals], totals, strict=False)]


def _mfu(params: int, step: dict[str, Any], peak: float) -> float:
    """6 * params * tokens computed / seconds / the measured peak.

    Tokens computed: the non-padding tokens on TRL's side; on rlhfkit's side the tokens of its
    packed rows, where a pair's shared prompt is computed once (``share_prefix``), so the MFU
    counts only arithmetic that was done, never the prompt twice.
    """
    tokens = step.get("processed_tokens", step["tokens"])
    return common.mfu(common.training_flops(params, tokens), step["seconds"], peak)


def summarise(
    report: common.Reporter, answers: dict[str, list[dict]], ready: dict[str, dict], peak: float
) -> None:
    """Turn the measured steps into the figures (medians and ratios of medians)."""
    rates: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    for side, steps in answers.items():
        seconds[side] = [s["seconds"] for s in steps]
        rates[side] = [s["tokens"] / s["seconds"] for s in steps]
        mfus = [_mfu(ready[side]["params"], s, peak) for s in steps]
        # The embedding matrix is only a lookup in a reward model (no LM head multiplies by it).
        executed = ready[side]["params"] - ready[side]["embedding_params"]
        report.figure(f"{side}.s_per_step", common.median(seconds[side]))
        report.figure(f"{side}.tokens_per_s", common.median(rates[side]))
        report.figure(f"{side}.mfu", common.median(mfus))
        report.figure(
            f"{side}.mfu_no_embedding", common.median([_mfu(executed, s, peak) for s in steps])
        )
        report.figure(f"{side}.cpu_s_per_step", common.median([s["cpu_seconds"] for s in steps]))
        report.figure(f"{side}.peak_rss_mib", steps[-1]["peak_rss_mib"])
    report.figure("speedup_tokens_per_s", common.ratio_of_medians(rates["rlhfkit"], rates["trl"]))
    report.figure("speedup_s_per_step", common.ratio_of_medians(seconds["trl"], seconds["rlhfkit"]))
    rounds = [t / r for t, r in zip(seconds["trl"], seconds["rlhfkit"], strict=True)]
    report.figure("speedup_median_round_ratio", common.median(rounds))
    report.figure(
        "rss_ratio", answers["rlhfkit"][-1]["peak_rss_mib"] / answers["trl"][-1]["peak_rss_mib"]
    )


def peak_sample() -> dict[str, Any]:
    """A short matmul-rate sample and the load average (taken between rounds)."""
    sample = common.matmul_peak(iters=10, repeats=3)
    sample["load_average"] = os.getloadavg()
    return sample


def drive(settings: Settings, profile: bool) -> dict[str, Any]:
    """Start both sides (TRL gets rlhfkit's pair order), warm up, alternate, stop."""
    ours = common.Worker.start("rlhfkit", rlhfkit_worker, settings)
    workers = [ours]
    try:
        ready = {"rlhfkit": ours.wait_ready()}
        rows = trl_rows(ready["rlhfkit"]["plan"], settings.data)
        workers.append(common.Worker.start("trl", trl_worker, settings, rows))
        ready["trl"] = workers[1].wait_ready()
        work = check_same_work(ready["rlhfkit"], ready["trl"], settings)
        work["sources"] = [[p["source"] for p in step] for step in ready["rlhfkit"].pop("plan")]
        del ready["rlhfkit"]["head"], ready["trl"]["head"]
        del ready["trl"]["chosen_ids"], ready["trl"]["rejected_ids"]
        samples = [peak_sample()]
        warm, _ = common.alternate(workers, settings.warmup)
        measured, between = common.alternate(workers, settings.steps, before_round=peak_sample)
        samples += [*between, peak_sample()]
        table = ours.request("profile")["profile"] if profile else None
        final = {w.name: w.request("stop") for w in workers}
    finally:
        for worker in workers:
            worker.close()
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
    """Run both sides alternately and report."""
    common.set_threads(settings.threads)
    report = common.Reporter("rm")
    report.details["environment"] = common.environment()
    result = drive(settings, profile)
    work, warm, measured = result["work"], result["warm"], result["measured"]
    trl_tokens = trl_token_counts(warm, measured)
    ours_tokens = [float(s["tokens"]) for s in warm["rlhfkit"] + measured["rlhfkit"]]
    for k, step in enumerate(measured["trl"]):
        step["tokens"] = trl_tokens[settings.warmup + k]  # TRL's own count (attention mask)
    work.update(
        rlhfkit_tokens_per_step=ours_tokens,
        trl_tokens_per_step=trl_tokens,
        token_counts_match=ours_tokens == trl_tokens,
        planned_tokens_match=ours_tokens == [float(s["tokens"]) for s in work["per_step"]],
    )
    if not all(s["stepped"] for s in warm["rlhfkit"] + measured["rlhfkit"]):
        print("warning: rlhfkit skipped a non-finite step; its timings cover less work")
    peak = common.median([x for s in result["peak_samples"] for x in s["samples"]])
    report.figure("peak_bf16_tflops", peak / 1e12)
    summarise(report, measured, result["ready"], peak)
    for side, steps in warm.items():
        if steps:  # the same weights and pairs: the losses agree up to bf16 rounding
            report.figure(f"{side}.first_step_loss", steps[0]["loss"])
    report.details.update(
        settings=asdict(settings),
        work=work,
        sides=result["ready"],
        warmup_steps=warm,
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
    parser.add_argument("--data", default=defaults.data, help="preference source (train split)")
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
