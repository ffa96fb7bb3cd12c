"""Two gloo ranks x two micro-batches give the single-process gradient.

Each rank runs ``accumulate`` on its half of the batch; ``accumulate`` all-reduces the global
normaliser and scales the loss by the world size, and the gradients are then averaged over ranks
as DDP does. The result must equal one process over the whole batch, for every aggregation mode.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhfkit.ops.masking import Aggregation, aggregate, normaliser_count
from rlhfkit.training.accumulate import accumulate
from rlhfkit.types import LossOutput

MODES = [
    Aggregation("token_mean"),
    Aggregation("seq_mean_token_mean"),
    Aggregation("fixed_length", 7),
]


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 7, 3, generator=g, dtype=torch.float64)  # (B, T, features)
    lengths = torch.tensor([1, 7, 3, 5, 2, 6, 4, 7])
    mask = torch.arange(7)[None, :] < lengths[:, None]  # (B, T)
    return x, mask


def run(weight: torch.Tensor, parts, agg: Aggregation) -> float:
    def loss_fn(mb, normaliser):
        x, mask = mb
        per_token = torch.tanh(x @ weight) ** 2  # (b, T)
        return LossOutput(aggregate(per_token, mask, agg, normaliser))

    return accumulate(parts, loss_fn, count_fn=lambda mb: float(normaliser_count(mb[1], agg))).loss


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x, mask = make_batch()
        mine = slice(0, 5) if rank == 0 else slice(5, 8)  # uneven shards
        x, mask = x[mine], mask[mine]
        results = []
        for agg in MODES:
            weight = torch.linspace(-1, 1, 3, dtype=torch.float64).requires_grad_()
            parts = [(x[:2], mask[:2]), (x[2:], mask[2:])]
            run(weight, parts, agg)
            dist.all_reduce(weight.grad)
            results.append(weight.grad / 2)  # DDP averages gradients over ranks
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    results = {r: torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)}
    x, mask = make_batch()
    for i, agg in enumerate(MODES):
        weight = torch.linspace(-1, 1, 3, dtype=torch.float64).requires_grad_()
        run(weight, [(x, mask)], agg)
        for rank in (0, 1):
            torch.testing.assert_close(results[rank][i], weight.grad, atol=1e-12, rtol=0)
