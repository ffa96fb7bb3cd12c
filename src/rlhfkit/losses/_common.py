"""Helpers shared by the direct-alignment losses (:mod:`rlhfkit.losses.preference`).

The loss dtype, the zero-safe division by the normaliser and the detached metric sums (also
used by :mod:`rlhfkit.losses.reward`), the log-ratios Δ = logp − ref, the
per-token averages and the paired losses' common output (the metric sums listed in
:mod:`rlhfkit.losses.preference`). Every tensor argument is keyword-only, so that chosen and
rejected (or policy and reference) log-probs cannot be swapped by position.
"""

from __future__ import annotations

import torch

from rlhfkit.types import LossOutput

Number = float | torch.Tensor
Pair = tuple[torch.Tensor, torch.Tensor]


def loss_dtype(x: torch.Tensor) -> torch.dtype:
    """The loss dtype of ``x``: fp64 stays fp64, everything else computes in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def safe_div(total: torch.Tensor, normaliser: Number) -> torch.Tensor:
    """``total / normaliser`` where a zero normaliser (nothing to count) gives 0, not NaN."""
    norm = torch.as_tensor(normaliser, dtype=total.dtype, device=total.device)
    return total / torch.where(norm == 0, torch.ones_like(norm), norm)


def detached_sums(metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The metric sums detached and in fp64 (they add up across micro-batches)."""
    return {k: v.detach().double() for k, v in metrics.items()}


def ref_deltas(
    *,
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    ref_chosen_logprobs: torch.Tensor | None,
    ref_rejected_logprobs: torch.Tensor | None,
) -> Pair:
    """(Δ_c, Δ_r) in the loss dtype; the reference log-probs never carry gradient."""
    if ref_chosen_logprobs is None or ref_rejected_logprobs is None:
        raise ValueError(
            "this loss needs ref_chosen_logprobs and ref_rejected_logprobs (reference log-probs); "
            "simpo and orpo train without a reference"
        )
    dt = loss_dtype(chosen_logprobs)
    d_c = chosen_logprobs.to(dt) - ref_chosen_logprobs.detach().to(dt)  # (N,)
    d_r = rejected_logprobs.to(dt) - ref_rejected_logprobs.detach().to(dt)  # (N,)
    return d_c, d_r


def per_token_avg(*, values: torch.Tensor, tokens: torch.Tensor | None, name: str) -> torch.Tensor:
    """Per-token average ``values / tokens`` (lengths below 1 count as 1)."""
    if tokens is None:
        raise ValueError(f"this loss uses per-token averages: pass {name} (response lengths)")
    v = values.to(loss_dtype(values))
    return v / tokens.to(v.dtype).clamp(min=1)  # (N,)


def pair_output(
    *,
    per_pair: torch.Tensor,
    rewards: Pair,
    logprobs: Pair,
    deltas: Pair | None,
    normaliser: Number | None,
    **extra: torch.Tensor,
) -> LossOutput:
    """L = sum_i l_i / normaliser and the module's detached metric sums (plus ``extra``)."""
    total = per_pair.sum()
    loss = safe_div(total, per_pair.numel() if normaliser is None else normaliser)
    margin = rewards[0] - rewards[1]  # (N,)
    d_c, d_r = deltas if deltas is not None else (torch.zeros_like(margin),) * 2
    metrics = {
        "pairs": torch.tensor(float(per_pair.numel()), device=per_pair.device),
        "loss_sum": total,
        "chosen_rewards_sum": rewards[0].sum(),
        "rejected_rewards_sum": rewards[1].sum(),
        "margin_sum": margin.sum(),
        "correct": (margin > 0).sum() + 0.5 * (margin == 0).sum(),
        "chosen_logprobs_sum": logprobs[0].sum(),
        "rejected_logprobs_sum": logprobs[1].sum(),
        "displaced": ((d_c < 0) & (d_r < 0)).sum(),
        "delta_chosen_sum": d_c.sum(),
        **extra,
    }
    return LossOutput(loss=loss, metrics=detached_sums(metrics))
