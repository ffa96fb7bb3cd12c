"""Step 6 of a policy-gradient step: the policy loss and the optimiser steps on one rollout batch.

Per micro-batch (:func:`policy_step_loss`): log pi_theta on the learner; the truncated
importance weight against the sampler's log-probs; the KL to pi_ref when it enters the loss;
the preset's objective, reduced with its aggregation under one global normaliser per
minibatch. With one step per batch pi_old = sg(pi_theta) (the ratio is 1: clipping inactive).

:func:`optimise` takes ``algo.epochs x algo.minibatches`` optimiser steps over the batch's
minibatches; gradient accumulation and the normaliser belong to
:func:`rlhfkit.training.accumulate.accumulate`. Formulas: ``docs/methods/policy.md#objectives``,
``#loss-aggregation`` and ``#truncated-importance-sampling``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhfkit.losses.policy import policy_loss, sampler_mismatch, tis_weights
from rlhfkit.models.forward import fused_head, rollout_logprobs
from rlhfkit.ops.masking import Aggregation, normaliser_count
from rlhfkit.recipes.policy_gradient.config import PGConfig
from rlhfkit.recipes.policy_gradient.presets import KLSide, PGPreset
from rlhfkit.recipes.policy_gradient.state import (
    LoopState,
    PGRun,
    RolloutBatch,
    RolloutMicroBatch,
    StepLoss,
)
from rlhfkit.training.accumulate import StepStats, accumulate
from rlhfkit.types import LossOutput


def aggregation(cfg: PGConfig, preset: PGPreset) -> Aggregation:
    """The preset's loss aggregation, shared by the policy loss and PPO's value loss.

    L_max of ``fixed_length`` is ``max_new_tokens``.
    """
    return Aggregation(preset.aggregation, max_len=cfg.sampling.max_new_tokens)


def count(run: PGRun) -> Callable[[RolloutMicroBatch], float]:
    """A micro-batch's share of the global normaliser of the preset's aggregation."""
    agg = aggregation(run.cfg, run.preset)
    return lambda b: float(normaliser_count(b.mask, agg))


def policy_step_loss(run: PGRun, state: LoopState) -> StepLoss:
    """The policy loss of one micro-batch, with detached metric sums.

    l_t = -w_t obj(rho_t, A_t) [+ c_KL KL_t when the KL is in the loss], w the TIS weight
    min(pi_old / pi_sampler, C), rho = pi_theta / pi_old; the coefficient is read from the
    loop state at each call (the adaptive controller moves it between batches).
    """
    model, preset, t = run.ctx.model, run.preset, run.temperature
    agg = aggregation(run.cfg, run.preset)
    kl_in_loss = preset.kl_placement == "loss" and preset.uses_kl

    def loss_kl(logprobs: torch.Tensor, hidden: torch.Tensor | None, b: RolloutMicroBatch):
        head = fused_head(model)
        policy = KLSide(logprobs, hidden, None if head is None else head.weight)
        ref = KLSide(b.ref_logprobs, b.ref_hidden, run.ref_head)
        return preset.kl.loss(policy, ref, b.mask, t)

    def step_loss(b: RolloutMicroBatch, normaliser: float) -> LossOutput:
        logprobs, hidden = rollout_logprobs(model, b.inputs, temperature=t)
        old = b.old_logprobs if b.old_logprobs is not None else logprobs.detach()
        weights = tis_weights(
            learner_logprobs=old, sampler_logprobs=b.sampler_logprobs, cap=run.cfg.algo.tis_cap,
            mode=run.cfg.algo.tis_mode, mask=b.mask,
        )  # fmt: skip
        kl = loss_kl(logprobs, hidden, b) if kl_in_loss else None
        out = policy_loss(
            logprobs=logprobs, old_logprobs=old, advantages=b.advantages, mask=b.mask,
            objective=preset.objective, params=preset.params, aggregation=agg,
            normaliser=normaliser, weights=weights, kl=kl,
            kl_coef=state.current_kl_coef(preset),
        )  # fmt: skip
        detached = logprobs.detach()
        if kl is None and b.ref_logprobs is not None:
            out.metrics["kl"] = float(torch.where(b.mask, detached - b.ref_logprobs, 0.0).sum())
        out.metrics.update(
            sampler_mismatch(
                learner_logprobs=detached, sampler_logprobs=b.sampler_logprobs, mask=b.mask
            )
        )
        out.metrics["tis_weight"] = float(weights[b.mask].sum())
        out.metrics["tis_dropped"] = float((weights == 0)[b.mask].sum())
        return out

    return step_loss


def optimise(
    run: PGRun,
    batch: RolloutBatch,
    steps: int,
    loss: StepLoss,
    after_backward: Callable[[], None],
) -> StepStats | None:
    """Up to ``steps`` optimiser steps: epochs over the batch's minibatches.

    Returns:
        The accumulated statistics of the last step taken (None if every step was skipped).
    """
    ctx, cfg, last = run.ctx, run.cfg, None
    counter = count(run)
    for _ in range(steps // len(batch.minibatches) + 1):
        for minibatch in batch.minibatches:
            if steps <= 0:
                return last
            stats = accumulate(
                minibatch, loss, count_fn=counter, after_backward=after_backward,
                models=ctx.models,
            )  # fmt: skip
            steps -= 1
            if ctx.apply_step(stats, cfg.optim.max_grad_norm, cfg.loop.max_nonfinite):
                last = stats
    return last
