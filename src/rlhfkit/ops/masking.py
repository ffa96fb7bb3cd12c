"""Masked reductions and the loss aggregation modes (docs/methods/policy.md).

``mask`` is bool and True where a token counts in the loss; it is cast only here.
Aggregation divides by a *global* normaliser (summed over micro-batches and ranks by
``training.accumulate``), so that the gradient does not depend on how a batch is split.

Padding and gradients: the reductions select with ``torch.where``, so a masked-out inf or NaN
never reaches the *value*. It can still reach the *gradient*: ``where`` sends a zero gradient
to the padded entries of its input, and an op upstream whose local derivative there is
non-finite (``exp(inf)``, ``a * inf`` with ``a`` trainable, ...) turns 0 * inf into NaN, which
then flows into the parameters. A per-token loss must therefore be built from inputs that went
through :func:`fill_masked` first (as :func:`rlhfkit.losses.policy.policy_loss` does); the
op-free ``where`` is then the only thing that sees the padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

AggregationName = Literal["token_mean", "seq_mean_token_mean", "fixed_length", "sum"]


AGGREGATIONS: tuple[AggregationName, ...] = get_args(AggregationName)
"""The aggregation modes (``sum`` is for losses whose normaliser is 1)."""


@dataclass(frozen=True)
class Aggregation:
    """A loss-aggregation mode.

    Attributes:
        mode: ``token_mean`` (sum over all loss tokens / total loss tokens, DAPO, SFT),
            ``seq_mean_token_mean`` (per-sequence token mean, then mean over sequences; GRPO),
            ``fixed_length`` (per-sequence sum / ``max_len``, then mean over sequences;
            Dr. GRPO) or ``sum`` (plain sum; normaliser 1).
        max_len: L_max of ``fixed_length`` (1 gives the per-sequence sum).
    """

    mode: AggregationName = "token_mean"
    max_len: int = 1

    def __post_init__(self) -> None:
        if self.mode not in AGGREGATIONS:
            raise ValueError(
                f"unknown aggregation mode {self.mode!r}; choose token_mean, "
                "seq_mean_token_mean, fixed_length or sum"
            )
        if self.max_len < 1:
            raise ValueError(f"fixed_length needs max_len >= 1, got {self.max_len}")


def fill_masked(values: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``values`` where ``mask`` is True, ``fill`` elsewhere: padding made harmless.

    out = where(mask, x, fill). Its backward is where(mask, g, 0) (no product with x), so the
    masked-out entries get exactly zero gradient even when they are inf or NaN, and every op
    applied to the result sees finite padding: a loss built on it has the same value and the
    same gradient whatever the padding held.

    Shapes:
        values, mask: (B, T) (or any broadcastable shapes); returns their broadcast shape.
    """
    return torch.where(mask, values, fill)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is True.

    Shapes:
        values, mask: (B, T) (or any equal shapes); returns a scalar or the reduced shape.
    """
    masked = fill_masked(values, mask)  # not values * mask: inf * 0 would be NaN
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over True entries of ``mask`` (0 where a row has none).

    Shapes:
        values, mask: (B, T); returns a scalar or (B,) for ``dim=-1``.
    """
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def normaliser_count(mask: torch.Tensor, agg: Aggregation) -> torch.Tensor:
    """This micro-batch's share of the global normaliser.

    token_mean and sum: number of loss tokens (``sum`` ignores the normaliser, the count only
    tells ``accumulate`` that the batch is not empty); seq_mean_token_mean / fixed_length:
    number of sequences (rows with at least one loss token).

    Shapes:
        mask: (B, T); returns a scalar fp64 tensor (exact counts).
    """
    if agg.mode in ("token_mean", "sum"):
        return mask.sum().to(torch.float64)
    return mask.any(dim=-1).sum().to(torch.float64)


def aggregate(
    loss: torch.Tensor, mask: torch.Tensor, agg: Aggregation, normaliser: float | torch.Tensor
) -> torch.Tensor:
    """Reduce a per-token loss matrix to this micro-batch's share of the batch loss.

    With ``normaliser`` the global count from :func:`normaliser_count` summed over all
    micro-batches and ranks, the shares of all micro-batches add up to:

    - token_mean: sum_{i,t} l_it m_it / sum_i |y_i|
    - seq_mean_token_mean: (1/B) sum_i (1/|y_i|) sum_t l_it m_it
    - fixed_length: (1/B) sum_i (1/L_max) sum_t l_it m_it
    - sum: sum_{i,t} l_it m_it

    Only the value is protected from non-finite padding here; build ``loss`` from inputs
    passed through :func:`fill_masked` to protect the gradient too (module docstring).

    Args:
        loss: Per-token loss, fp32.
        mask: True where the token counts.
        agg: The aggregation mode.
        normaliser: Global normaliser (ignored for ``sum``); must be > 0 otherwise.

    Shapes:
        loss, mask: (B, T); returns a scalar.
    """
    per_token = fill_masked(loss, mask)  # (B, T); masked inf/NaN never leak into the value
    if agg.mode == "sum":
        return per_token.sum()
    if agg.mode == "token_mean":
        total = per_token.sum()
    elif agg.mode == "seq_mean_token_mean":
        total = (per_token.sum(-1) / mask.sum(-1).clamp(min=1).to(loss.dtype)).sum()
    else:
        total = per_token.sum() / agg.max_len
    return total / normaliser


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Column of the last True entry of each row, for left or right padding alike.

    ``idx = T - 1 - argmax(flip(mask, -1), -1)`` (reward-model docs). ``mask.sum(1) - 1``
    is only right for right padding and must not be used. A row without a True entry gets
    ``T - 1``.

    Shapes:
        mask: (B, T) bool or 0/1; returns (B,) long.
    """
    flipped = mask.flip(-1).to(torch.int8)  # (B, T); argmax finds the first 1 = the last token
    return mask.shape[-1] - 1 - flipped.argmax(-1)


def unpack_rows(values: torch.Tensor, seq_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a packed row into a right-padded matrix, one row per document.

    Args:
        values: Per-token values of a packed row (any trailing dims).
        seq_lens: Document lengths, summing to N.

    Returns:
        ``(padded, mask)``: padded with zeros after each document, mask True on real tokens.

    Shapes:
        values: (N, ...); seq_lens: (D,); returns (D, T_max, ...), (D, T_max).
    """
    lengths = seq_lens.to(torch.long)
    longest = int(lengths.max()) if lengths.numel() else 0
    cols = torch.arange(longest, device=values.device)  # (T_max,)
    mask = cols[None, :] < lengths[:, None]  # (D, T_max)
    padded = values.new_zeros((len(lengths), longest, *values.shape[1:]))  # (D, T_max, ...)
    padded[mask] = values
    return padded, mask


def prefix_tree_mask(
    prefix_len: int, branch_lens: list[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Attention mask of one shared prefix followed by K branches that share it.

    The document is laid out ``[prefix, branch_1, ..., branch_K]``. A prefix token attends
    causally within the prefix; a token of branch k attends to the whole prefix and causally
    within branch k, never to another branch. Each branch then sees exactly what it would see
    as the sequence ``prefix + branch_k`` on its own, so the prefix is computed once for all K.

    Shapes:
        returns (L, L) bool with L = prefix_len + sum(branch_lens); True = may attend.
    """
    lengths = [prefix_len, *branch_lens]
    segment = torch.repeat_interleave(
        torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device)
    )  # (L,): 0 for the prefix, k for branch k
    n = segment.numel()
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()  # (L, L)
    same = segment[:, None] == segment[None, :]  # (L, L)
    to_prefix = segment[None, :] == 0  # (1, L): every token may see the prefix
    return causal & (same | to_prefix)
