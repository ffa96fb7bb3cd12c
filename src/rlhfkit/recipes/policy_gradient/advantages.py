"""Step 5 of a policy-gradient step: log-probs under pi_old and pi_ref, the KL, the advantages.

1. :func:`attach_logprobs`: log pi_old on the learner (when the batch serves several steps, has
   a critic or an exact KL in the reward) and log pi_ref (when a KL enters the reward or the
   loss); the exact per-token KL for the reward when the KL source needs hidden states.
2. :func:`assign_advantages`: the rewards normalised and clipped (``--algo.reward-norm``,
   ``--algo.reward-clip``), the KL in the reward (per sequence off the sequence reward, or per
   token inside the token stage), the preset's estimator on the (P, G) rewards with skipped
   completions left out of every baseline, and for a token-level estimator REINFORCE++'s
   whitened returns-to-go or PPO's GAE with the critic's values.

The math lives in :mod:`rlhfkit.ops.advantages`, :mod:`rlhfkit.ops.kl` and
:mod:`rlhfkit.rewards.shaping`; this module applies it to rollout micro-batches. Formulas:
``docs/methods/policy.md#advantage-estimators``, ``#where-the-kl-goes`` and
``#rewards-truncation-and-sampling-modifiers``.
"""

from __future__ import annotations

import torch

from rlhfkit.losses.distill import sampled_reverse_kl
from rlhfkit.models.forward import fused_head, rollout_logprobs
from rlhfkit.models.sharding import gathered
from rlhfkit.ops import advantages as adv_ops
from rlhfkit.ops.masking import masked_mean
from rlhfkit.recipes.policy_gradient.config import PGAlgoConfig
from rlhfkit.recipes.policy_gradient.presets import ESTIMATORS, BaselineInputs, KLSide
from rlhfkit.recipes.policy_gradient.self_distill import attach_self_teacher
from rlhfkit.recipes.policy_gradient.state import LoopState, PGRun, RolloutBatch, RolloutMicroBatch
from rlhfkit.rewards.shaping import clip_fraction, kl_in_reward, reward_scale, shape_rewards
from rlhfkit.training.distributed import all_reduce_sum, dist_rank, gather_objects


@torch.no_grad()
def forward_logprobs(
    model: torch.nn.Module, batches: list[RolloutMicroBatch], temperature: float
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Detached (B, T) fp32 log-probs and (N, H) final hidden states of ``model`` (eval mode)."""
    was_training = model.training
    model.eval()
    out = []
    for b in batches:
        logprobs, hidden = rollout_logprobs(model, b.inputs, temperature=temperature)
        out.append((logprobs.float(), hidden))
    model.train(was_training)
    return out


def attach_teacher_logprobs(run: PGRun, batch: RolloutBatch) -> None:
    """On-policy distillation: log pi_T of the sampled tokens on every micro-batch.

    From the external teacher, or (self-distillation) from the policy's network reading each
    completion after its privileged prompt.
    """
    if run.self_teacher is not None:
        attach_self_teacher(run, run.self_teacher, batch, run.ctx.step)
    if run.teacher is not None:
        with gathered(run.teacher):
            for b, (logprobs, _) in zip(
                batch.batches,
                forward_logprobs(run.teacher, batch.batches, run.temperature),
                strict=True,
            ):
                b.teacher_logprobs = logprobs


def attach_logprobs(run: PGRun, batch: RolloutBatch) -> None:
    """Store log pi_old and log pi_ref on every micro-batch, and the exact KL for the reward."""
    preset, batches, t = run.preset, batch.batches, run.temperature
    exact = preset.uses_kl and preset.kl.needs_hidden
    old_hidden: list[torch.Tensor | None] = [None] * len(batches)
    if run.needs_old:
        for i, (b, (logprobs, hidden)) in enumerate(
            zip(batches, forward_logprobs(run.ctx.model, batches, t), strict=True)
        ):
            b.old_logprobs, old_hidden[i] = logprobs, hidden
    attach_teacher_logprobs(run, batch)
    if not preset.uses_kl:
        return
    with run.reference() as ref:
        for b, (logprobs, hidden) in zip(batches, forward_logprobs(ref, batches, t), strict=True):
            b.ref_logprobs, b.ref_hidden = logprobs, hidden if exact else None
        if exact:
            run.ref_head = fused_head(ref).weight.detach()
    if exact and preset.kl_placement == "reward":
        head = fused_head(run.ctx.model).weight.detach()
        with torch.no_grad():
            for b, hidden in zip(batches, old_hidden, strict=True):
                b.kl = preset.kl.reward(
                    KLSide(b.old_logprobs, hidden, head),
                    KLSide(b.ref_logprobs, b.ref_hidden, run.ref_head), b.mask, t,
                ).float()  # fmt: skip
                b.ref_hidden = None  # needed in the loss only


def token_kl(b: RolloutMicroBatch) -> torch.Tensor:
    """Per-token KL for the reward, (B, T).

    The exact one when computed, else k1 = log pi_old (or the sampler's log-prob when pi_old was
    not computed) - log pi_ref.
    """
    return b.kl if b.kl is not None else b.kl_logprobs - b.ref_logprobs


def sequence_kl(batches: list[RolloutMicroBatch], n: int) -> torch.Tensor:
    """Per sequence sum_t KL_t (:func:`token_kl`), in rollout order. Shapes: returns (n,) fp64."""
    out = torch.zeros(n, dtype=torch.float64)
    for b in batches:
        out[b.rows.cpu()] = torch.where(b.mask, token_kl(b), 0.0).sum(1).double().cpu()
    return out


def estimate(
    rewards: torch.Tensor, name: str, algo: PGAlgoConfig, inputs: BaselineInputs
) -> torch.Tensor:
    """Advantages of (P, G) rewards where NaN marks a skipped completion (A = 0 there).

    With every completion scored the estimator sees the full tensor. Otherwise a group estimator
    runs on each group's scored samples alone (a group below ``min_size`` gets 0) and a batch
    estimator on all scored samples, so a skipped completion moves no baseline.

    Shapes:
        rewards: (P, G) fp64; returns (P, G).
    """
    est = ESTIMATORS[name]
    valid = ~torch.isnan(rewards)
    if bool(valid.all()):
        return est.fn(rewards, inputs, algo)
    out = torch.zeros_like(rewards)
    if est.scope == "batch":
        if bool(valid.any()):
            out[valid] = est.fn(rewards[valid], inputs, algo)
        return out
    for i in range(rewards.shape[0]):
        row = rewards[i, valid[i]]
        if row.numel() < max(est.min_size, 1):
            continue
        out[i, valid[i]] = est.fn(row[None], inputs.row(i), algo)[0]
    return out


def broadcast(batches: list[RolloutMicroBatch], advantages: torch.Tensor) -> None:
    """Set each micro-batch's advantages to its completions' values broadcast over tokens."""
    for b in batches:
        values = advantages[b.rows.cpu()].to(b.advantages.dtype).to(b.advantages.device)
        b.advantages = values[:, None].expand_as(b.mask).clone()


def global_whiten(batches: list[RolloutMicroBatch], values: list[torch.Tensor]) -> None:
    """Set every micro-batch's advantages to ``values`` whitened over all masked tokens.

    The mean and the unbiased std are taken over every completion token of every micro-batch
    and every rank (global whitening, eps 1e-8).
    """
    pairs = list(zip(batches, values, strict=True))
    total = sum(float(torch.where(b.mask, r, 0.0).sum()) for b, r in pairs)
    squares = sum(float(torch.where(b.mask, r, 0.0).square().sum()) for b, r in pairs)
    count = sum(float(b.mask.sum()) for b in batches)
    stats = tuple(
        torch.tensor(all_reduce_sum(v), dtype=torch.float64) for v in (total, squares, count)
    )
    for b, r in pairs:
        b.advantages = adv_ops.masked_whiten(r, b.mask, stats=stats).float()


def token_rewards(b: RolloutMicroBatch, kl_coef: float) -> torch.Tensor:
    """r_t = -c_KL KL_t plus the sequence score at the last completion token, (B, T) fp64.

    On entry ``b.advantages`` holds each sequence's score broadcast over its tokens.
    """
    kl = token_kl(b) if kl_coef else torch.zeros_like(b.sampler_logprobs)
    return kl_in_reward(b.advantages[:, 0].double(), kl.double(), b.mask, kl_coef, True)


def returns_to_go_advantages(batches: list[RolloutMicroBatch], kl_coef: float) -> None:
    """REINFORCE++: whitened returns-to-go of the per-token rewards, over the global batch."""
    returns = [adv_ops.returns_to_go(token_rewards(b, kl_coef), b.mask) for b in batches]
    global_whiten(batches, returns)


def gae_advantages(
    batches: list[RolloutMicroBatch], kl_coef: float, *, gamma: float, lam: float, whiten: bool
) -> None:
    """PPO: GAE on the per-token rewards with the critic's V_old, and the returns R = A + V_old.

    Reads ``old_values`` (set by the critic before the update); with ``whiten`` the advantages
    are whitened over the global batch.
    """
    raw = []
    for b in batches:
        if b.old_values is None:
            raise ValueError("GAE needs the critic's values (old_values) on every micro-batch")
        adv, returns = adv_ops.gae(
            token_rewards(b, kl_coef), b.old_values.double(), b.mask, gamma=gamma, lam=lam
        )
        b.returns = returns.float()
        raw.append(adv)
    if whiten:
        global_whiten(batches, raw)
    else:
        for b, a in zip(batches, raw, strict=True):
            b.advantages = a.float()


def _token_level(run: PGRun, batch: RolloutBatch, kl_coef: float) -> torch.Tensor:
    """The token stage in place; returns each completion's mean advantage, (P*G,)."""
    preset, batches = run.preset, batch.batches
    in_reward = kl_coef if preset.uses_kl and preset.kl_placement == "reward" else 0.0
    if "critic" in preset.estimator.needs:
        critic = run.cfg.critic
        gae_advantages(
            batches, in_reward, gamma=critic.gamma, lam=critic.lam,
            whiten=preset.whiten_advantages,
        )  # fmt: skip
    else:
        returns_to_go_advantages(batches, in_reward)
    out = torch.zeros_like(batch.advantages)
    for b in batches:
        out[b.rows.cpu()] = masked_mean(b.advantages, b.mask, dim=-1).double().cpu()
    return out


def _whole_batch(local: torch.Tensor | None) -> tuple[torch.Tensor | None, slice]:
    """Every rank's rows of ``local`` stacked in rank order, and where this rank's rows are.

    Batch-level statistics (a batch baseline, the EMA, the KL the adaptive controller reads)
    are over the global batch, whichever rank sampled which prompts.
    """
    if local is None:
        return None, slice(None)
    parts = gather_objects(local.cpu())
    start = sum(p.shape[0] for p in parts[: dist_rank()])
    return torch.cat(parts), slice(start, start + local.shape[0])


def shaped_rewards(
    run: PGRun, state: LoopState, batch: RolloutBatch
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's rewards normalised, then clipped, and every rank's greedy rewards alike.

    ``--algo.reward-norm`` and ``--algo.reward-clip`` (:mod:`rlhfkit.rewards.shaping`): the
    moments are over the scored completions of the global batch; under 'running' the loop
    state's moments take this batch in first. ReMax's greedy rewards are shaped with the same
    mean, std and bound (they do not enter the moments). Logs
    ``rollout/reward_shaped_mean`` and, with a clip, ``rollout/reward_clip_frac``;
    ``batch.rewards`` keeps the raw rewards.

    Shapes:
        returns (P, G) fp64 (NaN where skipped) and (P_all,) or None.
    """
    algo = run.cfg.algo
    greedy = _whole_batch(batch.sampled.greedy)[0]
    if algo.reward_norm == "none" and algo.reward_clip is None:
        return batch.rewards, greedy
    whole, mine = _whole_batch(batch.rewards)
    scale, state.reward_moments = reward_scale(whole, algo.reward_norm, state.reward_moments)
    shaped = shape_rewards(whole, scale, algo.reward_clip)
    valid = shaped[~torch.isnan(shaped)]
    batch.stats["rollout/reward_shaped_mean"] = float(valid.mean()) if valid.numel() else 0.0
    if algo.reward_clip is not None:
        unclipped = shape_rewards(whole, scale, None)
        batch.stats["rollout/reward_clip_frac"] = clip_fraction(unclipped, algo.reward_clip)
    if greedy is not None:
        greedy = shape_rewards(greedy, scale, algo.reward_clip)
    return shaped[mine], greedy


def assign_advantages(run: PGRun, state: LoopState, batch: RolloutBatch) -> None:
    """The KL in the reward and the preset's advantages, on every micro-batch (and the EMA).

    The rewards are first normalised and clipped (:func:`shaped_rewards`; every estimator,
    the EMA and PPO's token stage read the shaped ones). Estimators see the rewards of the
    whole batch (all ranks'), so that a batch baseline is the global one; each rank keeps the
    advantages of its own rows.
    """
    preset = run.preset
    rewards, greedy = shaped_rewards(run, state, batch)
    kl_coef = state.current_kl_coef(preset)
    shaped = rewards
    if preset.uses_kl:
        kl = sequence_kl(batch.batches, rewards.numel()).view_as(rewards)
        everywhere = _whole_batch(torch.stack([rewards, kl]).transpose(0, 1))[0]
        all_kl = everywhere[:, 1].flatten()[~torch.isnan(everywhere[:, 0].flatten())]
        batch.stats["rollout/kl_seq"] = float(all_kl.mean()) if all_kl.numel() else 0.0
        if preset.kl_placement == "reward" and preset.kl_per == "seq":
            shaped = rewards - kl_coef * kl
    whole, mine = _whole_batch(shaped)
    inputs = BaselineInputs(ema=state.ema_baseline, greedy=greedy)
    advantages = estimate(whole, preset.advantage, run.cfg.algo, inputs)[mine]
    all_rewards = _whole_batch(rewards)[0].flatten()
    valid = all_rewards[~torch.isnan(all_rewards)]
    if "ema" in preset.estimator.needs and valid.numel():
        ema = adv_ops.ema_baseline(valid, state.ema_baseline, run.cfg.algo.ema_decay)
        state.ema_baseline = ema[1]
    batch.advantages = torch.nan_to_num(advantages.flatten(), nan=0.0)
    broadcast(batch.batches, batch.advantages)
    if preset.estimator.level == "token":
        batch.advantages = _token_level(run, batch, kl_coef)
    if run.teacher is not None or run.self_teacher is not None:
        add_teacher_advantages(run, batch)


def add_teacher_advantages(run: PGRun, batch: RolloutBatch) -> None:
    """On-policy distillation: add the teacher's per-token advantage to every micro-batch.

    A_t += c * sum_{s >= t} gamma^(s-t) (log pi_T(a_s) - log pi_old(a_s)), the negative of the
    sampled-token estimate of KL(pi || pi_T) summed forward (gamma 0: each token's own term),
    with c = ``--algo.teacher-coef`` and gamma = ``--algo.teacher-gamma``. Logs the per-token
    reverse-KL estimate over the global batch (``rollout/teacher_kl``). Added after the
    preset's estimator, so PPO's value targets (the returns) do not include it.
    """
    algo, total, tokens = run.cfg.algo, 0.0, 0.0
    for b in batch.batches:
        mask = b.mask if b.teacher_rows is None else b.mask & b.teacher_rows[:, None]
        gap = -sampled_reverse_kl(b.kl_logprobs, b.teacher_logprobs).double()  # (B, T)
        extra = adv_ops.returns_to_go(gap, mask, algo.teacher_gamma)
        b.advantages = (b.advantages.double() + algo.teacher_coef * extra).float()
        total -= float(gap[mask].sum())
        tokens += float(mask.sum())
        batch.advantages[b.rows.cpu()] = masked_mean(b.advantages, b.mask, dim=-1).double().cpu()
    total, tokens = all_reduce_sum(total), all_reduce_sum(tokens)
    batch.stats["rollout/teacher_kl"] = total / tokens if tokens else 0.0
