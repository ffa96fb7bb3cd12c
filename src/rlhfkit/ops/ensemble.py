"""Reward-model ensembles: K reward models' scores combined into one.

Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization".
"""

from __future__ import annotations

import torch

ENSEMBLE_MODES = ("mean", "min", "uwo")
"""Modes of :func:`rm_ensemble`: mean, min (worst case), uwo (mean - lam * std)."""


def rm_ensemble(scores: torch.Tensor, mode: str = "mean", lam: float = 1.0) -> torch.Tensor:
    """Combine the scores of K reward models into one reward per sequence (Coste et al. 2023).

    - ``mean``: (1/K) sum_k r_k.
    - ``min``: min_k r_k (worst-case optimisation).
    - ``uwo``: mean - lam * std, with the population std sqrt((1/K) sum_k (r_k - mean)^2)
      (uncertainty-weighted optimisation; default lam = 1.0).

    Shapes:
        scores: (K, B), one row per ensemble member. Returns (B,).

    Args:
        scores: The member scores.
        mode: One of :data:`ENSEMBLE_MODES`.
        lam: The std penalty of ``uwo``.
    """
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be (K, B) with K >= 1, got {tuple(scores.shape)}")
    if mode == "mean":
        return scores.mean(dim=0)
    if mode == "min":
        return scores.min(dim=0).values
    if mode == "uwo":
        return scores.mean(dim=0) - lam * scores.std(dim=0, correction=0)
    raise ValueError(f"unknown ensemble mode {mode!r}; choose one of {ENSEMBLE_MODES}")
