"""Intervals over prompts (rlhfkit.eval.intervals) against table values and hand computation."""

import math

import pytest

from rlhfkit.eval.intervals import mean_interval, paired_difference, t_quantile, win_tie_loss


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        (0.975, 1, 12.706205),
        (0.975, 2, 4.302653),
        (0.975, 8, 2.306004),
        (0.975, 10, 2.228139),
        (0.975, 30, 2.042272),
        (0.975, 83, 1.988959),
        (0.95, 20, 1.724718),
        (0.995, 12, 3.054540),
        (0.025, 10, -2.228139),
    ],
)
def test_t_quantile_matches_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_small_df_error_bound():
    assert t_quantile(0.975, 5) == pytest.approx(2.570582, abs=3e-4)


def test_t_quantile_tends_to_the_normal():
    assert t_quantile(0.975, 10**7) == pytest.approx(1.959964, abs=1e-6)


def test_mean_interval_by_hand():
    xs = [0.0, 1.0, 1.0, 0.5, 0.3]
    mean = sum(xs) / 5
    s = math.sqrt(sum((x - mean) ** 2 for x in xs) / 4)
    half = t_quantile(0.975, 4) * s / math.sqrt(5)  # t_{0.975, 4}
    out = mean_interval(xs)
    assert out["mean"] == pytest.approx(mean)
    assert out["low"] == pytest.approx(mean - half)
    assert out["high"] == pytest.approx(mean + half)
    assert out["n"] == 5


def test_constant_values_have_a_zero_width_interval():
    out = mean_interval([0.3] * 7)
    assert out["low"] == out["mean"] == out["high"] == pytest.approx(0.3)


def test_paired_difference_is_the_interval_of_differences():
    after, before = [1.0, 0.8, 1.3, 0.3], [0.3, 0.8, 0.0, 0.3]
    assert paired_difference(after, before) == mean_interval([0.7, 0.0, 1.3, 0.0])
    with pytest.raises(ValueError, match="length"):
        paired_difference([1.0], [1.0, 2.0])


def test_win_tie_loss_shares_and_ratio():
    outcomes = [[1.0, 1.0], [0.5, 0.0], [1.0, 0.5], [0.5, 0.5]]
    out = win_tie_loss(outcomes)
    assert out["win"]["mean"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert out["tie"]["mean"] == pytest.approx((0 + 0.5 + 0.5 + 1) / 4)
    assert out["loss"]["mean"] == pytest.approx((0 + 0.5 + 0 + 0) / 4)
    assert out["win"]["mean"] + out["tie"]["mean"] + out["loss"]["mean"] == pytest.approx(1.0)
    assert out["wins_per_loss"] == 3.0
    assert out["n"] == 8


def test_win_tie_loss_without_losses():
    assert win_tie_loss([[1.0], [0.5]])["wins_per_loss"] == math.inf
    assert math.isnan(win_tie_loss([[0.5], [0.5]])["wins_per_loss"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        mean_interval([1.0])
    with pytest.raises(ValueError, match="NaN"):
        mean_interval([1.0, math.nan])
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.9, 0)
