"""The policy-gradient recipe on the tiny model: it learns a toy task in seconds, the step does
not depend on the micro-batch split, clipping is inactive on a single epoch, EOS-only scoring."""

from __future__ import annotations

import pytest
import torch
from recipe_helpers import pg_config, pg_rollout, pg_setup, read_metrics

from rlhfkit.data.rollouts import rollout_micro_batches
from rlhfkit.recipes import policy_gradient as pg
from rlhfkit.recipes.policy_gradient import advantages, collect, update
from rlhfkit.recipes.policy_gradient.state import RolloutMicroBatch
from rlhfkit.rewards.answers import exact_answer


def _cfg(model_dir, task, run_dir, **over) -> pg.PGConfig:
    data, reward = task
    base = {
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(data)},
        "rewards": [f"{reward}:letter_a"],
        "sampling": {"num_samples": 8, "max_new_tokens": 8, "temperature": 1.0},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant"},
        "loop": {"batch_size": 4, "max_steps": 30},
        "log": {"run_dir": str(run_dir), "progress": False, "tensorboard": False},
    }
    return pg_config(base, **over)


def test_grpo_learns_the_toy_task(tiny_model_dir, pg_task, tmp_path):
    pg.main(_cfg(tiny_model_dir, pg_task, tmp_path / "run"))
    metrics = read_metrics(tmp_path / "run")
    rewards = [m["rollout/reward"] for m in metrics]
    assert len(rewards) == 30
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2
    first = metrics[0]
    assert first["train/clip_frac"] == 0.0  # one epoch: pi_old = sg(pi_theta)
    assert first["train/ratio_mean"] == pytest.approx(1.0)
    assert first["train/kl_per_token"] == pytest.approx(0.0, abs=1e-6)  # policy = reference
    assert metrics[-1]["train/kl_per_token"] > 0
    assert (tmp_path / "run" / "samples.jsonl").exists()
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "preset", ["grpo", "rloo", "dr_grpo", "cispo", "gspo", "maxrl", "remax", "reinforce_pp"]
)
def test_step_gradient_is_independent_of_the_micro_batch_split(
    tiny_model_dir, pg_task, tmp_path, preset
):
    """One rollout, cut into one micro-batch or many: the accumulated gradient is the same."""
    from rlhfkit.training.accumulate import accumulate

    cfg = _cfg(tiny_model_dir, pg_task, tmp_path / "r", algo__preset=preset)
    ctx, run, state = pg_setup(cfg)
    batch = pg_rollout(run, state)
    step_loss, count = update.policy_step_loss(run, state), update.count(run)
    rollout, grads = batch.rollout, []
    for budget in (100_000, 40):
        parts = [
            RolloutMicroBatch.from_collated(b, ctx.dist.device)
            for b in rollout_micro_batches(
                rollout.prompt_ids, rollout.completion_ids, rollout.logprobs, ctx.pad_id, budget
            )
        ]
        if run.preset.uses_kl:
            with run.reference() as ref:
                for p, (lp, _) in zip(
                    parts, advantages.forward_logprobs(ref, parts, 1.0), strict=True
                ):
                    p.ref_logprobs = lp
        advantages.broadcast(parts, batch.advantages)
        if preset == "reinforce_pp":
            advantages.returns_to_go_advantages(parts, run.preset.kl_coef)
            values = torch.cat([p.advantages[p.mask] for p in parts])
            assert float(values.mean()) == pytest.approx(0.0, abs=1e-5)
            assert float(values.std()) == pytest.approx(1.0, abs=1e-4)
        if budget > 1000:
            assert len(parts) == 1
        else:
            assert len(parts) > 2  # the split really differs
        ctx.model.zero_grad()
        accumulate(parts, step_loss, count_fn=count)
        grads.append([p.grad.clone() for p in ctx.model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_epochs_reuse_one_rollout_and_recompute_pi_old(tiny_model_dir, pg_task, tmp_path):
    """6 optimiser steps at 3 epochs are 2 rollouts of consecutive prompt batches."""
    run = tmp_path / "r"
    pg.main(_cfg(tiny_model_dir, pg_task, run, loop__max_steps=6, algo__epochs=3))
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [3, 6]  # logged once per rollout
    assert metrics[-1]["train/ratio_mean"] != pytest.approx(1.0, abs=1e-9)
    state = torch.load(
        sorted((run / "checkpoints").iterdir())[-1] / "trainer_state.pt", weights_only=False
    )
    assert state["extra"]["loop"]["rollouts"] == 2


def test_presets_without_their_machinery_are_refused():
    with pytest.raises(NotImplementedError, match="grpo_process"):
        pg.resolve_preset(pg.PGAlgoConfig(preset="grpo_process"))
    with pytest.raises(ValueError, match="critic"):
        pg.resolve_preset(pg.PGAlgoConfig(preset="grpo", advantage="gae"))
    assert pg.resolve_preset(pg.PGAlgoConfig(preset="ppo")).epochs == 4
    assert pg.resolve_preset(pg.PGAlgoConfig(preset="ppo", epochs=2)).epochs == 2
    for axis in ("advantage", "objective", "aggregation", "kl_placement", "kl_estimator"):
        with pytest.raises(ValueError, match="unknown"):
            pg.resolve_preset(pg.PGAlgoConfig(preset="grpo", **{axis: "bogus"}))
    row = pg.resolve_preset(pg.PGAlgoConfig(preset="rloo", aggregation="token_mean"))
    assert row.aggregation == "token_mean" and row.advantage == "leave_one_out"
    with pytest.raises(ValueError, match="unknown preset"):
        pg.resolve_preset(pg.PGAlgoConfig(preset="nope"))
    assert pg.resolve_preset(pg.PGAlgoConfig(preset="grpo", kl_coef=0.0)).kl_coef == 0.0
    # the old spelling keeps working for a release
    assert pg.resolve_preset(pg.PGAlgoConfig(preset="grpo", beta=0.1)).kl_coef == 0.1
    with pytest.raises(ValueError, match="kl_coef"):
        pg.resolve_preset(pg.PGAlgoConfig(preset="grpo", beta=0.1, kl_coef=0.2))


def test_truncated_completions_get_the_penalty_without_a_reward_call():
    calls = []

    def reward(completion):
        calls.append(completion)
        return 1.0

    cfg = pg.PGConfig(rewards=("r",), algo=pg.PGAlgoConfig(truncation_penalty=-2.0))
    out, components = collect.score(["done", "cut"], [{}, {}], [True, False], cfg, [reward])
    assert out == [1.0, -2.0] and calls == ["done"]
    assert components["r"] == [1.0, None]
    cfg = pg.PGConfig(rewards=("r",))
    assert collect.score(["done", "cut"], [{}, {}], [True, False], cfg, [reward])[0] == [1.0, 1.0]


def test_exact_answer():
    assert exact_answer("37 + 58 = 95", "95") == 1.0
    assert exact_answer("It is 1,234.", "1234") == 1.0
    assert exact_answer("no idea", "3") == 0.0


def test_remax_baseline_is_the_greedy_reward(tiny_model_dir, pg_task, tmp_path):
    cfg = _cfg(tiny_model_dir, pg_task, tmp_path / "r", algo__preset="remax")
    _, run, state = pg_setup(cfg)
    batch = pg_rollout(run, state)
    greedy = collect.greedy_rewards(run, batch.prompts)
    torch.testing.assert_close(greedy, batch.sampled.greedy)
    kl = advantages.sequence_kl(batch.batches, len(batch.advantages)).view_as(batch.rewards)
    expected = batch.rewards - run.preset.kl_coef * kl - greedy[:, None]
    torch.testing.assert_close(batch.advantages, expected.flatten())


def test_a_kl_in_the_reward_reaches_a_group_estimators_advantages(
    tiny_model_dir, pg_task, tmp_path
):
    """GRPO with its KL moved into the reward: a sequence-level estimator takes the sequence KL
    off each reward before the group z-score (the KL's level follows the estimator's)."""
    from rlhfkit.ops import advantages as adv_ops

    cfg = _cfg(
        tiny_model_dir, pg_task, tmp_path / "r", algo__preset="grpo", algo__kl_placement="reward",
        algo__kl_coef=0.5,
    )  # fmt: skip
    ctx, run, state = pg_setup(cfg)
    with torch.no_grad():  # move the policy off the (separately held) reference
        gen = torch.Generator().manual_seed(0)
        for p in ctx.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    batch = pg_rollout(run, state)
    kl = advantages.sequence_kl(batch.batches, len(batch.advantages)).view_as(batch.rewards)
    assert float(kl.abs().max()) > 1e-3
    expected = adv_ops.group_zscore(batch.rewards - 0.5 * kl, eps=cfg.algo.std_eps)
    torch.testing.assert_close(batch.advantages, expected.flatten())
