"""Pure parts of the rollout pipeline: skipped rewards, DAPO's group filter, minibatches."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.ops import advantages as adv_ops
from rlhfkit.recipes import policy_gradient as pg
from rlhfkit.recipes.policy_gradient.advantages import estimate
from rlhfkit.recipes.policy_gradient.collect import (
    OVERLONG,
    informative_groups,
    score,
    split_minibatches,
)
from rlhfkit.recipes.policy_gradient.presets import BaselineInputs

NAN = math.nan


def test_a_skipped_completion_moves_no_group_baseline():
    rewards = torch.tensor([[1.0, 0.0, NAN, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    algo = pg.PGAlgoConfig()
    z = estimate(rewards, "group_zscore", algo, BaselineInputs())
    torch.testing.assert_close(
        z[0, [0, 1, 3]], adv_ops.group_zscore(rewards[:1, [0, 1, 3]], eps=algo.std_eps)[0]
    )
    assert z[0, 2] == 0.0
    torch.testing.assert_close(z[1], adv_ops.group_zscore(rewards[1:], eps=algo.std_eps)[0])
    loo = estimate(rewards, "leave_one_out", algo, BaselineInputs())
    torch.testing.assert_close(
        loo[0, [0, 1, 3]], torch.tensor([1.0, -0.5, -0.5], dtype=torch.float64)
    )
    # a batch estimator pools every scored completion
    b = estimate(rewards, "batch_baseline", algo, BaselineInputs())
    assert float(b[~torch.isnan(rewards)].sum()) == pytest.approx(0.0, abs=1e-12)


def test_a_group_below_the_estimators_minimum_gets_zero():
    rewards = torch.tensor([[1.0, NAN, NAN]], dtype=torch.float64)
    assert torch.equal(
        estimate(rewards, "leave_one_out", pg.PGAlgoConfig(), BaselineInputs()),
        torch.zeros(1, 3, dtype=torch.float64),
    )
    assert not torch.isnan(
        estimate(rewards, "group_zscore", pg.PGAlgoConfig(), BaselineInputs())
    ).any()


def test_dynamic_sampling_keeps_exactly_the_mixed_groups():
    rewards = torch.tensor(
        [[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0.5, 0.5, NAN, 0.5], [1, NAN, NAN, 0]],
        dtype=torch.float64,
    )
    assert informative_groups(rewards) == [2, 4]


def test_minibatches_partition_the_rows():
    parts = split_minibatches(list(range(10)), 3, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(10))
    assert [len(p) for p in parts] in ([4, 3, 3],)
    assert split_minibatches([0, 1], 1, seed=0) == [[0, 1]]


def test_score_marks_skips_and_adds_the_overlong_component():
    def reward(completion):
        return None if completion == "skip" else 1.0

    cfg = pg.PGConfig(rewards=("r",))
    cfg.sampling.max_new_tokens = 512
    cfg.algo.overlong_cache = 128
    out, components = score(
        ["a", "skip", "b"], [{}, {}, {}], [True, True, False], cfg, [reward],
        lengths=[384, 10, 448], overlong=True,
    )  # fmt: skip
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == pytest.approx(0.5)
    assert components[OVERLONG] == [0.0, 0.0, -0.5]


def test_mask_truncated_skips_without_a_reward_call():
    calls = []

    def reward(completion):
        calls.append(completion)
        return 1.0

    cfg = pg.PGConfig(rewards=("r",))
    cfg.algo.mask_truncated = True
    out, _ = score(["done", "cut"], [{}, {}], [True, False], cfg, [reward])
    assert out[0] == 1.0 and math.isnan(out[1]) and calls == ["done"]
    cfg.algo.truncation_penalty = -1.0
    with pytest.raises(ValueError, match="not both"):
        score(["done"], [{}], [True], cfg, [reward])


def test_length_penalty_is_a_component():
    cfg = pg.PGConfig(rewards=("r",))
    cfg.algo.length_penalty, cfg.algo.length_budget = 0.1, 4
    out, components = score(
        ["a", "b"], [{}, {}], [True, True], cfg, [lambda completion: 1.0], lengths=[3, 6]
    )
    assert components["length"] == [0.0, pytest.approx(-0.2)]
    assert out == [1.0, pytest.approx(0.8)]


def test_ema_baseline_uses_the_running_value_and_starts_at_the_batch_mean():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    algo = pg.PGAlgoConfig()
    torch.testing.assert_close(
        estimate(rewards, "ema_baseline", algo, BaselineInputs(ema=0.5)), rewards - 0.5
    )
    torch.testing.assert_close(
        estimate(rewards, "ema_baseline", algo, BaselineInputs(ema=None)), rewards - 0.75
    )
