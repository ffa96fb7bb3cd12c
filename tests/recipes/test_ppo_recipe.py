"""PPO with a critic, DAPO's dynamic sampling and skipped rewards, on the tiny model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from recipe_helpers import pg_config, pg_rollout, pg_setup, read_metrics
from safetensors.torch import load_file

from rlhfkit.models.load import load_model
from rlhfkit.recipes import policy_gradient as pg
from rlhfkit.recipes.policy_gradient import update
from rlhfkit.recipes.policy_gradient.collect import collect, informative_groups
from rlhfkit.recipes.policy_gradient.critic import Critic
from rlhfkit.recipes.policy_gradient.metrics import rollout_metrics
from rlhfkit.training.accumulate import accumulate

REWARD = '''
def has_a(completion):
    """1 when the completion contains the letter 'a': a sparse binary toy reward."""
    return float("a" in completion)


def letter_a(completion):
    """Share of the letter 'a' (dense)."""
    text = completion.strip()
    return sum(c == "a" for c in text) / max(len(text), 1)


def skip_b(completion):
    """None (skip) when the completion contains 'b', else the share of 'a'."""
    return None if "b" in completion else letter_a(completion)
'''


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ppo")
    (root / "reward.py").write_text(REWARD)
    rows = [{"prompt": f"Say a {i}", "answer": "a"} for i in range(16)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "prompts.jsonl", root / "reward.py"


def _cfg(model_dir, task, run_dir, reward="letter_a", **over) -> pg.PGConfig:
    data, reward_file = task
    base = {
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(data)},
        "rewards": [f"{reward_file}:{reward}"],
        "algo": {"preset": "ppo"},
        "critic": {"init": "policy", "lr": 1e-3},
        "sampling": {"num_samples": 4, "max_new_tokens": 8, "temperature": 1.0},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant"},
        "loop": {"batch_size": 4, "max_steps": 8},
        "log": {"run_dir": str(run_dir), "progress": False, "tensorboard": False},
    }
    return pg_config(base, **over)


def test_ppo_trains_policy_and_critic_and_checkpoints_both(tiny_model_dir, task, tmp_path):
    run = tmp_path / "run"
    pg.main(_cfg(tiny_model_dir, task, run))  # the ppo preset adds the critic to the loop
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [4, 8]  # 4 epochs x 1 minibatch per rollout
    for m in metrics:
        assert m["train/clip_frac"] > 0  # pi_old is from before the update: the clip engages
        assert m["critic/value_loss"] >= 0 and "train/grad_norm/critic" in m
        assert "rollout/entropy" in m and m["train/kl_per_token"] > 0
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    weights = load_file(str(ckpt / "model.safetensors"))
    assert any(k.startswith("critic/") for k in weights)
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert set(state["data"]["companions"]) == {"critic"}
    critic = load_model(str(run / "critic"), task="score")
    start = load_model(str(tiny_model_dir), task="score")
    head = critic.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(head, start.model.layers[0].mlp.up_proj.weight)
    assert (run / "final" / "model.safetensors").exists()


def test_ppo_resume_gives_the_same_weights(tiny_model_dir, task, tmp_path):
    straight = tmp_path / "straight"
    pg.main(_cfg(tiny_model_dir, task, straight, loop__max_steps=8))
    cut = tmp_path / "cut"
    pg.main(_cfg(tiny_model_dir, task, cut, loop__max_steps=4))
    pg.main(_cfg(tiny_model_dir, task, cut, loop__max_steps=8, loop__resume=True))
    for name in ("final", "critic"):
        a = load_file(str(straight / name / "model.safetensors"))
        b = load_file(str(cut / name / "model.safetensors"))
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_ppo_gradient_is_independent_of_the_micro_batch_split(tiny_model_dir, task, tmp_path):
    cfg = _cfg(tiny_model_dir, task, tmp_path / "r")
    ctx, run, state = pg_setup(cfg)
    critic = Critic.build(ctx, cfg, update.aggregation(cfg, run.preset))
    step_loss, count = critic.add_value_loss(update.policy_step_loss(run, state)), update.count(run)
    grads = []
    for budget in (100_000, 30):
        state.rollouts = 0  # the same prompts and samples
        cfg.loop.micro_batch_tokens = budget
        batch = pg_rollout(run, state, critic)
        assert (len(batch.batches) == 1) == (budget > 1000)
        values = torch.cat([b.advantages[b.mask] for b in batch.batches])
        assert float(values.mean()) == pytest.approx(0.0, abs=1e-5)  # whitened globally
        ctx.model.zero_grad()
        critic.model.zero_grad()
        accumulate(batch.batches, step_loss, count_fn=count)
        models = (ctx.model, critic.model)
        grads.append([p.grad.clone() for m in models for p in m.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_ppo_raises_a_reward_models_score_at_a_bounded_kl(
    tiny_model_dir, tiny_rm_dir, task, tmp_path
):
    """Against a (random) reward model; the critic starts from that reward model."""
    run = tmp_path / "rm"
    cfg = _cfg(
        tiny_model_dir, task, run, loop__max_steps=48, critic__init="auto",
        algo__truncation_penalty=None,
    )  # fmt: skip
    cfg.rewards = (f"rm:{tiny_rm_dir}",)
    pg.main(cfg)
    metrics = read_metrics(run)
    rewards = [m["rollout/reward"] for m in metrics]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1
    kl = [m["train/kl_per_token"] for m in metrics]
    # the logged KL is the sampled-token estimate mean(log pi - log ref) (k1): its expectation
    # is >= 0, but one batch's mean may dip just below 0 while the policy is near the reference
    assert all(-0.05 < k < 5 for k in kl)


def test_dapo_dynamic_sampling_refills_with_informative_groups(tiny_model_dir, task, tmp_path):
    cfg = _cfg(tiny_model_dir, task, tmp_path / "d", reward="has_a", algo__preset="dapo")
    _, run, state = pg_setup(cfg)
    batch = collect(run, state)
    rounds = batch.stats["rollout/dynamic_rounds"]
    assert 1 <= rounds <= 1 + cfg.algo.max_refills
    assert state.rollouts == rounds  # each round took the next prompt batch
    assert informative_groups(batch.rewards) == list(range(len(batch.prompts)))
    assert len(batch.prompts) <= cfg.loop.batch_size
    assert "overlong" in batch.components


def test_skipped_completions_are_left_out_of_the_loss(tiny_model_dir, task, tmp_path):
    cfg = _cfg(tiny_model_dir, task, tmp_path / "s", reward="skip_b", algo__preset="grpo")
    _, run, state = pg_setup(cfg)
    skipped = set()
    for _ in range(3):
        batch = pg_rollout(run, state)
        flat = batch.rewards.flatten()
        skipped = {i for i in range(len(flat)) if torch.isnan(flat[i])}
        if skipped:
            break
    assert skipped, "the toy model never wrote a 'b'"
    trained = {int(i) for b in batch.batches for i in b.rows}
    assert trained == set(range(len(flat))) - skipped
    assert all(batch.advantages[i] == 0 for i in skipped)
    assert rollout_metrics(batch)["rollout/skipped"] == len(skipped) / len(flat)


def test_adaptive_kl_coefficient_follows_the_controller(tiny_model_dir, task, tmp_path):
    from rlhfkit.ops.kl import adaptive_kl_coef

    run = tmp_path / "kl"
    cfg = _cfg(
        tiny_model_dir, task, run, algo__preset="rloo", algo__kl_target=0.5,
        algo__kl_horizon=20, loop__max_steps=4,
    )  # fmt: skip
    pg.main(cfg)
    metrics = read_metrics(run)
    assert metrics[0]["train/kl_coef"] == 0.05  # the preset's beta to start
    for before, after in itertools.pairwise(metrics):
        expected = adaptive_kl_coef(
            before["train/kl_coef"], before["rollout/kl_seq"], 0.5, n_steps=16, horizon=20
        )
        assert after["train/kl_coef"] == pytest.approx(expected)
    assert len({m["train/kl_coef"] for m in metrics}) > 1


@pytest.mark.parametrize("placement", ["loss", "reward"])
def test_full_vocabulary_kl_runs_in_the_loss_and_in_the_reward(
    tiny_model_dir, task, tmp_path, placement
):
    run = tmp_path / placement
    cfg = _cfg(
        tiny_model_dir, task, run, algo__preset="grpo", algo__kl_estimator="full",
        algo__kl_placement=placement, algo__kl_coef=0.1, loop__max_steps=3,
    )  # fmt: skip
    pg.main(cfg)
    metrics = read_metrics(run)
    assert metrics[0]["rollout/kl_seq"] == pytest.approx(0.0, abs=1e-5)  # policy = reference
    assert metrics[-1]["rollout/kl_seq"] > 0  # exact KL >= 0, and the policy has moved


def test_reinforce_pp_baseline_centres_groups_then_whitens_tokens(tiny_model_dir, task, tmp_path):
    cfg = _cfg(
        tiny_model_dir, task, tmp_path / "b", algo__preset="reinforce_pp",
        algo__advantage="group_whiten", algo__kl_coef=0.0,
    )  # fmt: skip
    _, run, state = pg_setup(cfg)
    batch = pg_rollout(run, state)
    centred = (batch.rewards - batch.rewards.mean(1, keepdim=True)).flatten()
    lengths = torch.tensor([len(c) for c in batch.rollout.completion_ids], dtype=torch.float64)
    tokens = torch.repeat_interleave(centred, lengths.long())  # returns-to-go = score (beta 0)
    expected = (centred - tokens.mean()) / (tokens.std() + 1e-8)
    for b in batch.batches:
        for row, i in enumerate(b.rows.tolist()):
            got = b.advantages[row][b.mask[row]]
            torch.testing.assert_close(got.double(), expected[i].expand_as(got), atol=1e-5, rtol=0)
