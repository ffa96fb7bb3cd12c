"""PPO with a learned value model (RLHF book chapter 6; METHODS.md section 6.4).

``rlhfkit rl --algo.preset ppo`` runs this loop; it is ``rlhfkit rl``'s loop with a critic:

    for each rollout batch:
        sample G completions per prompt; score them (EOS-only scoring for a reward model)
        log pi_old (learner), log pi_ref, V_old = critic(s_t)      # before any update
        r_t = -beta (log pi_old - log pi_ref)_t, plus the score at the last completion token
        A, R = GAE(r, V_old; gamma, lambda);  A <- whiten(A) over the global batch
        for epoch in 1..E, minibatch in 1..M:                      # 4 x 1 by default
            L = L_clip(pi_theta / pi_old, A)
                + c_v max(1/2 (V - R)^2, 1/2 (clip(V, V_old +- eps_v) - R)^2)
            step the policy and the critic (each with its own AdamW and gradient clipping)

The value model is ``AutoModelForSequenceClassification`` (one label): a reward model
checkpoint (``--critic.init reward_model``, the default when a ``rm:<dir>`` reward or
``--critic.model`` names one; InstructGPT, Tulu 3) or the policy's weights plus a freshly
initialised scalar head (``--critic.init policy``). V(s_t) is the head at the position whose
logits predict completion token t. ``--critic.warmup_steps`` trains the critic alone first.

The critic is a :class:`rlhfkit.training.run.Companion` of the run: its weights and optimiser
state are part of every checkpoint (one atomic write), a resumed run restores both models, and
the trained value model is saved under ``<run_dir>/critic``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhfkit.atomic import atomic_directory
from rlhfkit.config import to_dict
from rlhfkit.losses.policy import PGPreset, value_loss
from rlhfkit.models.heads import rollout_values
from rlhfkit.models.load import load_model
from rlhfkit.ops.masking import Aggregation
from rlhfkit.recipes.pg import PGConfig, make_step_loss, resolve_preset, run_state, total_steps
from rlhfkit.recipes.pg import train as pg_train
from rlhfkit.training.distributed import barrier
from rlhfkit.training.precision import MasterWeights
from rlhfkit.training.run import Companion, RunContext, build_run, finish_run
from rlhfkit.types import LossOutput

CRITIC = "critic"
"""Name of the value model among the run's companions (checkpoint prefix, metrics)."""


def critic_source(cfg: PGConfig) -> str:
    """The checkpoint the value model starts from (see :class:`rlhfkit.recipes.pg.CriticConfig`).

    Raises:
        ValueError: ``init`` is 'reward_model' but no reward model is known, or unknown.
    """
    c = cfg.critic
    reward_models = [spec[3:] for spec in cfg.rewards if spec.startswith("rm:")]
    if c.init not in ("auto", "reward_model", "policy"):
        raise ValueError(f"critic.init must be auto, reward_model or policy, got {c.init!r}")
    if c.model:
        return c.model
    if c.init == "policy" or (c.init == "auto" and not reward_models):
        return cfg.model.name
    if not reward_models:
        raise ValueError("critic.init reward_model needs --critic.model or an rm:<dir> reward")
    return reward_models[0]


def build_critic(ctx: RunContext, cfg: PGConfig) -> Companion:
    """Load the value model at the run's precision and wrap it as a trained companion."""
    _, kwargs = ctx.source
    model = load_model(
        critic_source(cfg), dtype=torch.float32, task="score", num_labels=1,
        attn_implementation=kwargs["attn_implementation"],
        trust_remote_code=kwargs["trust_remote_code"], pad_token_id=ctx.pad_id,
    )  # fmt: skip
    policy_vocab = ctx.model.get_input_embeddings().num_embeddings
    if model.get_input_embeddings().num_embeddings != policy_vocab:
        raise ValueError(
            f"the value model {critic_source(cfg)!r} has a vocabulary of "
            f"{model.get_input_embeddings().num_embeddings} tokens, the policy {policy_vocab}: "
            "it must read the policy's token ids"
        )
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(ctx.dist.device).train()
    optim = type(cfg.optim)(**{**vars(cfg.optim), "lr": cfg.critic.lr})
    return Companion(model, MasterWeights(model, ctx.precision.compute), optim)


def make_ppo_step_loss(
    ctx: RunContext,
    critic: torch.nn.Module,
    preset: PGPreset,
    cfg: PGConfig,
    temperature: float,
    beta: Callable[[], float] | None = None,
    run: dict[str, Any] | None = None,
) -> tuple[Callable[[dict[str, torch.Tensor], float], LossOutput], Callable[..., float]]:
    """L = L_policy + c_v L_value for one micro-batch, under one global normaliser.

    The value loss is aggregated like the policy loss (the preset's mode). During the critic
    warm-up the policy term is left out, so the policy receives no gradient.
    """
    policy_step, count = make_step_loss(ctx.model, preset, cfg, temperature, beta, run)
    agg = Aggregation(preset.aggregation, max_len=cfg.sampling.max_new_tokens)
    c = cfg.critic

    def step_loss(batch: dict[str, torch.Tensor], normaliser: float) -> LossOutput:
        mask = batch["completion_mask"]
        values = rollout_values(critic, batch)
        v = value_loss(
            values, batch["old_values"], batch["returns"], mask, aggregation=agg,
            normaliser=normaliser, clip=c.value_clip,
        )  # fmt: skip
        with torch.no_grad():
            sq = 0.5 * (values.detach() - batch["returns"]).square()
            metrics = {
                "value_loss": float(sq[mask].sum()),
                "value_clipped": v.metrics["value_clipped"],
                "value_mean": float(values.detach()[mask].sum()),
                "returns_mean": float(batch["returns"][mask].sum()),
                "tokens": float(mask.sum()),
            }
        if ctx.step < c.warmup_steps:
            return LossOutput(c.vf_coef * v.loss, metrics)
        out = policy_step(batch, normaliser)
        return LossOutput(out.loss + c.vf_coef * v.loss, {**out.metrics, **metrics})

    return step_loss, count


def save_critic(ctx: RunContext, critic: Companion) -> Path:
    """Write the trained value model (fp32, Hugging Face format) to ``<run_dir>/critic``."""
    target = ctx.run_dir / CRITIC
    if ctx.dist.is_main:
        critic.model.to(torch.float32)
        critic.master.sync_to_model()
        with atomic_directory(target) as tmp:
            critic.model.save_pretrained(tmp, safe_serialization=True)
            ctx.tokenizer.save_pretrained(tmp)
    barrier()
    return target


def main(cfg: PGConfig) -> Path:
    """Run PPO; returns the run directory (policy under ``final``, value model ``critic``)."""
    preset = resolve_preset(cfg.algo)
    if not preset.critic:
        raise ValueError(f"preset {cfg.algo.preset!r} has no critic: run it with rlhfkit rl")
    ctx = build_run(cfg.model, cfg.log, cfg.loop.seed, to_dict(cfg))
    critic = build_critic(ctx, cfg)
    ctx.companions[CRITIC] = critic
    run: dict[str, Any] = {**run_state(ctx, cfg, preset), "critic": critic.model}
    total = total_steps(cfg, preset, len(run["prompts"]))
    ctx.start_training(cfg.optim, total, resume=cfg.loop.resume)
    step_loss, count = make_ppo_step_loss(
        ctx, critic.model, preset, cfg, run["temperature"], run["beta"], run
    )

    def after_backward() -> None:
        ctx.master.collect_grads()
        critic.master.collect_grads()

    pg_train(ctx, cfg, run, total, step_loss, count, after_backward)
    finish_run(ctx, cfg.loop.keep_last)
    save_critic(ctx, critic)
    return ctx.run_dir
