"""KTO, the unpaired direct-alignment loss, and its reference point (Ethayarajh 2024).

Its inputs are single examples, not pairs: ``logprobs`` / ``ref_logprobs`` the summed response
log-probs under the policy and the frozen reference, ``desirable`` the example's label, ``z0``
the reference point. :func:`kto_unpaired_from_pairs` turns preference pairs into such examples.
Loss math runs in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch

from rlhfkit.losses._common import Number, detached_sums, loss_dtype, safe_div
from rlhfkit.types import LossOutput


def kto_z0(*, log_ratios: torch.Tensor) -> torch.Tensor:
    """KTO reference point z0 = max(0, mean(log π_θ − log π_ref)), detached (KTO).

    ``log_ratios`` are the mismatched pairs (x_i, y_{i+1}) of an extra forward pass, or the
    undesirable ones (:func:`kto_z0_batch_rejected`). Under data parallelism, all-gather them
    (or all-reduce their sum and count) first. No ratios gives 0.

    Shapes:
        log_ratios: (M,); returns a scalar.
    """
    r = log_ratios.detach().to(loss_dtype(log_ratios))
    return (r.sum() / max(r.numel(), 1)).clamp(min=0)


def kto_z0_batch_rejected(
    *, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, desirable: torch.Tensor
) -> torch.Tensor:
    """Cheap z0 (``z0="batch_rejected"``): :func:`kto_z0` of the undesirable log-ratios.

    Shapes:
        logprobs, ref_logprobs, desirable: (N,); returns a scalar.
    """
    return kto_z0(log_ratios=(logprobs.detach() - ref_logprobs.detach())[~desirable])


def kto_unpaired_from_pairs(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor,
    ref_rejected_logprobs: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Split N pairs into 2N KTO examples: chosen desirable, rejected undesirable.

    Returns:
        ``logprobs``, ``ref_logprobs`` and ``desirable``, the keyword inputs of :func:`kto_loss`.

    Shapes:
        inputs (N,); every output (2N,), the N chosen first.
    """
    desirable = torch.arange(2 * chosen_logprobs.numel(), device=chosen_logprobs.device)
    return {
        "logprobs": torch.cat([chosen_logprobs, rejected_logprobs]),  # (2N,)
        "ref_logprobs": torch.cat([ref_chosen_logprobs, ref_rejected_logprobs]),  # (2N,)
        "desirable": desirable < chosen_logprobs.numel(),  # (2N,)
    }


def kto_loss(
    *,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    desirable: torch.Tensor,
    z0: Number,
    beta: float = 0.1,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    normaliser: Number | None = None,
) -> LossOutput:
    """KTO (Ethayarajh 2024), unpaired, with r = logprobs − ref (summed).

    Desirable: l = λ_D(1 − σ(β(r − z0))); undesirable: l = λ_U(1 − σ(β(z0 − r))); both are
    λ·σ(−sβ(r − z0)) with s = ±1. ``z0`` (see :func:`kto_z0`) is detached here. With class
    imbalance set λ_D·n_D/(λ_U·n_U) in [1, 4/3]. ``normaliser`` defaults to N examples.

    Returns:
        LossOutput with metric sums ``examples``, ``desirable``, ``undesirable``, ``loss_sum``,
        ``desirable_rewards_sum`` / ``undesirable_rewards_sum`` (βr) and
        ``desirable_logprobs_sum`` / ``undesirable_logprobs_sum``.

    Shapes:
        logprobs, ref_logprobs, desirable (bool): (N,); z0 scalar; loss scalar.
    """
    dt = loss_dtype(logprobs)
    lp = logprobs.to(dt)  # (N,)
    r = lp - ref_logprobs.detach().to(dt)  # (N,)
    z = torch.as_tensor(z0, device=r.device).detach().to(dt)
    sign = desirable.to(dt) * 2 - 1  # (N,): +1 desirable, -1 undesirable
    weight = torch.where(desirable, lambda_d, lambda_u).to(dt)  # (N,)
    per_example = weight * torch.sigmoid(-sign * beta * (r - z))  # (N,)
    total = per_example.sum()
    loss = safe_div(total, r.numel() if normaliser is None else normaliser)
    metrics = {
        "examples": torch.tensor(float(r.numel()), device=r.device),
        "desirable": desirable.sum(),
        "undesirable": (~desirable).sum(),
        "loss_sum": total,
        "desirable_rewards_sum": torch.where(desirable, beta * r, 0.0).sum(),
        "undesirable_rewards_sum": torch.where(desirable, 0.0, beta * r).sum(),
        "desirable_logprobs_sum": torch.where(desirable, lp, 0.0).sum(),
        "undesirable_logprobs_sum": torch.where(desirable, 0.0, lp).sum(),
    }
    return LossOutput(loss=loss, metrics=detached_sums(metrics))
