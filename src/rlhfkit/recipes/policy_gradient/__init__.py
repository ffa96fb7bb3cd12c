"""Policy-gradient RL (RLHF book chapter 6): ``rlhfkit rl``.

REINFORCE, RLOO, ReMax, REINFORCE++, PPO, GRPO, Dr. GRPO, DAPO, GSPO, CISPO, SAPO and MaxRL.
Every algorithm is a row of :data:`~rlhfkit.recipes.policy_gradient.presets.PG_PRESETS`: an
advantage estimator, an objective, a loss aggregation and a KL placement, plus modifiers;
``--algo.preset grpo`` picks the row and the other ``--algo`` fields override single axes.

For each rollout batch (:func:`~rlhfkit.recipes.policy_gradient.loop.step`):

    1. The next ``loop.batch_size`` prompts of a seeded shuffle, rendered with the chat
       template.                                                          (collect)
    2. ``sampling.num_samples`` completions per prompt from the policy (KV cache, one prefill
       per prompt), with the sampler's per-token log-probs.               (collect)
    3. Rewards: the weighted sum of every ``--rewards`` entry; EOS-only scoring of truncated
       completions; DAPO's overlong penalty; None skips a completion.     (collect)
    4. DAPO's dynamic sampling drops groups with all-equal rewards and samples more prompts;
       ReMax decodes each prompt greedily for its baseline.               (collect)
    5. log pi_old (when a batch serves several steps) and log pi_ref; PPO's V_old; the KL in
       the reward (per sequence or per token); the advantages.            (advantages, critic)
    6. ``algo.epochs`` x ``algo.minibatches`` optimiser steps: policy loss per token
       (objective, TIS weight against the sampler, KL in the loss), the preset's aggregation
       under one global normaliser per minibatch; clip; AdamW. PPO adds c_v times the clipped
       value loss and steps the critic too.                              (update, critic)
    7. The adaptive KL controller (Ziegler 2019) sets the next coefficient; log; checkpoint
       (the loop state - prompt counter, EMA baseline, KL coefficient - is in every
       checkpoint).                                                       (loop, metrics)

The reference model for a KL is the starting model, held in memory (eval mode, compute dtype)
or, under LoRA, the policy with its adapter disabled. Not yet here (stated, not faked): process
rewards (``grpo_process`` raises a clear error).

Modules, in the order of the algorithm: ``config`` (options, preset resolution), ``presets``
(the tables), ``state`` (run objects, loop state, micro-batches), ``collect``, ``advantages``,
``critic``, ``update``, ``metrics``, ``loop``. Imports only point down that list (checked).

Formulas, defaults and papers of every axis and preset: the method reference,
``docs/methods/policy.md``.
"""

from rlhfkit.recipes.policy_gradient.config import (
    CriticConfig,
    PGAlgoConfig,
    PGConfig,
    PGDataConfig,
    resolve_preset,
)
from rlhfkit.recipes.policy_gradient.loop import main
from rlhfkit.recipes.policy_gradient.presets import ESTIMATORS, KL_SOURCES, PG_PRESETS, PGPreset

__all__ = [
    "ESTIMATORS", "KL_SOURCES", "PG_PRESETS", "CriticConfig", "PGAlgoConfig", "PGConfig",
    "PGDataConfig", "PGPreset", "main", "resolve_preset",
]  # fmt: skip
