"""Atomic, resumable checkpoints.

A checkpoint is a directory ``<run_dir>/checkpoints/step-<N>`` holding:

- ``model.safetensors``: the trainable parameters by name, fp32 master weights; or, for a
  sharded run (``--model.parallel fsdp2``), ``shards/``: a torch.distributed.checkpoint of the
  master weights *and* the AdamW state, written by every rank in parallel and readable at any
  number of ranks (:func:`save_shards`, :func:`load_shards`);
- ``trainer_state.pt``: optimiser and scheduler state, RNG states (python, torch, CUDA), the
  step, the data position and any extra recipe state;
- ``info.json``: the step and what a resumed run needs before loading anything (how many
  records ``metrics.jsonl`` held).

It is written into a temporary sibling directory and renamed into place only when complete,
then ``checkpoints/latest`` (a one-line file) is replaced atomically to point at it. A crash at
any moment therefore leaves the previous checkpoint intact and ``latest`` naming a complete one;
:func:`latest_checkpoint` also finds the newest complete checkpoint when ``latest`` is missing
or names a deleted one, and :func:`remove_partial` clears what a killed write left behind.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rlhfkit.atomic import atomic_directory, atomic_write_text
from rlhfkit.errors import DiskSpaceError

LATEST = "latest"
INFO = "info.json"
SHARDS = "shards"


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
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically and point ``latest`` at it.

    Args:
        run_dir: The run directory.
        weights: Trainable parameters by name (fp32 master weights).
        state: Optimiser, scheduler, RNG and data state.
        keep_last: Keep only this many newest checkpoints (None keeps all).
        info: Small plain values written to ``info.json`` with the step
            (:func:`checkpoint_info` reads them without loading the state).

    Returns:
        The checkpoint directory.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:08d}"
    need = tensor_bytes(weights) + tensor_bytes(state.__dict__)
    require_space(root, need)
    try:
        with atomic_directory(final) as tmp:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
            save_file(tensors, str(tmp / "model.safetensors"))
            torch.save(state.__dict__, tmp / "trainer_state.pt")
            (tmp / INFO).write_text(json.dumps({**(info or {}), "step": state.step}) + "\n")
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        if isinstance(exc, OSError) and exc.errno != errno.ENOSPC:
            raise
        if shutil.disk_usage(root).free >= need:
            raise
        raise _no_space(root, need) from exc
    atomic_write_text(root / LATEST, final.name + "\n")
    _prune(root, final, keep_last)
    return final


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor inside ``obj`` (nested dicts, lists and tuples), counted once each."""
    seen: set[int] = set()

    def walk(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            if id(x) in seen:
                return 0
            seen.add(id(x))
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0

    return walk(obj)


def require_space(directory: Path, need: int) -> None:
    """Raise :class:`DiskSpaceError` unless ``directory`` has ``need`` bytes free.

    1% and 16 MiB are added as headroom for file headers.
    """
    if shutil.disk_usage(directory).free < need * 1.01 + 2**24:
        raise _no_space(directory, need)


def _no_space(directory: Path, need: int) -> DiskSpaceError:
    free = shutil.disk_usage(directory).free
    return DiskSpaceError(
        f"not enough free disk in {directory}: a checkpoint needs about {need / 2**30:.2f} GiB "
        f"and {free / 2**30:.2f} GiB is free. The checkpoints already written are intact: free "
        "some space (or lower --loop.keep-last) and run the same command again to resume."
    )


def _prune(root: Path, final: Path, keep_last: int | None) -> None:
    """Delete all but the ``keep_last`` newest checkpoints (``final`` among those kept)."""
    if keep_last:
        others = sorted(p for p in root.glob("step-*") if p.is_dir() and p != final)
        for old in others[: max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` points at, or None if the run has none.

    When ``latest`` is missing or names an incomplete or deleted checkpoint (a run killed
    between writing a checkpoint and its pointer, or a checkpoint removed by hand), the newest
    complete ``step-*`` directory is used instead.
    """
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if _complete(path):
            return path
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.glob("step-*") if _complete(p))
    return complete[-1] if complete else None


def _complete(path: Path) -> bool:
    weights = (path / "model.safetensors").is_file() or (path / SHARDS / ".metadata").is_file()
    return (path / "trainer_state.pt").is_file() and weights


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` keeps its tensors in ``shards/`` (an FSDP2 run)."""
    return (Path(path) / SHARDS / ".metadata").is_file()


def save_shards(
    run_dir: str | Path,
    tensors: dict[str, torch.Tensor],
    state: TrainerState,
    *,
    is_main: bool,
    keep_last: int | None = 2,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a sharded checkpoint atomically; every rank calls it with its own shards.

    Rank 0 makes a temporary directory and tells the others its name; every rank writes its
    shards of ``tensors`` into ``<tmp>/shards`` (``torch.distributed.checkpoint.save``); after
    a barrier rank 0 adds ``trainer_state.pt`` and ``info.json`` and renames the directory into
    place. The run directory must be on a file system that every rank sees.

    Args:
        run_dir: The run directory.
        tensors: Tensors by name, plain or ``DTensor`` shards (model and optimiser state).
        state: Scheduler, RNG, data position and recipe state (its ``optimizer`` holds only the
            parameter groups' hyper-parameters; the moments are in ``tensors``).
        is_main: True on rank 0.
        keep_last: Keep only this many newest checkpoints (None keeps all).
        info: Small plain values for ``info.json``.
    """
    import torch.distributed.checkpoint as dcp

    from rlhfkit.training.distributed import barrier, broadcast_object

    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{state.step:08d}"
    tmp = None
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root)
    tmp = Path(broadcast_object(tmp))
    dcp.save(tensors, checkpoint_id=tmp / SHARDS)
    barrier()
    if is_main:
        try:
            torch.save(state.__dict__, tmp / "trainer_state.pt")
            (tmp / INFO).write_text(json.dumps({**(info or {}), "step": state.step}) + "\n")
            os.chmod(tmp, 0o755)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        atomic_write_text(root / LATEST, final.name + "\n")
        _prune(root, final, keep_last)
    barrier()
    return final


def load_shards(path: str | Path, tensors: dict[str, torch.Tensor]) -> TrainerState:
    """Read a sharded checkpoint into ``tensors`` in place (any number of ranks, or none).

    ``tensors`` names the destinations as :func:`save_shards` named the sources; each rank
    passes its own layout (shards, or whole tensors in one process) and reads what it needs.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    dcp.load(tensors, checkpoint_id=path / SHARDS)
    raw = torch.load(path / "trainer_state.pt", weights_only=False)
    return TrainerState(**raw)


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The ``info.json`` of a checkpoint: at least its ``step``.

    Checkpoints written before ``info.json`` existed give only the step, read from the name.
    """
    path = Path(path)
    try:
        info = json.loads((path / INFO).read_text())
    except (OSError, ValueError):
        info = {}
    if "step" not in info:
        info["step"] = int(path.name.removeprefix("step-"))
    return info


def update_checkpoint_info(path: str | Path, **values: Any) -> None:
    """Replace values in a complete checkpoint's ``info.json`` (atomically)."""
    info = {**checkpoint_info(path), **values}
    atomic_write_text(Path(path) / INFO, json.dumps(info) + "\n")


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Delete what killed writes left in a run directory and its ``checkpoints``.

    Atomic writes go through ``.tmp-<name>-*`` directories and ``.<name>.<pid>.tmp`` files,
    renamed into place when complete; a run killed mid-write leaves them behind. Returns the
    removed paths.
    """
    removed = []
    for root in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not root.is_dir():
            continue
        for path in [*root.glob(".tmp-*"), *root.glob(".*.tmp")]:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


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
