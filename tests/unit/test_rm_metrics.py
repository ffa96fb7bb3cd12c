"""Reward-model metrics.

Expected values are derived by hand in each docstring, never produced by the code under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.eval.metrics import (
    expected_calibration_error,
    orm_metrics,
    pairwise_accuracy,
    pearson,
    reward_distribution,
)

finite = st.floats(-20, 20, allow_nan=False, allow_infinity=False)
pairs = st.lists(st.tuples(finite, finite), min_size=1, max_size=20)


def test_pairwise_accuracy_hand_value_and_ties():
    """(3 > 1) 1, (0 = 0) 0.5, (1 < 2) 0, (tensor input) -> 1.5 / 3."""
    assert pairwise_accuracy([3.0, 0.0, 1.0], [1.0, 0.0, 2.0]) == pytest.approx(0.5)
    assert pairwise_accuracy(torch.tensor([2.0, 5.0]), torch.tensor([1.0, 0.0])) == 1.0
    assert math.isnan(pairwise_accuracy([], []))
    with pytest.raises(ValueError, match="differ in length"):
        pairwise_accuracy([1.0], [1.0, 2.0])


def test_constant_reward_gives_accuracy_half_and_zero_ece():
    """A constant RM ties every pair: accuracy 0.5; p = 0.5 with confidence 0.5 and accuracy
    0.5 in the first bin, so ECE = |0.5 - 0.5| = 0."""
    rewards = [0.7] * 50
    assert pairwise_accuracy(rewards, rewards) == 0.5
    assert expected_calibration_error(rewards, rewards) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_value():
    """d = log 3 -> p = 0.75, correct; d = -log 9 -> p = 0.1, confidence 0.9, wrong. Different
    bins: ECE = (1/2)|1 - 0.75| + (1/2)|0 - 0.9| = 0.125 + 0.45 = 0.575. Both pairs at
    p = 0.75 (one each way round) share a bin: acc 1/2, conf 0.75 -> 0.25."""
    ece = expected_calibration_error([math.log(3), 0.0], [0.0, math.log(9)])
    assert ece == pytest.approx(0.575, abs=1e-6)
    same = expected_calibration_error([math.log(3), 0.0], [0.0, math.log(3)])
    assert same == pytest.approx(0.25, abs=1e-6)
    # Bins are 0.05 wide on [0.5, 1]: p = 0.52 (correct) and p = 0.42 (confidence 0.58, wrong)
    # fall in bins 0 and 1: ECE = (1/2)|1 - 0.52| + (1/2)|0 - 0.58| = 0.53. With one bin:
    # |1/2 - 0.55| = 0.05. A certain, correct pair (p -> 1) lands in the last bin: ECE 0.
    near = [math.log(0.52 / 0.48), 0.0], [0.0, math.log(0.58 / 0.42)]
    assert expected_calibration_error(*near) == pytest.approx(0.53, abs=1e-6)
    assert expected_calibration_error(*near, bins=1) == pytest.approx(0.05, abs=1e-6)
    assert expected_calibration_error([100.0], [0.0]) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_bt_sampled_labels_vanishes():
    """Labels drawn from P(a beats b) = sigmoid(r_a - r_b) and scored by the same rewards are
    calibrated by construction: E[correct | confidence c] = c, so ECE -> 0 (200k pairs: the
    sampling noise is about sqrt(0.25 / 20k) per bin). Control: rewards scaled by 3 are
    over-confident and give a large ECE."""
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    r_a = torch.randn(n, generator=gen, dtype=torch.float64) * 2
    r_b = torch.randn(n, generator=gen, dtype=torch.float64) * 2
    a_wins = torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(r_a - r_b)
    chosen, rejected = torch.where(a_wins, r_a, r_b), torch.where(a_wins, r_b, r_a)
    assert expected_calibration_error(chosen, rejected) < 0.01
    assert expected_calibration_error(3 * chosen, 3 * rejected) > 0.05


@settings(max_examples=60, deadline=None)
@given(pairs, st.integers(1, 20))
def test_accuracy_and_ece_properties(items, bins):
    """acc(c, r) + acc(r, c) = 1; 0 <= ECE <= 1; by the triangle inequality
    sum_b |S_b| >= |sum_b S_b|, so any binning gives at least the one-bin ECE
    |mean acc - mean conf|."""
    c, r = [x[0] for x in items], [x[1] for x in items]
    assert pairwise_accuracy(c, r) + pairwise_accuracy(r, c) == pytest.approx(1.0)
    ece = expected_calibration_error(c, r, bins=bins)
    one_bin = expected_calibration_error(c, r, bins=1)
    assert 0.0 <= one_bin <= ece + 1e-12 <= 1.0 + 2e-12


def test_pearson_hand_value_and_constant():
    """x = [1, 2, 3], y = [2, 4, 7]: dx = [-1, 0, 1], dy = [-7/3, -1/3, 8/3];
    r = 5 / sqrt(2 * 114/9) = 0.993399."""
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9), abs=1e-9)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.993399, abs=1e-6)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(pearson([1.0], [2.0]))


moderate = st.integers(-1000, 1000).map(lambda v: v / 8)  # exact in binary: no underflow


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(moderate, moderate), min_size=3, max_size=20),
    st.sampled_from([0.5, 2.0, 4.0]),
    moderate,
)
def test_pearson_affine_property(items, scale, shift):
    """r(x, y) = r(y, x) = r(a x + b, y) for a > 0, and |r| <= 1."""
    x, y = [p[0] for p in items], [p[1] for p in items]
    r = pearson(x, y)
    if math.isnan(r):
        assert min(x) == max(x) or min(y) == max(y)
        return
    assert abs(r) <= 1 + 1e-9
    assert pearson(y, x) == pytest.approx(r, abs=1e-9)
    assert pearson([scale * v + shift for v in x], y) == pytest.approx(r, abs=1e-6)


def test_reward_distribution_hand_values():
    """0, 1, ..., 100: mean 50; population std sqrt((101^2 - 1) / 12) = sqrt(850); quantile q
    lands exactly on 100 q; bins of width 10 hold 10 values each, the last (closed) bin 11."""
    summary = reward_distribution(torch.arange(101, dtype=torch.float64))
    assert summary["count"] == 101
    assert summary["mean"] == pytest.approx(50.0)
    assert summary["std"] == pytest.approx(math.sqrt(850), abs=1e-9)
    assert (summary["min"], summary["max"]) == (0.0, 100.0)
    for key, q in [("p05", 5), ("p25", 25), ("p50", 50), ("p75", 75), ("p95", 95)]:
        assert summary[key] == pytest.approx(q, abs=1e-9)
    hist = summary["histogram"]
    assert hist["edges"] == pytest.approx([10.0 * i for i in range(11)])
    assert hist["counts"] == [10] * 9 + [11]
    assert all(isinstance(c, int) for c in hist["counts"])
    constant = reward_distribution([3.0, 3.0], bins=2)
    assert constant["histogram"] == {"edges": [2.5, 3.0, 3.5], "counts": [0, 2]}
    with pytest.raises(ValueError, match="at least one"):
        reward_distribution([])


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=30), st.integers(1, 12))
def test_reward_distribution_property(values, bins):
    """Counts sum to n; min <= p05 <= ... <= p95 <= max; bins + 1 edges."""
    s = reward_distribution(values, bins=bins)
    assert sum(s["histogram"]["counts"]) == len(values)
    assert len(s["histogram"]["edges"]) == bins + 1
    order = [s[k] for k in ("min", "p05", "p25", "p50", "p75", "p95", "max")]
    assert all(a <= b + 1e-9 for a, b in itertools.pairwise(order))


def test_orm_metrics_hand_values():
    """Prompt A: 0.9 (ok), 0.3 (bad), 0.5 (ok) -> top-1 correct, pairs 0.9>0.3, 0.5>0.3.
    Prompt B: 0.2, 0.8, both bad -> excluded from top-1 and pairs.
    Prompt C: 0.4 (ok), 0.4 (bad) -> tied top: 1/2 of it correct; one tied pair 0.5.
    top-1 (1 + 0.5) / 2 = 0.75; pairwise (1 + 1 + 0.5) / 3; mean correct (0.9 + 0.5 + 0.4)/3
    = 0.6; mean incorrect (0.3 + 0.2 + 0.8 + 0.4) / 4 = 0.425."""
    out = orm_metrics(
        scores=[0.9, 0.3, 0.5, 0.2, 0.8, 0.4, 0.4],
        correct=[1, 0, 1, 0, 0, 1, 0],
        prompt_ids=["A", "A", "A", "B", "B", "C", "C"],
    )
    assert out["top1_accuracy"] == pytest.approx(0.75)
    assert out["top1_prompts"] == 2
    assert out["pairwise_accuracy"] == pytest.approx(2.5 / 3)
    assert out["pairs"] == 3
    assert out["mean_score_correct"] == pytest.approx(0.6)
    assert out["mean_score_incorrect"] == pytest.approx(0.425)


def test_orm_metrics_top1_can_be_wrong_and_nan_without_correct():
    """One prompt whose best-scored rollout is wrong: top-1 0, pairwise 0. No correct at all:
    top-1 and pairwise are nan."""
    out = orm_metrics(
        scores=torch.tensor([0.1, 0.9]), correct=torch.tensor([True, False]), prompt_ids=[7, 7]
    )
    assert (out["top1_accuracy"], out["pairwise_accuracy"]) == (0.0, 0.0)
    none = orm_metrics(scores=[0.1, 0.9], correct=[0, 0], prompt_ids=[1, 2])
    assert math.isnan(none["top1_accuracy"]) and math.isnan(none["pairwise_accuracy"])
    assert math.isnan(none["mean_score_correct"])
    with pytest.raises(ValueError, match="differ in length"):
        orm_metrics(scores=[0.1], correct=[1], prompt_ids=[1, 2])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 1), st.booleans(), st.integers(0, 3)), min_size=1, max_size=15),
    st.randoms(),
)
def test_orm_metrics_row_order_property(rows, rnd):
    """Shuffling the rollouts changes nothing; accuracies lie in [0, 1]."""

    def run(items):
        return orm_metrics(
            scores=[r[0] for r in items],
            correct=[float(r[1]) for r in items],
            prompt_ids=[r[2] for r in items],
        )

    base = run(rows)
    shuffled = list(rows)
    rnd.shuffle(shuffled)
    other = run(shuffled)
    for key, value in base.items():
        assert (math.isnan(value) and math.isnan(other[key])) or other[key] == pytest.approx(value)
        assert math.isnan(value) or key in ("pairs", "top1_prompts") or 0 <= value <= 1
