"""The run directory across attempts: continue a run, start it over, or report it finished.

Running the same command again into the same ``--log.run-dir`` continues the run. What happens
is decided by ``--loop.resume`` before any model is loaded (:func:`plan_run`):

- ``None`` (the default): continue from the latest complete checkpoint if there is one; a
  finished run (its ``final`` model exists and no step is left) is reported as finished
  (:class:`RunFinished`); otherwise start from step 0, removing what an attempt that never
  reached a checkpoint left behind.
- ``True``: continue, and fail with a :class:`~rlhfkit.errors.ConfigError` if there is no
  checkpoint.
- ``False``: start from step 0, deleting the previous run's outputs (:data:`RUN_OUTPUTS`).

Continuing drops the records that the interrupted attempt logged after its checkpoint
(``metrics.jsonl`` keeps exactly the records it had when the checkpoint was written; the step
tables keep steps up to the checkpoint's), so that no step is recorded twice and two
attempts' metrics never mix. Leftovers of killed atomic writes are removed in any case.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.atomic import atomic_write_text
from rlhfkit.errors import ConfigError
from rlhfkit.training.checkpoint import checkpoint_info, latest_checkpoint, remove_partial
from rlhfkit.validation import run_dir_problem

log = logging.getLogger(__name__)

RUN_OUTPUTS = (
    "checkpoints", "final", "critic", "tb", "rounds", "metrics.jsonl", "samples.jsonl",
    "eval.json", "gold_samples.json",
)  # fmt: skip
"""What a training run writes into its directory besides its config and provenance: deleted
when a run starts over. Other files in the directory are left alone."""

STEP_TABLES = ("samples.jsonl",)
"""Tables with one record per row and a ``step`` field, trimmed to the checkpoint's step."""


class RunFinished(Exception):
    """The run directory holds a finished run: there is nothing left to train.

    Attributes:
        run_dir: The run directory.
        step: The step the run finished at (None when no checkpoint is left to tell).
    """

    def __init__(self, run_dir: Path, step: int | None = None) -> None:
        self.run_dir, self.step = run_dir, step
        at = f" at step {step}" if step is not None else ""
        super().__init__(
            f"{run_dir} holds a finished run{at} (its model is in {run_dir / 'final'}); "
            "nothing to do. Raise --loop.max-steps to train it further, or pass "
            "--loop.resume False to start it over."
        )


@dataclass(frozen=True)
class RunPlan:
    """What a run does with its directory.

    Attributes:
        run_dir: The run directory.
        checkpoint: The checkpoint to continue from, or None to start at step 0.
    """

    run_dir: Path
    checkpoint: Path | None


def plan_run(run_dir: str | Path, resume: bool | None) -> RunPlan:
    """Decide how a run uses ``run_dir`` (see the module docstring); reads, never writes.

    Raises:
        ConfigError: The directory cannot be created or written, or ``resume`` is True and
            there is no checkpoint.
        RunFinished: ``resume`` is None, the run's final model exists and no checkpoint is left
            to continue from.
    """
    run_dir = Path(run_dir)
    problem = run_dir_problem(str(run_dir))
    if problem:
        raise ConfigError(f"--log.run-dir: {problem}")
    if resume is False:
        return RunPlan(run_dir, None)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None and resume:
        raise ConfigError(
            f"--loop.resume True: {run_dir} has no checkpoint to continue from (runs write one "
            "every --loop.save-every steps); leave the option out to start a new run"
        )
    if checkpoint is None and (run_dir / "final").is_dir():
        raise RunFinished(run_dir)
    return RunPlan(run_dir, checkpoint)


def prepare_run_dir(plan: RunPlan, config: dict[str, Any]) -> int | None:
    """Make the run directory ready for this attempt (rank 0 only).

    Removes leftovers of killed writes; starting over, deletes the previous run's outputs;
    continuing, trims the records logged after the checkpoint and warns about options that
    differ from the previous attempt's.

    Returns:
        The first step this attempt logs when it continues a run (TensorBoard's purge step),
        else None.
    """
    run_dir = plan.run_dir
    remove_partial(run_dir)
    if plan.checkpoint is None:
        present = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
        if _trained(run_dir):
            log.warning(
                "%s: starting from step 0; deleting the previous run's %s",
                run_dir, ", ".join(present),
            )  # fmt: skip
        for name in present:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None
    info = checkpoint_info(plan.checkpoint)
    log.info("resuming from %s at step %d", plan.checkpoint, info["step"])
    for change in changed_options(run_dir / "config.yaml", config):
        log.warning("option changed since the previous attempt: %s", change)
    trim_records(run_dir, info)
    return int(info["step"]) + 1


def _trained(run_dir: Path) -> bool:
    """Whether a previous attempt got anywhere (a checkpoint, a final model, a logged step)."""
    metrics = run_dir / "metrics.jsonl"
    return (
        latest_checkpoint(run_dir) is not None
        or (run_dir / "final").is_dir()
        or (metrics.is_file() and metrics.stat().st_size > 0)
    )


def trim_records(run_dir: Path, info: dict[str, Any]) -> None:
    """Drop the records an interrupted attempt logged after its checkpoint.

    ``metrics.jsonl`` keeps its first ``info["metrics_records"]`` lines (checkpoints without
    that count keep the records of steps up to the checkpoint's); each of :data:`STEP_TABLES`
    keeps the rows of steps up to the checkpoint's. A line cut short by a kill goes too.
    """
    step, keep = int(info["step"]), info.get("metrics_records")
    for name in ("metrics.jsonl", *STEP_TABLES):
        path = run_dir / name
        if not path.is_file():
            continue
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        if name == "metrics.jsonl" and keep is not None and keep <= len(lines):
            kept = [line for line in lines[:keep] if line.endswith("\n")]
        else:
            kept = [line for line in lines if (n := _step(line)) is not None and n <= step]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(kept))
            log.info("%s: dropped %d records logged after step %d", path, len(lines) - len(kept),
                     step)  # fmt: skip


def _step(line: str) -> int | None:
    """The ``step`` of a JSON-lines record (None for a malformed or cut line)."""
    if not line.endswith("\n"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def changed_options(previous: Path, config: dict[str, Any]) -> list[str]:
    """``"section.field: old -> new"`` for each option that differs from the previous attempt.

    ``previous`` is that attempt's ``config.yaml``; ``loop.resume`` is left out.
    """
    try:
        old = yaml.safe_load(previous.read_text())
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(old, dict):
        return []
    a, b = _flatten(old), _flatten(config)
    keys = sorted((set(a) | set(b)) - {"loop.resume"})
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out
