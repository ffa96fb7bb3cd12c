"""GRPO benchmark: rlhfkit's GRPO step vs TRL's GRPOTrainer on the same work.

Both sides train the embedded SmolLM2-135M-Instruct with the GRPO preset on the same arithmetic
prompts (``builtin:arithmetic``, train split, in rlhfkit's seeded batch order): per optimiser step
2 prompts x 8 sampled completions of at most 32 new tokens at temperature 1.0 (no top-k, top-p or
min-p), rewarded by the same function (``rlhfkit.rewards.answers.exact_answer``), group z-score
advantages (unbiased std + 1e-4), the PPO-clip objective (eps 0.2) with one optimiser step per
rollout batch (so the ratio is 1), per-sequence token-mean then mean over sequences, KL to the
frozen starting model in the loss (k3, coefficient 0.04: both sides hold and run a reference model),
AdamW at the same constant learning rate, gradient clipping at 1.0, bf16 compute, one log record
per step.

- rlhfkit runs the loop body of ``rlhfkit rl``: ``policy_gradient.loop.step`` (collect:
  sample with ``HFGenerator``, decode, score; reference log-probs; advantages; one
  ``accumulate`` + ``ctx.apply_step``) -> ``step_metrics`` -> ``ctx.log_step``.
- TRL runs ``GRPOTrainer`` (``transformers`` ``generate``, no vLLM) fed the same prompts in the
  same order; a step is timed from the driver's command to that step's ``on_log``.

Each side runs in its own persistent process; the driver asks them for one optimiser step at a
time, alternating rlhfkit, TRL, rlhfkit, TRL ... after warm-up steps, and samples the machine's
bf16 matmul rate between rounds. The figure is the steps/s ratio (rlhfkit / TRL). The sides
sample different completions (different random streams), so their completion lengths, and with
them the work of a step, differ from step to step; the mean completion length of each side is
reported next to the timings. What could not be made equal (details in benchmarks/README.md):
the samples themselves; TRL keeps fp32 weights under bf16 autocast (generation and reference
included) where rlhfkit keeps bf16 weights with fp32 masters; rlhfkit's loss carries a truncated
importance weight against its sampler (about 1 on-policy), which TRL applies only with vLLM;
TRL's default KL bias correction (``use_bias_correction_kl``) is switched off to match plain k3.

    python benchmarks/bench_grpo.py [--steps 6] [--warmup 1] [--profile]
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import common
import versus


@dataclass(frozen=True)
class Settings(versus.BenchSettings):
    """What both sides are asked to do: ``batch_size`` prompts x ``num_samples`` per step.

    ``max_len`` bounds the prompt tokens (rlhfkit's ``data.max_prompt_len``; no arithmetic prompt
    comes near it; TRL 1.16 has no prompt limit).
    """

    batch_size: int = 2
    """Prompts per optimiser step."""
    num_samples: int = 8
    """Completions per prompt (the group)."""
    max_new_tokens: int = 32
    """Maximum new tokens per completion."""
    temperature: float = 1.0
    """Sampling temperature (no top-k / top-p / min-p)."""
    beta: float = 0.04
    """KL coefficient (the GRPO preset's, KL in the loss, k3)."""
    lr: float = 1e-6
    """Constant AdamW learning rate (the RL recipe's and GRPOConfig's default)."""
    data: str = "builtin:arithmetic"
    """Prompt source (train split, verifiable schema)."""

    @property
    def completions(self) -> int:
        """Completions per optimiser step."""
        return self.batch_size * self.num_samples


REWARD = "rlhfkit.rewards.answers:exact_answer"
"""The reward of both sides."""


def timed_call(fn: Any, sink: list[float]) -> Any:
    """``fn`` wrapped to append each call's wall seconds to ``sink``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - start)

    return wrapper


# ---------------------------------------------------------------------------------------------
# rlhfkit side


def _rlhfkit_setup(settings: Settings, run_dir: str) -> dict[str, Any]:
    """Config, run context and run objects exactly as ``rlhfkit rl`` builds them."""
    from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig, to_dict
    from rlhfkit.recipes import policy_gradient as pg
    from rlhfkit.recipes.policy_gradient import loop
    from rlhfkit.recipes.policy_gradient.state import LoopState
    from rlhfkit.recipes.policy_gradient.update import policy_step_loss
    from rlhfkit.rollout.hf import SamplingConfig
    from rlhfkit.training.run import build_run

    cfg = pg.PGConfig(
        model=ModelConfig(precision="bf16"),
        data=pg.PGDataConfig(train=settings.data, max_prompt_len=settings.max_len),
        algo=pg.PGAlgoConfig(preset="grpo", kl_coef=settings.beta),
        sampling=SamplingConfig(
            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
            top_p=1.0, top_k=0, min_p=0.0, num_samples=settings.num_samples,
        ),
        rewards=(REWARD,),
        optim=OptimConfig(
            lr=settings.lr, schedule="constant", warmup_ratio=0.0,
            max_grad_norm=settings.max_grad_norm,
        ),
        loop=LoopConfig(
            batch_size=settings.batch_size, max_steps=settings.total_steps, seed=settings.seed
        ),
        log=LogConfig(run_dir=run_dir, tensorboard=False, progress=False),
        sample_every=0,  # TRL's log_completions is off too
    )  # fmt: skip
    preset = pg.resolve_preset(cfg.algo)
    ctx = build_run(cfg.model, cfg.log, cfg.loop.seed, to_dict(cfg))
    state = loop.prepare(ctx, cfg, preset)
    generate_s: list[float] = []
    reference_s: list[float] = []
    state.generator.generate = timed_call(state.generator.generate, generate_s)
    loop.attach_logprobs = timed_call(loop.attach_logprobs, reference_s)  # the step's reference
    ctx.start_training(cfg.optim, settings.total_steps + 1, resume=False)  # +1: optional profile
    loop_state = LoopState()
    return {
        "ctx": ctx, "cfg": cfg, "preset": preset, "state": state, "loop_state": loop_state,
        "step_loss": policy_step_loss(state, loop_state), "generate_s": generate_s,
        "reference_s": reference_s,
    }  # fmt: skip


def _plan(run: dict[str, Any], settings: Settings) -> list[list[dict[str, Any]]]:
    """The prompts of every step in ``collect``'s order: ids, messages and answer."""
    from rlhfkit.training.run import batch_order

    ctx, cfg, prompts = run["ctx"], run["cfg"], run["state"].prompts
    size = min(cfg.loop.batch_size, len(prompts))
    plan = []
    for position in range(settings.total_steps):
        order = ctx.dist.shard(batch_order(len(prompts), size, cfg.loop.seed, position))
        plan.append(
            [
                {
                    "ids": list(prompts[i].ids),
                    "prompt": [dict(m) for m in prompts[i].fields["prompt"]],
                    "answer": prompts[i].fields["answer"],
                }
                for i in order
            ]
        )
    return plan


def _rlhfkit_step(run: dict[str, Any]) -> dict[str, Any]:
    """One optimiser step: the loop body of ``rlhfkit rl`` (``loop.step``: collect, reference,
    advantages, one accumulate + apply_step; then step_metrics, log_step; no bar, no samples,
    no saving)."""
    from rlhfkit.recipes.policy_gradient import loop
    from rlhfkit.recipes.policy_gradient.metrics import step_metrics

    ctx, cfg = run["ctx"], run["cfg"]
    gen_before, ref_before = len(run["generate_s"]), len(run["reference_s"])
    start, cpu_start = time.perf_counter(), time.process_time()
    before = ctx.step
    result = loop.step(run["state"], run["loop_state"], run["step_loss"], None, 1)
    batch, stats = result.batch, result.stats
    stepped = ctx.step > before
    metrics: dict[str, float] = {}
    if stats is not None:
        metrics = step_metrics(stats, batch)
        ctx.log_step(metrics, cfg.log.log_every)
    seconds = time.perf_counter() - start
    lengths = [len(c) for c in batch.rollout.completion_ids]
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_start,
        "loss": stats.loss if stats is not None else float("nan"),
        "stepped": stepped,
        "tokens": sum(lengths),
        "completion_lengths": lengths,
        "generate_seconds": sum(run["generate_s"][gen_before:]),
        "reference_seconds": sum(run["reference_s"][ref_before:]),
        "reward": metrics.get("rollout/reward", float("nan")),
        "kl_per_token": metrics.get("train/kl_per_token", float("nan")),
        "micro_batches": len(batch.batches),
        "positions": sum(  # model positions computed per forward (prefix trees or padded)
            b.inputs["input_ids"].numel()
            if "input_ids" in b.inputs
            else b.inputs["prompt_ids"].numel() + b.inputs["completion_ids"].numel()
            for b in batch.batches
        ),
        "prompt_ids": [list(p.ids) for p in batch.prompts],
    }


def rlhfkit_worker(conn: Any, settings: Settings) -> None:
    """Worker process of the rlhfkit side (answers "step", "profile", "stop")."""

    def body() -> None:
        common.set_threads(settings.threads)
        with tempfile.TemporaryDirectory(prefix="bench-grpo-rlhfkit-") as run_dir:
            run = _rlhfkit_setup(settings, run_dir)
            ctx = run["ctx"]
            conn.send(
                {
                    **common.model_facts(ctx.model),
                    "preset": repr(run["preset"]),
                    "needs_ref": run["state"].reference is not None,
                    "micro_batch_tokens": run["cfg"].loop.micro_batch_tokens,
                    "tis_cap": run["cfg"].algo.tis_cap,
                    "plan": _plan(run, settings),
                    "rss_mib": common.rss_mib(),
                }
            )
            versus.serve_steps(conn, lambda: _rlhfkit_step(run), close=ctx.logger.close)

    common.worker_main(conn, body)


# ---------------------------------------------------------------------------------------------
# TRL side


def exact_answer_reward(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """TRL reward function (completions and the dataset's ``answer`` column) around rlhfkit's
    ``exact_answer``; a conversational completion is a list holding the assistant message."""
    from rlhfkit.rewards.answers import exact_answer

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [exact_answer(t, a) for t, a in zip(texts, answer, strict=True)]


class _Relay:
    """The TRL worker's pipe: adds what the generation wrapper recorded to each step answer."""

    def __init__(self, conn: Any, pending: dict[str, Any]) -> None:
        self.conn, self.pending = conn, pending

    def send(self, message: dict[str, Any]) -> None:
        if "seconds" in message:  # a step answer (see versus.trl_step_callback)
            message.update(self.pending)
            self.pending.clear()
        self.conn.send(message)

    def recv(self) -> Any:
        return self.conn.recv()


def trl_args(settings: Settings, output_dir: str) -> dict[str, Any]:
    """GRPOConfig keywords: the shared ones (no ``max_length`` in GRPOConfig) plus GRPO's."""
    args = versus.trl_args(settings, output_dir)
    del args["max_length"]
    args.update(
        per_device_train_batch_size=settings.completions,  # completions per micro-batch
        generation_batch_size=settings.completions,  # one generation per optimiser step
        num_generations=settings.num_samples,
        max_completion_length=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        use_vllm=False,
        beta=settings.beta,
        loss_type="grpo",  # per-sequence token mean, then mean: seq_mean_token_mean
        scale_rewards="group",  # (r - group mean) / (group std + 1e-4): group_zscore
        epsilon=0.2,
        num_iterations=1,
        importance_sampling_level="token",
        use_bias_correction_kl=False,  # plain k3 in the loss, as the GRPO preset
        mask_truncated_completions=False,  # rlhfkit: truncation_penalty None
        shuffle_dataset=False,  # the rows come in rlhfkit's batch order
        log_completions=False,
    )
    return args


def trl_worker(conn: Any, settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Worker process of the TRL side (answers "step", "stop")."""

    def body() -> None:
        common.set_threads(settings.threads)
        os.environ["TQDM_DISABLE"] = "1"
        import datasets
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer

        path = versus.trl_model_dir()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        pending: dict[str, Any] = {}
        head_dtypes: set[str] = set()

        def record_generation(inner: Any) -> Any:
            def wrapper(prompt_ids: list[list[int]], *args: Any, **kwargs: Any) -> Any:
                hook = model.get_output_embeddings().register_forward_hook(
                    lambda mod, inp, out: head_dtypes.add(str(out.dtype))
                )
                start = time.perf_counter()
                try:
                    completion_ids, logprobs = inner(prompt_ids, *args, **kwargs)
                finally:
                    hook.remove()
                lengths = [len(c) for c in completion_ids]
                pending.update(
                    generate_seconds=time.perf_counter() - start,
                    tokens=sum(lengths),
                    completion_lengths=lengths,
                    prompt_ids=[list(p) for p in prompt_ids[:: settings.num_samples]],
                    generation_head_dtypes=sorted(head_dtypes),
                )
                return completion_ids, logprobs

            return wrapper

        def make_trainer(output_dir: str, callbacks: list[Any]) -> Any:
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=exact_answer_reward,
                args=GRPOConfig(**trl_args(settings, output_dir)),
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer,
                callbacks=callbacks,
            )
            trainer._generate_single_turn = record_generation(trainer._generate_single_turn)
            return trainer

        def describe(trainer: Any) -> dict[str, Any]:
            ref = trainer.ref_model
            return {
                "ref_model": ref is not None,
                "ref_dtype": str(next(ref.parameters()).dtype) if ref is not None else None,
                "generation_config": trainer.generation_config.to_diff_dict(),
                "steps_per_generation": trainer.args.steps_per_generation,
                "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
            }

        logged = ("reward", "kl", "completions/mean_length", "entropy", "step_time")
        versus.train_trl(
            _Relay(conn, pending), model, make_trainer, describe,
            prefix="bench-grpo-trl-", logged=logged,
        )  # fmt: skip

    common.worker_main(conn, body)


# ---------------------------------------------------------------------------------------------
# Driver


def summarise(
    report: common.Reporter, answers: dict[str, list[dict]], ready: dict[str, dict], peak: float
) -> None:
    """The shared figures (``tokens`` = completion tokens generated in the step), steps/s, the
    generation phase, and the headline steps/s ratio."""

    def efficiency(side: str, steps: list[dict]) -> dict[str, float]:
        gen = [s["generate_seconds"] for s in steps]
        lengths = [x for s in steps for x in s["completion_lengths"]]
        return {
            "steps_per_s": 1.0 / common.median([s["seconds"] for s in steps]),
            "generate_s_per_step": common.median(gen),
            "generate_tokens_per_s": common.median(
                [s["tokens"] / s["generate_seconds"] for s in steps]
            ),
            "generate_share": common.median([s["generate_seconds"] / s["seconds"] for s in steps]),
            "mean_completion_length": sum(lengths) / len(lengths),
            "mean_reward": sum(s["reward"] for s in steps) / len(steps),
        }

    versus.summarise(report, answers, efficiency, "rss_ratio")
    seconds = {side: [s["seconds"] for s in steps] for side, steps in answers.items()}
    report.figure(
        "speedup_steps_per_s", common.ratio_of_medians(seconds["trl"], seconds["rlhfkit"])
    )
    report.figure(
        "rlhfkit.reference_s_per_step",
        common.median([s["reference_seconds"] for s in answers["rlhfkit"]]),
    )


def check_same_work(plan: list[list[dict]], steps: list[dict]) -> dict[str, Any]:
    """Compare the prompt ids TRL generated from with rlhfkit's plan, step by step."""
    same = [
        [p["ids"] for p in planned] == step.get("prompt_ids")
        for planned, step in zip(plan, steps, strict=False)
    ]
    return {"same_prompt_ids": all(same) and len(same) == len(plan), "same_per_step": same}


def drive(settings: Settings, profile: bool) -> dict[str, Any]:
    """Start both sides (TRL gets rlhfkit's prompt order), alternate, stop."""
    ours = common.Worker.start("rlhfkit", rlhfkit_worker, settings)
    workers = [ours]
    try:
        ready = {"rlhfkit": ours.wait_ready()}
        plan = ready["rlhfkit"].pop("plan")
        rows = [{"prompt": p["prompt"], "answer": p["answer"]} for step in plan for p in step]
        workers.append(common.Worker.start("trl", trl_worker, settings, rows))
        ready["trl"] = workers[1].wait_ready()
        measured = versus.measure(workers, settings, profile)
    finally:
        for worker in workers:
            worker.close()
    trl_steps = measured["warm"]["trl"] + measured["measured"]["trl"]
    ours_steps = measured["warm"]["rlhfkit"] + measured["measured"]["rlhfkit"]
    work = check_same_work(plan, trl_steps)
    work.update(
        rlhfkit_same_prompt_ids=[s["prompt_ids"] for s in ours_steps]
        == [[p["ids"] for p in step] for step in plan[: len(ours_steps)]],
        prompts=[[p["prompt"][-1]["content"] for p in step] for step in plan],
        prompt_lengths=[[len(p["ids"]) for p in step] for step in plan],
        completion_tokens={"rlhfkit": [s["tokens"] for s in ours_steps],
                           "trl": [s["tokens"] for s in trl_steps]},
        trl_generation_head_dtypes=trl_steps[-1].get("generation_head_dtypes"),
    )  # fmt: skip
    for steps in (ours_steps, trl_steps):
        for s in steps:
            s.pop("prompt_ids", None)
    return {"ready": ready, "work": work, **measured}


def run(settings: Settings, profile: bool) -> common.Reporter:
    """Run both sides alternately and report."""
    common.set_threads(settings.threads)
    report = common.Reporter("grpo")
    report.details["environment"] = common.environment()
    result = drive(settings, profile)
    versus.report_result(report, result, settings, summarise, reward=REWARD)
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the figures and write the JSON result."""
    versus.main(Settings, run, __doc__.splitlines()[0], "prompt source (train split)", argv)


if __name__ == "__main__":
    main()
