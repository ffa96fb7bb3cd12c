"""PPO's value model, an addition to the policy-gradient step (InstructGPT; Tulu 3).

What it adds to the loop:

    after collection:  V_old(s_t) = critic(s_t) on every micro-batch    (attach_values)
    advantages:        A, R = GAE(r, V_old; gamma, lambda)              (the ``gae`` estimator)
    each micro-batch:  L = L_pi + c_v max(1/2 (V - R)^2, 1/2 (clip(V, V_old +- eps_v) - R)^2)
                                                                        (add_value_loss)
    each step:         the critic's own AdamW step and gradient clipping (a run companion)

The value model is ``AutoModelForSequenceClassification`` (one label): a reward model
checkpoint (``--critic.init reward_model``, the default when a ``rm:<dir>`` reward or
``--critic.model`` names one) or the policy's weights plus a freshly initialised scalar head
(``--critic.init policy``). V(s_t) is the head at the position whose logits predict completion
token t. ``--critic.warmup_steps`` trains the critic alone first.

The critic is a :class:`rlhfkit.training.run.Companion` of the run: its weights and optimiser
state are part of every checkpoint (one atomic write), a resumed run restores both models, and
the trained value model is saved under ``<run_dir>/critic``. Formulas:
``docs/methods/policy.md#ppo-and-gae``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.losses.policy import value_loss
from rlhfkit.models.heads import rollout_values
from rlhfkit.models.load import load_model
from rlhfkit.ops.masking import Aggregation
from rlhfkit.recipes.policy_gradient.config import PGConfig
from rlhfkit.recipes.policy_gradient.state import RolloutMicroBatch, StepLoss
from rlhfkit.training.run import Companion, RunContext, export_model
from rlhfkit.types import LossOutput

CRITIC = "critic"
"""Name of the value model among the run's companions (checkpoint prefix, metrics)."""


def critic_source(cfg: PGConfig) -> str:
    """The checkpoint the value model starts from (see ``CriticConfig``).

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


@dataclass
class Critic:
    """The value model of a run, trained next to the policy.

    Attributes:
        ctx: The run (the critic is registered among its companions).
        companion: The value model with its master weights and optimiser.
        cfg: The run configuration (``critic`` section, aggregation length).
        aggregation: The preset's loss aggregation, shared with the policy loss.
        fresh: Loads the value model's starting point again (fp32), for the export of a
            sharded one.
    """

    ctx: RunContext
    companion: Companion
    cfg: PGConfig
    aggregation: Aggregation
    fresh: Callable[[], torch.nn.Module]

    @classmethod
    def build(cls, ctx: RunContext, cfg: PGConfig, aggregation: Aggregation) -> Critic:
        """Load the value model at the run's precision and register it as a companion."""
        _, kwargs = ctx.source
        source = critic_source(cfg)

        def fresh() -> torch.nn.Module:
            return load_model(
                source, dtype=torch.float32, task="score", num_labels=1,
                attn_implementation=kwargs["attn_implementation"],
                trust_remote_code=kwargs["trust_remote_code"], pad_token_id=ctx.pad_id,
            )  # fmt: skip

        model = fresh()
        policy_vocab = ctx.model.get_input_embeddings().num_embeddings
        if model.get_input_embeddings().num_embeddings != policy_vocab:
            raise ValueError(
                f"the value model {source!r} has a vocabulary of "
                f"{model.get_input_embeddings().num_embeddings} tokens, the policy "
                f"{policy_vocab}: it must read the policy's token ids"
            )
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        optim = type(cfg.optim)(**{**vars(cfg.optim), "lr": cfg.critic.lr})
        companion = Companion(model, ctx.place.trained(model), optim)
        ctx.companions[CRITIC] = companion
        return cls(ctx, companion, cfg, aggregation, fresh)

    @property
    def model(self) -> torch.nn.Module:
        """The value model."""
        return self.companion.model

    @torch.no_grad()
    def attach_values(self, batches: list[RolloutMicroBatch]) -> None:
        """V_old(s_t) before the update on every micro-batch (eval mode), (B, T) fp32."""
        was_training = self.model.training
        self.model.eval()
        for b in batches:
            b.old_values = rollout_values(self.model, b.inputs).float()
        self.model.train(was_training)

    def add_value_loss(self, policy_loss: StepLoss) -> StepLoss:
        """L = L_pi + c_v L_V for one micro-batch under the same global normaliser.

        The value loss is aggregated like the policy loss. During the critic warm-up the
        policy term is left out, so the policy receives no gradient.
        """
        c = self.cfg.critic

        def step_loss(b: RolloutMicroBatch, normaliser: float) -> LossOutput:
            mask = b.mask
            values = rollout_values(self.model, b.inputs)
            v = value_loss(
                values=values, old_values=b.old_values, returns=b.returns, mask=mask,
                aggregation=self.aggregation, normaliser=normaliser, clip=c.value_clip,
            )  # fmt: skip
            with torch.no_grad():
                sq = 0.5 * (values.detach() - b.returns).square()
                metrics = {
                    "value_loss": float(sq[mask].sum()),
                    "value_clipped": v.metrics["value_clipped"],
                    "value_mean": float(values.detach()[mask].sum()),
                    "returns_mean": float(b.returns[mask].sum()),
                    "tokens": float(mask.sum()),
                }
            if self.ctx.step < c.warmup_steps:
                return LossOutput(c.vf_coef * v.loss, metrics)
            out = policy_loss(b, normaliser)
            return LossOutput(out.loss + c.vf_coef * v.loss, {**out.metrics, **metrics})

        return step_loss

    def collect_grads(self) -> None:
        """Move the value model's gradients onto its fp32 master weights."""
        self.companion.master.collect_grads()

    def save(self) -> Path:
        """Write the trained value model (fp32, Hugging Face format) to ``<run_dir>/critic``."""
        target = self.ctx.run_dir / CRITIC
        export_model(self.ctx, self.model, self.companion.master, target, self.fresh)
        return target
