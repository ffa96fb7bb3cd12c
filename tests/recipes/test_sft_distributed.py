"""SFT on 2 gloo ranks (torchrun's environment) equals SFT in one process (DESIGN.md section 5)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig
from rlhfkit.recipes import sft


def config(model_dir: str, train: str, heldout: str, run_dir: str) -> sft.SFTConfig:
    return sft.SFTConfig(
        model=ModelConfig(name=model_dir, precision="fp32"),
        data=sft.SFTDataConfig(train=train, eval=heldout, eval_split="train"),
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.0),
        loop=LoopConfig(batch_size=8, micro_batch_tokens=64, max_steps=3, seed=1),
        log=LogConfig(run_dir=run_dir, tensorboard=False, progress=False),
    )


def rank_main(rank: int, port: int, args: tuple[str, str, str, str]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        sft.main(config(*args))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith(("train/loss", "eval/"))} for r in rows]


def test_two_ranks_equal_one_process(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    train, heldout = (str(p) for p in chat_data)
    single, double = tmp_path / "single", tmp_path / "double"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    sft.main(config(str(tiny_model_dir), train, heldout, str(single)))
    args = (str(tiny_model_dir), train, heldout, str(double))
    mp.spawn(rank_main, args=(free_port(), args), nprocs=2, join=True)

    a, b = records(single), records(double)
    assert len(a) == len(b) == 5  # eval, 3 steps, eval: only rank 0 wrote
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert abs(ra[key] - rb[key]) < 1e-5, (key, ra[key], rb[key])
    wa = load_file(str(single / "final" / "model.safetensors"))
    wb = load_file(str(double / "final" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)
