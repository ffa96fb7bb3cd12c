"""Gradient accumulation: the ONLY owner of micro-batching and the global loss normaliser.

A loss over an optimiser batch is normalised by a global count (loss tokens for ``token_mean``,
sequences for the per-sequence modes; see :mod:`rlhfkit.ops.masking`). ``accumulate`` first adds
up every micro-batch's count, all-reduces it across ranks, then runs forward and backward per
micro-batch with that one normaliser. The summed gradient is then identical however the batch is
split into micro-batches and ranks: each micro-batch contributes exactly its share of the batch
loss, and nothing is ever divided again by the number of accumulation steps.

The gradient all-reduce (replicate) and FSDP2's reduce-scatter *average* over ranks, so each
rank's loss is multiplied by the world size to turn that average back into the global sum.

Sharded models (FSDP2) add two rules, both kept here. Each forward and backward of a sharded
model is a collective, so every rank runs the same number of micro-batches: a rank with fewer
repeats its last one with its loss multiplied by 0 (exactly zero gradient). And each
micro-batch's loss runs as a forward of every sharded model's root unit
(:func:`rlhfkit.models.sharding.run_as_forward`), because rlhfkit's forward helpers read the
head's weight outside the model's own ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from rlhfkit.models.sharding import is_sharded, run_as_forward
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


def global_count(local: float, group: dist.ProcessGroup | None = None, op: Any = None) -> float:
    """Sum (or ``op``) of ``local`` over all ranks (identity without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(local)
    nccl = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    tensor = torch.tensor([float(local)], dtype=torch.float64, device=device)
    if op is None:
        dist.all_reduce(tensor, group=group)
    else:
        dist.all_reduce(tensor, op=op, group=group)
    return float(tensor.item())


def accumulate(
    micro_batches: Sequence[MicroBatch],
    loss_fn: Callable[[MicroBatch, float], LossOutput],
    *,
    count_fn: Callable[[MicroBatch], float],
    after_backward: Callable[[], None] | None = None,
    backward: bool = True,
    group: dist.ProcessGroup | None = None,
    models: Sequence[nn.Module] = (),
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
        models: The models ``loss_fn`` runs; sharded ones make every rank run the same number
            of micro-batches, and each micro-batch a forward of their root units.

    Returns:
        StepStats with the batch loss and summed metrics.

    Raises:
        ValueError: If the global normaliser is 0 (no token or sequence counts in the batch).
    """
    normaliser = global_count(sum(float(count_fn(mb)) for mb in micro_batches), group)
    if normaliser <= 0:
        raise ValueError("the batch has nothing to learn from (global normaliser is 0)")
    ranks = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    sharded = [m for m in models if is_sharded(m)]
    runs = _passes(len(micro_batches), group) if sharded else len(micro_batches)
    total, finite = 0.0, True
    metrics: dict[str, float] = {}
    for index in range(runs):
        real = index < len(micro_batches)
        mb = micro_batches[index] if real else micro_batches[-1]
        out = _forward(sharded, partial(loss_fn, mb, normaliser))
        if real and not torch.isfinite(out.loss.detach()).all():
            if not sharded:
                return StepStats(
                    loss=float("nan"), normaliser=normaliser, metrics=metrics, finite=False
                )
            finite = False  # the other ranks' collectives still need this rank's passes
        if backward:
            (out.loss * (ranks if real else 0.0)).backward()
            if after_backward is not None:
                after_backward()
        if not real:
            continue
        total += float(out.loss.detach())
        for key, value in out.metrics.items():
            metrics[key] = metrics.get(key, 0.0) + float(value)
    if not finite:  # the caller drops the (non-finite) gradients on every rank
        return StepStats(loss=float("nan"), normaliser=normaliser, metrics=metrics, finite=False)
    return StepStats(loss=total, normaliser=normaliser, metrics=metrics)


def _passes(mine: int, group: dist.ProcessGroup | None) -> int:
    """Micro-batches every rank runs under sharding: the most any rank has.

    Raises:
        ValueError: This rank has none while another has some (nothing to repeat).
    """
    runs = int(global_count(float(mine), group, op=dist.ReduceOp.MAX))
    if runs and not mine:
        raise ValueError("this rank has no micro-batch while others do: give every rank data")
    return runs


def _forward(sharded: list[nn.Module], fn: Callable[[], LossOutput]) -> LossOutput:
    """``fn()`` run as a forward of every sharded model's root unit (nested), or plainly."""
    if not sharded:
        return fn()

    def wrapped() -> tuple[torch.Tensor, LossOutput]:
        out = _forward(sharded[1:], fn)
        return out.loss, out  # FSDP2 hooks the loss tensor for its backward

    return run_as_forward(sharded[0], wrapped)[1]
