"""Reasoning metrics from repeated samples: pass@k, pass^k, maj@k, avg@k (evaluation docs).

For one prompt, n samples were drawn and c of them are correct:

- pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1): the
  probability that at least one of k samples drawn without replacement from the n is correct,
  1 - C(n-c, k) / C(n, k) (unbiased for the pass@k of the sampler).
- pass^k (Yao et al. 2024, tau-bench): the probability that all k are correct, C(c, k) / C(n, k).
- maj@k: whether the majority vote of the first k samples is correct.
- avg@k: the mean correctness of the first k samples.

Aggregates average the per-prompt values over prompts. Pure functions; results are Python floats
(nan for an empty set of prompts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from rlhfkit.rewards.verifiers.math import answers_match, majority_vote


def _check(n: int, c: int, k: int) -> None:
    if k < 1 or n < 1:
        raise ValueError(f"need n >= 1 samples and k >= 1, got n={n}, k={k}")
    if k > n:
        raise ValueError(f"k={k} > n={n}: draw at least k samples per prompt")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n correct samples, got c={c}, n={n}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt from n samples with c correct (Chen et al. 2021).

    pass@k = 1 - C(n-c, k) / C(n, k), computed as the numerically stable product
    1 - prod_{i=n-c+1}^{n} (1 - k / i); it is exactly 1 when n - c < k (every k-subset holds a
    correct sample).

    Raises:
        ValueError: k > n, c outside [0, n], or n, k < 1.
    """
    _check(n, c, k)
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_hat_k(n: int, c: int, k: int) -> float:
    """pass^k of one prompt: the chance that k samples (without replacement) are all correct.

    pass^k = C(c, k) / C(n, k) (tau-bench, Yao et al. 2024); exact integer binomials, one
    correctly rounded division.

    Raises:
        ValueError: k > n, c outside [0, n], or n, k < 1.
    """
    _check(n, c, k)
    return math.comb(c, k) / math.comb(n, k)


def _mean_over_prompts(
    metric: Callable[[int, int, int], float], counts: Sequence[int], n: int | Sequence[int], k: int
) -> float:
    ns = [n] * len(counts) if isinstance(n, int) else list(n)
    if len(ns) != len(counts):
        raise ValueError(f"{len(counts)} correct counts but {len(ns)} sample counts")
    if not counts:
        return math.nan
    return math.fsum(metric(n_i, c_i, k) for n_i, c_i in zip(ns, counts, strict=True)) / len(ns)


def mean_pass_at_k(counts: Sequence[int], n: int | Sequence[int], k: int) -> float:
    """pass@k averaged over prompts: (1/P) sum_p pass@k(n_p, c_p, k).

    Args:
        counts: Correct samples c_p of each prompt.
        n: Samples per prompt: one number for all, or one per prompt.
        k: Samples drawn.
    """
    return _mean_over_prompts(pass_at_k, counts, n, k)


def mean_pass_hat_k(counts: Sequence[int], n: int | Sequence[int], k: int) -> float:
    """pass^k averaged over prompts: (1/P) sum_p C(c_p, k) / C(n_p, k) (arguments as above)."""
    return _mean_over_prompts(pass_hat_k, counts, n, k)


def _first_k(samples: Sequence[Sequence[Any]], k: int) -> list[list[Any]]:
    if k < 1:
        raise ValueError(f"need k >= 1, got {k}")
    short = [i for i, row in enumerate(samples) if len(row) < k]
    if short:
        raise ValueError(f"prompt(s) {short[:5]} have fewer than k={k} samples")
    return [list(row[:k]) for row in samples]


def maj_at_k(
    answers: Sequence[Sequence[str | float | None]],
    references: Sequence[Any],
    k: int,
    is_correct: Callable[[str, Any], bool] = answers_match,
) -> float:
    """maj@k: the fraction of prompts whose majority-vote answer over the first k is correct.

    maj@k = (1/P) sum_p 1[is_correct(vote_p, reference_p)], vote_p = majority_vote(first k
    answers of prompt p) (:func:`rlhfkit.rewards.verifiers.math.majority_vote`: normalised,
    None dropped, ties to the earliest). A prompt with no answer at all counts as wrong.

    Args:
        answers: Extracted answers per prompt (None where a sample had none), in sample order.
        references: Reference answer per prompt.
        k: Samples per vote.
        is_correct: ``(vote, reference) -> bool`` (default: math answer equivalence).

    Raises:
        ValueError: Different numbers of prompts, or a prompt with fewer than k samples.
    """
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} prompts of answers but {len(references)} references")
    if not answers:
        return math.nan
    hits = 0
    for row, reference in zip(_first_k(answers, k), references, strict=True):
        vote = majority_vote(row)
        hits += vote is not None and bool(is_correct(vote, reference))
    return hits / len(answers)


def avg_at_k(correct: Sequence[Sequence[float]], k: int) -> float:
    """avg@k: mean correctness of the first k samples, averaged over prompts.

    avg@k = (1/P) sum_p (1/k) sum_{j<k} r_pj with r_pj in {0, 1} (or a partial score).

    Raises:
        ValueError: A prompt with fewer than k samples.
    """
    rows = _first_k(correct, k)
    if not rows:
        return math.nan
    return math.fsum(math.fsum(float(x) for x in row) / k for row in rows) / len(rows)
