"""Multi-turn GRPO benchmark: rlhfkit's tool-use GRPO step vs TRL's GRPOTrainer with tools.

Both sides train the embedded SmolLM2-135M-Instruct with the GRPO preset on the same rows in the
same order: 3-digit multiplications, each prompt SmolLM2's default system message, ``--shots``
(3) worked tool-calling exchanges (question, ``<tool_call>`` JSON, tool result, answer) and the
question. The rows are written to a JSONL file (``prompt`` messages and ``answer``) that rlhfkit
reads as its prompt source; TRL gets them in rlhfkit's seeded batch order. Per optimiser step 4
prompts x 4 episodes at temperature 1.0 (no top-k, top-p or min-p); one tool, rlhfkit's
``calculator`` (``rlhfkit.envs.builtin``, the same function on both sides), called in the Hermes
format; at most 3 model turns (2 tool-calling iterations) and at most 128 completion tokens per
episode, the model's and the tool answers' together (each turn at most 128 new tokens); reward
1.0 when the final turn ended at end-of-turn, makes no tool call and its last number is the
product (``CalculatorEnv.score``), else 0.0; tool answers take part in no loss, advantage or KL
on either side. The GRPO settings are bench_grpo.py's: group z-score advantages (unbiased std +
1e-4), PPO-clip (eps 0.2) with one optimiser step per rollout batch, per-sequence token mean,
k3 KL to the frozen starting model in the loss (0.04, a reference model on both sides), AdamW at
a constant 1e-6, clipping at 1.0, bf16 compute, one log record per step.

- rlhfkit runs the loop body of ``rlhfkit rl --env.name calculator --env.max-turns 3
  --env.max-tokens 128`` (its config made as the command makes it: ``with_env_defaults``,
  ``check_before_loading``, ``prepare``): ``policy_gradient.loop.step`` (collect: the episodes
  of ``run_episodes``, the ``HFGenerator`` sampling every live episode's next turn in one batch
  and ``CalculatorEnv`` running the calls between turns; reference log-probs; advantages; one
  ``accumulate`` + ``ctx.apply_step``) -> ``step_metrics`` -> ``ctx.log_step``.
- TRL runs ``GRPOTrainer(tools=[calculator])`` with ``max_tool_calling_iterations=2`` and
  ``max_completion_length=128`` (``transformers`` ``generate``, no vLLM); a step is timed from
  the driver's command to that step's ``on_log``.

Each side runs in its own persistent process; the driver asks them for one optimiser step at a
time, alternating rlhfkit, TRL, rlhfkit, TRL ... after warm-up steps, and samples the machine's
bf16 matmul rate between rounds. The figure is the steps/s ratio (rlhfkit / TRL). Reported per
side: the median s/step, model tokens and tool tokens per step, tool calls and tool answers per
completion, the mean prompt tokens, the generation time and the peak RSS of its worker.

What could not be made equal (besides bench_grpo.py's: the samples themselves, fp32 weights
under bf16 autocast in TRL vs bf16 weights with fp32 masters in rlhfkit, rlhfkit's truncated
importance weight, TRL's KL bias correction switched off):

- The chat template and the way the tools are shown. TRL 1.16 accepts ``tools`` only with a
  template that renders a whole tool conversation and whose replies it can parse; SmolLM2's
  ChatML template ignores ``tools``, ``tool_calls`` and tool messages, so TRL runs on its own
  Qwen2.5 template (``trl.chat_template_utils.qwen2_5_chat_template``: the same ChatML markers,
  the tool schemas in a "# Tools" block after the system message, tool results as
  ``<tool_response>`` blocks in a user turn). rlhfkit keeps the model's template and puts the
  Hermes call format's system prompt (the tools and how to call them) before the row's system
  message; tool results are ``tool`` turns. The prompts therefore differ in length (the mean
  prompt tokens of each side are reported) and so do the tool answers inside the 128-token
  budget (tool tokens per answer reported). The worked examples' assistant turns are the same
  text on both sides: the ``<tool_call>`` JSON as content, which the Qwen2.5 template renders
  exactly as it renders structured ``tool_calls``.
- The turns of an episode. TRL samples every later turn up to ``max_completion_length`` new
  tokens and cuts it afterwards; rlhfkit samples at most the largest remaining budget of the live
  episodes. A third turn that makes a call: rlhfkit runs it (counted in its ``env/calls``) and
  ends the episode, TRL does not run it; TRL's ``tools/call_frequency`` counts the calls it ran,
  those whose results it then dropped as overlong included. The figure computed the same way on
  both sides is ``tool_answers_per_completion``: the runs of tool tokens inside the completions.
- Memory. TRL with the whole generation batch (16 completions of about 710 positions) as one
  micro-batch peaks at 20-22 GiB RSS on its own, which with rlhfkit's worker beside it does not
  fit the 24 GiB of the machine the figures come from. TRL therefore trains in micro-batches of
  ``trl_micro_batch`` (4) completions (gradient accumulation 4, still one generation of 16 per
  optimiser step: the same optimiser batch and loss), at most about 2.9k positions each, below
  rlhfkit's own micro-batch budget (``loop.micro_batch_tokens`` 4096, prefix trees). On prefix
  trees rlhfkit computes the worked examples, which every prompt shares, once per micro-batch
  (exact; its step's ``positions`` are recorded), where TRL's forward passes hold each
  completion's whole prompt.

Worked examples: asked zero-shot, SmolLM2-135M-Instruct never writes a ``<tool_call>`` (0 of 48
completions at temperature 1.0), so no tool would run; with 3 worked exchanges most completions
call the tool. Budget: a call (``<tool_call>`` JSON + ``<|im_end|>``) is about 37 tokens and
TRL's tool answer about 28, so at 64 completion tokens TRL drops most tool results as overlong
and ends those samples after the call; 128 leaves room for the answer turn.

    python benchmarks/bench_tools.py [--steps 4] [--warmup 1] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import bench_grpo
import common
import versus

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""SmolLM2's default system message (its template adds it when a prompt has none; the Qwen2.5
template would put Qwen's in)."""

QUESTION = "What is {a} * {b}? Use the calculator tool, then answer with just the number."

SHOTS = ((218, 347), (503, 761), (984, 129), (432, 615))
"""The factors of the worked examples (the first ``shots`` are used)."""


@dataclass(frozen=True)
class Settings(bench_grpo.Settings):
    """bench_grpo.py's settings with this benchmark's batch and limits.

    ``max_len`` bounds rlhfkit's prompt tokens (``data.max_prompt_len``, cut from the left); no
    prompt here comes near it (checked), TRL 1.16 has no prompt limit.
    """

    steps: int = 4
    warmup: int = 1
    batch_size: int = 4
    """Prompts per optimiser step."""
    num_samples: int = 4
    """Episodes per prompt (the group)."""
    max_new_tokens: int = 128
    """Tokens per episode after the prompt, the model's and the tool answers' (rlhfkit's
    ``env.max_tokens``, TRL's ``max_completion_length``); also each turn's new-token limit."""
    max_turns: int = 3
    """Model turns per episode (rlhfkit's ``env.max_turns``; TRL's
    ``max_tool_calling_iterations`` is one less)."""
    shots: int = 3
    """Worked tool-calling exchanges at the start of every prompt."""
    trl_micro_batch: int = 4
    """Completions per TRL micro-batch (gradient accumulation makes up the optimiser batch)."""
    max_len: int = 1024
    data: str = "generated: 3-digit multiplication with worked tool calls"


# ---------------------------------------------------------------------------------------------
# The rows (both sides)


def worked_example(a: int, b: int) -> list[dict[str, Any]]:
    """One worked exchange: question, tool call (Hermes text), tool result, answer."""
    from rlhfkit.envs.calls import ToolCall, get_format

    call = ToolCall("calculator", {"expression": f"{a} * {b}"})
    return [
        {"role": "user", "content": QUESTION.format(a=a, b=b)},
        {"role": "assistant", "content": get_format("hermes").render([call])},
        {"role": "tool", "name": "calculator", "content": str(a * b)},
        {"role": "assistant", "content": str(a * b)},
    ]


def make_rows(count: int, seed: int, shots: int) -> list[dict[str, Any]]:
    """``count`` rows (``prompt`` messages, ``answer``) of 3-digit multiplications, each prompt
    the system message, ``shots`` worked examples and the question."""
    if shots > len(SHOTS):
        raise ValueError(f"at most {len(SHOTS)} worked examples")
    examples = [m for a, b in SHOTS[:shots] for m in worked_example(a, b)]
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        prompt = [
            {"role": "system", "content": SYSTEM},
            *examples,
            {"role": "user", "content": QUESTION.format(a=a, b=b)},
        ]
        rows.append({"prompt": prompt, "answer": str(a * b)})
    return rows


def tool_answers(mask: list[Any]) -> int:
    """Runs of tool tokens (mask False / 0) in a completion: the tool answers it holds."""
    runs, previous = 0, True
    for m in mask:
        runs += bool(previous) and not m
        previous = m
    return runs


# ---------------------------------------------------------------------------------------------
# rlhfkit side


def _rlhfkit_setup(settings: Settings, run_dir: str, data: str) -> dict[str, Any]:
    """Config, run context and run objects exactly as ``rlhfkit rl --env.name calculator``
    builds them (``loop.main`` up to the training loop)."""
    from rlhfkit.config import EnvConfig, LogConfig, LoopConfig, ModelConfig, OptimConfig, to_dict
    from rlhfkit.recipes import policy_gradient as pg
    from rlhfkit.recipes.policy_gradient import collect, loop
    from rlhfkit.recipes.policy_gradient.state import LoopState
    from rlhfkit.recipes.policy_gradient.update import policy_step_loss
    from rlhfkit.rollout.hf import SamplingConfig
    from rlhfkit.training.run import build_run

    cfg = pg.PGConfig(
        model=ModelConfig(precision="bf16"),
        data=pg.PGDataConfig(train=data, max_prompt_len=settings.max_len),
        algo=pg.PGAlgoConfig(preset="grpo", kl_coef=settings.beta),
        env=EnvConfig(
            name="calculator", call_format="hermes", max_turns=settings.max_turns,
            max_tokens=settings.max_new_tokens,
        ),
        sampling=SamplingConfig(
            max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
            top_p=1.0, top_k=0, min_p=0.0, num_samples=settings.num_samples,
        ),
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
    cfg = loop.with_env_defaults(cfg)  # the environment's reward only (no default reward)
    preset = loop.check_before_loading(cfg)
    ctx = build_run(cfg.model, cfg.log, cfg.loop.seed, to_dict(cfg), batch_size=cfg.loop.batch_size)
    state = loop.prepare(ctx, cfg, preset)
    turns: list[dict[str, Any]] = []
    episodes_s: list[float] = []
    reference_s: list[float] = []
    state.generator.generate = _record_turns(state.generator.generate, turns)
    collect.run_episodes = bench_grpo.timed_call(collect.run_episodes, episodes_s)
    loop.attach_logprobs = bench_grpo.timed_call(loop.attach_logprobs, reference_s)
    ctx.start_training(cfg.optim, settings.total_steps + 1, resume=False)  # +1: optional profile
    loop_state = LoopState()
    return {
        "ctx": ctx, "cfg": cfg, "preset": preset, "state": state, "loop_state": loop_state,
        "step_loss": policy_step_loss(state, loop_state), "turns": turns,
        "episodes_s": episodes_s, "reference_s": reference_s,
    }  # fmt: skip


def _record_turns(generate: Any, turns: list[dict[str, Any]]) -> Any:
    """``generate`` wrapped to record each call (one per turn round) in ``turns``."""

    def wrapper(contexts: Any, sampling: Any) -> Any:
        start = time.perf_counter()
        out = generate(contexts, sampling)
        turns.append(
            {
                "sequences": len(out.completion_ids),
                "max_input_len": max(len(c) for c in contexts),
                "new_tokens": sum(len(c) for c in out.completion_ids),
                "max_new_tokens": sampling.max_new_tokens,
                "seconds": time.perf_counter() - start,
            }
        )
        return out

    return wrapper


def _rlhfkit_step(run: dict[str, Any]) -> dict[str, Any]:
    """One optimiser step: the loop body of ``rlhfkit rl`` (``loop.step``: collect with the
    episodes, reference, advantages, one accumulate + apply_step; then step_metrics, log_step;
    no bar, no samples, no saving)."""
    from rlhfkit.recipes.policy_gradient import loop
    from rlhfkit.recipes.policy_gradient.metrics import step_metrics

    ctx, cfg = run["ctx"], run["cfg"]
    turns_before = len(run["turns"])
    ep_before, ref_before = len(run["episodes_s"]), len(run["reference_s"])
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
    rollout = batch.rollout
    masks = rollout.masks or [[True] * len(c) for c in rollout.completion_ids]
    turns = run["turns"][turns_before:]
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_start,
        "loss": stats.loss if stats is not None else float("nan"),
        "stepped": stepped,
        "tokens": sum(sum(m) for m in masks),  # the model's tokens
        "model_tokens": sum(sum(m) for m in masks),
        "tool_tokens": sum(len(m) - sum(m) for m in masks),
        "completion_lengths": [len(c) for c in rollout.completion_ids],
        "tool_answers": [tool_answers(m) for m in masks],
        "tool_calls_per_completion": metrics.get("env/calls", float("nan")),
        "prompt_lengths": [len(p.ids) for p in batch.prompts],
        "generate_seconds": sum(t["seconds"] for t in turns),
        "turns": turns,
        "episodes_seconds": sum(run["episodes_s"][ep_before:]),
        "reference_seconds": sum(run["reference_s"][ref_before:]),
        "reward": metrics.get("rollout/reward", float("nan")),
        "kl_per_token": metrics.get("train/kl_per_token", float("nan")),
        "finish_reasons": list(rollout.finish_reasons),
        "env": {k: v for k, v in metrics.items() if k.startswith("env/")},
        "micro_batches": len(batch.batches),
        "positions": sum(  # model positions computed per forward (prefix trees or padded)
            b.inputs["input_ids"].numel()
            if "input_ids" in b.inputs
            else b.inputs["prompt_ids"].numel() + b.inputs["completion_ids"].numel()
            for b in batch.batches
        ),
        "prompt_ids": [list(p.ids) for p in batch.prompts],
    }


def rlhfkit_worker(conn: Any, settings: Settings, data: str) -> None:
    """Worker process of the rlhfkit side (answers "step", "profile", "stop")."""

    def body() -> None:
        common.set_threads(settings.threads)
        with tempfile.TemporaryDirectory(prefix="bench-tools-rlhfkit-") as run_dir:
            run = _rlhfkit_setup(settings, run_dir, data)
            ctx, cfg = run["ctx"], run["cfg"]
            conn.send(
                {
                    **common.model_facts(ctx.model),
                    "preset": repr(run["preset"]),
                    "needs_ref": run["state"].reference is not None,
                    "rewards": list(cfg.rewards),
                    "env": asdict(cfg.env),
                    "sampling": asdict(cfg.sampling),
                    "micro_batch_tokens": cfg.loop.micro_batch_tokens,
                    "prefix_trees": run["state"].trees,
                    "tis_cap": cfg.algo.tis_cap,
                    "plan": bench_grpo._plan(run, settings),
                    "rss_mib": common.rss_mib(),
                }
            )
            versus.serve_steps(conn, lambda: _rlhfkit_step(run), close=ctx.logger.close)

    common.worker_main(conn, body)


# ---------------------------------------------------------------------------------------------
# TRL side


def tool_chat_template() -> str:
    """The ChatML template with tool support that TRL recognises (its Qwen2.5 template)."""
    from trl.chat_template_utils import qwen2_5_chat_template

    return qwen2_5_chat_template


def trl_args(settings: Settings, output_dir: str) -> dict[str, Any]:
    """bench_grpo.py's GRPOConfig keywords, the tool-calling limit and the micro-batches."""
    if settings.completions % settings.trl_micro_batch:
        raise ValueError("trl_micro_batch must divide batch_size * num_samples")
    args = bench_grpo.trl_args(settings, output_dir)
    args.update(
        max_tool_calling_iterations=settings.max_turns - 1,
        per_device_train_batch_size=settings.trl_micro_batch,
        gradient_accumulation_steps=settings.completions // settings.trl_micro_batch,
        generation_batch_size=settings.completions,  # one generation per optimiser step
    )
    return args


def calculator_reward_fn(eos: int) -> Any:
    """TRL reward function giving rlhfkit's episode reward (``eos``: the end-of-turn id)."""
    from rlhfkit.envs.builtin import CalculatorEnv

    env = CalculatorEnv()

    def calculator_reward(
        completions: list[Any], answer: list[str], completion_ids: list[list[int]], **kw: Any
    ) -> list[float]:
        """1.0 when the final turn ended at end-of-turn, makes no call (well-formed or not) and
        its last number is the answer (``CalculatorEnv.score``), else 0.0."""
        rewards = []
        for completion, expected, ids in zip(completions, answer, completion_ids, strict=True):
            last = completion[-1] if completion else {}
            if last.get("role") != "assistant" or last.get("tool_calls") or ids[-1:] != [eos]:
                rewards.append(0.0)
                continue
            parsed = env.format.parse(last.get("content") or "")
            final = not parsed.calls and not parsed.errors
            rewards.append(env.score(parsed.content, {"answer": expected}) if final else 0.0)
        return rewards

    return calculator_reward


def record_generation(inner: Any, pending: dict[str, Any], tokenizer: Any, group: int) -> Any:
    """TRL's ``_generate_single_turn`` wrapped to add each call (one per turn) to ``pending``;
    the first call's prompts (each ``group`` times) are the step's."""

    def wrapper(prompt_ids: list[list[int]], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        completion_ids, logprobs = inner(prompt_ids, *args, **kwargs)
        seconds = time.perf_counter() - start
        turns = pending.setdefault("turns", [])
        if not turns:
            firsts = prompt_ids[::group]
            pending["prompt_lengths"] = [len(p) for p in firsts]
            pending["prompt_tails"] = [tokenizer.decode(p[-48:]) for p in firsts]
        turns.append(
            {
                "sequences": len(prompt_ids),
                "max_input_len": max(len(p) for p in prompt_ids),
                "new_tokens": sum(len(c) for c in completion_ids),
                "seconds": seconds,
            }
        )
        pending["generate_seconds"] = pending.get("generate_seconds", 0.0) + seconds
        return completion_ids, logprobs

    return wrapper


def record_tool_loop(inner: Any, pending: dict[str, Any], eos: int) -> Any:
    """TRL's ``_tool_call_loop`` wrapped to time it (tool calls, suffix tokenising, later turns'
    generation) and count the model's and the tools' tokens of the finished completions."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = inner(*args, **kwargs)
        tool_mask, completions, completion_ids = result[0], result[1], result[2]
        model_tokens = sum(sum(m) for m in tool_mask)
        pending.update(
            tool_loop_seconds=time.perf_counter() - start,
            tokens=model_tokens,
            model_tokens=model_tokens,
            tool_tokens=sum(len(m) - sum(m) for m in tool_mask),
            completion_lengths=[len(c) for c in completion_ids],  # tool tokens included
            tool_answers=[tool_answers(m) for m in tool_mask],
            finished=[ids[-1:] == [eos] for ids in completion_ids],
            messages_per_completion=[len(c) for c in completions],
        )
        return result

    return wrapper


def describe_trl(trainer: Any) -> dict[str, Any]:
    """The TRL side's facts for the ready message."""
    args = trainer.args
    return {
        "ref_model": trainer.ref_model is not None,
        "generation_config": trainer.generation_config.to_diff_dict(),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "steps_per_generation": args.steps_per_generation,
        "max_tool_calling_iterations": trainer.max_tool_calling_iterations,
        "max_completion_length": getattr(trainer, "max_completion_length", None),
        "response_template": getattr(trainer.processing_class, "response_template", None)
        is not None,
    }


def trl_worker(conn: Any, settings: Settings, rows: list[dict[str, Any]]) -> None:
    """Worker process of the TRL side (answers "step", "stop")."""

    def body() -> None:
        common.set_threads(settings.threads)
        os.environ["TQDM_DISABLE"] = "1"
        import datasets
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer

        from rlhfkit.envs.builtin import calculator

        path = versus.trl_model_dir()
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.chat_template = tool_chat_template()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        pending: dict[str, Any] = {}
        eos = tokenizer.eos_token_id

        def make_trainer(output_dir: str, callbacks: list[Any]) -> Any:
            trainer = GRPOTrainer(
                model=model,
                reward_funcs=calculator_reward_fn(eos),
                args=GRPOConfig(**trl_args(settings, output_dir)),
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer,
                callbacks=callbacks,
                tools=[calculator],
            )
            trainer._generate_single_turn = record_generation(
                trainer._generate_single_turn, pending, tokenizer, settings.num_samples
            )
            trainer._tool_call_loop = record_tool_loop(trainer._tool_call_loop, pending, eos)
            return trainer

        logged = (
            "reward", "kl", "completions/mean_length", "completions/clipped_ratio",
            "tools/call_frequency", "tools/failure_frequency", "step_time",
        )  # fmt: skip
        versus.train_trl(
            bench_grpo._Relay(conn, pending), model, make_trainer, describe_trl,
            prefix="bench-tools-trl-", logged=logged,
        )  # fmt: skip

    common.worker_main(conn, body)


# ---------------------------------------------------------------------------------------------
# Driver


def summarise(
    report: common.Reporter, answers: dict[str, list[dict]], ready: dict[str, dict], peak: float
) -> None:
    """The shared figures (``tokens`` = the model's tokens of the step), the multi-turn figures
    of each side and the headline steps/s ratio."""

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    def efficiency(side: str, steps: list[dict]) -> dict[str, float]:
        answers_ = [x for s in steps for x in s["tool_answers"]]
        tool_tokens = sum(s["tool_tokens"] for s in steps)
        calls = [s.get("tool_calls_per_completion", s.get("tools/call_frequency")) for s in steps]
        return {
            "steps_per_s": 1.0 / common.median([s["seconds"] for s in steps]),
            "generate_s_per_step": common.median([s["generate_seconds"] for s in steps]),
            "generate_share": common.median([s["generate_seconds"] / s["seconds"] for s in steps]),
            "model_tokens_per_step": mean([s["model_tokens"] for s in steps]),
            "tool_tokens_per_step": mean([s["tool_tokens"] for s in steps]),
            "tool_calls_per_completion": mean(calls),
            "tool_answers_per_completion": mean(answers_),
            "tool_tokens_per_answer": tool_tokens / max(1, sum(answers_)),
            "later_turn_sequences_per_step": mean(
                [sum(t["sequences"] for t in s["turns"][1:]) for s in steps]
            ),
            "mean_prompt_tokens": mean([x for s in steps for x in s["prompt_lengths"]]),
            "mean_reward": mean([s["reward"] for s in steps]),
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


def check_same_work(plan: list[list[dict]], ours: list[dict], trl: list[dict]) -> dict[str, Any]:
    """Did both sides sample from the planned rows, step by step? rlhfkit: the same prompt ids;
    TRL (another template): each first-turn prompt ends with the planned question."""
    ours_same = [
        [p["ids"] for p in planned] == step["prompt_ids"]
        for planned, step in zip(plan, ours, strict=False)
    ]
    trl_same = [
        len(step.get("prompt_tails", [])) == len(planned)
        and all(
            p["prompt"][-1]["content"] in tail
            for p, tail in zip(planned, step["prompt_tails"], strict=False)
        )
        for planned, step in zip(plan, trl, strict=False)
    ]
    return {
        "rlhfkit_same_prompt_ids": all(ours_same) and len(ours_same) == len(ours),
        "trl_same_questions": all(trl_same) and len(trl_same) == len(trl),
        "rlhfkit_same_per_step": ours_same,
        "trl_same_per_step": trl_same,
    }


def drive(settings: Settings, profile: bool) -> dict[str, Any]:
    """Write the rows, start both sides (TRL gets rlhfkit's prompt order), alternate, stop."""
    rows = make_rows(settings.batch_size * settings.total_steps, settings.seed, settings.shots)
    with tempfile.TemporaryDirectory(prefix="bench-tools-") as tmp:
        data = str(Path(tmp) / "calculator_shots.jsonl")
        Path(data).write_text("".join(json.dumps(row) + "\n" for row in rows))
        ours = common.Worker.start("rlhfkit", rlhfkit_worker, settings, data)
        workers = [ours]
        try:
            ready = {"rlhfkit": ours.wait_ready()}
            plan = ready["rlhfkit"].pop("plan")
            trl_rows = [{"prompt": p["prompt"], "answer": p["answer"]} for s in plan for p in s]
            workers.append(common.Worker.start("trl", trl_worker, settings, trl_rows))
            ready["trl"] = workers[1].wait_ready()
            measured = versus.measure(workers, settings, profile)
        finally:
            for worker in workers:
                worker.close()
    ours_steps = measured["warm"]["rlhfkit"] + measured["measured"]["rlhfkit"]
    trl_steps = measured["warm"]["trl"] + measured["measured"]["trl"]
    work = check_same_work(plan, ours_steps, trl_steps)
    longest = max(len(p["ids"]) for step in plan for p in step)
    work.update(
        rows_file="calculator_shots.jsonl (temporary; the rows are under 'rows')",
        rows=rows,
        prompts=[[p["prompt"][-1]["content"] for p in step] for step in plan],
        rlhfkit_prompt_lengths=[[len(p["ids"]) for p in step] for step in plan],
        rlhfkit_prompt_cut=longest >= settings.max_len,
        model_tokens={"rlhfkit": [s["model_tokens"] for s in ours_steps],
                      "trl": [s["model_tokens"] for s in trl_steps]},
        tool_tokens={"rlhfkit": [s["tool_tokens"] for s in ours_steps],
                     "trl": [s["tool_tokens"] for s in trl_steps]},
    )  # fmt: skip
    if work["rlhfkit_prompt_cut"]:
        print(f"warning: a prompt reached --max-len {settings.max_len}; rlhfkit cut its start")
    for steps in (ours_steps, trl_steps):
        for s in steps:
            s.pop("prompt_ids", None)
    return {"ready": ready, "work": work, **measured}


def print_steps(result: dict[str, Any], settings: Settings) -> None:
    """One line per step and side: time, generation by turn, tokens, tool use, reward."""
    for phase in ("warm", "measured"):
        for side in ("rlhfkit", "trl"):
            for i, s in enumerate(result[phase][side]):
                turns = " + ".join(
                    f"{t['sequences']}x<={t['max_input_len']} {t['seconds']:.1f}s"
                    for t in s.get("turns", [])
                )
                answers = s.get("tool_answers", [])
                print(
                    f"{side} {phase} step {i}: {s['seconds']:.1f} s, generate "
                    f"{s.get('generate_seconds', float('nan')):.1f} s [{turns}], model tokens "
                    f"{s.get('model_tokens')}, tool tokens {s.get('tool_tokens')}, tool answers/"
                    f"completion {sum(answers) / max(1, len(answers)):.2f}, reward "
                    f"{s['reward']:.3f}, peak RSS {s['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )


def run(settings: Settings, profile: bool) -> common.Reporter:
    """Run both sides alternately and report."""
    common.set_threads(settings.threads)
    report = common.Reporter("tools")
    report.details["environment"] = common.environment()
    print(f"cpu: {report.details['environment']['cpu']}", flush=True)
    result = drive(settings, profile)
    print_steps(result, settings)
    versus.report_result(
        report, result, settings, summarise, reward="rlhfkit.envs.builtin:CalculatorEnv.score"
    )
    return report


def parse_settings(argv: list[str] | None = None) -> tuple[Settings, bool]:
    """Command line -> (settings, profile one extra rlhfkit step?)."""
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=defaults.steps, help="measured steps per side")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="warm-up steps")
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--max-new-tokens", type=int, default=defaults.max_new_tokens,
        help="tokens per episode after the prompt, tool answers included (and per turn)",
    )  # fmt: skip
    parser.add_argument("--max-turns", type=int, default=defaults.max_turns)
    parser.add_argument("--shots", type=int, default=defaults.shots, help="worked examples")
    parser.add_argument("--trl-micro-batch", type=int, default=defaults.trl_micro_batch)
    parser.add_argument("--max-len", type=int, default=defaults.max_len)
    parser.add_argument(
        "--profile", action="store_true", help="profile one extra rlhfkit step (not measured)"
    )
    args = vars(parser.parse_args(argv))
    profile = args.pop("profile")
    return Settings(**args), profile


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the figures and write the JSON result."""
    settings, profile = parse_settings(argv)
    report = run(settings, profile)
    if report.details.get("profile"):
        print(report.details["profile"])
    print(f"wrote {report.write()}")


if __name__ == "__main__":
    main()
