"""Reward-model over-optimisation: best-of-n curves, Gao fits, RM ensembles (RLHF book ch. 14).

Over-optimisation is measured by scoring the same samples with a proxy reward (the trained
reward model) and a gold reward (the programmatic judge the RM was trained to imitate) and
plotting both against d = sqrt(KL(pi || pi_init)) (Gao, Schulman & Hilton 2023, "Scaling Laws for
Reward Model Overoptimization"). The proxy keeps rising as the policy moves away from its start;
the gold reward rises, peaks and falls.

- ``bon_curve``: the best-of-n curve from an (M, N) grid of proxy and gold rewards, with the
  analytic best-of-n KL, log n - (n - 1)/n (Stiennon 2020).
- ``bon_unbiased``: the exact expected best-of-n reward from N >= n samples of a prompt.
- ``fit_gao_bon`` / ``fit_gao_rl``: least-squares fits of Gao's functional forms
  R_bon(d) = d (alpha - beta d) and R_rl(d) = d (alpha - beta log d).
- ``gao_peaks``: where those forms peak, d*_bon = alpha / (2 beta), d*_rl = e^(alpha/beta - 1).
- ``bon_curve_unbiased``: the best-of-n curve from every prompt's N samples with
  ``bon_unbiased``, with 95% intervals over prompts.
- ``gao_fit``: one fit with its R^2 and peak, as the ``rlhfkit overopt`` report tabulates it.
- ``pairwise_agreement``: how often a proxy orders two samples of a prompt as gold does.
- ``rm_ensemble``: combine the scores of K reward models (Coste et al. 2023, "Reward Model
  Ensembles Help Mitigate Overoptimization"): mean, worst case (min) or the uncertainty-weighted
  mean - lambda * std.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from rlhfkit.eval.intervals import mean_interval
from rlhfkit.ops.ensemble import ENSEMBLE_MODES as ENSEMBLE_MODES
from rlhfkit.ops.ensemble import rm_ensemble as rm_ensemble
from rlhfkit.ops.selection import bon_kl


def _grid(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (M, N) matrix, got shape {tuple(t.shape)}")
    return t


def bon_curve(proxy: Any, gold: Any, ns: Sequence[int]) -> list[dict[str, float]]:
    """The best-of-n curve: mean proxy and gold reward of the proxy's pick among n samples.

    Every prompt's N samples are split into floor(N / n) disjoint consecutive groups of n
    (columns [g n, (g + 1) n); the last N mod n columns are left out). Each group keeps its
    argmax by proxy reward (ties to the first; a NaN proxy counts as -inf, so it is never picked
    while the group has a scored sample, and a group with no scored sample is left out). The
    curve point of n averages the picks' proxy rewards over all groups of all prompts, and their
    gold rewards over the picks whose gold reward is not NaN. Disjoint groups make every pick an
    honest draw of best-of-n from the base policy; n = 1 gives the base policy's mean reward.

    KL = log n - (n - 1)/n (the analytic best-of-n KL, :func:`rlhfkit.ops.selection.bon_kl`) and
    d = sqrt(KL).

    Shapes:
        proxy, gold: (M, N), M prompts by N samples each (tensors, arrays or nested lists).

    Args:
        proxy: The proxy (reward-model) rewards; selection uses these.
        gold: The gold rewards of the same samples; only averaged.
        ns: The values of n, each in 1..N.

    Returns:
        One dict per n, in the order of ``ns``: ``n``, ``kl``, ``d``, ``proxy`` and ``gold``
        (NaN when nothing was averaged) and ``groups`` (the number of groups counted).
    """
    p, g = _grid(proxy, "proxy"), _grid(gold, "gold")
    if p.shape != g.shape:
        raise ValueError(f"proxy and gold differ in shape: {tuple(p.shape)} vs {tuple(g.shape)}")
    m, n_samples = p.shape
    filled = torch.nan_to_num(p, nan=-math.inf)  # (M, N)
    out = []
    for n in ns:
        if not 1 <= n <= n_samples:
            raise ValueError(f"every n must be in 1..N = {n_samples}, got {n}")
        groups = n_samples // n
        width = groups * n
        picks = filled[:, :width].reshape(m, groups, n).argmax(dim=2, keepdim=True)  # (M, G, 1)
        pick_p = p[:, :width].reshape(m, groups, n).gather(2, picks).flatten()  # (M*G,)
        pick_g = g[:, :width].reshape(m, groups, n).gather(2, picks).flatten()  # (M*G,)
        scored = ~torch.isnan(pick_p)  # a NaN pick means the whole group was unscored
        gold_ok = scored & ~torch.isnan(pick_g)
        kl = bon_kl(n)
        out.append(
            {
                "n": n,
                "kl": kl,
                "d": math.sqrt(kl),
                "proxy": float(pick_p[scored].mean()) if scored.any() else math.nan,
                "gold": float(pick_g[gold_ok].mean()) if gold_ok.any() else math.nan,
                "groups": int(scored.sum()),
            }
        )
    return out


def bon_unbiased(proxy: Sequence[float], gold: Sequence[float], n: int) -> tuple[float, float]:
    """Expected proxy and gold reward of best-of-n, exactly, from N >= n samples of one prompt.

    Best-of-n draws n of the N samples without replacement and keeps the proxy's argmax (ties
    to the lowest index). Over all C(N, n) draws, with the samples ranked by (proxy ascending,
    index descending), the sample of rank i (1-based) is the pick in C(i - 1, n - 1) of them, so

        E[r of the pick] = sum_i r_(i) C(i - 1, n - 1) / C(N, n)

    for r = proxy and r = gold alike: the unbiased estimator of the best-of-n reward, which
    uses every sample instead of splitting them into disjoint groups.

    Args:
        proxy: The N proxy rewards (selection), finite.
        gold: The N gold rewards of the same samples, finite.
        n: Samples per draw, 1 <= n <= N.

    Returns:
        (expected proxy reward, expected gold reward) of the pick.

    Raises:
        ValueError: Different lengths, n out of range, or a non-finite reward.
    """
    size = len(proxy)
    if len(gold) != size:
        raise ValueError(f"proxy and gold differ in length: {size} vs {len(gold)}")
    if not 1 <= n <= size:
        raise ValueError(f"n must be in 1..N = {size}, got {n}")
    if not all(math.isfinite(x) for x in [*proxy, *gold]):
        raise ValueError("best-of-n rewards must be finite")
    order = sorted(range(size), key=lambda i: (proxy[i], -i))  # rank 1 .. N
    total = math.comb(size, n)
    weights = [math.comb(rank, n - 1) / total for rank in range(size)]  # C(i - 1, n - 1)
    return (
        math.fsum(w * proxy[i] for w, i in zip(weights, order, strict=True)),
        math.fsum(w * gold[i] for w, i in zip(weights, order, strict=True)),
    )


def _lstsq2(x1: list[float], x2: list[float], y: list[float]) -> tuple[float, float]:
    """Least squares y ~ a x1 + b x2 through the 2x2 normal equations, solved in fp64."""
    s11 = math.fsum(u * u for u in x1)
    s12 = math.fsum(u * v for u, v in zip(x1, x2, strict=True))
    s22 = math.fsum(v * v for v in x2)
    t1 = math.fsum(u * w for u, w in zip(x1, y, strict=True))
    t2 = math.fsum(v * w for v, w in zip(x2, y, strict=True))
    det = s11 * s22 - s12 * s12
    if not det > 1e-12 * s11 * s22:  # also catches NaN and empty input
        raise ValueError("the fit needs at least two points with distinct d > 0")
    return (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det


def _points(d: Sequence[float], r: Sequence[float]) -> list[tuple[float, float]]:
    if len(d) != len(r):
        raise ValueError(f"d and r differ in length: {len(d)} vs {len(r)}")
    pts = [(float(a), float(b)) for a, b in zip(d, r, strict=True)]
    return [(a, b) for a, b in pts if a > 0 and math.isfinite(a) and math.isfinite(b)]


def fit_gao_bon(d: Sequence[float], r: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of Gao's best-of-n form R(d) = d (alpha - beta d).

    R is linear in (alpha, beta) with features (d, -d^2), so the fit solves the 2x2 normal
    equations in fp64. Points at d = 0 carry no information (R(0) = 0 for every alpha, beta) and
    points with a non-finite d or reward are left out. R is the reward gain over the base policy
    (subtract the n = 1 reward before fitting).

    Args:
        d: sqrt(KL) of each point.
        r: The reward gain at each point.

    Returns:
        (alpha, beta).

    Raises:
        ValueError: Fewer than two usable points with distinct d.
    """
    pts = _points(d, r)
    return _lstsq2([a for a, _ in pts], [-a * a for a, _ in pts], [b for _, b in pts])


def fit_gao_rl(d: Sequence[float], r: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of Gao's RL form R(d) = d (alpha - beta log d).

    Linear in (alpha, beta) with features (d, -d log d); solved like :func:`fit_gao_bon`. The
    form is undefined at d = 0 (its limit is 0), so only points with d > 0 are used.

    Args:
        d: sqrt(KL) of each point.
        r: The reward gain over the initial policy at each point.

    Returns:
        (alpha, beta).

    Raises:
        ValueError: Fewer than two usable points with distinct d.
    """
    pts = _points(d, r)
    return _lstsq2([a for a, _ in pts], [-a * math.log(a) for a, _ in pts], [b for _, b in pts])


def gao_peaks(alpha: float, beta: float) -> tuple[float, float]:
    """Where Gao's forms peak: d*_bon = alpha / (2 beta) and d*_rl = exp(alpha / beta - 1).

    From dR/dd = 0: alpha - 2 beta d = 0 for best-of-n and alpha - beta (log d + 1) = 0 for RL.
    With beta <= 0 the gold reward never turns down and both peaks are +inf (an RL peak beyond
    the float range is +inf too).

    Returns:
        (d*_bon, d*_rl).
    """
    if beta <= 0:
        return math.inf, math.inf
    ratio = alpha / beta
    d_rl = math.exp(ratio - 1) if ratio - 1 < 709 else math.inf
    return alpha / (2 * beta), d_rl


def bon_curve_unbiased(
    proxy: Sequence[Sequence[float]], gold: Sequence[Sequence[float]], ns: Sequence[int]
) -> list[dict[str, Any]]:
    """The best-of-n curve with the unbiased estimator: per n, the means over prompts.

    For each prompt, :func:`bon_unbiased` gives the exact expected proxy and gold reward of the
    proxy's pick among n of its N samples; the point of n averages them over the M prompts,
    with a 95% Student-t interval of the gold mean over prompts (M >= 2). KL = log n - (n - 1)/n
    and d = sqrt(KL), as in :func:`bon_curve`.

    Shapes:
        proxy, gold: (M, N) nested sequences, M prompts by N >= max(ns) samples.

    Returns:
        One dict per n: ``n``, ``kl``, ``d``, ``proxy``, ``gold``, ``gold_low``, ``gold_high``.
    """
    if len(proxy) != len(gold) or not proxy:
        raise ValueError(f"need the same M >= 1 prompts: {len(proxy)} vs {len(gold)}")
    out = []
    for n in ns:
        picks = [bon_unbiased(p, g, n) for p, g in zip(proxy, gold, strict=True)]
        golds = [g for _, g in picks]
        interval = mean_interval(golds) if len(golds) > 1 else {"low": golds[0], "high": golds[0]}
        kl = bon_kl(n)
        proxies = math.fsum(p for p, _ in picks) / len(picks)
        out.append({
            "n": n, "kl": kl, "d": math.sqrt(kl), "proxy": proxies,
            "gold": math.fsum(golds) / len(golds), "gold_low": interval["low"],
            "gold_high": interval["high"],
        })  # fmt: skip
    return out


def r_squared(d: Sequence[float], r: Sequence[float], alpha: float, beta: float, rl: bool) -> float:
    """Coefficient of determination of a Gao fit: 1 - SS_res / SS_tot over the points with d > 0.

    The prediction is d (alpha - beta d) (best-of-n) or d (alpha - beta log d) (RL, ``rl``); SS_tot
    is taken around the points' mean. NaN with fewer than two points or no spread.
    """
    pts = _points(d, r)
    if len(pts) < 2:
        return math.nan
    mean = math.fsum(y for _, y in pts) / len(pts)
    shape = math.log if rl else (lambda x: x)
    res = math.fsum((y - x * (alpha - beta * shape(x))) ** 2 for x, y in pts)
    tot = math.fsum((y - mean) ** 2 for _, y in pts)
    return 1.0 - res / tot if tot > 0 else math.nan


def gao_fit(d: Sequence[float], gain: Sequence[float], rl: bool) -> dict[str, float] | None:
    """Gao's form fitted to reward gains: ``alpha``, ``beta``, ``r2`` and the peak ``d_star``.

    Args:
        d: sqrt(KL) of each point.
        gain: The reward gain over the starting policy at each point.
        rl: The RL form d (alpha - beta log d) instead of best-of-n's d (alpha - beta d).

    Returns:
        None when there are fewer than two usable points.
    """
    try:
        alpha, beta = (fit_gao_rl if rl else fit_gao_bon)(d, gain)
    except ValueError:
        return None
    peak = gao_peaks(alpha, beta)[1 if rl else 0]
    return {"alpha": alpha, "beta": beta, "r2": r_squared(d, gain, alpha, beta, rl), "d_star": peak}


def pairwise_agreement(proxy: Sequence[Sequence[float]], gold: Sequence[Sequence[float]]) -> float:
    """Share of same-prompt sample pairs with different gold rewards that the proxy orders alike.

    Over every prompt m and pair i < j of its samples with gold_mi != gold_mj, the pair counts
    1 when sign(proxy_mi - proxy_mj) = sign(gold_mi - gold_mj), 1/2 on a proxy tie, else 0: the
    proxy's accuracy on the policy's own samples, which is what best-of-n and RL select by.

    Shapes:
        proxy, gold: (M, N) nested sequences.

    Returns:
        The agreement in [0, 1] (NaN when no pair differs in gold).
    """
    hits, pairs = 0.0, 0
    for p_row, g_row in zip(proxy, gold, strict=True):
        for i in range(len(g_row)):
            for j in range(i + 1, len(g_row)):
                if g_row[i] == g_row[j]:
                    continue
                pairs += 1
                dp = p_row[i] - p_row[j]
                hits += 0.5 if dp == 0 else float((dp > 0) == (g_row[i] > g_row[j]))
    return hits / pairs if pairs else math.nan
