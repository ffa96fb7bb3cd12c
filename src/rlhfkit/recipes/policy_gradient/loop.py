"""The policy-gradient loop: one step as in the algorithm box, and the run around it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rlhfkit.config import to_dict
from rlhfkit.envs.base import env_class, env_factory
from rlhfkit.errors import ConfigError
from rlhfkit.models.heads import supports_prefix_trees
from rlhfkit.models.load import load_tokenizer
from rlhfkit.ops.kl import adaptive_kl_coef
from rlhfkit.recipes.distill import check_tokenizers, load_teacher
from rlhfkit.recipes.engine import vllm_policy
from rlhfkit.recipes.policy_gradient.advantages import assign_advantages, attach_logprobs
from rlhfkit.recipes.policy_gradient.asynchronous import RolloutProducer
from rlhfkit.recipes.policy_gradient.collect import assemble, collect, load_prompts
from rlhfkit.recipes.policy_gradient.config import (
    DEFAULT_REWARDS,
    PGConfig,
    PGDataConfig,
    group_size_problem,
    resolve_preset,
    total_steps,
)
from rlhfkit.recipes.policy_gradient.critic import Critic
from rlhfkit.recipes.policy_gradient.metrics import step_metrics, write_samples
from rlhfkit.recipes.policy_gradient.presets import PGPreset
from rlhfkit.recipes.policy_gradient.self_distill import SelfTeacher
from rlhfkit.recipes.policy_gradient.state import LoopState, PGRun, RolloutBatch, StepLoss
from rlhfkit.recipes.policy_gradient.update import aggregation, optimise, policy_step_loss
from rlhfkit.rewards import load_reward_fn, reward_models
from rlhfkit.rollout.engine import LocalEngine
from rlhfkit.rollout.multiturn import TurnLimits, env_prompt_rows
from rlhfkit.rollout.sampler import HFGenerator
from rlhfkit.rollout.vllm_server import require_engine
from rlhfkit.training.accumulate import StepStats
from rlhfkit.training.run import RunContext, build_run, finish_run

LOOP_STATE = "loop"
"""Key of the loop state in a checkpoint's resume state."""


@dataclass
class StepResult:
    """What one step did.

    Attributes:
        batch: The rollout batch.
        stats: The last optimiser step's statistics (None when every step was skipped as
            non-finite).
        kl_coef: The KL coefficient the step used.
    """

    batch: RolloutBatch
    stats: StepStats | None
    kl_coef: float


def step(
    run: PGRun,
    state: LoopState,
    loss: StepLoss,
    critic: Critic | None,
    max_steps: int,
    producer: RolloutProducer | None = None,
) -> StepResult:
    """One policy-gradient step on the next prompts (GRPO, PPO and every other preset).

    Args:
        run: The run's objects (policy, sampler, rewards, reference, preset row).
        state: The loop state; the prompt counter, EMA baseline and KL coefficient move.
        loss: The micro-batch loss (the policy loss, plus the value loss with a critic).
        critic: PPO's value model, or None.
        max_steps: Most optimiser steps to take on this batch.
        producer: Asynchronous RL: the engine's batches drawn ahead (None: sample now).
    """
    # each rank samples and scores its share of the prompts (reward models whole meanwhile)
    with run.ctx.gathered(*reward_models(run.reward_fns)):
        # 1-4. the next prompts, G completions each, their rewards; DAPO drops flat groups
        batch = collect(run, state) if producer is None else from_engine(run, state, producer)
        # 5. log pi_old and log pi_ref, the critic's V_old, the KL in the reward, the advantages
        attach_logprobs(run, batch)
        if critic is not None:
            critic.attach_values(batch.batches)
        assign_advantages(run, state, batch)
    # 6. epochs x minibatches optimiser steps on this batch
    kl_coef = state.current_kl_coef(run.preset)
    steps = min(run.steps_per_batch, max_steps)
    stats = optimise(run, batch, steps, loss, backward_hook(run, critic))
    if run.self_teacher is not None:  # an EMA teacher follows the policy
        run.self_teacher.update()
    if producer is not None:  # the engine may draw on (and gets new weights when due)
        producer.finished(run.ctx.step)
    # the adaptive controller sets the coefficient of the next batch from this batch's KL
    target = run.cfg.algo.kl_target
    if stats is not None and target is not None and "rollout/kl_seq" in batch.stats:
        state.kl_coef = adaptive_kl_coef(
            kl_coef, batch.stats["rollout/kl_seq"], target, n_steps=int(batch.rewards.numel()),
            horizon=run.cfg.algo.kl_horizon,
        )  # fmt: skip
    return StepResult(batch, stats, kl_coef)


def from_engine(run: PGRun, state: LoopState, producer: RolloutProducer) -> RolloutBatch:
    """The next batch the engine drew, cut for the learner, with its staleness logged."""
    drawn = producer.next(run.ctx.step)
    state.rollouts = drawn.rollouts
    batch = assemble(run, drawn.sampled, drawn.stats, drawn.rollouts)
    batch.stats["async/version"] = float(drawn.version)
    batch.stats["async/staleness"] = float(run.ctx.step - drawn.version)
    batch.stats["async/sync_s"] = producer.engine.sync_seconds
    return batch


@contextlib.contextmanager
def rollout_source(
    run: PGRun, state: LoopState, total: int | None = None
) -> Iterator[RolloutProducer | None]:
    """The engine's producer of batches, or None to sample on the policy itself.

    ``hf`` with ``max_staleness`` unset samples on the policy (no copy); ``hf`` with a bound
    samples on an in-process copy; ``vllm`` on a server (synchronous: staleness 0).
    """
    engine_cfg, ctx = run.cfg.engine, run.ctx
    if engine_cfg.backend == "hf" and engine_cfg.max_staleness is None:
        yield None
        return
    with contextlib.ExitStack() as stack:
        eos = [ctx.tokenizer.eos_token_id]
        if engine_cfg.backend == "vllm":
            engine = stack.enter_context(vllm_policy(ctx, engine_cfg, run.cfg.loop.seed))
        else:
            engine = LocalEngine(
                ctx.model, pad_id=ctx.pad_id, eos_ids=eos, tokenizer=ctx.tokenizer,
                version=ctx.step,
            )  # fmt: skip
        producer = RolloutProducer(
            run, engine, state, max_staleness=engine_cfg.max_staleness or 0,
            steps_per_batch=run.steps_per_batch, sync_every=engine_cfg.sync_every,
            total_steps=total,
        )  # fmt: skip
        with producer:
            yield producer


def backward_hook(run: PGRun, critic: Critic | None) -> Callable[[], None]:
    """After each backward pass: gradients onto the fp32 master weights of every trained model."""
    if critic is None:
        return run.ctx.master.collect_grads

    def both() -> None:
        run.ctx.master.collect_grads()
        critic.collect_grads()

    return both


def check_before_loading(cfg: PGConfig) -> PGPreset:
    """The resolved preset, once every setting that can be checked without a model is.

    Raises:
        ConfigError: Naming the option (the engine, the group size, the teacher).
        EngineError: The vLLM engine is not installed (with the command that builds it).
    """
    preset = resolve_preset(cfg.algo)
    if cfg.env.name is not None:
        env_factory(cfg.env)  # an unknown environment or bad options, before any model
        if "greedy" in preset.estimator.needs or cfg.algo.teacher == "self":
            raise ConfigError(
                "--env.name: episodes cannot be replayed greedily (ReMax) or re-scored with "
                "privileged context (--algo.teacher self); choose another preset or teacher"
            )
    if preset.min_group_size > cfg.sampling.num_samples:
        raise ConfigError(f"--sampling.num-samples: {group_size_problem(cfg.algo.preset, preset)}")
    engine, world = cfg.engine, int(os.environ.get("WORLD_SIZE", "1"))
    if (engine.max_staleness is not None or engine.backend != "hf") and world > 1:
        raise ConfigError(
            "--engine: a separate rollout engine (vllm, or max_staleness) runs with one learner "
            "process; under torchrun use the hf backend without max_staleness"
        )
    require_engine(engine, cfg.model)  # not installed: say how, before loading anything
    if preset.teacher and cfg.algo.teacher is None:
        raise ConfigError(
            f"--algo.teacher: the {cfg.algo.preset} preset distils a teacher; name it"
        )
    if cfg.algo.teacher == "self" and cfg.algo.self_teacher == "ema" and world > 1:
        raise ConfigError(
            "--algo.self-teacher ema keeps a copy of the policy: it runs with one process"
        )
    if cfg.algo.teacher not in (None, "self"):  # a shared tokenizer, before any model loads
        check_tokenizers(
            load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code),
            load_tokenizer(cfg.algo.teacher, trust_remote_code=cfg.model.trust_remote_code),
            cfg.algo.teacher, option="--algo.teacher",
        )  # fmt: skip
    return preset


def main(cfg: PGConfig) -> Path:
    """Run policy-gradient RL; returns the run directory.

    The model is saved under ``<run_dir>/final`` and, with a critic, the value model under
    ``<run_dir>/critic``.
    """
    cfg = with_env_defaults(cfg)
    preset = check_before_loading(cfg)
    ctx = build_run(
        cfg.model, cfg.log, cfg.loop.seed, to_dict(cfg), resume=cfg.loop.resume,
        batch_size=cfg.loop.batch_size,
    )  # fmt: skip
    critic = None
    if preset.critic:  # before the reference: the same RNG draws as a run without one
        critic = Critic.build(ctx, cfg, aggregation(cfg, preset))
    run = prepare(ctx, cfg, preset)
    total = total_steps(cfg, preset, len(run.prompts))
    ctx.start_training(cfg.optim, total)
    state = restore_state(ctx)
    loss = policy_step_loss(run, state)
    if critic is not None:
        loss = critic.add_value_loss(loss)
    try:
        train(run, state, loss, critic, total)
    finally:
        if run.self_teacher is not None:
            run.self_teacher.close()
    if critic is not None:  # before the final model, whose presence marks a finished run
        critic.save()
    finish_run(ctx, cfg.loop.keep_last)
    return ctx.run_dir


def train(run: PGRun, state: LoopState, loss: StepLoss, critic: Critic | None, total: int) -> None:
    """Steps until ``total`` optimiser steps: log, write samples and checkpoint as configured."""
    ctx, cfg = run.ctx, run.cfg
    with ctx.progress(total) as bar, rollout_source(run, state, total) as producer:
        while ctx.step < total:
            before = ctx.step
            result = step(run, state, loss, critic, total - ctx.step, producer)
            ctx.resume_state[LOOP_STATE] = state.to_dict()
            if result.stats is None:
                continue
            batch = result.batch
            metrics = {**step_metrics(result.stats, batch), "train/kl_coef": result.kl_coef}
            tokens = int(sum(len(c) for c in batch.rollout.completion_ids))
            bar.update(ctx.step - before, loss=metrics["train/loss"], tokens=tokens)
            ctx.log_step(metrics, cfg.log.log_every)
            if cfg.sample_every and ctx.step % cfg.sample_every == 0 and ctx.dist.is_main:
                write_samples(ctx, batch)
            if cfg.loop.save_every and ctx.step % cfg.loop.save_every == 0:
                ctx.save(cfg.loop.keep_last)


def restore_state(ctx: RunContext) -> LoopState:
    """The loop state of a resumed run (fresh for a new run).

    Checkpoints written before the loop state had its own record kept its fields at the top
    level of the resume state; they are read too.
    """
    saved = ctx.resume_state.get(LOOP_STATE)
    return LoopState.from_dict(saved if saved is not None else ctx.resume_state)


def reference_model(ctx: RunContext) -> Callable[[], contextlib.AbstractContextManager]:
    """pi_ref for the KL: the adapter-less policy under LoRA, else one frozen copy kept loaded."""
    if getattr(ctx.model, "disable_adapter", None) is not None:
        return ctx.starting_model
    stack = contextlib.ExitStack()
    frozen = stack.enter_context(ctx.starting_model())

    @contextlib.contextmanager
    def held() -> Iterator[torch.nn.Module]:
        with ctx.gathered(frozen):  # whole while it is used (sharded at rest under FSDP2)
            yield frozen

    return held


def with_env_defaults(cfg: PGConfig) -> PGConfig:
    """The run's settings with an environment's defaults.

    Its own dataset unless one is named, and its reward instead of the default one.
    """
    if cfg.env.name is None:
        return cfg
    data, rewards = cfg.data, cfg.rewards
    if data.train == PGDataConfig.train:
        dataset = getattr(env_class(cfg.env.name), "DATASET", None)
        data = replace(data, train=dataset) if dataset else data
    if rewards == DEFAULT_REWARDS:
        rewards = ()
    return replace(cfg, data=data, rewards=rewards)


def prepare(ctx: RunContext, cfg: PGConfig, preset: PGPreset) -> PGRun:
    """The run's objects: prompts, rewards, the reference (when a KL needs it), the sampler."""
    prompts = load_prompts(ctx.tokenizer, cfg)
    make_env = env_factory(cfg.env) if cfg.env.name is not None else None
    if make_env is not None:
        prompts = env_prompt_rows(
            ctx.tokenizer, prompts, make_env, native_tools=cfg.env.native_tools,
            max_prompt_len=cfg.data.max_prompt_len,
        )  # fmt: skip
    return PGRun(
        env=make_env, turns=TurnLimits.of(cfg.env),
        ctx=ctx, cfg=cfg, preset=preset, prompts=prompts,
        reward_fns=[load_reward_fn(spec, place=ctx.place.frozen) for spec in cfg.rewards],
        generator=HFGenerator(
            ctx.model, pad_id=ctx.pad_id, eos_ids=[ctx.tokenizer.eos_token_id],
            tokenizer=ctx.tokenizer,
        ),
        reference=reference_model(ctx) if preset.uses_kl else None,
        teacher=(
            load_teacher(
                ctx, cfg.algo.teacher, trust_remote_code=cfg.model.trust_remote_code,
                option="--algo.teacher",
            ) if cfg.algo.teacher not in (None, "self") else None
        ),
        self_teacher=(
            SelfTeacher(ctx, cfg.algo.self_teacher, cfg.algo.self_ema)
            if cfg.algo.teacher == "self" else None
        ),
        # each prompt once per micro-batch, its completions as branches (exact; no padding)
        trees=cfg.data.share_prefix and supports_prefix_trees(ctx.model),
    )  # fmt: skip
