"""The policy-gradient variant axes are tables, and every name in use comes from one of them."""

from __future__ import annotations

import dataclasses

import pytest

from rlhfkit.losses.policy import OBJECTIVES
from rlhfkit.ops.masking import AGGREGATIONS
from rlhfkit.recipes.policy_gradient import config
from rlhfkit.recipes.policy_gradient.presets import (
    ESTIMATORS,
    KL_PLACEMENTS,
    KL_SOURCES,
    PG_PRESETS,
    PLANNED_ESTIMATORS,
)

TABLES = {
    "advantage": (*ESTIMATORS, *PLANNED_ESTIMATORS),
    "objective": tuple(OBJECTIVES),
    "aggregation": AGGREGATIONS,
    "kl_placement": KL_PLACEMENTS,
    "kl_estimator": tuple(KL_SOURCES),
}


def test_every_preset_row_names_table_entries():
    for name, row in PG_PRESETS.items():
        for axis, table in TABLES.items():
            assert getattr(row, axis) in table, (name, axis, getattr(row, axis))


def test_the_options_accept_exactly_the_tables():
    for axis, allowed in config.CHOICES.items():
        assert set(allowed) <= set(TABLES[axis]), axis
        assert set(TABLES[axis]) - set(allowed) <= {"sum"}, axis  # sum: losses with norm 1
        for value in allowed:
            if value in PLANNED_ESTIMATORS:
                continue
            preset = "ppo" if value == "gae" else "grpo"  # gae goes with a critic
            config.resolve_preset(config.PGAlgoConfig(preset=preset, **{axis: value}))
        with pytest.raises(ValueError, match="unknown"):
            config.resolve_preset(config.PGAlgoConfig(preset="grpo", **{axis: "bogus"}))


def test_every_override_field_is_a_preset_field():
    fields = {f.name for f in dataclasses.fields(config.PGAlgoConfig)}
    row_fields = {f.name for f in dataclasses.fields(next(iter(PG_PRESETS.values())))}
    assert set(config._AXES) <= fields & row_fields


def test_estimators_declare_their_level_and_needs():
    token_level = {name for name, e in ESTIMATORS.items() if e.level == "token"}
    assert token_level == {"batch_whiten", "group_whiten", "gae"}
    needs = {name: set(e.needs) for name, e in ESTIMATORS.items() if e.needs}
    assert needs == {"ema_baseline": {"ema"}, "greedy_baseline": {"greedy"}, "gae": {"critic"}}
    for name, row in PG_PRESETS.items():
        if row.advantage in ESTIMATORS:
            assert ("critic" in row.estimator.needs) == row.critic, name


def test_only_the_exact_kl_needs_hidden_states():
    assert {name for name, s in KL_SOURCES.items() if s.needs_hidden} == {"full"}


def test_a_kl_in_the_reward_lands_at_the_estimators_level():
    """A per-token KL in the reward of a sequence-level estimator would be computed and dropped:
    the KL's level is read from the estimator, never set apart from it."""
    for name in ("reinforce", "rloo", "remax"):
        assert PG_PRESETS[name].kl_per == "seq"
    for name in ("reinforce_pp", "ppo"):
        assert PG_PRESETS[name].kl_per == "token"
    grpo_in_reward = config.resolve_preset(
        config.PGAlgoConfig(preset="grpo", kl_placement="reward")
    )
    assert grpo_in_reward.kl_per == "seq"
