"""Direct-alignment (DPO family) losses (docs/methods/direct_alignment.md).

Paired losses take per-pair sequence quantities: ``chosen_logprobs`` / ``rejected_logprobs`` the
summed response log-probs under the policy (with grad); ``ref_chosen_logprobs`` /
``ref_rejected_logprobs`` the same under the frozen reference (detached here; ``None`` for the
reference-free losses, which ignore them); ``chosen_tokens`` / ``rejected_tokens`` the response
lengths (for per-token averages "avg" = sum / length); ``beta``; ``normaliser``, the global
number of pairs of the optimiser batch (summed over micro-batches and ranks by the caller;
default the local N). Every paired loss accepts all six tensors, so a recipe calls any row of
:data:`PREFERENCE_LOSSES` the same way. Notation: Δ_c = logp_c − ref_c, Δ_r = logp_r − ref_r,
h = Δ_c − Δ_r.

Each loss returns L = sum_i l_i / normaliser and detached metric *sums* (they add up across
micro-batches; divide by ``pairs`` for means): ``pairs``, ``loss_sum``, ``chosen_rewards_sum``
/ ``rejected_rewards_sum`` (the loss's implicit rewards: βΔ, or β·avg logprobs for reference-free
losses), ``margin_sum`` (reward_c − reward_r), ``correct`` (reward_c > reward_r, ties 0.5),
``chosen_logprobs_sum`` / ``rejected_logprobs_sum``, ``displaced`` (pairs with Δ_c < 0 and Δ_r < 0:
preference displacement) and ``delta_chosen_sum`` (summed Δ_c); the last two are 0 for
reference-free losses. Loss math runs in fp32 (fp64 for fp64 inputs).

Every tensor argument, of the losses and of their helpers, is keyword-only, so that chosen and
rejected (or policy and reference) log-probs cannot be swapped by position.

This module holds the reference-based paired losses and :data:`PREFERENCE_LOSSES`, the table
a recipe calls them through; the reference-free SimPO and ORPO live in
:mod:`rlhfkit.losses.reference_free` and the unpaired KTO in :mod:`rlhfkit.losses.kto`, both
re-exported here, and the shared helpers in ``rlhfkit.losses._common``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhfkit.losses._common import Number, pair_output, per_token_avg, ref_deltas
from rlhfkit.losses.kto import kto_loss
from rlhfkit.losses.kto import kto_unpaired_from_pairs as kto_unpaired_from_pairs
from rlhfkit.losses.kto import kto_z0 as kto_z0
from rlhfkit.losses.kto import kto_z0_batch_rejected as kto_z0_batch_rejected
from rlhfkit.losses.reference_free import ORPO_MAX_AVG_LOGP as ORPO_MAX_AVG_LOGP
from rlhfkit.losses.reference_free import orpo_log_odds as orpo_log_odds
from rlhfkit.losses.reference_free import orpo_loss, simpo_loss
from rlhfkit.types import LossOutput


def dpo_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    normaliser: Number | None = None,
) -> LossOutput:
    """DPO (Rafailov 2023, eq. 7): l = −log σ(βh) = softplus(−βh).

    ∂l/∂h = −β σ(−βh); implicit rewards βΔ_c, βΔ_r. The lengths are unused.

    Returns:
        LossOutput with the module's metric sums.

    Shapes:
        every tensor (N,); loss scalar.
    """
    d_c, d_r = ref_deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    per_pair = F.softplus(-beta * (d_c - d_r))  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    return pair_output(
        per_pair=per_pair, rewards=(beta * d_c, beta * d_r), logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser,
    )  # fmt: skip


def cdpo_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    label_smoothing: Number = 0.1,
    normaliser: Number | None = None,
) -> LossOutput:
    """Conservative DPO (Mitchell 2023): l = −(1−ε) log σ(βh) − ε log σ(−βh).

    ``label_smoothing`` ε is the probability that a label is flipped; the minimiser is finite,
    h* = log((1−ε)/ε)/β, with l(h*) = H_b(ε). ε = 0 gives DPO.

    Returns:
        LossOutput with the module's metric sums (rewards βΔ).

    Shapes:
        every tensor (N,); ``label_smoothing`` scalar or (N,); loss scalar.
    """
    d_c, d_r = ref_deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    x = beta * (d_c - d_r)  # (N,)
    per_pair = (1 - label_smoothing) * F.softplus(-x) + label_smoothing * F.softplus(x)
    logprobs = (chosen_logprobs, rejected_logprobs)
    return pair_output(
        per_pair=per_pair, rewards=(beta * d_c, beta * d_r), logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser,
    )  # fmt: skip


def ipo_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    average_logprobs: bool = False,
    normaliser: Number | None = None,
) -> LossOutput:
    """IPO (Azar 2023): l = (h − 1/(2β))², minimised at h = 1/(2β).

    h is built from the summed log-probs (unscaled, 25 at init for β 0.1), or from per-token
    averages with ``average_logprobs`` (which then needs the lengths). Rewards βΔ of that h.

    Returns:
        LossOutput with the module's metric sums.

    Shapes:
        every tensor (N,); loss scalar.
    """
    d_c, d_r = ref_deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    a_c, a_r = (
        (
            per_token_avg(values=d_c, tokens=chosen_tokens, name="chosen_tokens"),
            per_token_avg(values=d_r, tokens=rejected_tokens, name="rejected_tokens"),
        )
        if average_logprobs
        else (d_c, d_r)
    )
    per_pair = (a_c - a_r - 1 / (2 * beta)) ** 2  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    return pair_output(
        per_pair=per_pair, rewards=(beta * a_c, beta * a_r), logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser,
    )  # fmt: skip


def dpo_norm_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 2.0,
    normaliser: Number | None = None,
) -> LossOutput:
    """Length-normalised DPO (Tülu 3): l = softplus(−β(Δ_c/|y_c| − Δ_r/|y_r|)).

    DPO on per-token average log-ratios, hence the larger default β 2.0. Rewards β·Δ/|y|.

    Returns:
        LossOutput with the module's metric sums.

    Shapes:
        every tensor (N,); loss scalar.
    """
    d_c, d_r = ref_deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    a_c = per_token_avg(values=d_c, tokens=chosen_tokens, name="chosen_tokens")  # (N,)
    a_r = per_token_avg(values=d_r, tokens=rejected_tokens, name="rejected_tokens")  # (N,)
    per_pair = F.softplus(-beta * (a_c - a_r))  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    return pair_output(
        per_pair=per_pair, rewards=(beta * a_c, beta * a_r), logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser,
    )  # fmt: skip


def apo_zero_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    normaliser: Number | None = None,
) -> LossOutput:
    """APO-zero (D'Oosterlinck 2024): l = 1 − σ(βΔ_c) + σ(βΔ_r).

    Pushes the chosen likelihood up and the rejected one down (chosen better than the model).

    Returns:
        LossOutput with the module's metric sums (rewards βΔ).

    Shapes:
        every tensor (N,); loss scalar.
    """
    d_c, d_r = ref_deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    per_pair = 1 - torch.sigmoid(beta * d_c) + torch.sigmoid(beta * d_r)  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    return pair_output(
        per_pair=per_pair, rewards=(beta * d_c, beta * d_r), logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser,
    )  # fmt: skip


def apo_down_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    normaliser: Number | None = None,
) -> LossOutput:
    """APO-down (D'Oosterlinck 2024): l = σ(βΔ_c) + 1 − σ(β(Δ_c − Δ_r)).

    Pushes both likelihoods down, the rejected one more (model better than the chosen).

    Returns:
        LossOutput with the module's metric sums (rewards βΔ).

    Shapes:
        every tensor (N,); loss scalar.
    """
    d_c, d_r = ref_deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    per_pair = torch.sigmoid(beta * d_c) + 1 - torch.sigmoid(beta * (d_c - d_r))  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    return pair_output(
        per_pair=per_pair, rewards=(beta * d_c, beta * d_r), logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser,
    )  # fmt: skip


def rpo_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor | None = None,
    beta: float = 0.1,
    alpha: float = 1.0,
    nll_weights: torch.Tensor | None = None,
    normaliser: Number | None = None,
) -> LossOutput:
    """DPO + NLL (Pang 2024; alias ``dpo_nll``): l = softplus(−βh) − α·w·logp_c/|y_c|.

    α = 0 gives DPO. (Not Nemotron-4's reward-aware "RPO".) ``nll_weights`` w (default 1)
    restricts the NLL to some pairs: Pang et al. imitate only correct chosen replies, so where
    pairs also differ in lesser ways (format, length) the NLL should skip those whose chosen
    reply is merely the better of two bad ones.

    Returns:
        LossOutput with the module's metric sums plus ``nll_sum`` (sum of −w·logp_c/|y_c|).

    Shapes:
        every tensor (N,); loss scalar.
    """
    d_c, d_r = ref_deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    nll = -per_token_avg(values=chosen_logprobs, tokens=chosen_tokens, name="chosen_tokens")  # (N,)
    if nll_weights is not None:
        nll = nll * nll_weights.to(nll.dtype)
    per_pair = F.softplus(-beta * (d_c - d_r)) + alpha * nll  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    rewards = (beta * d_c, beta * d_r)
    return pair_output(
        per_pair=per_pair, rewards=rewards, logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser, nll_sum=nll.sum(),
    )  # fmt: skip


dpo_nll_loss = rpo_loss


def _odpo_offsets(
    *,
    score_chosen: torch.Tensor | None,
    score_rejected: torch.Tensor | None,
    offsets: torch.Tensor | None,
    alpha: float,
) -> torch.Tensor:
    if offsets is not None:
        if score_chosen is not None or score_rejected is not None:
            raise ValueError("odpo: pass score_chosen/score_rejected or offsets, not both")
        return offsets.detach()
    if score_chosen is None or score_rejected is None:
        raise ValueError("odpo needs score_chosen and score_rejected (or offsets)")
    gap = (score_chosen - score_rejected).detach()  # (N,)
    if bool((gap <= 0).any()):
        raise ValueError(
            "odpo needs score_chosen > score_rejected for every pair; "
            f"got gaps {gap[gap <= 0].tolist()}"
        )
    return alpha * torch.log(gap)


def odpo_loss(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    score_chosen: torch.Tensor | None = None,
    score_rejected: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
    beta: float = 0.1,
    alpha: float = 1.0,
    normaliser: Number | None = None,
) -> LossOutput:
    """DPO with an offset (Amini 2024): l = softplus(−(βh − δ)).

    δ = α·log(s_c − s_r) from the pair's scores (s_c > s_r required, else ValueError), or
    ``offsets`` δ given directly (α not applied). α = 0 gives DPO.

    Returns:
        LossOutput with the module's metric sums (rewards βΔ) plus ``offset_sum``.

    Shapes:
        every tensor (N,); loss scalar.
    """
    d_c, d_r = ref_deltas(
        chosen_logprobs=chosen_logprobs, rejected_logprobs=rejected_logprobs,
        ref_chosen_logprobs=ref_chosen_logprobs, ref_rejected_logprobs=ref_rejected_logprobs,
    )  # fmt: skip
    delta = _odpo_offsets(
        score_chosen=score_chosen, score_rejected=score_rejected, offsets=offsets, alpha=alpha
    ).to(d_c.dtype)  # (N,)
    per_pair = F.softplus(delta - beta * (d_c - d_r))  # (N,)
    logprobs = (chosen_logprobs, rejected_logprobs)
    rewards = (beta * d_c, beta * d_r)
    return pair_output(
        per_pair=per_pair, rewards=rewards, logprobs=logprobs, deltas=(d_c, d_r),
        normaliser=normaliser, offset_sum=delta.sum(),
    )  # fmt: skip


@dataclass(frozen=True)
class PreferenceLossSpec:
    """One row of :data:`PREFERENCE_LOSSES`: how a recipe calls a direct-alignment loss.

    Attributes:
        fn: The loss function.
        reference_free: True if it never reads reference log-probs (no π_ref pass needed).
        paired: False for unpaired losses (KTO: ``logprobs``, ``ref_logprobs``, ``desirable``,
            ``z0`` instead of the paired inputs).
        beta: Default β (equal to the function's own default).
        hyperparameters: Keyword names of its hyperparameters besides ``beta``.
        needs_lengths: True if it reads ``chosen_tokens`` / ``rejected_tokens`` (IPO only with
            ``average_logprobs``).
        extra_inputs: Per-pair data inputs beyond the common ones.
    """

    fn: Callable[..., LossOutput]
    reference_free: bool
    paired: bool
    beta: float
    hyperparameters: tuple[str, ...] = ()
    needs_lengths: bool = False
    extra_inputs: tuple[str, ...] = ()


_RPO = PreferenceLossSpec(rpo_loss, False, True, 0.1, ("alpha",), needs_lengths=True)
PREFERENCE_LOSSES: dict[str, PreferenceLossSpec] = {
    "dpo": PreferenceLossSpec(dpo_loss, False, True, 0.1),
    "cdpo": PreferenceLossSpec(cdpo_loss, False, True, 0.1, ("label_smoothing",)),
    "ipo": PreferenceLossSpec(ipo_loss, False, True, 0.1, ("average_logprobs",)),
    "dpo_norm": PreferenceLossSpec(dpo_norm_loss, False, True, 2.0, needs_lengths=True),
    "simpo": PreferenceLossSpec(simpo_loss, True, True, 2.0, ("gamma_beta_ratio",), True),
    "orpo": PreferenceLossSpec(orpo_loss, True, True, 0.1, ("lambda_",), needs_lengths=True),
    "kto": PreferenceLossSpec(kto_loss, False, False, 0.1, ("lambda_d", "lambda_u"), False),
    "apo_zero": PreferenceLossSpec(apo_zero_loss, False, True, 0.1),
    "apo_down": PreferenceLossSpec(apo_down_loss, False, True, 0.1),
    "rpo": _RPO,
    "dpo_nll": _RPO,
    "odpo": PreferenceLossSpec(
        odpo_loss, False, True, 0.1, ("alpha",), extra_inputs=("score_chosen", "score_rejected")
    ),
}
"""Direct-alignment losses by name; ``rpo`` and ``dpo_nll`` are the same row."""
