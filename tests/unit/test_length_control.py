"""Length-control rewards: Kimi k1.5 and L1."""

from __future__ import annotations

import pytest

from rlhfkit.rewards.shaping import kimi_length_rewards, l1_length_reward


def test_kimi_methods_value():
    assert kimi_length_rewards([100, 200, 300], [1, 1, 0]) == pytest.approx([0.5, 0.0, -0.5])


def test_kimi_wrong_samples_never_gain():
    # lambda = [0.5, 0.25, 0, -0.5]; wrong samples get min(0, lambda).
    rewards = kimi_length_rewards([10, 20, 30, 50], [False, False, True, True])
    assert rewards == pytest.approx([0.0, 0.0, 0.0, -0.5])
    rewards = kimi_length_rewards([10, 20, 30, 50], [True, True, False, False])
    assert rewards == pytest.approx([0.5, 0.25, 0.0, -0.5])


def test_kimi_equal_lengths_give_zero():
    assert kimi_length_rewards([7, 7, 7], [1, 0, 1]) == [0.0, 0.0, 0.0]
    assert kimi_length_rewards([5], [True]) == [0.0]
    assert kimi_length_rewards([], []) == []


def test_kimi_range_and_bool_inputs():
    rewards = kimi_length_rewards([3, 1, 2], [True, True, True])
    assert rewards == pytest.approx([-0.5, 0.5, 0.0])
    assert all(-0.5 <= r <= 0.5 for r in rewards)


def test_kimi_lengths_must_align():
    with pytest.raises(ValueError, match="correctness"):
        kimi_length_rewards([1, 2], [True])


def test_l1_length_reward():
    assert l1_length_reward(True, 120, 100, 0.01) == pytest.approx(0.8)
    assert l1_length_reward(True, 80, 100, 0.01) == pytest.approx(0.8)  # symmetric
    assert l1_length_reward(False, 100, 100, 0.01) == 0.0
    assert l1_length_reward(0, 300, 100, 0.001) == pytest.approx(-0.2)
    assert l1_length_reward(1.0, 100, 100, 0.5) == 1.0
