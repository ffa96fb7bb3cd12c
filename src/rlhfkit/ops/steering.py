"""Activation steering math: persona vectors, projections, steering and capping.

Pure functions on hidden states (Chen et al. 2025, "Persona Vectors"; Lu et al. 2026, "The
Assistant Axis"). Hidden states are the residual stream after a decoder layer, (B, T, D); a
vector is (D,).

- ``masked_mean``: per row, the mean hidden state over the positions a mask selects.
- ``mean_difference``: a persona vector, mean(positive) - mean(negative) over examples.
- ``project``: <h, v / |v|>, the coordinate of each hidden state on the vector's axis.
- ``steer_hidden``: h + alpha v at the masked positions.
- ``cap_hidden``: bound the projection on a unit axis from below or above.
- ``auroc``: how well a score separates two sets (Mann-Whitney, ties count 1/2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

Side = Literal["below", "above"]


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the mean of ``hidden`` over the positions where ``mask`` is True.

    Shapes:
        hidden: (B, T, D); mask: (B, T) bool; returns (B, D) fp32 (zeros for an empty row).
    """
    m = mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
    total = (hidden.float() * m).sum(dim=1)
    return total / m.sum(dim=1).clamp(min=1.0)


def mean_difference(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The persona vector: the mean of the positive examples minus the mean of the negative.

    v = (1/P) sum_i a_i^+ - (1/N) sum_j a_j^-, per layer when the inputs carry a layer axis.
    It is exactly 0 when the two sets hold the same rows.

    Shapes:
        positive: (P, ..., D); negative: (N, ..., D); returns (..., D) in fp64.
    """
    if positive.shape[0] == 0 or negative.shape[0] == 0:
        raise ValueError("a persona vector needs at least one positive and one negative example")
    return positive.double().mean(dim=0) - negative.double().mean(dim=0)


def unit(vector: torch.Tensor) -> torch.Tensor:
    """The unit vector v / |v| (raises on a zero vector).

    Shapes:
        vector: (D,); returns (D,).
    """
    norm = vector.norm()
    if not norm > 0:
        raise ValueError("the vector is zero: it has no direction")
    return vector / norm


def project(hidden: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """<h, v / |v|> at every position, in fp32 (0 everywhere for a zero vector: no axis).

    Shapes:
        hidden: (..., D); vector: (D,); returns (...).
    """
    v = vector.float()
    if not v.norm() > 0:
        return torch.zeros(hidden.shape[:-1])
    return hidden.float() @ (v / v.norm())


def steer_hidden(
    hidden: torch.Tensor, vector: torch.Tensor, alpha: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Steer: h + alpha v at the positions ``mask`` selects (all with None), in h's dtype.

    Shapes:
        hidden: (B, T, D); vector: (D,); mask: (B, T) bool or None; returns (B, T, D).
    """
    shift = (alpha * vector).to(hidden.dtype)
    if mask is None:
        return hidden + shift
    return hidden + mask.unsqueeze(-1).to(hidden.dtype) * shift


def cap_hidden(hidden: torch.Tensor, axis: torch.Tensor, tau: float, side: Side) -> torch.Tensor:
    """Bound the projection on a unit axis: from below, h <- h - v min(<h, v> - tau, 0).

    From above, h <- h - v max(<h, v> - tau, 0). A hidden state already on the allowed side is
    returned unchanged (the correction is exactly 0); one past tau is moved along v onto it.
    The projection is computed in fp32 and the correction applied in the input's dtype.

    Shapes:
        hidden: (..., D); axis: (D,), normalised here; returns (..., D).
    """
    v = unit(axis.float())
    gap = hidden.float() @ v - tau  # (...)
    excess = gap.clamp(max=0.0) if side == "below" else gap.clamp(min=0.0)
    if not excess.any():
        return hidden
    return hidden - (excess.unsqueeze(-1) * v).to(hidden.dtype)


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney U / PN).

    1.0: every positive scores above every negative; 0.5: no separation.
    """
    if not positive or not negative:
        raise ValueError("AUROC needs at least one positive and one negative score")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))
