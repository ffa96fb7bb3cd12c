"""A second model trained beside the policy and stepped with it (PPO's value model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.config import OptimConfig
from rlhfkit.training.optim import optimizer_and_schedule
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
        self.optimizer, self.scheduler = optimizer_and_schedule(
            self.master.params(), self.optim, total_steps
        )

    def step(self) -> None:
        """Optimiser and schedule step, then copy the master weights into the model."""
        self.optimizer.step()
        self.scheduler.step()
        self.master.zero_grad()
        self.master.sync_to_model()
