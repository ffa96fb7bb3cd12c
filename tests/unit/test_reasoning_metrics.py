"""Reasoning metrics: pass@k, pass^k, maj@k, avg@k."""

from __future__ import annotations

import itertools
import math

import pytest

from rlhfkit.eval.reasoning import (
    avg_at_k,
    maj_at_k,
    mean_pass_at_k,
    mean_pass_hat_k,
    pass_at_k,
    pass_hat_k,
)


def brute_force(n: int, c: int, k: int, need_all: bool) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) with any / all correct."""
    subsets = list(itertools.combinations(range(n), k))
    if need_all:
        hits = sum(all(i < c for i in s) for s in subsets)
    else:
        hits = sum(any(i < c for i in s) for s in subsets)
    return hits / len(subsets)


GRID = [(n, c, k) for n in range(1, 10) for c in range(n + 1) for k in range(1, n + 1)]


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 2, 0.5),
        (10, 3, 1, 0.3),
        (10, 3, 5, 0.916667),
        (10, 0, 5, 0.0),
        (10, 8, 3, 1.0),
        (200, 20, 10, 0.660226),
        (5, 2, 3, 0.9),
    ],
)
def test_pass_at_k_methods_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=5e-7)


def test_pass_at_k_equals_brute_force_enumeration():
    for n, c, k in GRID:
        assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k, False), abs=1e-12)


def test_pass_at_k_equals_the_binomial_form():
    for n, c, k in [(200, 20, 10), (100, 1, 50), (64, 7, 16), (1000, 3, 100)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)


def test_pass_at_k_special_cases():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)  # k = 1: the pass rate
    assert pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(10, 3, 8) == 1.0  # n - c = 7 < k: every subset holds a correct sample
    assert pass_at_k(10, 0, 10) == 0.0
    values = [pass_at_k(16, 4, k) for k in range(1, 17)]
    assert values == sorted(values)  # non-decreasing in k


@pytest.mark.parametrize(("n", "c", "k"), [(4, 1, 5), (4, 5, 2), (4, -1, 2), (4, 1, 0), (0, 0, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
    with pytest.raises(ValueError):
        pass_hat_k(n, c, k)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"), [(4, 2, 2, 1 / 6), (10, 3, 2, 0.066667), (8, 4, 1, 0.5)]
)
def test_pass_hat_k_methods_values(n, c, k, expected):
    assert pass_hat_k(n, c, k) == pytest.approx(expected, abs=5e-7)


def test_pass_hat_k_equals_brute_force_enumeration():
    for n, c, k in GRID:
        assert pass_hat_k(n, c, k) == pytest.approx(brute_force(n, c, k, True), abs=1e-12)


def test_pass_hat_k_special_cases():
    assert pass_hat_k(10, 2, 3) == 0.0  # c < k
    assert pass_hat_k(10, 10, 7) == 1.0
    assert pass_hat_k(10, 4, 1) == pass_at_k(10, 4, 1)  # k = 1: both are the pass rate


def test_mean_pass_at_k_and_hat_k():
    assert mean_pass_at_k([1, 0], 4, 2) == pytest.approx(0.25)
    assert mean_pass_at_k([1, 3], [4, 10], 1) == pytest.approx((0.25 + 0.3) / 2)
    assert mean_pass_hat_k([2, 4], [4, 8], 1) == pytest.approx(0.5)
    assert mean_pass_hat_k([2, 4], 4, 2) == pytest.approx((1 / 6 + 1) / 2)
    assert math.isnan(mean_pass_at_k([], 4, 2))
    with pytest.raises(ValueError, match="sample counts"):
        mean_pass_at_k([1, 2], [4], 2)


def test_maj_at_k():
    answers = [
        ["3", "5", "3", None],  # vote 3: correct
        ["5", "3", "3", "3"],  # first 2: tie, 5 wins (wrong); first 4: 3 (correct)
        [None, None, None, None],  # no answer: wrong
        ["0.5", "1/2", "2", "2"],  # 0.5 and 1/2 are one vote
    ]
    references = ["3", "3", "3", r"\frac{1}{2}"]
    assert maj_at_k(answers, references, 1) == pytest.approx(2 / 4)
    assert maj_at_k(answers, references, 2) == pytest.approx(2 / 4)
    assert maj_at_k(answers, references, 3) == pytest.approx(3 / 4)
    assert maj_at_k(answers, references, 4) == pytest.approx(3 / 4)  # 0.5 tie 2-2: earliest


def test_maj_at_k_with_a_custom_check():
    def same_word(vote, reference):
        return vote.lower() == reference.lower()

    answers = [["Paris", "paris", "Lyon"], ["Rome", "Milan", "Milan"]]
    assert maj_at_k(answers, ["PARIS", "rome"], 3, is_correct=same_word) == pytest.approx(0.5)


def test_maj_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fewer than k"):
        maj_at_k([["1", "2"], ["1"]], ["1", "1"], 2)
    with pytest.raises(ValueError, match="references"):
        maj_at_k([["1"]], ["1", "2"], 1)
    assert math.isnan(maj_at_k([], [], 1))


def test_avg_at_k():
    correct = [[1, 0, 1, 1], [0, 0, 1, 0]]
    assert avg_at_k(correct, 1) == pytest.approx(0.5)
    assert avg_at_k(correct, 2) == pytest.approx(0.25)
    assert avg_at_k(correct, 4) == pytest.approx((0.75 + 0.25) / 2)
    assert avg_at_k([[0.5, 1.0]], 2) == pytest.approx(0.75)  # partial scores
    assert math.isnan(avg_at_k([], 3))
    with pytest.raises(ValueError, match="fewer than k"):
        avg_at_k(correct, 5)
    with pytest.raises(ValueError, match="k >= 1"):
        avg_at_k(correct, 0)


def test_avg_at_k_is_the_mean_of_pass_at_1_over_subsets():
    # With all n samples, avg@n = c / n = pass@1.
    rows = [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert avg_at_k(rows, 5) == pytest.approx(mean_pass_at_k([2, 1], 5, 1))
