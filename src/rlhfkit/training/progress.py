"""A rich progress bar for training loops: step count, loss, tokens/s and ETA."""

from __future__ import annotations

import time
from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """Progress bar over optimiser steps; shows loss and tokens/s (non-padding tokens).

    Args:
        total: Total number of steps.
        start: Steps already done (resume).
        description: Label shown left of the bar.
        enabled: False disables all output (non-zero ranks, tests).
    """

    def __init__(
        self, total: int, *, start: int = 0, description: str = "train", enabled: bool = True
    ) -> None:
        self.enabled = enabled
        self.tokens = 0
        self.started = time.perf_counter()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self.task = self.progress.add_task(
            description, total=total, completed=start, loss="-", tps="-"
        )

    def __enter__(self) -> TrainProgress:
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def update(self, steps: int = 1, *, loss: float, tokens: int) -> None:
        """Advance ``steps`` steps that processed ``tokens`` non-padding tokens."""
        self.tokens += tokens
        rate = self.tokens / max(1e-9, time.perf_counter() - self.started)
        self.progress.update(self.task, advance=steps, loss=f"{loss:.4f}", tps=f"{rate:,.0f}")
