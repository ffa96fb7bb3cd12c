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

import tempfile
import time
from dataclasses import dataclass
from typing import Any

import common
import versus


@dataclass(frozen=True)
class Settings(versus.BenchSettings):
    """What both sides are asked to do: ``batch_size`` preference pairs per optimiser step.

    ``max_len`` bounds prompt + completion; ``seed`` seeds the head's initialisation (both
    sides) and rlhfkit's batch order.
    """

    lr: float = 5e-5
    """Constant AdamW learning rate (the reward-model recipe's default for a small model)."""
    data: str = "builtin:preferences"
    """Preference source (train split), read by the reward-model recipe's ``load_groups``."""


# ---------------------------------------------------------------------------------------------
# rlhfkit side


def _rlhfkit_setup(settings: Settings, run_dir: str) -> dict[str, Any]:
    """Build the run and the groups exactly as recipes/reward_model.py does."""
    from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig
    from rlhfkit.data.collate import supports_padding_free
    from rlhfkit.models.heads import supports_prefix_trees
    from rlhfkit.recipes.reward_model import PairwiseTask, RMConfig, RMDataConfig
    from rlhfkit.training.run import build_run

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
    from rlhfkit.training.run import batch_order

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
    from rlhfkit.training.accumulate import accumulate
    from rlhfkit.training.distributed import all_reduce_sum
    from rlhfkit.training.run import batch_order

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
    pairs_tokens = sum(g.num_tokens for g in batch)  # every sequence in full
    return versus.step_answer(
        start, cpu_start, stats, stepped, parts, tokens=pairs_tokens, pairs=len(batch)
    )


def rlhfkit_worker(conn: Any, settings: Settings) -> None:
    """Worker process of the rlhfkit side (answers "step", "profile", "stop")."""

    def body() -> None:
        common.set_threads(settings.threads)
        from rlhfkit.models.heads import check_pooling_compatible, score_head

        with tempfile.TemporaryDirectory(prefix="bench-rm-rlhfkit-") as run_dir:
            run = _rlhfkit_setup(settings, run_dir)
            ctx = run["ctx"]
            sequences = [s.input_ids for g in run["train"] for s in g.sequences]
            conn.send(
                {
                    **common.model_facts(ctx.model),
                    "embedding_params": ctx.model.get_input_embeddings().weight.numel(),
                    "packing": ctx.packing,
                    "share_prefix": run["task"].share_prefix,
                    "micro_batch_tokens": run["cfg"].loop.micro_batch_tokens,
                    "group_counts": run["counts"],
                    "sequences_ending_with_pad": check_pooling_compatible(sequences, ctx.pad_id),
                    "head": score_head(ctx.model).weight.detach().float().flatten().tolist(),
                    "plan": _plan(run, settings),
                    "rss_mib": common.rss_mib(),
                }
            )
            versus.serve_steps(conn, lambda: _rlhfkit_step(run), close=ctx.logger.close)

    common.worker_main(conn, body)


# ---------------------------------------------------------------------------------------------
# TRL side


def _trl_config(settings: Settings, output_dir: str) -> Any:
    """RewardConfig for the same work: the shared arguments (TRL gets the rows already in
    rlhfkit's batch order, so its sequential sampling reproduces the recipe's shuffle)."""
    from trl import RewardConfig

    return RewardConfig(**versus.trl_args(settings, output_dir))


def trl_worker(conn: Any, settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Worker process of the TRL side (answers "step", "stop")."""

    def body() -> None:
        common.set_threads(settings.threads)
        import datasets
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from trl import RewardTrainer

        path = versus.trl_model_dir()
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(settings.seed)  # the head's initialisation, as rlhfkit's build_run
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        head = model.score.weight.detach().to(torch.bfloat16).float().flatten().tolist()

        def make_trainer(output_dir: str, callbacks: list[Any]) -> Any:
            return RewardTrainer(
                model=model,
                args=_trl_config(settings, output_dir),
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer,
                callbacks=callbacks,
            )

        def describe(trainer: Any) -> dict[str, Any]:
            prepared = trainer.train_dataset
            return {
                "embedding_params": model.get_input_embeddings().weight.numel(),
                "pad_token_id": model.config.pad_token_id,
                "head": head,
                "chosen_ids": [list(x) for x in prepared["chosen_ids"]],
                "rejected_ids": [list(x) for x in prepared["rejected_ids"]],
            }

        versus.train_trl(
            conn, model, make_trainer, describe, prefix="bench-rm-trl-", logged=("accuracy",)
        )

    common.worker_main(conn, body)


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


def summarise(
    report: common.Reporter, answers: dict[str, list[dict]], ready: dict[str, dict], peak: float
) -> None:
    """The shared figures, with ``mfu`` and ``mfu_no_embedding`` per side.

    MFU is 6 * params * tokens computed / seconds / the measured peak. Tokens computed: the
    non-padding tokens on TRL's side; on rlhfkit's side the tokens of its packed rows
    (``processed_tokens``), where a pair's shared prompt is computed once (``share_prefix``), so
    the MFU counts only arithmetic that was done, never the prompt twice.
    """

    def efficiency(side: str, steps: list[dict]) -> dict[str, float]:
        params = ready[side]["params"]
        # The embedding matrix is only a lookup in a reward model (no LM head multiplies by it).
        executed = params - ready[side]["embedding_params"]
        return {
            "mfu": common.median_mfu(params, steps, peak, "processed_tokens"),
            "mfu_no_embedding": common.median_mfu(executed, steps, peak, "processed_tokens"),
        }

    versus.summarise(report, answers, efficiency, "rss_ratio")


def drive(settings: Settings, profile: bool) -> dict[str, Any]:
    """Start both sides (TRL gets rlhfkit's pair order), warm up, alternate, stop."""
    ours = common.Worker.start("rlhfkit", rlhfkit_worker, settings)
    workers = [ours]
    try:
        ready = {"rlhfkit": ours.wait_ready()}
        rows = versus.trl_preference_rows(ready["rlhfkit"]["plan"], settings.data)
        workers.append(common.Worker.start("trl", trl_worker, settings, rows))
        ready["trl"] = workers[1].wait_ready()
        work = check_same_work(ready["rlhfkit"], ready["trl"], settings)
        work["sources"] = [[p["source"] for p in step] for step in ready["rlhfkit"].pop("plan")]
        del ready["rlhfkit"]["head"], ready["trl"]["head"]
        del ready["trl"]["chosen_ids"], ready["trl"]["rejected_ids"]
        measured = versus.measure(workers, settings, profile)
    finally:
        for worker in workers:
            worker.close()
    return {"ready": ready, "work": work, **measured}


def run(settings: Settings, profile: bool) -> common.Reporter:
    """Run both sides alternately and report."""
    common.set_threads(settings.threads)
    report = common.Reporter("rm")
    report.details["environment"] = common.environment()
    result = drive(settings, profile)
    work, warm, measured = result["work"], result["warm"], result["measured"]
    trl_tokens = versus.trl_token_counts(warm, measured)
    ours_tokens = [float(s["tokens"]) for s in warm["rlhfkit"] + measured["rlhfkit"]]
    for k, step in enumerate(measured["trl"]):
        step["tokens"] = trl_tokens[settings.warmup + k]  # TRL's own count (attention mask)
    work.update(
        rlhfkit_tokens_per_step=ours_tokens,
        trl_tokens_per_step=trl_tokens,
        token_counts_match=ours_tokens == trl_tokens,
        planned_tokens_match=ours_tokens == [float(s["tokens"]) for s in work["per_step"]],
    )
    versus.report_result(report, result, settings, summarise)
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the figures and write the JSON result."""
    versus.main(Settings, run, __doc__.splitlines()[0], "preference source (train split)", argv)


if __name__ == "__main__":
    main()
