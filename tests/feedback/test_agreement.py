"""Agreement statistics against hand-computed textbook values."""

from __future__ import annotations

from fractions import Fraction

import pytest

from rlhfkit.feedback.agreement import (
    agreement_summary,
    cohen_kappa,
    fleiss_kappa,
    labeller_stats,
    majority,
    majority_agreement,
    percent_agreement,
)

# Fleiss (1971) worked example as tabulated on Wikipedia: 10 subjects, 14 raters, 5 categories.
FLEISS_TABLE = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def table_units(table: list[list[int]]) -> list[list[int]]:
    return [[k for k, count in enumerate(row) for _ in range(count)] for row in table]


def test_fleiss_textbook_example():
    units = table_units(FLEISS_TABLE)
    # Hand computation in exact fractions: P_i = sum n_ij(n_ij - 1) / (14 * 13).
    p_i = [Fraction(sum(c * (c - 1) for c in row), 14 * 13) for row in FLEISS_TABLE]
    p_bar = sum(p_i) / 10
    totals = [sum(row[k] for row in FLEISS_TABLE) for k in range(5)]
    assert totals == [20, 28, 39, 21, 32]
    p_e = sum(Fraction(t, 140) ** 2 for t in totals)
    expected = (p_bar - p_e) / (1 - p_e)
    assert float(p_bar) == pytest.approx(0.378, abs=5e-4)
    assert float(p_e) == pytest.approx(0.213, abs=5e-4)
    assert fleiss_kappa(units) == pytest.approx(float(expected), abs=1e-12)
    assert fleiss_kappa(units) == pytest.approx(0.210, abs=5e-4)
    assert percent_agreement(units) == pytest.approx(float(p_bar), abs=1e-12)


def test_cohen_textbook_example():
    # Wikipedia's example: 50 proposals, readers A and B: yes/yes 20, yes/no 5, no/yes 10,
    # no/no 15. p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5, kappa = 0.4.
    first = ["yes"] * 25 + ["no"] * 25
    second = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4, abs=1e-12)
    assert percent_agreement(list(zip(first, second, strict=True))) == pytest.approx(0.7)


def test_cohen_perfect_chance_and_undefined():
    assert cohen_kappa(["a", "b", "a"], ["a", "b", "a"]) == pytest.approx(1.0)
    # Systematic disagreement: p_o = 0, p_e = 0.5 -> -1.
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # p_e = 1
    assert cohen_kappa([], []) is None
    with pytest.raises(ValueError, match="one pair per unit"):
        cohen_kappa(["a"], ["a", "b"])


def test_two_raters_fleiss_differs_from_cohen_by_pooled_marginals():
    first, second = ["a", "a", "b", "b"], ["a", "b", "b", "b"]
    units = list(zip(first, second, strict=True))
    # Pooled p = (3/8, 5/8): P_e = 34/64; P_bar = 3/4 -> (3/4 - 34/64) / (30/64) = 14/30.
    assert fleiss_kappa(units) == pytest.approx(14 / 30)
    # Cohen: p_e = (2/4)(1/4) + (2/4)(3/4) = 1/2 -> (3/4 - 1/2) / (1/2) = 1/2.
    assert cohen_kappa(first, second) == pytest.approx(0.5)


def test_varying_labels_per_unit_and_single_label_units_ignored():
    units = [["a", "a", "b"], ["b", "b"], ["a"]]
    # P = [2/6, 1]; P_bar = 2/3. Pooled over rated units: a 2/5, b 3/5 -> P_e = 13/25.
    assert percent_agreement(units) == pytest.approx(2 / 3)
    assert fleiss_kappa(units) == pytest.approx((2 / 3 - 13 / 25) / (12 / 25))
    assert fleiss_kappa([["a"], ["b"]]) is None
    assert fleiss_kappa([["a", "a"], ["a", "a"]]) is None  # one category: undefined
    assert percent_agreement([]) is None


def test_majority_and_agreement_with_majority():
    assert majority(["a", "b", "a"]) == "a"
    assert majority(["a", "b"]) is None
    assert majority([]) is None
    units = {
        1: {"x": "a", "y": "a", "z": "b"},  # others of x: a, b -> no majority
        2: {"x": "a", "y": "a", "z": "a"},
        3: {"x": "b", "y": "a", "z": "a"},
        4: {"x": "a"},
    }
    assert majority_agreement(units, "x") == (0.5, 2)
    assert majority_agreement(units, "z") == (0.5, 2)  # unit 1: others a,a vs b; unit 2 agrees
    summary = agreement_summary(units)
    assert summary["units"] == 3
    assert summary["cohen_kappa"] is None  # three labellers
    pairs = {(p["a"], p["b"]): p for p in summary["pairwise"]}
    assert pairs[("x", "y")]["units"] == 3


def test_agreement_summary_two_labellers_reports_cohen():
    units = {i: {"p": a, "q": b} for i, (a, b) in enumerate(zip("aabb", "abbb", strict=True))}
    summary = agreement_summary(units)
    assert summary["cohen_kappa"] == pytest.approx(0.5)
    assert summary["percent_agreement"] == pytest.approx(0.75)


def vote(name, display, seconds, skipped=False):
    return {"labeller": name, "display_value": display, "seconds": seconds, "skipped": skipped}


def test_labeller_stats_position_bias_and_time():
    votes = [
        vote("ann", 1, 2.0),  # left
        vote("ann", 2, 4.0),  # left
        vote("ann", 3, 6.0),  # tie: not counted for position bias
        vote("ann", 5, 9.0),  # right
        vote("ann", None, 1.0, skipped=True),
        vote("bob", 4, 3.0),
    ]
    stats = {s["labeller"]: s for s in labeller_stats(votes, {}, midpoint=3.0)}
    ann = stats["ann"]
    assert ann["labels"] == 4 and ann["skips"] == 1
    assert ann["left_rate"] == pytest.approx(2 / 3) and ann["left_votes"] == 3
    assert ann["mean_seconds"] == pytest.approx(5.25)
    assert ann["median_seconds"] == pytest.approx(5.0)
    assert stats["bob"]["left_rate"] == 0.0
    no_mid = labeller_stats(votes, {}, midpoint=None)
    assert all(s["left_rate"] is None for s in no_mid)
