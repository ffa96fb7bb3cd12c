"""Distillation benchmark: rlhfkit's distillation step vs TRL's GKDTrainer on the same work.

Both sides distil a teacher into the embedded SmolLM2-135M-Instruct on the same chat rows in
the same order (16 rows per optimiser step, one micro-batch on TRL): off-policy batches only
(GKD's lambda = 0: the rows' own assistant replies, so both sides see the same tokens), the
generalised JSD with beta = 0.5 at temperature 1 on the assistant tokens (content plus
end-of-turn token), bf16 compute, AdamW at the same constant learning rate, clipping at 1.0. The
teacher is the embedded model too, loaded separately and frozen (the step's work does not depend
on its weights). Each side runs in its own persistent process; the driver alternates one
optimiser step of each after warm-up steps. The headline is training tokens/s (non-padding
tokens of the step); peak memory is reported beside it.

- rlhfkit runs the loop body of ``rlhfkit distill`` on the rendered rows (the SFT recipe's
  ``micro_batches`` -> ``accumulate`` with the head-fused chunked divergence -> ``apply_step``,
  through ``bench_sft``'s worker).
- TRL runs ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0``, ``beta=0.5``,
  ``temperature=1``, ``seq_kd=False`` (full logits of both models, padded batch).

    python benchmarks/bench_distill.py [--steps 6] [--warmup 1] [--profile]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import bench_sft
import common
import versus
from bench_sft import TEMPLATE, load_conversations


@dataclass(frozen=True)
class Settings(versus.BenchSettings):
    """What both sides are asked to do: ``batch_size`` rows per optimiser step."""

    lr: float = 1e-5
    """Constant AdamW learning rate."""
    data: str = "builtin:instructions"
    """Row source (rlhfkit.data.sources.load_rows)."""
    beta: float = 0.5
    """The generalised JSD's interpolation."""


# ---------------------------------------------------------------------------------------------
# rlhfkit side


def _rlhfkit_setup(settings: Settings, conversations: list, run_dir: str) -> dict[str, Any]:
    """``bench_sft``'s run (the same rendered rows and training state) with the frozen teacher
    and the distillation step loss of recipes/distill.py."""
    from rlhfkit.losses.distill import DistillLoss
    from rlhfkit.models.load import load_model
    from rlhfkit.recipes.distill import make_step_loss

    run = bench_sft._rlhfkit_setup(settings, conversations, run_dir)
    ctx = run["ctx"]
    teacher = ctx.place.frozen(
        load_model("smollm2-135m-instruct", dtype=ctx.precision.compute).requires_grad_(False)
    )
    loss = DistillLoss(beta=settings.beta)
    run["step_loss"] = make_step_loss(ctx.model, teacher, loss, vocab=len(ctx.tokenizer))
    return run


def rlhfkit_worker(conn: Any, settings: Settings, conversations: list) -> None:
    """Worker process of the rlhfkit side: ``bench_sft``'s, whose step (the loop body shared by
    ``rlhfkit sft`` and ``rlhfkit distill``) runs the distillation step loss built here."""
    bench_sft.rlhfkit_worker(conn, settings, conversations, _rlhfkit_setup, "bench-distill-")


# ---------------------------------------------------------------------------------------------
# TRL side


def trl_worker(conn: Any, settings: Settings, conversations: list) -> None:
    """Worker process of the TRL side (answers "step", "stop")."""

    def body() -> None:
        common.set_threads(settings.threads)
        os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
        import datasets
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        path = versus.trl_model_dir()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
        rows = datasets.Dataset.from_list([{"messages": m} for m in conversations])

        def make_trainer(output_dir: str, callbacks: list[Any]) -> Any:
            args = GKDConfig(
                **versus.trl_args(settings, output_dir), lmbda=0.0, beta=settings.beta,
                temperature=1.0, seq_kd=False, chat_template_path=str(TEMPLATE),
            )  # fmt: skip
            return GKDTrainer(
                model=model, teacher_model=teacher, args=args, train_dataset=rows,
                processing_class=tokenizer, callbacks=callbacks,
            )  # fmt: skip

        def describe(trainer: Any) -> dict[str, Any]:
            return {"lmbda": trainer.lmbda, "beta": trainer.beta, "seq_kd": trainer.seq_kd}

        versus.train_trl(conn, model, make_trainer, describe, prefix="bench-distill-trl-")

    common.worker_main(conn, body)


# ---------------------------------------------------------------------------------------------
# Driver


def summarise(
    report: common.Reporter, answers: dict[str, list[dict]], ready: dict[str, dict], peak: float
) -> None:
    """The shared figures (tokens/s, peak memory and their ratios)."""

    def efficiency(side: str, steps: list[dict]) -> dict[str, float]:
        return {"mfu": common.median_mfu(ready[side]["params"], steps, peak)}

    versus.summarise(report, answers, efficiency, "memory_ratio")


def run(settings: Settings, profile: bool) -> common.Reporter:
    """Start both workers, alternate them, and report."""
    common.set_threads(settings.threads)
    report = common.Reporter("distill")
    report.details["environment"] = common.environment()
    conversations, data_name = load_conversations(
        settings.data, settings.total_steps * settings.batch_size
    )
    workers = [
        common.Worker.start("rlhfkit", rlhfkit_worker, settings, conversations),
        common.Worker.start("trl", trl_worker, settings, conversations),
    ]
    try:
        ready = {w.name: w.wait_ready() for w in workers}
        ids = ready["rlhfkit"].pop("input_ids")
        size = settings.batch_size
        per_step = [
            sum(map(len, ids[k * size : (k + 1) * size])) for k in range(settings.total_steps)
        ]
        result = {"ready": ready, **versus.measure(workers, settings, profile)}
    finally:
        for worker in workers:
            worker.close()
    for steps in result["measured"].values():  # the same non-padding tokens on both sides
        for k, step in enumerate(steps):
            step["tokens"] = per_step[settings.warmup + k]
    result["work"] = {"tokens_per_step": per_step}
    versus.report_result(report, result, settings, summarise, data=data_name)
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the figures and write the JSON result."""
    versus.main(Settings, run, __doc__.splitlines()[0], "row source for load_rows", argv)


if __name__ == "__main__":
    main()
