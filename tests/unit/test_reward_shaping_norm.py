"""Reward normalisation and clipping (--algo.reward-norm, --algo.reward-clip) against exact
properties, and their place in assign_advantages (docs/methods/policy.md)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhfkit.config import from_dict
from rlhfkit.recipes import policy_gradient as pg
from rlhfkit.recipes.policy_gradient.advantages import assign_advantages
from rlhfkit.recipes.policy_gradient.config import resolve_preset
from rlhfkit.recipes.policy_gradient.state import (
    LoopState,
    RolloutBatch,
    RolloutMicroBatch,
    Sampled,
)
from rlhfkit.rewards.shaping import (
    clip_fraction,
    clip_rewards,
    merge_moments,
    moments_std,
    normalise_rewards,
    reward_scale,
    shape_rewards,
)
from rlhfkit.validation import config_problems

NAN = math.nan


def _rewards(seed: int, shape: tuple[int, ...] = (3, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 2.5 + 1.0


# -- the pure functions -----------------------------------------------------------------------


def test_merging_two_halves_gives_the_moments_of_the_whole():
    x = _rewards(0, (17,))
    count, mean, m2 = merge_moments(*merge_moments(0, 0.0, 0.0, x[:6]), x[6:])
    assert count == 17
    assert mean == pytest.approx(float(x.mean()), abs=1e-12)
    assert m2 / count == pytest.approx(float(x.var(correction=0)), abs=1e-12)
    assert moments_std(count, m2) == pytest.approx(float(x.std(correction=0)), abs=1e-12)


def test_merge_ignores_nans_and_an_all_nan_batch_changes_nothing():
    x = torch.tensor([1.0, NAN, 3.0, 8.0, NAN], dtype=torch.float64)
    count, mean, m2 = merge_moments(0, 0.0, 0.0, x)
    kept = x[~torch.isnan(x)]
    assert (count, mean) == (3, pytest.approx(float(kept.mean())))
    assert m2 == pytest.approx(float(kept.var(correction=0)) * 3)
    assert merge_moments(3, 4.0, 26.0, torch.full((2, 2), NAN)) == (3, 4.0, 26.0)
    assert moments_std(0, 0.0) == 0.0


def test_batch_normalisation_gives_mean_zero_std_one_and_keeps_nans():
    x = _rewards(1)
    x[0, 2] = x[2, 1] = NAN
    scale, running = reward_scale(x, "batch", (5, 1.0, 2.0))
    assert running == (5, 1.0, 2.0)  # "batch" does not touch the running moments
    out = shape_rewards(x, scale, None)
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(out), nan)
    assert float(out[~nan].mean()) == pytest.approx(0.0, abs=1e-12)
    assert float(out[~nan].std(correction=0)) == pytest.approx(1.0, abs=1e-7)
    mean, std = float(x[~nan].mean()), float(x[~nan].std(correction=0))
    torch.testing.assert_close(out, normalise_rewards(x, mean, std, eps=1e-8), equal_nan=True)


def test_running_normalisation_updates_with_the_batch_first_then_uses_it():
    first, second = _rewards(2), _rewards(3)
    _, running = reward_scale(first, "running", (0, 0.0, 0.0))
    scale, running = reward_scale(second, "running", running)
    both = torch.cat([first, second]).flatten()
    assert running[0] == both.numel()
    assert scale == pytest.approx((float(both.mean()), float(both.std(correction=0))))
    expected = (second - both.mean()) / (both.std(correction=0) + 1e-8)
    torch.testing.assert_close(shape_rewards(second, scale, None), expected)
    assert reward_scale(second, "none", running) == (None, running)
    with pytest.raises(ValueError, match="unknown reward normalisation"):
        reward_scale(second, "whiten", running)


def test_clip_respects_the_bound_and_leaves_values_inside_untouched():
    x = torch.tensor([[-3.0, -1.5, 0.2, NAN], [1.5, 1.49, 7.0, -0.0]], dtype=torch.float64)
    out = clip_rewards(x, 1.5)
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(out), nan)
    assert bool((out[~nan].abs() <= 1.5).all())
    inside = ~nan & (x.abs() <= 1.5)
    assert torch.equal(out[inside], x[inside])
    assert out[0, 0] == -1.5 and out[1, 2] == 1.5
    assert clip_fraction(x, 1.5) == pytest.approx(2 / 7)  # -3 and 7 of the 7 valid
    assert clip_fraction(torch.full((3,), NAN), 1.0) == 0.0
    with pytest.raises(ValueError, match="must be > 0"):
        clip_rewards(x, 0.0)


def test_normalise_then_clip():
    x = _rewards(4)
    scale, _ = reward_scale(x, "batch", (0, 0.0, 0.0))
    torch.testing.assert_close(
        shape_rewards(x, scale, 0.5), normalise_rewards(x, *scale).clamp(-0.5, 0.5)
    )
    assert shape_rewards(x, None, None) is x


# -- the loop state and the options -----------------------------------------------------------


def test_running_moments_round_trip_through_the_checkpoint_state():
    state = LoopState(rollouts=3, ema_baseline=0.5)
    state.reward_moments = merge_moments(0, 0.0, 0.0, _rewards(5))
    back = LoopState.from_dict(state.to_dict())
    assert back == state and back.reward_moments == state.reward_moments
    # a checkpoint written before these fields existed still loads, with empty moments
    old = LoopState.from_dict({"rollouts": 3, "kl_coef": None, "ema_baseline": 0.5})
    assert old.reward_moments == (0, 0.0, 0.0)


@pytest.mark.parametrize("bound", [0.0, -1.0])
def test_a_reward_clip_at_or_below_zero_is_a_problem(bound):
    algo = pg.PGAlgoConfig(reward_clip=bound)
    problems = algo.problems()
    assert ("reward_clip", f"must be > 0 (or unset), got {bound}") in problems
    assert f"--algo.reward-clip: must be > 0 (or unset), got {bound}" in config_problems(
        algo, "algo."
    )
    assert not pg.PGAlgoConfig(reward_clip=2.0, reward_norm="running").problems()


def test_options_parse_from_the_command_config():
    cfg = from_dict(pg.PGConfig, {"algo": {"reward_norm": "batch", "reward_clip": 5}})
    assert (cfg.algo.reward_norm, cfg.algo.reward_clip) == ("batch", 5.0)
    assert (pg.PGAlgoConfig().reward_norm, pg.PGAlgoConfig().reward_clip) == ("none", None)


# -- in assign_advantages ---------------------------------------------------------------------


def _assign(
    rewards: torch.Tensor,
    state: LoopState | None = None,
    greedy: torch.Tensor | None = None,
    **algo,
) -> RolloutBatch:
    """assign_advantages on one micro-batch of one-token completions (no model needed)."""
    cfg = pg.PGConfig(algo=pg.PGAlgoConfig(kl_placement="none", **algo))
    run = SimpleNamespace(cfg=cfg, preset=resolve_preset(cfg.algo), teacher=None, self_teacher=None)
    n = rewards.numel()
    micro = RolloutMicroBatch(
        {"completion_mask": torch.ones(n, 1, dtype=torch.bool)},
        torch.arange(n), torch.zeros(n, 1), torch.zeros(n, 1),
        old_values=torch.zeros(n, 1),
    )  # fmt: skip
    batch = RolloutBatch([[micro]], Sampled([], None, [], rewards.clone(), {}, greedy))
    assign_advantages(run, state or LoopState(), batch)
    return batch


@pytest.mark.parametrize("preset", ["grpo", "rloo"])
def test_batch_norm_makes_the_advantages_blind_to_an_affine_change_of_rewards(preset):
    rewards = _rewards(6)
    rewards[1, 3] = NAN
    base = _assign(rewards, preset=preset, reward_norm="batch")
    moved = _assign(3.0 * rewards + 5.0, preset=preset, reward_norm="batch")
    torch.testing.assert_close(moved.advantages, base.advantages, atol=1e-6, rtol=0)
    assert base.advantages[7] == 0.0  # the skipped completion
    if preset == "rloo":  # without the normalisation RLOO's advantages scale with the rewards
        plain = _assign(3.0 * rewards + 5.0, preset=preset)
        torch.testing.assert_close(
            plain.advantages, 3.0 * _assign(rewards, preset=preset).advantages
        )
    # the raw rewards are kept for logging; the shaped mean is logged
    torch.testing.assert_close(moved.rewards, 3.0 * rewards + 5.0, equal_nan=True)
    assert moved.stats["rollout/reward_shaped_mean"] == pytest.approx(0.0, abs=1e-9)
    assert "rollout/reward_clip_frac" not in moved.stats


def test_remax_greedy_rewards_are_shaped_like_the_samples():
    rewards, greedy = _rewards(9), torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    base = _assign(rewards, greedy=greedy, preset="remax", reward_norm="batch")
    moved = _assign(
        2.0 * rewards - 1.0, greedy=2.0 * greedy - 1.0, preset="remax", reward_norm="batch"
    )
    torch.testing.assert_close(moved.advantages, base.advantages, atol=1e-6, rtol=0)
    valid = rewards.flatten()
    std = float(valid.std(correction=0)) + 1e-8
    expected = (rewards - greedy[:, None]) / std  # the baseline normalised with the samples
    torch.testing.assert_close(base.advantages, expected.flatten(), atol=1e-6, rtol=0)
    assert moved.sampled.greedy is not None and moved.sampled.greedy[0] == 0.0  # raw kept


def test_ppo_value_targets_are_the_shaped_scores():
    rewards = torch.tensor([[4.0, -1.0, 0.5, NAN], [2.0, 9.0, -6.0, 1.0]], dtype=torch.float64)
    batch = _assign(rewards, preset="ppo", reward_norm="batch", reward_clip=1.0)
    valid = rewards[~torch.isnan(rewards)]
    expected = ((rewards - valid.mean()) / (valid.std(correction=0) + 1e-8)).clamp(-1.0, 1.0)
    returns = batch.batches[0].returns[:, 0].double()  # R = A + V_old, V_old = 0, one token
    keep = ~torch.isnan(rewards.flatten())
    torch.testing.assert_close(returns[keep], expected.flatten()[keep], atol=1e-6, rtol=0)
    normalised = (valid - valid.mean()) / valid.std(correction=0)
    frac = float((normalised.abs() > 1.0).double().mean())
    assert batch.stats["rollout/reward_clip_frac"] == pytest.approx(frac)
    assert 0.0 < frac < 1.0


def test_running_norm_accumulates_in_the_loop_state():
    state, first, second = LoopState(), _rewards(7), _rewards(8)
    second[0, 0] = NAN
    _assign(first, state, reward_norm="running")
    _assign(second, state, reward_norm="running")
    both = torch.cat([first.flatten(), second.flatten()])
    both = both[~torch.isnan(both)]
    assert state.reward_count == both.numel() == 23
    assert state.reward_mean == pytest.approx(float(both.mean()), abs=1e-12)
    assert state.reward_m2 / 23 == pytest.approx(float(both.var(correction=0)), abs=1e-12)
    before = state.reward_moments
    _assign(torch.full((2, 4), NAN, dtype=torch.float64), state, reward_norm="running")
    assert state.reward_moments == before


def test_length_reward_spec_is_the_word_count_penalty():
    from rlhfkit.rewards.base import load_reward_fn, reward_spec_problem

    fn = load_reward_fn("length:3:0.5")
    assert fn("one two three") == 0.0
    assert fn("one two three four five") == pytest.approx(-1.0)  # 2 words over, 0.5 each
    assert load_reward_fn("length:0")("a b") == pytest.approx(-0.02)  # default 0.01 per word
    assert reward_spec_problem("length:10:0.02") is None
    for bad in ("length:", "length:-1", "length:5:-0.1", "length:5:x", "length:5:1:2"):
        assert "expected length:" in reward_spec_problem(bad), bad


def test_length_reward_is_rejected_before_any_model_loads(tmp_path, capsys):
    from rlhfkit.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_:
        cli_main(["bon", "--rewards", "length:many", "--output", str(tmp_path / "o.json")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "length:many" in err and "Traceback" not in err
