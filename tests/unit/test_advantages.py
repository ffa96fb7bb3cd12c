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


def test_gae_skips_a_hole_in_the_mask():
    """Model turn, tool output (masked out), model turn: the tool tokens are not steps.

    Columns 0-1 and 4-5 are the model's, 2-3 the tool's, 6 padding. Hole and padding hold 9.0
    (they must not count). Over the masked steps k = 0..3 (columns 0, 1, 4, 5):
    r = [0, 0, 0, 1], V = [0.5, 0.6, 0.7, 0.8], gamma = 0.9, lam = 0.5 (gamma lam = 0.45),
    done only at k = 3 (the row's last masked token):

    - k = 3: delta = 1 - 0.8 = 0.2; A = 0.2
    - k = 2: delta = 0.9 * 0.8 - 0.7 = 0.02; A = 0.02 + 0.45 * 0.2 = 0.11
    - k = 1: delta = 0.9 * 0.7 - 0.6 = 0.03; A = 0.03 + 0.45 * 0.11 = 0.0795
    - k = 0: delta = 0.9 * 0.6 - 0.5 = 0.04; A = 0.04 + 0.45 * 0.0795 = 0.075775

    R = A + V = [0.575775, 0.6795, 0.81, 1.0]. A done at column 1 (the old behaviour) would
    give A = -0.6 there: the first turn would never see the terminal reward.
    """
    mask = torch.tensor([[True, True, False, False, True, True, False]])
    r = torch.tensor([[0.0, 0.0, 9.0, 9.0, 0.0, 1.0, 9.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.6, 9.0, 9.0, 0.7, 0.8, 9.0]], dtype=torch.float64)
    adv, ret = gae(r, v, mask, gamma=0.9, lam=0.5)
    approx(adv, [0.075775, 0.0795, 0.0, 0.0, 0.11, 0.2, 0.0], tol=1e-12)
    approx(ret, [0.575775, 0.6795, 0.0, 0.0, 0.81, 1.0, 0.0], tol=1e-12)
    # the same row without the hole and the padding gives the same numbers
    steps = [0, 1, 4, 5]
    compact, compact_ret = gae(r[:, steps], v[:, steps], mask[:, steps], gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv[mask], compact[0])
    torch.testing.assert_close(ret[mask], compact_ret[0])


def test_gae_with_lam_one_and_no_values_is_returns_to_go_across_holes():
    gen = torch.Generator().manual_seed(2)
    r = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 9, generator=gen) > 0.4
    mask[:, 0] = True
    adv, _ = gae(r, torch.zeros_like(r), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, returns_to_go(r, mask))


def _textbook_gae(r: list[float], v: list[float], gamma: float, lam: float) -> list[float]:
    """GAE of one episode, as in Schulman et al. 2016 (V after the last step = 0)."""
    out, running = [0.0] * len(r), 0.0
    for t in reversed(range(len(r))):
        next_value = v[t + 1] if t + 1 < len(r) else 0.0
        running = r[t] + gamma * next_value - v[t] + gamma * lam * running
        out[t] = running
    return out


@pytest.mark.parametrize("holes", [False, True], ids=["contiguous", "holes"])
def test_gae_equals_textbook_gae_over_the_masked_tokens(holes):
    """Right or left padding (contiguous masks: unchanged) and interior holes alike."""
    gen = torch.Generator().manual_seed(3)
    r = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, 9, (6,), generator=gen)
    cols = torch.arange(8)
    mask = cols[None] < lengths[:, None]  # right padding
    mask[3:] = mask[3:].flip(-1)  # left padding
    if holes:
        mask &= torch.rand(6, 8, generator=gen) > 0.3
        mask[:, 0] = True
    adv, ret = gae(r.masked_fill(~mask, 9.0), v.masked_fill(~mask, 9.0), mask, gamma=0.97, lam=0.9)
    for i in range(6):
        expected = _textbook_gae(r[i, mask[i]].tolist(), v[i, mask[i]].tolist(), 0.97, 0.9)
        approx(adv[i, mask[i]], expected, tol=1e-12)
        approx(ret[i, mask[i]] - v[i, mask[i]], expected, tol=1e-12)  # R = A + V
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_ignores_non_finite_padding():
    gen = torch.Generator().manual_seed(5)
    r, v = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    mask = torch.tensor(
        [[True, True, False, True, True, False], [False, True, True, True, True, True]]
    )
    clean = gae(r.masked_fill(~mask, 0.0), v.masked_fill(~mask, 0.0), mask, gamma=0.9, lam=0.8)
    dirty = gae(
        r.masked_fill(~mask, torch.nan), v.masked_fill(~mask, torch.inf), mask, gamma=0.9, lam=0.8
    )
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


def test_gae_done_on_a_masked_out_separator_ends_the_episode():
    """Packed documents [a a][sep][b b b] with done on the separator = two separate rows."""
    gen = torch.Generator().manual_seed(4)
    r, v = torch.randn(1, 6, generator=gen), torch.randn(1, 6, generator=gen)
    mask = torch.tensor([[True, True, False, True, True, True]])
    dones = torch.tensor([[False, False, True, False, False, True]])
    packed, _ = gae(r, v, mask, gamma=0.9, lam=0.8, dones=dones)
    ones = torch.ones(1, 3, dtype=torch.bool)
    first, _ = gae(r[:, :2], v[:, :2], ones[:, :2], gamma=0.9, lam=0.8)
    second, _ = gae(r[:, 3:], v[:, 3:], ones, gamma=0.9, lam=0.8)
    torch.testing.assert_close(packed, torch.cat([first, torch.zeros(1, 1), second], 1))


def test_masked_whiten_gradient_ignores_non_finite_padding():
    values = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), 0.5]], requires_grad=True)
    mask = torch.isfinite(values.detach())
    out = masked_whiten(values, mask)
    (grad,) = torch.autograd.grad((out * torch.arange(6.0).reshape(2, 3)).sum(), values)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()


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


def test_returns_to_go_discounts_over_model_tokens_only():
    """Model turn (0-1), tool output (2-3, a hole), model turn (4-5): by hand, gamma 0.5."""
    r = torch.tensor([[1.0, 0.0, 7.0, 7.0, 0.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False, True, True]])
    out = returns_to_go(r, mask, gamma=0.5)
    # G_5 = 4, G_4 = 0 + .5*4 = 2, G_1 = 0 + .5*2 = 1, G_0 = 1 + .5*1 = 1.5; holes 0
    torch.testing.assert_close(out, torch.tensor([[1.5, 1.0, 0.0, 0.0, 2.0, 4.0]],
                                                 dtype=torch.float64))  # fmt: skip
