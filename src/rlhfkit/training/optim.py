"""Optimiser and learning-rate schedule: AdamW, warmup then cosine / linear decay, clipping."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch

from rlhfkit.models.sharding import full_tensor

if TYPE_CHECKING:
    from rlhfkit.config import OptimConfig

ScheduleName = Literal["linear", "cosine", "constant"]


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over ``params``; weight decay skips 1-D parameters (norms, biases).

    Args:
        params: Parameters to optimise (fp32 master weights).
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay for matrices.
        betas: Adam moment coefficients.
        eps: Adam epsilon.
    """
    params = list(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    # The fused kernel updates each tensor in one pass; on CPU it is several times faster than
    # the foreach path, which materialises temporaries the size of the model.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: ScheduleName) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based).

    Warmup rises linearly from 1/(warmup+1) to 1 over ``warmup_steps`` steps; then ``linear``
    decays to 0 at ``total_steps``, ``cosine`` follows 0.5(1 + cos(pi * progress)), and
    ``constant`` stays at 1.
    """
    shapes = {
        "linear": lambda x: 1.0 - x,
        "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
        "constant": lambda x: 1.0,
    }
    if schedule not in shapes:
        raise ValueError(f"unknown schedule {schedule!r}; choose {', '.join(shapes)}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return shapes[schedule](progress)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_ratio: float = 0.05,
    schedule: ScheduleName = "linear",
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR implementing :func:`lr_factor`; its state is checkpointed with the optimiser."""
    warmup = round(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, total_steps=total_steps, warmup_steps=warmup, schedule=schedule
        ),
    )


def optimizer_and_schedule(
    params: Iterable[torch.nn.Parameter], optim: OptimConfig, total_steps: int
) -> tuple[torch.optim.AdamW, Any]:
    """:func:`build_optimizer` and :func:`build_scheduler` from an ``--optim`` section.

    Args:
        params: Parameters to optimise (fp32 master weights).
        optim: Learning rate, weight decay, betas, eps, warmup and schedule.
        total_steps: Optimiser steps of the whole run.
    """
    optimizer = build_optimizer(
        params, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas, eps=optim.eps
    )
    scheduler = build_scheduler(
        optimizer, total_steps=total_steps, warmup_ratio=optim.warmup_ratio,
        schedule=optim.schedule,
    )  # fmt: skip
    return optimizer, scheduler


def adam_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """AdamW's state of ``param`` before its first step (what the optimiser would create).

    Made ahead of time so a checkpoint can be read into it; the step counter lives on the
    parameter's device for the fused kernel, as AdamW itself places it.
    """
    fused = bool(optimizer.defaults.get("fused"))
    step = torch.zeros((), dtype=torch.float32, device=param.device if fused else "cpu")
    return {
        "step": step,
        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
    }


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip the global L2 norm of the gradients to ``max_norm`` (None: only measure it)."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    return float(full_tensor(norm))  # a sharded model's norm is a DTensor: the global value
