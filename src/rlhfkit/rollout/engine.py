"""A rollout engine: a sampler on its own copy of the policy, kept in step by weight syncs.

The learner trains its model; the engine samples with a separate copy that only changes when the
learner pushes new weights. This is how an inference engine (vLLM) relates to a trainer, and it
is what lets generation run ahead of training (asynchronous RL): the engine's weights carry the
*version* (the learner's optimiser step) they were taken at, and every rollout records the
version that drew it.

:class:`LocalEngine` is the in-process engine: rlhfkit's KV-cache sampler on a deep copy of the
policy. A sync copies the learner's trainable parameters (with LoRA: only the adapters) into a
staging snapshot (:meth:`LocalEngine.push`, called by the learner); the engine applies the
snapshot between two batches (:meth:`LocalEngine.apply`, called by the sampling side), so a
batch is never drawn by half-updated weights and the learner never waits for a batch to finish.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from typing import Any

import torch
from torch import nn

from rlhfkit.rollout.sampler import HFGenerator


def weights_hash(model: nn.Module, names: set[str] | None = None) -> str:
    """A hash of the exact bytes of the model's parameters (or of those in ``names``)."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if names is None or name in names:
            digest.update(name.encode())
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class StagedEngine:
    """What every rollout engine shares: weights staged by the learner, loaded between batches.

    The learner calls :meth:`push` (a snapshot is taken at once, so training goes on); the
    sampling side calls :meth:`apply` between two batches, so a batch is never drawn by
    half-updated weights. Subclasses say how a snapshot is taken (:meth:`_snapshot`) and
    loaded (:meth:`_load`).

    Args:
        model: The learner's model (its trainable parameters are the ones synced).
        version: The learner's optimiser step of the weights the engine starts with.
    """

    def __init__(self, model: nn.Module, version: int = 0) -> None:
        self.synced = {n for n, p in model.named_parameters() if p.requires_grad}
        self.version = version
        self.sync_seconds = 0.0
        """Time of the last :meth:`apply` that loaded weights."""
        self._pending: tuple[int, dict[str, torch.Tensor]] | None = None
        self._lock = threading.RLock()  # re-entrant: `latest` is read under `changed`
        self.changed = threading.Condition(self._lock)
        """Notified on every push (the sampling side waits on it for a fresh version)."""

    @property
    def latest(self) -> int:
        """The newest version pushed (applied or still staged)."""
        with self._lock:
            return self._pending[0] if self._pending is not None else self.version

    @property
    def pending(self) -> bool:
        """Whether pushed weights wait to be loaded by the next :meth:`apply`."""
        with self._lock:
            return self._pending is not None

    @torch.no_grad()
    def push(self, model: nn.Module, version: int) -> None:
        """Stage the learner's weights as ``version``."""
        snapshot = self._snapshot(model)
        with self.changed:
            self._pending = (version, snapshot)
            self.changed.notify_all()

    @torch.no_grad()
    def apply(self) -> int:
        """Load the staged weights, if any; returns the version the engine now holds."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            start = time.perf_counter()
            self._load(pending[1])
            self.version = pending[0]
            self.sync_seconds = time.perf_counter() - start
        return self.version

    def _snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load(self, snapshot: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


class LocalEngine(StagedEngine):
    """rlhfkit's sampler on a private copy of the policy, updated only by weight syncs.

    Args:
        model: The learner's model (copied; the copy is in eval mode).
        pad_id: Padding id of the sampler.
        eos_ids: End-of-turn ids.
        tokenizer: For stop strings.
        version: The learner's optimiser step the copy is taken at.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        pad_id: int,
        eos_ids: list[int],
        tokenizer: Any = None,
        version: int = 0,
    ) -> None:
        super().__init__(model, version)
        # The copy keeps the learner's requires_grad flags (it only runs under no_grad): on CPU
        # frozen weights can take other kernels, and the engine must compute what the learner
        # would (max_staleness 0 reproduces the synchronous run bit for bit).
        self.model = copy.deepcopy(model).eval()
        self.generator = HFGenerator(
            self.model, pad_id=pad_id, eos_ids=eos_ids, tokenizer=tokenizer
        )

    def _snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if n in self.synced}

    def _load(self, snapshot: dict[str, torch.Tensor]) -> None:
        missing = set(self.synced) - set(snapshot)
        if missing:
            raise RuntimeError(f"weight sync failed: no value for {sorted(missing)[:3]}")
        params = dict(self.model.named_parameters())
        for name, value in snapshot.items():
            params[name].copy_(value)

    def weights_hash(self) -> str:
        """Hash of the synced weights the engine holds (equal to the learner's after a sync)."""
        return weights_hash(self.model, self.synced)
