"""Data parallelism across processes (``torchrun ... -m rlhfkit <command>``).

Each rank holds a full replica and processes its shard of every optimiser batch. After the
local micro-batches, the fp32 master gradients are averaged across ranks with one all-reduce
per flattened bucket; ``training.accumulate`` has already scaled each rank's loss by the world
size over the *global* normaliser, so the average equals the single-process gradient of the
whole batch (tested with 2 gloo processes). Averaging the master gradients (rather than wrapping
the model in DDP) keeps bf16 compute + fp32 master weights on one code path and reduces in fp32.

Backend: NCCL when CUDA is available, gloo otherwise. Without torchrun's environment
(``WORLD_SIZE`` unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

_BUCKET_ELEMENTS = 1 << 25  # 128 MB of fp32 per all-reduce


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job.

    Attributes:
        rank: Global rank.
        world_size: Number of processes.
        local_rank: Rank within this machine.
        device: The device this rank computes on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """True on the rank that logs and writes files."""
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of a global batch (strided, so shares differ by at most one)."""
        return items[self.rank :: self.world_size]


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if world <= 1:
        return DistInfo(device=device)
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, device)


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` in place across ranks, in flattened buckets (no-op on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in [*tensors, None]:
        if tensor is not None:
            bucket.append(tensor)
            size += tensor.numel()
        if bucket and (tensor is None or size >= _BUCKET_ELEMENTS):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat.div_(world)
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                dst.copy_(src)
            bucket, size = [], 0


def all_reduce_sum(value: float) -> float:
    """Sum a Python number across ranks (for logging losses and counts)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return float(tensor.item())


def collective_device() -> torch.device:
    """Where small tensors for collectives must live (NCCL needs CUDA tensors)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj: object) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` on one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op on one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (``obj`` itself on one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def dist_rank() -> int:
    """This process's global rank (0 on one process)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
