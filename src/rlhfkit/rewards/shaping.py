"""Reward shaping (docs/methods/policy.md: KL in the reward, DAPO, EOS-only scoring).

DAPO's overlong penalty, a length penalty, the weighted sum of reward components, the KL
penalty in the reward, and reward normalisation and clipping (running moments merged with
Chan et al.'s parallel update). Pure functions on plain numbers or tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

REWARD_NORMS = ("none", "batch", "running")
"""``--algo.reward_norm``: no normalisation, this batch's moments, or the running moments."""

Moments = tuple[int, float, float]
"""(count, mean, M2) of the values seen: M2 = sum_i (x_i - mean)^2."""


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


def merge_moments(count: int, mean: float, m2: float, values: torch.Tensor) -> Moments:
    """The moments (n, mean, M2) updated with the non-NaN ``values`` (Chan et al. 1979).

    With the batch's n_b, mean_b and M2_b = sum_i (x_i - mean_b)^2, n = n_a + n_b and
    delta = mean_b - mean_a:

        mean = mean_a + delta n_b / n,    M2 = M2_a + M2_b + delta^2 n_a n_b / n.

    Starting from (0, 0, 0) this gives one batch's own moments. Returns the input unchanged
    when every value is NaN.

    Shapes:
        values: any shape (flattened); returns plain numbers.
    """
    x = values.detach().flatten().double()
    x = x[~torch.isnan(x)]
    n_b = int(x.numel())
    if n_b == 0:
        return count, mean, m2
    mean_b = float(x.mean())
    m2_b = float((x - mean_b).square().sum())
    n = count + n_b
    delta = mean_b - mean
    return n, mean + delta * n_b / n, m2 + m2_b + delta * delta * count * n_b / n


def moments_std(count: int, m2: float) -> float:
    """The population std sqrt(M2 / n) of merged moments (0 when n = 0)."""
    return math.sqrt(max(m2, 0.0) / count) if count > 0 else 0.0


def normalise_rewards(
    values: torch.Tensor, mean: float, std: float, eps: float = 1e-8
) -> torch.Tensor:
    """Rewards standardised: r <- (r - mean) / (std + eps); NaN (skipped) stays NaN.

    Shapes:
        values: any shape; returns the same shape and dtype.
    """
    return (values - mean) / (std + eps)


def clip_rewards(values: torch.Tensor, bound: float) -> torch.Tensor:
    """Rewards clipped: r <- clip(r, -bound, bound); NaN stays NaN.

    Shapes:
        values: any shape; returns the same shape and dtype.

    Raises:
        ValueError: When ``bound`` is not positive.
    """
    if not bound > 0:
        raise ValueError(f"the reward clip bound must be > 0, got {bound}")
    return values.clamp(-bound, bound)


def clip_fraction(values: torch.Tensor, bound: float) -> float:
    """Share of the non-NaN ``values`` with |r| > bound (0 when every value is NaN)."""
    valid = values[~torch.isnan(values)]
    return float((valid.abs() > bound).double().mean()) if valid.numel() else 0.0


def reward_scale(
    values: torch.Tensor, norm: str, running: Moments
) -> tuple[tuple[float, float] | None, Moments]:
    """The (mean, std) to normalise one batch's rewards by, and the running moments after it.

    ``norm`` "batch": the batch's own mean and std; "running": the running moments updated
    with this batch first (:func:`merge_moments`), then read; "none": no normalisation (None).
    Both stds are population stds, sqrt(M2 / n); NaN values are ignored.

    Shapes:
        values: any shape; returns plain numbers.

    Raises:
        ValueError: An unknown ``norm``.
    """
    if norm not in REWARD_NORMS:
        raise ValueError(f"unknown reward normalisation {norm!r} (choose from {REWARD_NORMS})")
    if norm == "none":
        return None, running
    if norm == "running":
        running = merge_moments(*running, values)
    count, mean, m2 = running if norm == "running" else merge_moments(0, 0.0, 0.0, values)
    return (mean, moments_std(count, m2)), running


def shape_rewards(
    values: torch.Tensor, scale: tuple[float, float] | None, bound: float | None
) -> torch.Tensor:
    """Normalise, then clip: r <- clip((r - mean) / (std + 1e-8), -bound, bound).

    ``scale`` is the (mean, std) of :func:`reward_scale` (None: no normalisation); ``bound``
    None: no clipping. NaN (a skipped completion) stays NaN.

    Shapes:
        values: any shape; returns the same shape and dtype.
    """
    out = values if scale is None else normalise_rewards(values, *scale)
    return out if bound is None else clip_rewards(out, bound)


LENGTH_PREFIX = "length:"
"""``length:<budget>[:<per_word>]``: the word-count length penalty as a reward."""


def parse_length_spec(spec: str) -> tuple[int, float]:
    """``length:<budget>[:<per_word>]`` as (budget words, penalty per word; default 0.01).

    Raises:
        ValueError: Not of that form, a negative budget, or a negative or non-finite penalty.
    """
    parts = spec.removeprefix(LENGTH_PREFIX).split(":")
    try:
        budget = int(parts[0])
        per_word = float(parts[1]) if len(parts) == 2 else 0.01
    except (ValueError, IndexError):
        budget, per_word = -1, 0.0
    if len(parts) > 2 or budget < 0 or not 0.0 <= per_word < float("inf"):
        raise ValueError(
            f"reward {spec!r}: expected length:<budget words >= 0>[:<penalty per word >= 0>]"
        )
    return budget, per_word


def length_reward(spec: str) -> Callable[[str], float]:
    """The reward ``length:<budget>[:<per_word>]``: -per_word * max(0, words - budget).

    A length penalty for any command that takes ``--rewards`` (``bon``, ``rs``, ``eval``,
    ``rl``): weighted beside a reward model it removes the easiest exploit of a proxy that
    likes long answers. Words are whitespace-separated, so the reward needs no tokenizer.
    """
    budget, per_word = parse_length_spec(spec)

    def reward(completion: str) -> float:
        return length_penalty(len(completion.split()), budget, per_word)

    return reward
