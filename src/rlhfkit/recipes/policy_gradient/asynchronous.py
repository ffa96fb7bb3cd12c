"""Asynchronous RL: an engine draws the next rollout batches while the learner trains.

The learner trains at optimiser step s (its policy *version*); the engine samples with weights
of an older version v, pushed to it by weight syncs. A background thread draws batch j as soon
as the engine's weights are fresh enough for the step the learner will be at when it trains on
that batch, so the staleness s - v of every batch consumed is at most ``max_staleness``:

- the learner tells the producer how far it got (its step after each batch, and how many
  batches it consumed); the producer predicts the step of batch j's consumption as that step
  plus one batch's optimiser steps for every batch still in between (an upper bound: a skipped
  non-finite step only lowers the real step), and waits until the engine holds a version at
  least that step minus ``max_staleness``;
- the learner pushes its weights every ``sync_every`` steps, and whenever the producer could not
  otherwise make the batch the learner waits for.

With ``max_staleness = 0`` the producer waits for the weights of the batch's own step, which
exist only once the previous batch is trained: the synchronous loop, step for step (same
samples, losses and weights). The off-policy gap is corrected by the importance weight of the
learner's log-probs against the sampler's (``--algo.tis-mode``); π_old is the learner's own, so
PPO's ratio still measures only the learner's movement within the batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, replace
from typing import Any

import torch

from rlhfkit.recipes.policy_gradient.collect import draw
from rlhfkit.recipes.policy_gradient.state import LoopState, PGRun, Sampled
from rlhfkit.rollout.engine import LocalEngine

log = logging.getLogger(__name__)


@dataclass
class Drawn:
    """One batch drawn by the engine.

    Attributes:
        index: Its place among the batches drawn in this process (0, 1, ...).
        sampled: The scored groups.
        stats: Sampling statistics to log.
        version: The learner step of the weights that drew it.
        rollouts: The prompt-batch counter after drawing it (the learner adopts it).
    """

    index: int
    sampled: Sampled
    stats: dict[str, float]
    version: int
    rollouts: int


class RolloutProducer:
    """The background thread that draws batches on an engine, ahead of the learner.

    Args:
        run: The run (its generator is replaced by the engine's).
        engine: The engine copy of the policy.
        state: The learner's loop state (only its prompt counter is read, at the start).
        max_staleness: Largest learner step minus engine version of a consumed batch.
        steps_per_batch: Optimiser steps the learner takes on a batch.
        sync_every: Push the learner's weights after this many optimiser steps.
        total_steps: The learner's last step: a batch that would be consumed at or after it is
            not drawn (unless skipped steps bring it back into the run).
    """

    def __init__(
        self,
        run: PGRun,
        engine: LocalEngine,
        state: LoopState,
        *,
        max_staleness: int,
        steps_per_batch: int,
        sync_every: int = 1,
        total_steps: int | None = None,
    ) -> None:
        self.run = replace(run, generator=engine.generator)
        self.engine, self.k, self.per_batch = engine, max_staleness, steps_per_batch
        self.sync_every, self.total = sync_every, total_steps
        self._drawing = LoopState(rollouts=state.rollouts)
        self._done_step, self._done_batches = run.ctx.step, 0
        self._stop = False
        self._queue: queue.Queue[Drawn | BaseException] = queue.Queue()
        # torch's intra-op thread count is per OS thread: the sampling thread uses the learner's,
        # so its kernels reduce in the same order as a synchronous run's
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._produce, name="rollouts", daemon=True)
        self._thread.start()

    def predicted_step(self, index: int) -> int:
        """An upper bound of the learner's step when it takes batch ``index``."""
        with self.engine.changed:
            return self._done_step + (index - self._done_batches) * self.per_batch

    def required_version(self, index: int) -> int:
        """The oldest engine version allowed to draw batch ``index``."""
        return self.predicted_step(index) - self.k

    def _may_draw(self, index: int) -> bool:
        """Batch ``index`` is needed and the engine's weights are fresh enough for it."""
        needed = self.total is None or self.predicted_step(index) < self.total
        return needed and self.engine.latest >= self.required_version(index)

    def _produce(self) -> None:
        torch.set_num_threads(self._threads)
        try:
            index = 0
            while True:
                with self.engine.changed:
                    while not self._stop and not self._may_draw(index):
                        self.engine.changed.wait()
                    if self._stop:
                        return
                version = self.engine.apply()
                sampled, stats = draw(self.run, self._drawing)
                self._queue.put(Drawn(index, sampled, stats, version, self._drawing.rollouts))
                index += 1
        except BaseException as err:  # the learner re-raises it: never hang on a dead engine
            self._queue.put(err)

    def next(self, learner_step: int, timeout: float | None = None) -> Drawn:
        """The next batch for the learner at ``learner_step`` (pushing weights if it must).

        Raises:
            RuntimeError: The engine failed (the original error is chained), or the batch
                would break the staleness bound (a bug, never silently trained on).
        """
        if self._queue.empty():
            index = self._done_batches
            if self.engine.latest < self.required_version(index):
                self.engine.push(self.run.ctx.model, learner_step)
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty as err:
            raise RuntimeError(f"the rollout engine gave no batch in {timeout} s") from err
        if isinstance(item, BaseException):
            raise RuntimeError(f"the rollout engine failed: {item}") from item
        if item.version < learner_step - self.k:
            raise RuntimeError(
                f"batch drawn by version {item.version} at learner step {learner_step}: "
                f"staleness above {self.k}"
            )
        return item

    def finished(self, learner_step: int) -> None:
        """The learner has trained on one more batch and is now at ``learner_step``.

        Pushes its weights when ``sync_every`` steps have passed since the engine's version.
        """
        if learner_step - self.engine.latest >= self.sync_every:
            self.engine.push(self.run.ctx.model, learner_step)
        with self.engine.changed:
            self._done_step, self._done_batches = learner_step, self._done_batches + 1
            self.engine.changed.notify_all()

    def close(self) -> None:
        """Stop drawing (a batch being drawn is finished first) and wait for the thread."""
        with self.engine.changed:
            self._stop = True
            self.engine.changed.notify_all()
        self._thread.join()

    def __enter__(self) -> RolloutProducer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
