"""Confidence intervals over prompts for the pipeline's headline figures.

Completions of one prompt are not independent (an easy prompt is easy for every sample), so
every interval here treats the prompt as the unit: each prompt contributes one value (its mean
over samples), and the interval is Student's t over the N prompts:

    mean = (1/N) sum_i x_i,   s^2 = (1/(N-1)) sum_i (x_i - mean)^2,
    CI = mean -/+ t_{(1+level)/2, N-1} * s / sqrt(N).

- :func:`mean_interval`: the mean of per-prompt values (a model's gold reward).
- :func:`paired_difference`: the mean of per-prompt differences between two models evaluated
  on the same prompts (final minus SFT); its interval is the paired t interval.
- :func:`win_tie_loss`: the shares of wins, ties and losses, each with its interval from the
  per-prompt shares, and the win/loss ratio.

The t quantile uses the Cornish-Fisher expansion of Student's t in the normal quantile z
(Abramowitz and Stegun 26.7.5, terms up to 1/nu^4): within 3e-4 of the exact value for nu >= 5,
3e-5 for nu >= 8 and exact as nu -> infinity; nu = 1 and 2 use their closed forms. (Intervals
over fewer than 5 prompts are too wide to mean much whichever quantile is used.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist, fmean, stdev


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t distribution with ``df`` degrees of freedom.

    Closed forms for df 1 (Cauchy: tan(pi (p - 1/2))) and 2 ((2p - 1) / sqrt(2 p (1 - p)));
    otherwise, with z the standard normal quantile of p and nu = df (Abramowitz and Stegun
    26.7.5)::

        t = z + g1/nu + g2/nu^2 + g3/nu^3 + g4/nu^4
        g1 = (z^3 + z) / 4
        g2 = (5 z^5 + 16 z^3 + 3 z) / 96
        g3 = (3 z^7 + 19 z^5 + 17 z^3 - 15 z) / 384
        g4 = (79 z^9 + 776 z^7 + 1482 z^5 - 1920 z^3 - 945 z) / 92160

    Args:
        p: Probability in (0, 1).
        df: Degrees of freedom, >= 1.

    Returns:
        The quantile (for example 2.2281 for p = 0.975, df = 10).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    g = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(gk / df ** (k + 1) for k, gk in enumerate(g))


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean of per-prompt values with its Student-t interval.

    Args:
        values: One value per prompt (N >= 2), NaN-free.
        level: Coverage of the interval.

    Returns:
        ``{"mean", "low", "high", "n"}``; ``low == high == mean`` when every value is equal.
    """
    xs = [float(v) for v in values]
    if len(xs) < 2:
        raise ValueError(f"an interval needs at least 2 prompts, got {len(xs)}")
    if any(math.isnan(x) for x in xs):
        raise ValueError("values must not contain NaN")
    mean = fmean(xs)
    half = t_quantile((1 + level) / 2, len(xs) - 1) * stdev(xs) / math.sqrt(len(xs))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(xs)}


def paired_difference(
    after: Sequence[float], before: Sequence[float], level: float = 0.95
) -> dict[str, float]:
    """Mean of per-prompt differences ``after_i - before_i`` with the paired t interval.

    Args:
        after: One value per prompt (the final model's mean gold reward on that prompt).
        before: The same prompts' values for the baseline model, in the same order.
        level: Coverage of the interval.

    Returns:
        ``{"mean", "low", "high", "n"}`` of the differences.
    """
    if len(after) != len(before):
        raise ValueError(f"paired values differ in length: {len(after)} and {len(before)}")
    return mean_interval([a - b for a, b in zip(after, before, strict=True)], level)


def win_tie_loss(outcomes: Sequence[Sequence[float]], level: float = 0.95) -> dict[str, object]:
    """Win, tie and loss shares over prompts, each with its interval, and wins per loss.

    Args:
        outcomes: Per prompt, the outcomes of its comparisons: 1.0 win, 0.5 tie, 0.0 loss.
        level: Coverage of the intervals.

    Returns:
        ``{"win", "tie", "loss"}``, each a :func:`mean_interval` of the per-prompt shares
        (their means sum to 1 when every prompt has the same number of comparisons),
        ``"wins_per_loss"`` (total wins / total losses; inf when nothing was lost and
        something won, NaN when neither), and ``"n"`` (comparisons).
    """
    rows = [list(o) for o in outcomes if len(o)]
    shares = {
        name: mean_interval([sum(o == value for o in row) / len(row) for row in rows], level)
        for name, value in (("win", 1.0), ("tie", 0.5), ("loss", 0.0))
    }
    wins = sum(o == 1.0 for row in rows for o in row)
    losses = sum(o == 0.0 for row in rows for o in row)
    ratio = wins / losses if losses else (math.inf if wins else math.nan)
    return {**shares, "wins_per_loss": ratio, "n": sum(len(row) for row in rows)}
