"""Run outputs: metrics, progress and provenance.

Metrics go to JSONL always, TensorBoard when installed, wandb/trackio on request. Provenance:
the resolved config, the git revision and the package versions.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

_VERSIONED = ("rlhfkit", "torch", "transformers", "datasets", "peft", "safetensors", "tyro")


class MetricsLogger:
    """Writes one JSON line per logged step to ``<run_dir>/metrics.jsonl`` and mirrors scalars.

    Args:
        run_dir: The run directory (created if missing).
        tensorboard: Also write TensorBoard event files under ``<run_dir>/tb`` if the package is
            installed.
        wandb: Also log to Weights & Biases (needs ``pip install wandb``).
        trackio: Also log to trackio (needs ``pip install trackio``).
        project: Project name for wandb / trackio.
        config: Resolved config, passed to wandb / trackio.
        enabled: False on non-zero ranks: every call becomes a no-op.
        purge_step: A resumed run's first step: TensorBoard drops the events the previous
            attempt wrote from this step on (metrics.jsonl is trimmed before it is opened).

    Attributes:
        records: Lines in ``metrics.jsonl`` (those there before plus those written); a
            checkpoint stores it so that a resumed run can drop the later ones.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        trackio: bool = False,
        project: str = "rlhfkit",
        config: dict[str, Any] | None = None,
        enabled: bool = True,
        purge_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.sinks: list[Any] = []
        self.records = 0
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            with path.open("rb") as f:
                self.records = sum(1 for _ in f)
        self.file = path.open("a", buffering=1)
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_step)
            self.sinks.append(_TensorBoard(writer))
        for name, wanted in (("wandb", wandb), ("trackio", trackio)):
            if wanted:
                self.sinks.append(_Tracker(name, project, str(self.run_dir), config or {}))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` for ``step`` (non-finite values are written as null in JSON)."""
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        self.file.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        self.records += 1
        for sink in self.sinks:
            sink.log(step, {k: v for k, v in clean.items() if v is not None})

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        """Record a small table for ``step``.

        Appended to ``<run_dir>/<name>.jsonl`` (one JSON object per row, with the step) and
        shown in TensorBoard's text tab as a markdown table.
        """
        if not self.enabled or not rows:
            return
        with (self.run_dir / f"{name}.jsonl").open("a") as f:
            f.writelines(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n" for r in rows)
        for sink in self.sinks:
            if hasattr(sink, "text"):
                sink.text(step, name, rows)

    def close(self) -> None:
        """Flush and close every sink."""
        if not self.enabled:
            return
        self.file.close()
        for sink in self.sinks:
            sink.close()


class _TensorBoard:
    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def text(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        """A markdown table of ``rows`` (cells flattened to one line, pipes escaped)."""
        columns = list(rows[0])

        def cell(value: Any) -> str:
            return str(value).replace("\n", " ").replace("|", "\\|")

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
        self.writer.add_text(name, "\n".join(lines), step)

    def close(self) -> None:
        self.writer.close()


class _Tracker:
    """wandb or trackio (same ``init`` / ``log`` / ``finish`` API), imported lazily."""

    def __init__(self, name: str, project: str, run_dir: str, config: dict[str, Any]) -> None:
        try:
            self.module = importlib.import_module(name)
        except ImportError as err:
            raise ImportError(
                f"log.{name}=true needs the {name} package: pip install {name}"
            ) from err
        self.module.init(project=project, name=Path(run_dir).name, config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.module.log(metrics, step=step)

    def close(self) -> None:
        self.module.finish()


def git_revision(start: str | Path = ".") -> dict[str, Any]:
    """Git commit of the working directory (and whether it has uncommitted changes)."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=start, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=start, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"revision": None, "dirty": None}
    return {"revision": rev, "dirty": bool(dirty)}


def package_versions() -> dict[str, str | None]:
    """Versions of Python and the packages that determine a run's numerics."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_run_info(run_dir: str | Path, config: dict[str, Any]) -> None:
    """Write ``config.yaml`` (the resolved config) and ``run_info.json`` (provenance)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    info = {
        "command": sys.argv,
        "git": git_revision(Path(__file__).resolve().parent),
        "versions": package_versions(),
        "platform": platform.platform(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
