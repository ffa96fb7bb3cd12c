"""Asynchronous RL: an engine copy of the policy draws batches ahead of the learner.

Exact properties: ``max_staleness = 0`` is the synchronous run (same samples, losses, weights);
every batch trained on satisfies version >= step - max_staleness; the engine's weights hash equal
to the learner's after a sync and differ before it; an engine failure surfaces as an error.
"""

from __future__ import annotations

import pytest
import torch
from recipe_helpers import pg_config, read_metrics
from safetensors.torch import load_file

from rlhfkit.recipes import policy_gradient as pg
from rlhfkit.rollout.engine import LocalEngine, weights_hash


def _cfg(model_dir, task, run_dir, preset="grpo", **over):
    data, reward = task
    base = {
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(data)},
        "rewards": [f"{reward}:letter_a"],
        "algo": {"preset": preset},
        "sampling": {"num_samples": 4, "max_new_tokens": 8, "temperature": 1.0},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant"},
        "loop": {"batch_size": 4, "max_steps": 4},
        "log": {"run_dir": str(run_dir), "progress": False, "tensorboard": False},
        "sample_every": 0,
    }
    if preset == "ppo":
        base["critic"] = {"init": "policy", "lr": 1e-3}
    return pg_config(base, **over)


def _train(records):
    return [{k: v for k, v in r.items() if k.startswith(("train/", "rollout/r"))} for r in records]


@pytest.mark.parametrize("preset", ["grpo", "ppo"])
def test_zero_staleness_is_the_synchronous_run(tiny_model_dir, pg_task, tmp_path, preset):
    steps = 4 if preset == "grpo" else 8  # ppo: 4 optimiser steps per batch
    pg.main(_cfg(tiny_model_dir, pg_task, tmp_path / "sync", preset, loop__max_steps=steps))
    pg.main(_cfg(tiny_model_dir, pg_task, tmp_path / "async", preset, loop__max_steps=steps,
                 engine__max_staleness=0))  # fmt: skip
    sync, asyn = read_metrics(tmp_path / "sync"), read_metrics(tmp_path / "async")
    assert _train(sync) == _train(asyn)  # bit for bit: same samples, losses and rewards
    assert all(r["async/staleness"] == 0 for r in asyn)
    a = load_file(str(tmp_path / "sync" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "async" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_staleness_is_bounded_and_logged(tiny_model_dir, pg_task, tmp_path, monkeypatch):
    from rlhfkit.recipes.policy_gradient import asynchronous

    drawn = []
    original = asynchronous.draw
    monkeypatch.setattr(asynchronous, "draw", lambda *a: drawn.append(1) or original(*a))
    run = tmp_path / "run"
    pg.main(_cfg(tiny_model_dir, pg_task, run, "ppo", loop__max_steps=16,
                 engine__max_staleness=4, engine__sync_every=2))  # fmt: skip
    metrics = read_metrics(run)
    assert len(metrics) == 4  # 4 batches of 4 optimiser steps
    assert len(drawn) == 4  # none drawn beyond the run's last step
    for m in metrics:
        assert 0 <= m["async/staleness"] <= 4
        assert m["async/version"] == m["step"] - 4 - m["async/staleness"]  # drawn at that step
        assert "train/tis_weight" in m and "train/sampler_kl" in m


def test_engine_sync_hashes_equal_and_a_missing_sync_shows(tiny_model_dir):
    from rlhfkit.models.load import load_model

    model = load_model(str(tiny_model_dir))
    engine = LocalEngine(model, pad_id=0, eos_ids=[2], version=0)
    assert engine.weights_hash() == weights_hash(model, engine.synced)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    assert engine.weights_hash() != weights_hash(model, engine.synced)  # not synced yet
    engine.push(model, version=1)
    assert engine.latest == 1 and engine.version == 0  # staged, applied between batches
    assert engine.apply() == 1
    assert engine.weights_hash() == weights_hash(model, engine.synced)


def test_an_engine_failure_is_raised_not_hung(tiny_model_dir, pg_task, tmp_path, monkeypatch):
    from rlhfkit.recipes.policy_gradient import asynchronous

    def broken(run, state):
        raise OSError("engine died")

    monkeypatch.setattr(asynchronous, "draw", broken)
    cfg = _cfg(tiny_model_dir, pg_task, tmp_path / "run", engine__max_staleness=1)
    with pytest.raises(RuntimeError, match="engine died"):
        pg.main(cfg)
