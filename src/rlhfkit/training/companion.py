"""A second model trained beside the policy and stepped with it (PPO's value model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.config import OptimConfig
from rlhfkit.training.optim import build_optimizer, build_scheduler
from rlhfkit.training.precision import MasterWeights


@dataclass
class Companion:
    """A second model trained next to the policy and stepped with it (PPO's value model).

    It has its own fp32 master weights, AdamW, schedule and gradient clipping. Its weights are
    written into the policy's checkpoint under ``<name>/`` and its optimiser and schedule into
    ``TrainerState.data["companions"]``, so one atomic checkpoint restores both models.
    """

    model: torch.nn.Module
    master: MasterWeights
    optim: OptimConfig
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None

    def start(self, total_steps: int) -> None:
        """Build the optimiser and schedule for ``total_steps`` steps."""
        o = self.optim
        self.optimizer = build_optimizer(
            self.master.params(), lr=o.lr, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps
        )
        self.scheduler = build_scheduler(
            self.optimizer, total_steps=total_steps, warmup_ratio=o.warmup_ratio,
            schedule=o.schedule,
        )  # fmt: skip

    def step(self) -> None:
        """Optimiser and schedule step, then copy the master weights into the model."""
        self.optimizer.step()
        self.scheduler.step()
        self.master.zero_grad()
        self.master.sync_to_model()
