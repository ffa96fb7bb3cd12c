"""Sharding benchmark: memory per rank and step time, replicate vs FSDP2, at 2 ranks.

Both strategies train the embedded SmolLM2-135M-Instruct with rlhfkit's SFT step on the same
chat rows (16 per optimiser step, shared out over the ranks), at the run's compute precision
(bf16 where the machine has it). Each strategy runs as its own 2-rank job (torch.multiprocessing
with torchrun's environment, gloo on CPU, NCCL on GPUs); the driver runs them one after the
other, ``--rounds`` times alternating, and reports per rank:

- the bytes of training state the rank holds: parameters, gradients and AdamW moments (exact,
  counted from the tensors: the quantity sharding divides);
- the peak resident memory of the process (CPU) or the peak allocated device memory (GPU);
- the median optimiser-step time after ``--warmup`` steps.

    python benchmarks/bench_fsdp.py [--steps 4] [--warmup 1] [--rounds 1] [--ranks 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from bench_sft import generated_rows

STRATEGIES = ("replicate", "fsdp2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_bytes(ctx: Any) -> int:
    """Bytes of parameters, gradients and optimiser state this rank stores."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    seen: set[int] = set()
    total = 0
    tensors = [*ctx.model.parameters(), *ctx.master.params()]
    tensors += [p.grad for p in ctx.master.params() if p.grad is not None]
    tensors += [v for s in ctx.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    for t in tensors:
        t = local(t)
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def worker(rank: int, port: int, world: int, strategy: str, args: dict, out: str) -> None:
    """One rank: build the run, train, write its figures to ``out/<rank>.json``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )  # fmt: skip
    common.set_threads(max(1, (os.cpu_count() or 2) // world))
    from rlhfkit.config import LogConfig, ModelConfig, OptimConfig
    from rlhfkit.data.templates import render_messages
    from rlhfkit.recipes.sft import label_count, make_step_loss, micro_batches
    from rlhfkit.training.accumulate import accumulate
    from rlhfkit.training.distributed import barrier
    from rlhfkit.training.run import build_run

    with tempfile.TemporaryDirectory() as run_dir:
        ctx = build_run(
            ModelConfig(parallel=strategy),
            LogConfig(run_dir=run_dir, tensorboard=False, progress=False),
            seed=0, config={}, batch_size=args["batch_size"],
        )  # fmt: skip
        steps = args["warmup"] + args["steps"]
        ctx.start_training(OptimConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant"), steps)
        rows = generated_rows(args["batch_size"] * steps)
        examples = [render_messages(ctx.tokenizer, r, max_len=512) for r in rows]
        step_loss, times = make_step_loss(ctx.model), []
        for k in range(steps):
            batch = ctx.dist.shard(examples[k * args["batch_size"] : (k + 1) * args["batch_size"]])
            parts = micro_batches(batch, packing=True, budget=args["micro_batch_tokens"],
                                  pad_id=ctx.pad_id)  # fmt: skip
            parts = [ctx.to_device(p) for p in parts]
            barrier()
            start = time.perf_counter()
            stats = accumulate(
                parts, step_loss, count_fn=label_count, after_backward=ctx.master.collect_grads,
                models=ctx.models,
            )  # fmt: skip
            ctx.apply_step(stats, 1.0, 3)
            barrier()
            if k >= args["warmup"]:
                times.append(time.perf_counter() - start)
        cuda = ctx.dist.device.type == "cuda"
        peak = (
            torch.cuda.max_memory_allocated()
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        result = {
            "strategy": strategy, "rank": rank, "state_bytes": state_bytes(ctx),
            "peak_bytes": peak, "peak_kind": "device allocated" if cuda else "process RSS",
            "step_s": statistics.median(times), "loss": stats.loss,
            "device": str(ctx.dist.device), "precision": str(ctx.precision.compute),
        }  # fmt: skip
        Path(out, f"{rank}.json").write_text(json.dumps(result))
        barrier()
    torch.distributed.destroy_process_group()


def run_job(strategy: str, world: int, args: dict) -> list[dict]:
    """One ``world``-rank job of ``strategy``; each rank's figures."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(worker, args=(_free_port(), world, strategy, args, out), nprocs=world, join=True)
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-tokens", type=int, default=1024)
    ns = parser.parse_args()
    args = {
        "steps": ns.steps, "warmup": ns.warmup, "batch_size": ns.batch_size,
        "micro_batch_tokens": ns.micro_batch_tokens,
    }  # fmt: skip
    print(f"machine: {common.cpu_model()}")
    results: dict[str, list[list[dict]]] = {s: [] for s in STRATEGIES}
    for _ in range(ns.rounds):
        for strategy in STRATEGIES:
            results[strategy].append(run_job(strategy, ns.ranks, args))
    gib = 1024**3
    first = results["fsdp2"][0][0]
    print(f"\n{ns.ranks} ranks, SFT step on {ns.batch_size} rows, {first['device']}, "
          f"{first['precision']}")  # fmt: skip
    print("| strategy | rank | training state held | peak memory | step (median) |")
    print("| --- | --- | --- | --- | --- |")
    summary = {}
    for strategy, rounds in results.items():
        for rank in range(ns.ranks):
            rows = [r[rank] for r in rounds]
            step = statistics.median(r["step_s"] for r in rows)
            peak = max(r["peak_bytes"] for r in rows)
            state = rows[0]["state_bytes"]
            summary[(strategy, rank)] = (state, peak, step)
            print(f"| {strategy} | {rank} | {state / gib:.3f} GiB | {peak / gib:.2f} GiB "
                  f"({rows[0]['peak_kind']}) | {step:.2f} s |")  # fmt: skip
    rep, sh = summary[("replicate", 0)], summary[("fsdp2", 0)]
    print(
        f"\nfsdp2 / replicate on rank 0: training state {sh[0] / rep[0]:.2f}x, "
        f"peak memory {sh[1] / rep[1]:.2f}x, step time {sh[2] / rep[2]:.2f}x"
    )
    losses = {s: results[s][0][0]["loss"] for s in STRATEGIES}
    print(f"last-step loss: replicate {losses['replicate']:.6f}, fsdp2 {losses['fsdp2']:.6f}")


if __name__ == "__main__":
    main()
