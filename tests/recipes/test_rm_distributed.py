"""Reward-model training on 2 gloo ranks (torchrun's environment) equals one process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig
from rlhfkit.recipes import reward_model as rm

ROWS = [
    {"prompt": f"What is {a} + {b}?", "chosen": f"The answer is {a + b}.",
     "rejected": f"The answer is {a + b + 1 + a % 3}." if a % 2 else "No."}
    for a, b in [(1, 2), (3, 4), (5, 1), (2, 8), (7, 7), (4, 0), (9, 3), (6, 5), (8, 2), (0, 9)]
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on the 2 shared cores two OpenMP threads spin against other
    processes and make these tests 10-80x slower (conftest does this only under xdist)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(model_dir: str, data: str, run_dir: str, loss: str) -> rm.RMConfig:
    return rm.RMConfig(
        model=ModelConfig(name=model_dir, precision="fp32"),
        data=rm.RMDataConfig(train=data, eval=data, eval_split="train"),
        algo=rm.RMAlgoConfig(loss=loss),
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.0),
        loop=LoopConfig(batch_size=4, micro_batch_tokens=64, max_steps=3, seed=1),
        log=LogConfig(run_dir=run_dir, tensorboard=False, progress=False),
    )


def rank_main(rank: int, port: int, args: tuple[str, str, str, str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        rm.main(config(*args))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith(("train/", "eval/"))} for r in rows]


def test_two_ranks_equal_one_process(tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    single, double = tmp_path / "single", tmp_path / "double"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # The head is initialised from torch.manual_seed(loop.seed) on every rank and in the
    # single process alike, so all runs start from the same weights.
    rm.main(config(str(tiny_model_dir), str(data), str(single), "bt"))
    args = (str(tiny_model_dir), str(data), str(double), "bt")
    mp.spawn(rank_main, args=(free_port(), args), nprocs=2, join=True)

    a, b = records(single), records(double)
    assert len(a) == len(b) == 5  # eval, 3 steps, eval: only rank 0 wrote
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert abs(ra[key] - rb[key]) < 1e-5, (key, ra[key], rb[key])
    wa = load_file(str(single / "final" / "model.safetensors"))
    wb = load_file(str(double / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(wa[name], base[name])  # it trained: equal weights are not trivial
