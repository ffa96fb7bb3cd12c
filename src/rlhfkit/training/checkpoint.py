"""Atomic, resumable checkpoints.

A checkpoint is a directory ``<run_dir>/checkpoints/step-<N>`` holding:

- ``model.safetensors``: the trainable parameters by name, fp32 master weights;
- ``trainer_state.pt``: optimiser and scheduler state, RNG states (python, torch, CUDA), the
  step, the data position and any extra recipe state.

It is written into a temporary sibling directory and renamed into place only when complete,
then ``checkpoints/latest`` (a one-line file) is replaced atomically to point at it. A crash at
any moment therefore leaves the previous checkpoint intact and ``latest`` naming a complete one.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rlhfkit.atomic import atomic_directory, atomic_write_text

LATEST = "latest"


@dataclass
class TrainerState:
    """Everything besides the weights needed to continue a run exactly.

    Attributes:
        step: Optimiser steps completed.
        optimizer: ``optimizer.state_dict()``.
        scheduler: ``scheduler.state_dict()``.
        rng: RNG states from :func:`capture_rng`.
        data: Data position (for example ``{"epoch": 1, "batch": 3}``).
        extra: Recipe-specific state (counters, controllers).
    """

    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    """States of Python's, torch's and (if present) CUDA's random generators."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Restore generator states saved by :func:`capture_rng`."""
    if "python" in state:
        random.setstate(state["python"])
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str | Path,
    weights: dict[str, torch.Tensor],
    state: TrainerState,
    *,
    keep_last: int | None = 2,
) -> Path:
    """Write a checkpoint atomically and point ``latest`` at it.

    Args:
        run_dir: The run directory.
        weights: Trainable parameters by name (fp32 master weights).
        state: Optimiser, scheduler, RNG and data state.
        keep_last: Keep only this many newest checkpoints (None keeps all).

    Returns:
        The checkpoint directory.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    with atomic_directory(final) as tmp:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(state.__dict__, tmp / "trainer_state.pt")
    atomic_write_text(root / LATEST, final.name + "\n")
    if keep_last:
        others = sorted(p for p in root.glob("step-*") if p.is_dir() and p != final)
        for old in others[: max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` points at, or None if the run has none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").is_file() else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], TrainerState]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: If ``path`` is not a complete checkpoint.
    """
    path = Path(path)
    if not (path / "model.safetensors").is_file() or not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(
            f"{path} is not a complete checkpoint (model.safetensors and trainer_state.pt expected)"
        )
    weights = load_file(str(path / "model.safetensors"))
    raw = torch.load(path / "trainer_state.pt", weights_only=False)
    return weights, TrainerState(**raw)
