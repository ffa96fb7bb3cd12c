"""Advantage estimators and reward shaping against closed forms (docs/methods/policy.md)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.ops.advantages import (
    batch_baseline,
    ema_baseline,
    gae,
    greedy_baseline,
    group_center,
    group_zscore,
    leave_one_out,
    masked_whiten,
    maxrl,
    process_group,
    returns_to_go,
)
from rlhfkit.ops.kl import adaptive_kl_coef
from rlhfkit.rewards.shaping import kl_in_reward, length_penalty, overlong_penalty, weighted_sum

ONE_HOT = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)


def approx(values, expected, tol=1e-6):
    assert torch.as_tensor(values).flatten().tolist() == pytest.approx(expected, abs=tol)


def test_batch_baseline():
    approx(batch_baseline(ONE_HOT[0]), [0.75, -0.25, -0.25, -0.25])


def test_ema_baseline_starts_at_the_first_mean():
    adv, b = ema_baseline(ONE_HOT[0], None, decay=0.9)
    approx(adv, [0.75, -0.25, -0.25, -0.25])
    assert b == pytest.approx(0.25)
    adv, b = ema_baseline(torch.tensor([1.0, 1.0]), b, decay=0.9)
    approx(adv, [0.75, 0.75])
    assert b == pytest.approx(0.9 * 0.25 + 0.1 * 1.0)


def test_rloo():
    approx(leave_one_out(ONE_HOT), [1.0, -1 / 3, -1 / 3, -1 / 3])
    pair = torch.tensor([[0.3, 1.1]], dtype=torch.float64)
    approx(leave_one_out(pair), [-0.8, 0.8])
    rewards = torch.randn(5, 6, dtype=torch.float64)
    approx(leave_one_out(rewards).sum(1), [0.0] * 5, 1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out(torch.ones(3, 1))


def test_grpo_zscore_values():
    approx(group_zscore(ONE_HOT, eps=0.0), [1.5, -0.5, -0.5, -0.5])
    assert float(group_zscore(ONE_HOT)[0, 0]) == pytest.approx(1.499700, abs=1e-6)
    approx(
        group_zscore(ONE_HOT, std="biased", eps=0.0), [1.732051, -0.577350, -0.577350, -0.577350]
    )
    eight = torch.tensor([[1.0, 1.0] + [0.0] * 6], dtype=torch.float64)
    out = group_zscore(eight, eps=0.0)
    assert float(out[0, 0]) == pytest.approx(1.620185, abs=1e-6)
    assert float(out[0, 2]) == pytest.approx(-0.540062, abs=1e-6)
    biased = group_zscore(eight, std="biased", eps=0.0)
    assert float(biased[0, 0]) == pytest.approx(1.732051, abs=1e-6)
    assert float(biased[0, 2]) == pytest.approx(-0.577350, abs=1e-6)
    approx(out.sum(1), [0.0], 1e-12)


def test_zero_variance_groups_give_exact_zero_never_nan():
    rewards = torch.tensor([[0.7, 0.7, 0.7], [1.0, 0.0, 0.0]], dtype=torch.float64)
    for eps in (0.0, 1e-4):
        out = group_zscore(rewards, eps=eps)
        assert torch.isfinite(out).all()
        assert out[0].tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="at least 2"):
        group_zscore(torch.ones(2, 1))


def test_dr_grpo_times_g_over_g_minus_one_is_rloo():
    approx(group_center(ONE_HOT) * 4 / 3, [1.0, -1 / 3, -1 / 3, -1 / 3])
    rewards = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(group_center(rewards) * 5 / 4, leave_one_out(rewards))


def test_maxrl():
    approx(maxrl(ONE_HOT), [3.0, -1.0, -1.0, -1.0])
    approx(maxrl(torch.zeros(1, 4)), [0.0] * 4)
    approx(maxrl(torch.ones(1, 4)), [0.0] * 4)


def test_remax_sample_equal_to_greedy_gives_zero():
    rewards = torch.tensor([[0.5, 0.2], [1.0, 1.0]])
    approx(greedy_baseline(rewards, torch.tensor([0.5, 1.0])), [0.0, -0.3, 0.0, 0.0])


def test_whitening_is_global_mean_zero_std_one_regardless_of_grouping():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(6, 9, generator=gen, dtype=torch.float64) * 3 + 2
    mask = torch.rand(6, 9, generator=gen) > 0.3
    out = masked_whiten(values, mask, eps=0.0)
    picked = out[mask]
    assert float(picked.mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(picked.std()) == pytest.approx(1.0, abs=1e-12)
    assert (out[~mask] == 0).all()
    regrouped = masked_whiten(values.reshape(3, 18), mask.reshape(3, 18), eps=0.0)
    torch.testing.assert_close(regrouped.reshape(6, 9), out)


def test_gae_closed_forms():
    r = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.6, 0.7]], dtype=torch.float64)
    m = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.95)
    approx(adv, [0.46575, 0.385, 0.3])
    approx(ret, [0.96575, 0.985, 1.0])
    approx(gae(r, v, m, lam=0.0)[0], [0.1, 0.1, 0.3])
    approx(gae(r, v, m, lam=1.0)[0], [0.5, 0.4, 0.3])


def test_gae_packed_equals_separate_and_padding_is_inert():
    gen = torch.Generator().manual_seed(1)
    r1, v1 = torch.randn(1, 3, generator=gen), torch.randn(1, 3, generator=gen)
    r2, v2 = torch.randn(1, 4, generator=gen), torch.randn(1, 4, generator=gen)
    a1, _ = gae(r1, v1, torch.ones(1, 3, dtype=torch.bool), lam=0.9, gamma=0.99)
    a2, _ = gae(r2, v2, torch.ones(1, 4, dtype=torch.bool), lam=0.9, gamma=0.99)
    packed_r, packed_v = torch.cat([r1, r2], 1), torch.cat([v1, v2], 1)
    dones = torch.zeros(1, 7, dtype=torch.bool)
    dones[0, 2] = dones[0, 6] = True
    packed, _ = gae(
        packed_r, packed_v, torch.ones(1, 7, dtype=torch.bool), lam=0.9, gamma=0.99, dones=dones
    )
    torch.testing.assert_close(packed, torch.cat([a1, a2], 1))
    padded_mask = torch.tensor([[True, True, True, False, False]])
    padded, _ = gae(
        torch.cat([r1, torch.full((1, 2), 9.0)], 1),
        torch.cat([v1, torch.full((1, 2), 9.0)], 1),
        padded_mask,
        lam=0.9,
        gamma=0.99,
    )
    torch.testing.assert_close(padded[:, :3], a1)
    assert (padded[:, 3:] == 0).all()


def test_returns_to_go():
    r = torch.tensor([[1.0, 0.0, 2.0, 5.0]])
    m = torch.tensor([[True, True, True, False]])
    approx(returns_to_go(r, m), [3.0, 2.0, 2.0, 0.0])
    approx(returns_to_go(r, m, gamma=0.5), [1.5, 1.0, 2.0, 0.0])


def test_process_group_example_and_outcome_case():
    out = process_group([[1.0, 0.0], [1.0]], [[1, 3], [2]], [4, 3])
    approx(out[0], [-0.7071068, -0.7071068, -1.4142136, -1.4142136])
    approx(out[1], [0.7071068, 0.7071068, 0.7071068])
    # one step per response at its end = outcome GRPO with the population std
    rewards = [[1.0], [0.0], [0.0], [0.0]]
    outcome = process_group(rewards, [[2]] * 4, [3] * 4, eps=0.0)
    expected = group_zscore(torch.tensor([[1.0, 0.0, 0.0, 0.0]]), std="biased", eps=0.0)[0]
    for adv, e in zip(outcome, expected.tolist(), strict=True):
        approx(adv, [e] * 3)


def test_overlong_penalty_and_length_penalty():
    values = [overlong_penalty(n, 512, 128) for n in (384, 385, 448, 512, 513)]
    assert values == pytest.approx([0.0, -0.0078125, -0.5, -1.0, -1.0])
    assert length_penalty(30, 20, 0.02) == pytest.approx(-0.2)
    assert length_penalty(10, 20, 0.02) == 0.0


def test_weighted_sum_of_components():
    out = weighted_sum({"a": [1.0, 2.0, None], "b": [0.5, 0.0, 1.0]}, {"a": 1.0, "b": 2.0})
    assert out == [2.0, 2.0, None]
    with pytest.raises(ValueError, match="no weight"):
        weighted_sum({"a": [1.0]}, {})


def test_kl_in_reward_per_token_and_per_sequence():
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    per_token = kl_in_reward(torch.tensor([1.0]), kl, mask, beta=0.5, per_token=True)
    approx(per_token, [-0.05, -0.1, 1.0 - 0.15, 0.0])
    per_seq = kl_in_reward(torch.tensor([1.0]), kl, mask, beta=0.5, per_token=False)
    approx(per_seq, [0.0, 0.0, 1.0 - 0.3, 0.0])
    assert float(per_token.sum()) == pytest.approx(float(per_seq.sum()))
    zero = kl_in_reward(torch.tensor([2.0]), torch.zeros(1, 4), mask, beta=0.5, per_token=True)
    approx(zero, [0.0, 0.0, 2.0, 0.0])  # pi = pi_ref: shaped reward = raw reward


def test_adaptive_kl_controller():
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 1, 10) == pytest.approx(0.102)
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 5, 10) == pytest.approx(0.1)
    assert adaptive_kl_coef(0.1, 0.0, 6.0, 10, 10) == pytest.approx(0.08)
    assert math.isfinite(adaptive_kl_coef(0.2, 1e9, 6.0, 1, 10_000))
