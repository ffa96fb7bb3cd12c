"""RL on multi-turn episodes with the tiny model: environment output is a hole in the mask that
takes no part in any loss, and the run logs what the episodes did."""

from __future__ import annotations

import string

import pytest
import torch
from recipe_helpers import pg_config, pg_rollout, pg_setup, read_metrics

from rlhfkit.data.rollouts import rollout_micro_batches
from rlhfkit.recipes import policy_gradient as pg
from rlhfkit.recipes.policy_gradient import advantages, update
from rlhfkit.recipes.policy_gradient.state import RolloutMicroBatch


def _cfg(model_dir, task, run_dir, **over) -> pg.PGConfig:
    data, _ = task
    base = {
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(data), "share_prefix": False},
        "env": {"name": "recipe_helpers:EchoEnv", "options": '{"turns": 3}', "max_tokens": 96},
        # every printable character ends a turn: the random model's turns are short and complete
        "sampling": {
            "num_samples": 4,
            "max_new_tokens": 8,
            "temperature": 1.0,
            "stop": list(string.printable[:94]),
        },
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0, "schedule": "constant"},
        "loop": {"batch_size": 2, "max_steps": 2},
        "log": {"run_dir": str(run_dir), "progress": False, "tensorboard": False},
    }
    return pg_config(base, **over)


def test_rl_on_an_environment_logs_its_episodes(tiny_model_dir, pg_task, tmp_path):
    pg.main(_cfg(tiny_model_dir, pg_task, tmp_path / "run"))
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert "rollout/reward/env" in m and 1 <= m["env/turns"] <= 3
        assert 0 < m["env/policy_token_share"] < 1  # the echoes are in the rows, not the loss
        assert m["train/sampler_gap"] < 1e-4  # the learner scores exactly what was sampled


@pytest.fixture
def env_batch(tiny_model_dir, pg_task, tmp_path):
    cfg = _cfg(tiny_model_dir, pg_task, tmp_path / "r", sampling__max_new_tokens=6)
    ctx, run, state = pg_setup(cfg)
    batch = pg_rollout(run, state)
    holes = [m for m in batch.rollout.masks if not all(m) and any(m[m.index(False) :])]
    assert holes, "no episode had a policy turn after an observation"
    return ctx, run, state, batch


def _hidden_grad(ctx, run, state, b):
    """d loss / d final hidden states of one padded micro-batch, (B, P + T, H).

    The final (normed) hidden state at a position feeds only that position's logits, so its
    gradient is the gradient of that position's loss term.
    """
    seen = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        seen["hidden"] = output

    handle = ctx.model.model.norm.register_forward_hook(keep)
    try:
        loss = update.policy_step_loss(run, state)(b, float(b.mask.sum()))
        loss.loss.backward()
    finally:
        handle.remove()
    return seen["hidden"].grad


def test_gradients_at_tool_output_positions_are_exactly_zero(env_batch):
    ctx, run, state, batch = env_batch
    rollout = batch.rollout
    b = batch.batches[0]  # padded rows (share_prefix off), reference log-probs attached
    b.advantages = torch.ones_like(b.advantages)  # nonzero everywhere the mask lets it count
    assert b.mask.shape == b.inputs["completion_ids"].shape
    for row, index in enumerate(b.rows.tolist()):
        n = len(rollout.masks[index])
        assert b.mask[row, :n].tolist() == rollout.masks[index] and not b.mask[row, n:].any()
    grad = _hidden_grad(ctx, run, state, b)
    width = b.inputs["prompt_ids"].shape[1]
    # the state at column width - 1 + t predicts completion token t
    per_token = grad[:, width - 1 : width - 1 + b.mask.shape[1]].abs().sum(-1)  # (B, T)
    assert not b.mask.all() and torch.all(per_token[~b.mask] == 0)
    assert torch.all(per_token[b.mask] > 0)


def test_a_changed_tool_output_changes_no_loss_term_before_it(env_batch):
    ctx, _, _, batch = env_batch
    rollout = batch.rollout
    row = next(i for i, m in enumerate(rollout.masks) if not all(m))
    mask, ids = rollout.masks[row], list(rollout.completion_ids[row])
    start = mask.index(False)
    other = list(ids)
    other[start : start + 3] = [(t + 7) % 300 + 10 for t in ids[start : start + 3]]
    losses = []
    for completion in (ids, other):
        (b,) = [
            RolloutMicroBatch.from_collated(x, ctx.dist.device)
            for x in rollout_micro_batches(
                [rollout.prompt_ids[row]], [completion], [rollout.logprobs[row]], ctx.pad_id,
                10**6, masks=[mask],
            )
        ]  # fmt: skip
        advantages.broadcast([b], torch.ones(1, dtype=torch.float64))
        ((logprobs, _),) = advantages.forward_logprobs(ctx.model, [b], 1.0)
        losses.append(-logprobs[0])  # the per-token terms of a policy-gradient loss
    assert torch.equal(losses[0][:start], losses[1][:start])
    assert not torch.equal(losses[0][start + 3 :][torch.tensor(mask[start + 3 :])],
                           losses[1][start + 3 :][torch.tensor(mask[start + 3 :])])  # fmt: skip


def test_prefix_trees_and_padded_rows_score_multi_turn_rows_alike(env_batch):
    """Tool output is context in both layouts; only the policy's tokens are scored."""
    from rlhfkit.data.rollouts import rollout_tree_batches
    from rlhfkit.models.heads import supports_prefix_trees

    ctx, _, _, batch = env_batch
    assert supports_prefix_trees(ctx.model)
    r = batch.rollout
    rows = list(range(len(r)))
    scored = {}
    for name, parts in (
        ("padded", rollout_micro_batches(r.prompt_ids, r.completion_ids, r.logprobs, ctx.pad_id,
                                         10**6, masks=r.masks)),
        ("trees", rollout_tree_batches(r.prompt_ids, r.completion_ids, r.logprobs, rows,
                                       ctx.pad_id, 10**6, masks=r.masks)),
    ):  # fmt: skip
        batches = [RolloutMicroBatch.from_collated(b, ctx.dist.device) for b in parts]
        for b, (lp, _) in zip(batches, advantages.forward_logprobs(ctx.model, batches, 1.0),
                              strict=True):  # fmt: skip
            for k, i in enumerate(b.rows.tolist()):
                scored.setdefault(i, {})[name] = lp[k, : len(r.masks[i])]
    for i, both in scored.items():
        mask = torch.tensor(r.masks[i])
        torch.testing.assert_close(both["trees"][mask], both["padded"][mask], atol=1e-5, rtol=0)
        assert torch.all(both["trees"][~mask] == 0) and torch.all(both["padded"][~mask] == 0)


def test_eval_in_an_environment_reports_tool_use(tiny_model_dir, tmp_path):
    from rlhfkit.config import from_dict
    from rlhfkit.inference import evaluate

    cfg = from_dict(evaluate.EvalConfig, {
        "model": {"name": str(tiny_model_dir), "precision": "fp32"},
        "env": {"name": "calculator", "max_turns": 2},
        "data": {"limit": 3},
        "sampling": {"max_new_tokens": 8, "temperature": 1.0, "num_samples": 2},
        "ks": [1, 2],
        "output": str(tmp_path / "report.json"),
        "samples_output": str(tmp_path / "samples.jsonl"),
    })  # fmt: skip
    report = evaluate.main(cfg)
    assert report["config"]["source"] == "builtin:calculator"
    assert report["overall"]["prompts"] == 3 and report["overall"]["samples"] == 6
    assert {"pass@2", "pass^2"} <= set(report["overall"])
    episodes = report["episodes"]
    assert 1 <= episodes["turns"] <= 2 and 0 <= episodes["success"] <= 1
    samples = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 6
