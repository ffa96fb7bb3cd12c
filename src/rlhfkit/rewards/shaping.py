"""Reward shaping (docs/methods/policy.md: KL in the reward, DAPO, EOS-only scoring).

DAPO's overlong penalty, a length penalty, the weighted sum of reward components and the KL
penalty in the reward. Pure functions on plain numbers or (B, T) tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def overlong_penalty(length: int, max_len: int, cache: int) -> float:
    """DAPO's soft overlong penalty of a completion of ``length`` tokens.

    0 if L <= L_max - L_cache; (L_max - L_cache - L) / L_cache if L <= L_max; -1 beyond.
    """
    if cache <= 0 or cache > max_len:
        raise ValueError(f"need 0 < cache <= max_len, got cache {cache}, max_len {max_len}")
    if length <= max_len - cache:
        return 0.0
    if length <= max_len:
        return (max_len - cache - length) / cache
    return -1.0


def length_penalty(length: int, budget: int, per_token: float) -> float:
    """-per_token * max(0, length - budget)."""
    return -per_token * max(0, length - budget)


def weighted_sum(
    components: dict[str, Sequence[float | None]], weights: dict[str, float]
) -> list[float | None]:
    """Per completion, sum_k w_k r_k over the components; None if any component skipped it.

    Raises:
        ValueError: When a component has no weight or the lengths differ.
    """
    missing = set(components) - set(weights)
    if missing:
        raise ValueError(f"no weight for reward component(s) {sorted(missing)}")
    lengths = {len(v) for v in components.values()}
    if len(lengths) > 1:
        raise ValueError(f"reward components have different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    out: list[float | None] = []
    for i in range(n):
        values = [(weights[k], v[i]) for k, v in components.items()]
        out.append(None if any(x is None for _, x in values) else sum(w * x for w, x in values))
    return out


def kl_in_reward(
    scores: torch.Tensor,
    token_kl: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    per_token: bool,
) -> torch.Tensor:
    """Rewards with the KL penalty folded in (detached).

    Per token (PPO, REINFORCE++): r_t = -beta k_t, plus the score at the last completion token.
    Per sequence (RLOO, REINFORCE): one value per row, score - beta sum_t k_t, returned at the
    last completion token as well (zeros elsewhere), so both forms sum to the same total.

    Shapes:
        scores: (B,); token_kl, mask: (B, T); returns (B, T).
    """
    kl = torch.where(mask, token_kl.detach(), 0.0)
    last = mask.shape[1] - 1 - torch.flip(mask.long(), dims=[1]).argmax(dim=1)  # (B,)
    rows = torch.arange(mask.shape[0], device=mask.device)
    if per_token:
        rewards = -beta * kl
    else:
        rewards = torch.zeros_like(kl)
        scores = scores - beta * kl.sum(1)
    rewards[rows, last] += scores.to(rewards.dtype)
    return torch.where(mask, rewards, 0.0)


def kimi_length_rewards(lengths: Sequence[int], correct: Sequence[bool | float]) -> list[float]:
    """Kimi k1.5 length reward of the samples of one prompt (Kimi Team 2025, length penalty).

    lambda_i = 0.5 - (L_i - L_min) / (L_max - L_min) (all 0 when every length is equal); the
    reward is lambda_i for a correct sample and min(0, lambda_i) for a wrong one, so short correct
    answers gain up to +0.5 and long answers lose up to -0.5 whether right or wrong.

    Raises:
        ValueError: When ``lengths`` and ``correct`` differ in length.
    """
    if len(lengths) != len(correct):
        raise ValueError(f"{len(lengths)} lengths but {len(correct)} correctness flags")
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    if high == low:
        return [0.0] * len(lengths)
    lambdas = [0.5 - (length - low) / (high - low) for length in lengths]
    return [lam if ok else min(0.0, lam) for lam, ok in zip(lambdas, correct, strict=True)]


def l1_length_reward(correct: bool | float, length: int, target: int, alpha: float) -> float:
    """L1's length-controlled reward (Aggarwal & Welleck 2025; LCPO, the L1-Exact setting).

    r = 1[correct] - alpha |L_target - L|.
    """
    return float(bool(correct)) - alpha * abs(target - length)
