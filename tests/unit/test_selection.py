"""Rejection-sampling selection, best-of-N KL and the difficulty band."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlhfkit.ops import selection as sel

BOOK = torch.tensor(
    [
        [0.7, 0.3, 0.5, 0.2],
        [0.4, 0.8, 0.6, 0.5],
        [0.9, 0.3, 0.4, 0.7],
        [0.2, 0.5, 0.8, 0.6],
        [0.5, 0.4, 0.3, 0.6],
    ]
)


def test_book_example_per_prompt_picks():
    assert [j for _, j in sel.top_per_prompt(BOOK)] == [0, 1, 0, 2, 3]


def test_book_example_top5_overall():
    picks = sel.top_k_overall(BOOK, 5)
    assert [i * 4 + j for i, j in picks] == [8, 5, 14, 0, 11]
    assert [(i + 1, j + 1) for i, j in picks] == [(3, 1), (2, 2), (4, 3), (1, 1), (3, 4)]


def test_ties_go_to_the_lowest_index():
    r = torch.tensor([[1.0, 2.0, 2.0], [3.0, 3.0, 0.0]])
    assert sel.top_per_prompt(r) == [(0, 1), (1, 0)]
    assert sel.top_k_overall(r, 3) == [(1, 0), (1, 1), (0, 1)]


def test_skipped_completions_are_never_selected():
    nan = float("nan")
    r = torch.tensor([[nan, 0.1], [nan, nan], [0.5, nan]])
    assert sel.top_per_prompt(r) == [(0, 1), (2, 0)]
    assert sel.top_k_overall(r, 5) == [(2, 0), (0, 1)]
    assert sorted(sel.random_per_prompt(r, seed=3)) == [(0, 1), (2, 0)]
    assert sorted(sel.random_k_overall(r, 5, seed=3)) == [(0, 1), (2, 0)]


def test_random_controls_match_the_counts_and_the_seed():
    per = sel.random_per_prompt(BOOK, seed=1)
    assert [i for i, _ in per] == [0, 1, 2, 3, 4]
    assert per == sel.random_per_prompt(BOOK, seed=1)
    flat = sel.random_k_overall(BOOK, 5, seed=1)
    assert len(set(flat)) == 5 and flat == sel.random_k_overall(BOOK, 5, seed=1)
    draws = {tuple(sel.random_per_prompt(BOOK, seed=s)) for s in range(20)}
    assert len(draws) > 1


def test_select_dispatches_and_validates():
    assert sel.select(BOOK, "top_per_prompt") == sel.top_per_prompt(BOOK)
    assert sel.select(BOOK, "top_k_overall", k=2) == sel.top_k_overall(BOOK, 2)
    with pytest.raises(ValueError, match="needs k"):
        sel.select(BOOK, "top_k_overall")
    with pytest.raises(ValueError, match="unknown selection"):
        sel.select(BOOK, "best")


@pytest.mark.parametrize(
    ("n", "kl"), [(1, 0.0), (2, 0.193147), (4, 0.636294), (16, 1.835089), (64, 3.174508)]
)
def test_bon_kl_values(n, kl):
    assert sel.bon_kl(n) == pytest.approx(kl, abs=1e-6)


def test_bon_kl_exact_over_equiprobable_outcomes():
    assert sel.bon_kl_exact(10, 4) == pytest.approx(0.628825, abs=1e-6)
    assert sel.bon_kl_exact(10_000, 4) == pytest.approx(0.636294, abs=1e-6)
    assert sel.bon_kl_exact(10, 4) < sel.bon_kl(4)
    assert sel.bon_kl_exact(7, 1) == pytest.approx(0.0, abs=1e-12)


def test_bon_kl_exact_matches_enumeration():
    """pi_BoN from enumerating every n-tuple of draws equals the closed form's distribution."""
    outcomes, n = 4, 3
    counts = [0] * outcomes
    for draw in itertools.product(range(outcomes), repeat=n):
        counts[max(draw)] += 1
    p = [c / outcomes**n for c in counts]
    kl = sum(q * math.log(q * outcomes) for q in p if q > 0)
    assert sel.bon_kl_exact(outcomes, n) == pytest.approx(kl, abs=1e-12)


def test_pass_rate_band_keeps_exactly_4_to_12_of_16():
    correct = torch.tensor([[1] * c + [0] * (16 - c) for c in range(17)])
    kept = sel.pass_rate_band(correct).tolist()
    assert [c for c, k in enumerate(kept) if k] == list(range(4, 13))


def test_pass_rate_band_validates():
    with pytest.raises(ValueError):
        sel.pass_rate_band(torch.ones(3, 4), 0.9, 0.1)
    with pytest.raises(ValueError):
        sel.pass_rate_band(torch.ones(4), 0.2, 0.8)
