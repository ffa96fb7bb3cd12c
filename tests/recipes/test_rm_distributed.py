"""Reward-model training on 2 gloo ranks (torchrun's environment) equals one process."""

from __future__ import annotations

import pytest
import torch
from recipe_helpers import assert_same_run, run_two_ranks, write_jsonl
from safetensors.torch import load_file

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig
from rlhfkit.recipes import reward_model as rm

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"prompt": f"What is {a} + {b}?", "chosen": f"The answer is {a + b}.",
     "rejected": f"The answer is {a + b + 1 + a % 3}." if a % 2 else "No."}
    for a, b in [(1, 2), (3, 4), (5, 1), (2, 8), (7, 7), (4, 0), (9, 3), (6, 5), (8, 2), (0, 9)]
]  # fmt: skip


def config(model_dir: str, data: str, run_dir: str, loss: str) -> rm.RMConfig:
    return rm.RMConfig(
        model=ModelConfig(name=model_dir, precision="fp32"),
        data=rm.RMDataConfig(train=data, eval=data, eval_split="train"),
        algo=rm.RMAlgoConfig(loss=loss),
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.0),
        loop=LoopConfig(batch_size=4, micro_batch_tokens=64, max_steps=3, seed=1),
        log=LogConfig(run_dir=run_dir, tensorboard=False, progress=False),
    )


def test_two_ranks_equal_one_process(tiny_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    single, double = tmp_path / "single", tmp_path / "double"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # The head is initialised from torch.manual_seed(loop.seed) on every rank and in the
    # single process alike, so all runs start from the same weights.
    rm.main(config(str(tiny_model_dir), str(data), str(single), "bt"))
    run_two_ranks(rm.main, config(str(tiny_model_dir), str(data), str(double), "bt"))
    # eval, 3 steps, eval: only rank 0 wrote
    wa = assert_same_run(single, double, ("train/", "eval/"), n_records=5)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(wa[name], base[name])  # it trained: equal weights are not trivial
