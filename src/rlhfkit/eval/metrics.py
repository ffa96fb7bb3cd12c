"""Reward-model metrics (docs/methods/reward_models.md).

Pure functions on 1-D tensors or float sequences; all arithmetic runs in fp64 on CPU and the
results are plain Python numbers, ready for JSON logging.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch

Values = torch.Tensor | Sequence[float]
QUANTILES = {"p05": 0.05, "p25": 0.25, "p50": 0.50, "p75": 0.75, "p95": 0.95}


def _vec(values: Values) -> torch.Tensor:
    """1-D fp64 CPU copy of a tensor or a float sequence."""
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64).flatten()  # (N,)
    return torch.tensor(list(values), dtype=torch.float64).flatten()  # (N,)


def _wins(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1[c > r] + 0.5 * 1[c == r] per pair."""
    return (chosen > rejected).double() + 0.5 * (chosen == rejected).double()


def _pair(chosen: Values, rejected: Values) -> tuple[torch.Tensor, torch.Tensor]:
    c, r = _vec(chosen), _vec(rejected)
    if c.shape != r.shape:
        raise ValueError(f"chosen ({c.numel()}) and rejected ({r.numel()}) differ in length")
    return c, r


def pairwise_accuracy(chosen: Values, rejected: Values) -> float:
    """Pairwise accuracy: mean_i 1[r_c,i > r_r,i], ties count 0.5 (nan without pairs).

    Shapes:
        chosen, rejected: (N,).
    """
    c, r = _pair(chosen, rejected)
    return float(_wins(c, r).mean()) if c.numel() else math.nan


def expected_calibration_error(chosen: Values, rejected: Values, bins: int = 10) -> float:
    """ECE of the BT preference probability (Guo et al. 2017).

    p_i = sigmoid(r_c - r_r) predicts "chosen wins"; confidence c_i = max(p_i, 1 - p_i); the
    prediction is correct iff p_i > 0.5 (0.5 counts half). With equal-width bins over
    [0.5, 1]: ECE = sum_b (n_b / n) |acc_b - conf_b| (nan without pairs).

    Shapes:
        chosen, rejected: (N,).
    """
    c, r = _pair(chosen, rejected)
    if not c.numel():
        return math.nan
    p = torch.sigmoid(c - r)  # (N,)
    confidence = torch.maximum(p, 1 - p)  # (N,)
    hit = _wins(p, torch.full_like(p, 0.5))  # (N,)
    index = ((confidence - 0.5) * 2 * bins).floor().long().clamp(0, bins - 1)  # (N,)
    hit_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, hit)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    return float((hit_sum - conf_sum).abs().sum() / c.numel())  # n_b |acc_b - conf_b| summed


def pearson(x: Values, y: Values) -> float:
    """Pearson correlation; nan if either input is constant or has fewer than 2 values.

    Shapes:
        x, y: (N,).
    """
    a, b = _pair(x, y)
    if a.numel() < 2 or bool(a.max() == a.min()) or bool(b.max() == b.min()):
        return math.nan  # tested exactly: a constant's mean can round off its own value
    da, db = a - a.mean(), b - b.mean()
    denom = (da.square().sum() * db.square().sum()).sqrt()
    return float((da * db).sum() / denom) if float(denom) > 0 else math.nan


def ranks(values: Values) -> torch.Tensor:
    """1-based ranks, ties sharing the mean of their positions (fp64).

    Shapes:
        values: (N,); returns (N,).
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    order = torch.argsort(v, stable=True)
    out = torch.empty_like(v)
    sorted_v = v[order]
    start = 0
    for end in range(1, v.numel() + 1):
        if end == v.numel() or sorted_v[end] != sorted_v[start]:
            out[order[start:end]] = (start + end + 1) / 2  # mean of ranks start+1 .. end
            start = end
    return out


def spearman(x: Values, y: Values) -> float:
    """Spearman rank correlation: Pearson's of the (tie-averaged) ranks; nan like ``pearson``.

    Shapes:
        x, y: (N,).
    """
    return pearson(ranks(x), ranks(y))


def distinct_ngrams(tokens: Sequence[Hashable], n: int = 2) -> float:
    """The fraction of a sequence's n-grams that are distinct: 1 for no repetition.

    distinct-n = |set of n-grams| / (number of n-grams); a text looping on one phrase tends to
    0. A sequence shorter than n has no n-gram and scores 1.

    Args:
        tokens: the sequence (token ids or words).
        n: the n-gram length.
    """
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def reward_distribution(rewards: Values, bins: int = 10) -> dict[str, object]:
    """Summary of a reward distribution.

    Returns:
        ``count``, ``mean``, ``std`` (population, ddof 0), ``min``, ``max``, quantiles ``p05``
        ``p25`` ``p50`` ``p75`` ``p95`` (linear interpolation) and ``histogram``:
        ``{"edges": [bins + 1 floats], "counts": [bins ints]}`` over equal-width bins on
        [min, max] (a constant input gets the range [v - 0.5, v + 0.5]).

    Shapes:
        rewards: (N,), N >= 1.
    """
    x = _vec(rewards)
    if not x.numel():
        raise ValueError("reward_distribution needs at least one reward")
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = torch.histogram(x, bins=bins, range=(lo, hi))
    summary: dict[str, object] = {
        "count": x.numel(),
        "mean": float(x.mean()),
        "std": float(x.std(correction=0)),
        "min": float(x.min()),
        "max": float(x.max()),
    }
    probs = torch.tensor(list(QUANTILES.values()), dtype=torch.float64)
    summary.update(zip(QUANTILES, torch.quantile(x, probs).tolist(), strict=True))
    summary["histogram"] = {"edges": edges.tolist(), "counts": [int(n) for n in counts]}
    return summary


def _group(prompt_ids: Sequence[Hashable], n: int) -> list[list[int]]:
    if len(prompt_ids) != n:
        raise ValueError(f"prompt_ids ({len(prompt_ids)}) and scores ({n}) differ in length")
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for row, pid in enumerate(prompt_ids):
        groups[pid].append(row)
    return list(groups.values())


def orm_metrics(
    *, scores: Values, correct: Values, prompt_ids: Sequence[Hashable]
) -> dict[str, float]:
    """Outcome-RM metrics over scored rollouts.

    - ``mean_score_correct`` / ``mean_score_incorrect``: mean score per outcome.
    - ``top1_accuracy``: over prompts with >= 1 correct rollout, the fraction whose top-scored
      rollout is correct (a tie at the top counts the correct share of the tied rollouts).
    - ``pairwise_accuracy``: over all (correct, incorrect) pairs of the same prompt,
      mean 1[s_correct > s_incorrect], ties 0.5.
    - ``top1_prompts`` / ``pairs``: how many prompts / pairs those means cover.
    Means over nothing are nan.

    Shapes:
        scores, correct: (N,) (correct is 0/1 or bool); prompt_ids: N hashables.
    """
    s, ok = _vec(scores), _vec(correct) > 0.5
    if ok.shape != s.shape:
        raise ValueError(f"scores ({s.numel()}) and correct ({ok.numel()}) differ in length")
    top1: list[float] = []
    pair_wins, pairs = 0.0, 0
    for rows in _group(prompt_ids, s.numel()):
        gs, gok = s[rows], ok[rows]  # (G,)
        if not bool(gok.any()):
            continue
        top1.append(float(gok[gs == gs.max()].double().mean()))
        good, bad = gs[gok], gs[~gok]  # (G_c,), (G_i,)
        pair_wins += float(_wins(good[:, None], bad[None, :]).sum())  # (G_c, G_i) summed
        pairs += good.numel() * bad.numel()

    def mean(values: torch.Tensor) -> float:
        return float(values.mean()) if values.numel() else math.nan

    return {
        "mean_score_correct": mean(s[ok]),
        "mean_score_incorrect": mean(s[~ok]),
        "top1_accuracy": sum(top1) / len(top1) if top1 else math.nan,
        "top1_prompts": float(len(top1)),
        "pairwise_accuracy": pair_wins / pairs if pairs else math.nan,
        "pairs": float(pairs),
    }
