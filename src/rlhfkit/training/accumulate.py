"""Gradient accumulation: the ONLY owner of micro-batching and the global loss normaliser.

A loss over an optimiser batch is normalised by a global count (loss tokens for ``token_mean``,
sequences for the per-sequence modes; see :mod:`rlhfkit.ops.masking`). ``accumulate`` first adds
up every micro-batch's count, all-reduces it across ranks, then runs forward and backward per
micro-batch with that one normaliser. The summed gradient is then identical however the batch is
split into micro-batches and ranks: each micro-batch contributes exactly its share of the batch
loss, and nothing is ever divided again by the number of accumulation steps.

Under DDP the gradient all-reduce *averages* over ranks, so each rank's loss is multiplied by the
world size to turn that average back into the global sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

from rlhfkit.types import LossOutput

MicroBatch = TypeVar("MicroBatch")


@dataclass
class StepStats:
    """What one accumulated optimiser step produced.

    Attributes:
        loss: The batch loss (sum of the micro-batch shares), as a float.
        normaliser: The global normaliser used.
        metrics: Metric values summed over micro-batches (detached floats).
        finite: False if a micro-batch loss was NaN or infinite (its backward was skipped and the
            remaining micro-batches were not run; the caller must drop the gradients).
    """

    loss: float
    normaliser: float
    metrics: dict[str, float] = field(default_factory=dict)
    finite: bool = True


def global_count(local: float, group: dist.ProcessGroup | None = None) -> float:
    """Sum ``local`` over all ranks (identity when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(local)
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    tensor = torch.tensor([float(local)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return float(tensor.item())


def accumulate(
    micro_batches: Sequence[MicroBatch],
    loss_fn: Callable[[MicroBatch, float], LossOutput],
    *,
    count_fn: Callable[[MicroBatch], float],
    after_backward: Callable[[], None] | None = None,
    backward: bool = True,
    group: dist.ProcessGroup | None = None,
) -> StepStats:
    """Forward and backward over micro-batches with one global normaliser.

    Args:
        micro_batches: This rank's micro-batches of one optimiser batch.
        loss_fn: ``loss_fn(micro_batch, normaliser)`` returns this micro-batch's share of the
            batch loss (already divided by the global ``normaliser``).
        count_fn: This micro-batch's contribution to the normaliser.
        after_backward: Called after every backward (e.g. moving bf16 gradients into fp32
            master gradients).
        backward: False for evaluation (no gradients; use under ``torch.no_grad``).
        group: Process group for the all-reduce (default: the world).

    Returns:
        StepStats with the batch loss and summed metrics.

    Raises:
        ValueError: If the global normaliser is 0 (no token or sequence counts in the batch).
    """
    normaliser = global_count(sum(float(count_fn(mb)) for mb in micro_batches), group)
    if normaliser <= 0:
        raise ValueError("the batch has nothing to learn from (global normaliser is 0)")
    ranks = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    total = 0.0
    metrics: dict[str, float] = {}
    for mb in micro_batches:
        out = loss_fn(mb, normaliser)
        if not torch.isfinite(out.loss.detach()).all():
            return StepStats(
                loss=float("nan"), normaliser=normaliser, metrics=metrics, finite=False
            )
        if backward:
            (out.loss * ranks).backward()
            if after_backward is not None:
                after_backward()
        total += float(out.loss.detach())
        for key, value in out.metrics.items():
            metrics[key] = metrics.get(key, 0.0) + float(value)
    return StepStats(loss=total, normaliser=normaliser, metrics=metrics)
