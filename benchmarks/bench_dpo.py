"""DPO benchmark: rlhfkit's DPO step vs TRL's DPOTrainer on the same work.

Both sides train the embedded SmolLM2-135M-Instruct (causal LM) with the DPO loss
-log sigma(beta * h), beta 0.1, on the same preference pairs in the same order: 8 pairs per
optimiser step, bf16 compute, AdamW at the same constant learning rate, gradient clipping at 1.0.
Both compute the reference log-probs once before training (rlhfkit: ``dpo.prepare``, TRL:
``precompute_ref_log_probs=True``), so no reference forward runs in a measured step; that
precompute is timed apart. The rlhfkit side runs the loop body of ``recipes/dpo.py``; the TRL
side is ``DPOTrainer`` fed the pairs in rlhfkit's batch order with sequential sampling. Each side
runs in its own persistent process; the driver asks them for one optimiser step at a time,
alternating rlhfkit, TRL, rlhfkit, TRL ... after warm-up steps, and samples the machine's bf16
matmul rate between rounds. See benchmarks/README.md for what is measured and what could not be
made equal.

    python benchmarks/bench_dpo.py [--steps 6] [--warmup 1] [--profile]
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import versus


@dataclass(frozen=True)
class Settings(versus.BenchSettings):
    """What both sides are asked to do: ``batch_size`` preference pairs per optimiser step.

    ``max_len`` bounds prompt + reply (no pair of the default data comes near it); ``seed``
    seeds rlhfkit's batch order (neither side draws random numbers while training).
    """

    batch_size: int = 8
    """Preference pairs per optimiser step (TRL's reference DPO figure uses 8)."""
    max_len: int = 1024
    """Maximum tokens of prompt + reply (the DPO recipe's and DPOConfig's default)."""
    lr: float = 5e-6
    """Constant AdamW learning rate."""
    beta: float = 0.1
    """DPO temperature (both sides' default)."""
    data: str = "builtin:preferences"
    """Preference source (train split), read by the DPO recipe's ``load_pairs``."""


CR = ("chosen", "rejected")
"""The two replies of a pair, in rlhfkit's sequence order."""
SIDES = ("rlhfkit", "trl")
"""The two sides, rlhfkit first."""
PLANNED_COLUMNS = (
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "ref_chosen_logps",
    "ref_rejected_logps",
)
"""Columns of TRL's prepared dataset that the driver compares with rlhfkit's plan."""


def timed(owner: Any, name: str, sink: list[float]) -> None:
    """Replace ``owner.name`` by a wrapper that appends each call's wall seconds to ``sink``."""
    inner = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - start)

    setattr(owner, name, wrapper)


# ---------------------------------------------------------------------------------------------
# rlhfkit side


def _rlhfkit_setup(settings: Settings, run_dir: str) -> dict[str, Any]:
    """Build the run, the pairs and their reference sums exactly as recipes/dpo.py does.

    The reference cache points at an empty directory once the model is loaded, so the
    reference log-probs are computed (a cache miss) and timed, as TRL computes its own.
    """
    from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig
    from rlhfkit.data.collate import supports_padding_free
    from rlhfkit.recipes import dpo
    from rlhfkit.training.run import build_run

    cfg = dpo.DPOConfig(
        model=ModelConfig(precision="bf16"),
        data=dpo.DPODataConfig(train=settings.data, eval=None, max_len=settings.max_len),
        algo=dpo.DPOAlgoConfig(loss="dpo", beta=settings.beta),
        optim=OptimConfig(
            lr=settings.lr,
            schedule="constant",
            warmup_ratio=0.0,
            max_grad_norm=settings.max_grad_norm,
        ),
        loop=LoopConfig(batch_size=settings.batch_size, seed=settings.seed),
        log=LogConfig(run_dir=run_dir, tensorboard=False, progress=False),
        eval=dpo.DPOEvalConfig(win_rate=False),
    )
    ctx = build_run(cfg.model, cfg.log, cfg.loop.seed, {})
    ctx.packing = supports_padding_free(ctx.model)
    os.environ["RLHFKIT_CACHE"] = str(Path(run_dir) / "cache")  # a fresh reference cache
    reference_seconds: list[float] = []
    timed(dpo, "cached_reference", reference_seconds)
    start = time.perf_counter()
    train, _, counts = dpo.prepare(ctx, cfg)
    setup_seconds = time.perf_counter() - start
    ctx.start_training(cfg.optim, settings.total_steps + 1, resume=False)  # +1: optional profile
    return {
        "ctx": ctx, "cfg": cfg, "train": train, "counts": counts,
        "step_loss": dpo.make_step_loss(ctx.model, cfg.algo), "count": dpo.example_count(cfg.algo),
        "precompute_seconds": sum(reference_seconds), "setup_seconds": setup_seconds,
    }  # fmt: skip


def _plan(run: dict[str, Any], settings: Settings) -> list[list[dict[str, Any]]]:
    """The pairs of every step by ``batch_order``: source row, ids, loss masks, reference sums."""
    from rlhfkit.training.run import batch_order

    train, loop = run["train"], run["cfg"].loop
    plan = []
    for position in range(settings.total_steps):
        step = []
        for i in batch_order(len(train.pairs), loop.batch_size, loop.seed, position):
            seqs = train.pairs[i].sequences
            step.append(
                {
                    "source": train.pairs[i].source,
                    "ids": [list(s.input_ids) for s in seqs],
                    "masks": [[int(m) for m in s.loss_mask] for s in seqs],
                    "ref": train.ref_sums[i].tolist(),
                }
            )
        plan.append(step)
    return plan


def _rlhfkit_step(run: dict[str, Any]) -> dict[str, Any]:
    """One optimiser step: the loop body of recipes/dpo.py (no evaluation, no save, no bar)."""
    from rlhfkit.recipes.dpo_eval import pair_metrics
    from rlhfkit.training.accumulate import accumulate
    from rlhfkit.training.distributed import all_reduce_sum
    from rlhfkit.training.run import batch_order

    ctx, cfg, train = run["ctx"], run["cfg"], run["train"]
    start, cpu_start = time.perf_counter(), time.process_time()
    order = batch_order(len(train.pairs), cfg.loop.batch_size, cfg.loop.seed, ctx.batches_done)
    mine = ctx.dist.shard(order)
    parts = [ctx.to_device(b) for b in train.micro_batches(mine, cfg.loop.micro_batch_tokens)]
    stats = accumulate(
        parts, run["step_loss"], count_fn=run["count"], after_backward=ctx.master.collect_grads
    )
    stepped = ctx.apply_step(stats, cfg.optim.max_grad_norm, cfg.loop.max_nonfinite)
    if stepped:
        loss = all_reduce_sum(stats.loss)
        tokens = int(all_reduce_sum(sum(train.pairs[i].num_tokens for i in mine)))
        sums = {k: all_reduce_sum(v) for k, v in sorted(stats.metrics.items())}
        metrics = {"train/loss": loss, "train/tokens": tokens, **pair_metrics(sums, "train")}
        ctx.log_step(metrics, cfg.log.log_every)
    pair_tokens = sum(train.pairs[i].num_tokens for i in mine)  # every sequence in full
    return versus.step_answer(
        start, cpu_start, stats, stepped, parts, tokens=pair_tokens, pairs=len(mine)
    )


def rlhfkit_worker(conn: Any, settings: Settings) -> None:
    """Worker process of the rlhfkit side (answers "step", "profile", "stop")."""

    def body() -> None:
        common.set_threads(settings.threads)
        with tempfile.TemporaryDirectory(prefix="bench-dpo-rlhfkit-") as run_dir:
            run = _rlhfkit_setup(settings, run_dir)
            ctx, train = run["ctx"], run["train"]
            conn.send(
                {
                    **common.model_facts(ctx.model),
                    "packing": ctx.packing,
                    "share_prefix": train.share_prefix,
                    "micro_batch_tokens": run["cfg"].loop.micro_batch_tokens,
                    "pair_counts": run["counts"],
                    "precompute_seconds": run["precompute_seconds"],
                    "precompute_pairs": len(train.pairs),
                    "setup_seconds": run["setup_seconds"],
                    "load_average_after_setup": os.getloadavg(),
                    "plan": _plan(run, settings),
                    "rss_mib": common.rss_mib(),
                }
            )
            versus.serve_steps(conn, lambda: _rlhfkit_step(run), close=ctx.logger.close)

    common.worker_main(conn, body)


# ---------------------------------------------------------------------------------------------
# TRL side


def trl_worker(conn: Any, settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Worker process of the TRL side (answers "step", "stop")."""

    def body() -> None:
        common.set_threads(settings.threads)
        os.environ["TQDM_DISABLE"] = "1"  # TRL's precompute progress bar
        import datasets
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        path = versus.trl_model_dir()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        precompute: list[float] = []
        timed(DPOTrainer, "_precompute_ref_logps", precompute)
        setup: list[float] = []

        def make_trainer(output_dir: str, callbacks: list[Any]) -> Any:
            args = DPOConfig(
                **versus.trl_args(settings, output_dir),
                loss_type=["sigmoid"],
                beta=settings.beta,
                precompute_ref_log_probs=True,
            )
            start = time.perf_counter()
            trainer = DPOTrainer(
                model=model,
                args=args,
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer,
                callbacks=callbacks,
            )
            setup.append(time.perf_counter() - start)
            return trainer

        def describe(trainer: Any) -> dict[str, Any]:
            planned = trainer.train_dataset[: settings.total_steps * settings.batch_size]
            return {
                "ref_model": trainer.ref_model is not None,
                "precompute_seconds": sum(precompute),
                "precompute_pairs": len(trainer.train_dataset),
                "precompute_batch_size": trainer.args.precompute_ref_batch_size
                or trainer.args.per_device_train_batch_size,
                "setup_seconds": sum(setup),
                "load_average_after_setup": os.getloadavg(),
                "pad_token_id": tokenizer.pad_token_id,
                **{k: planned[k] for k in PLANNED_COLUMNS},
            }

        versus.train_trl(conn, model, make_trainer, describe, prefix="bench-dpo-trl-")

    common.worker_main(conn, body)


# ---------------------------------------------------------------------------------------------
# Driver


def _token_names(ids: Counter) -> dict[str, int]:
    """``{token text: count}`` of token ids (SmolLM2's tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(versus.trl_model_dir())
    return {repr(tokenizer.decode([i])): n for i, n in ids.most_common()}


def _compare_sequences(
    ours: list[dict[str, Any]], theirs: dict[str, Any], tally: Callable[..., None]
) -> None:
    """Feed ``tally(ours_ids, ours_mask, trl_ids, trl_mask)`` every sequence of both sides."""
    for k, pair in enumerate(ours):
        prompt = list(theirs["prompt_ids"][k])
        for side, name in enumerate(CR):
            reply = list(theirs[f"{name}_ids"][k])
            trl_mask = [0] * len(prompt) + [1] * len(reply)
            tally(pair["ids"][side], pair["masks"][side], prompt + reply, trl_mask)


def check_same_work(plan: list[list[dict]], theirs: dict[str, Any], settings: Settings) -> dict:
    """Compare what the two sides will train on (ids, scored tokens, reference sums, tokens).

    Nothing raises: differences are counted and described, and each side's tokens/s uses its own
    token count.
    """
    ours = [p for step in plan for p in step]
    if len(theirs["prompt_ids"]) != len(ours):
        raise RuntimeError(f"TRL kept {len(theirs['prompt_ids'])} of {len(ours)} planned pairs")
    counts: Counter = Counter()
    trl_only: Counter = Counter()
    ours_only: Counter = Counter()

    def tally(ids: list[int], mask: list[int], trl_ids: list[int], trl_mask: list[int]) -> None:
        counts["sequences"] += 1
        counts["scored_rlhfkit"] += sum(mask)
        counts["scored_trl"] += sum(trl_mask)
        if ids != trl_ids:
            counts["different_ids"] += 1
            return
        for j, (a, b) in enumerate(zip(mask, trl_mask, strict=True)):
            if b > a:
                trl_only[ids[j]] += 1
                counts["trl_only_last_token"] += int(j == len(ids) - 1)
            elif a > b:
                ours_only[ids[j]] += 1

    _compare_sequences(ours, theirs, tally)
    ref_diff = [
        theirs[f"ref_{name}_logps"][k] - pair["ref"][side]
        for k, pair in enumerate(ours)
        for side, name in enumerate(CR)
    ]
    size = settings.batch_size
    steps = []
    for k in range(settings.total_steps):
        seqs = [s for p in ours[k * size : (k + 1) * size] for s in p["ids"]]
        steps.append({"tokens": sum(map(len, seqs)), "trl_padded": len(seqs) * max(map(len, seqs))})
    return {
        "same_input_ids": counts["different_ids"] == 0,
        **counts,
        "scored_only_by_trl": _token_names(trl_only),
        "scored_only_by_rlhfkit": _token_names(ours_only),
        "ref_logps_trl_minus_rlhfkit": {
            "mean": sum(ref_diff) / len(ref_diff),
            "min": min(ref_diff),
            "max": max(ref_diff),
        },
        "per_step": steps,
    }


def summarise(
    report: common.Reporter, answers: dict[str, list[dict]], ready: dict[str, dict], peak: float
) -> None:
    """The shared figures with ``mfu`` per side, then the reference precompute per side.

    MFU is 6 * params * tokens computed / seconds / the measured peak, ``params`` with the tied
    embedding (the LM head multiplies by it). Tokens computed: TRL's non-padding tokens; on
    rlhfkit's side its packed positions (``processed_tokens``: a pair's prompt computed once).
    """

    def efficiency(side: str, steps: list[dict]) -> dict[str, float]:
        return {"mfu": common.median_mfu(ready[side]["params"], steps, peak, "processed_tokens")}

    versus.summarise(report, answers, efficiency, "rss_ratio")
    rates = {}
    for side in SIDES:
        seconds, pairs = ready[side]["precompute_seconds"], ready[side]["precompute_pairs"]
        rates[side] = seconds / pairs
        report.figure(f"{side}.precompute_s", seconds)
        report.figure(f"{side}.precompute_s_per_pair", rates[side])
    report.figure("precompute_speedup_per_pair", rates["trl"] / rates["rlhfkit"])


def drive(settings: Settings, profile: bool) -> dict[str, Any]:
    """Start both sides (TRL gets rlhfkit's pair order), check the work, alternate, stop.

    TRL gets only the pairs of the planned steps (its precompute covers them; rlhfkit's recipe
    covers every training pair), so precompute is compared per pair.
    """
    ours = common.Worker.start("rlhfkit", rlhfkit_worker, settings)
    workers = [ours]
    try:
        ready = {"rlhfkit": ours.wait_ready()}
        plan = ready["rlhfkit"].pop("plan")
        rows = versus.trl_preference_rows(plan, settings.data)
        workers.append(common.Worker.start("trl", trl_worker, settings, rows))
        ready["trl"] = workers[1].wait_ready()
        work = check_same_work(plan, ready["trl"], settings)
        work["sources"] = [[p["source"] for p in step] for step in plan]
        for key in PLANNED_COLUMNS:
            del ready["trl"][key]
        measured = versus.measure(workers, settings, profile)
    finally:
        for worker in workers:
            worker.close()
    return {"ready": ready, "work": work, **measured}


def run(settings: Settings, profile: bool) -> common.Reporter:
    """Run both sides alternately and report."""
    common.set_threads(settings.threads)
    report = common.Reporter("dpo")
    report.details["environment"] = common.environment()
    result = drive(settings, profile)
    work, warm, measured = result["work"], result["warm"], result["measured"]
    trl_tokens = versus.trl_token_counts(warm, measured)
    ours_steps = warm["rlhfkit"] + measured["rlhfkit"]
    ours_tokens = [float(s["tokens"]) for s in ours_steps]
    for k, step in enumerate(measured["trl"]):
        step["tokens"] = trl_tokens[settings.warmup + k]  # TRL's own count (attention mask)
    work.update(
        rlhfkit_tokens_per_step=ours_tokens,
        trl_tokens_per_step=trl_tokens,
        token_counts_match=ours_tokens == trl_tokens,
        planned_tokens_match=ours_tokens == [float(s["tokens"]) for s in work["per_step"]],
        rlhfkit_processed_per_step=[s["processed_tokens"] for s in ours_steps],
    )
    versus.report_result(report, result, settings, summarise)
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the figures and write the JSON result."""
    versus.main(Settings, run, __doc__.splitlines()[0], "preference source (train split)", argv)


if __name__ == "__main__":
    main()
