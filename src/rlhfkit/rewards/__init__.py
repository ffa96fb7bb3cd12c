"""Rewards: the ``RewardFn`` protocol, ``module:function`` scorers and reward-model scoring."""

from rlhfkit.rewards.base import RewardFn, load_reward_fn, reward_models, score_completions

__all__ = ["RewardFn", "load_reward_fn", "reward_models", "score_completions"]
