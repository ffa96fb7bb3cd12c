"""Shared pieces of the benchmarks (the protocol: benchmarks/README.md).

- the machine's bf16 matmul rate, measured in the same run as the work it is compared with;
- model FLOPs utilisation (MFU) helpers: 6 * params * tokens for training, 2 * params * tokens
  for forward-only work;
- resident memory of the current process (peak and now);
- persistent worker processes, one per side, driven one step at a time so that the sides
  alternate (A B A B ...) and each process's peak memory is its own side's;
- a reporter that prints one machine-readable line per figure (``BENCH name value``) and writes
  every figure, the raw timings and the environment to a JSON file under
  ``benchmarks/results/`` (gitignored).

The frame shared by the rlhfkit-vs-TRL benchmarks (settings, TRL arguments and step callback,
worker loops, measurement rounds, figures) is in ``versus.py``.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Where result JSON files go (gitignored)."""

MATMUL_SIZE = 2048
"""Side of the square matrices of the peak-rate loop (the protocol's in-run peak)."""


# ---------------------------------------------------------------------------------------------
# Hardware limit and MFU


def set_threads(n: int) -> None:
    """Use ``n`` intra-op threads in torch (and tell OpenMP/MKL through the environment)."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)


def matmul_peak(
    *, size: int = MATMUL_SIZE, dtype: str = "bfloat16", iters: int = 20, repeats: int = 7
) -> dict[str, Any]:
    """Measure the matmul rate of this process's torch threads on a square ``size`` matmul.

    Each timing runs ``iters`` back-to-back ``a @ b`` products (output buffer reused); the rate
    is ``2 * size^3 * iters / seconds``. The figure is the median over ``repeats`` timings,
    after two warm-up products.

    Returns:
        ``{"flops": median FLOP/s, "samples": [FLOP/s of each timing], "size", "dtype"}``.
    """
    import torch

    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(torch_dtype)
    b = torch.randn(size, size, generator=gen).to(torch_dtype)
    out = torch.empty(size, size, dtype=torch_dtype)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        seconds = time.perf_counter() - start
        samples.append(2.0 * size**3 * iters / seconds)
    return {"flops": statistics.median(samples), "samples": samples, "size": size, "dtype": dtype}


def peak_sample() -> dict[str, Any]:
    """A short matmul-rate sample and the load average (taken between measured rounds)."""
    sample = matmul_peak(iters=10, repeats=3)
    sample["load_average"] = os.getloadavg()
    return sample


def training_flops(params: int, tokens: float) -> float:
    """Model FLOPs of training on ``tokens`` tokens: 6 * params * tokens (forward + backward)."""
    return 6.0 * params * tokens


def forward_flops(params: int, tokens: float) -> float:
    """Model FLOPs of a forward pass over ``tokens`` tokens: 2 * params * tokens."""
    return 2.0 * params * tokens


def mfu(model_flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the measured peak FLOP/s."""
    return model_flops / seconds / peak_flops


def median_mfu(params: int, steps: Sequence[dict], peak: float, tokens: str = "tokens") -> float:
    """Median over steps of 6 * params * tokens / seconds / peak.

    ``tokens`` names the step's token count (``step["tokens"]`` where the step lacks it).
    """
    return median(
        [mfu(training_flops(params, s.get(tokens, s["tokens"])), s["seconds"], peak) for s in steps]
    )


# ---------------------------------------------------------------------------------------------
# Memory and statistics


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
    return peak * scale / 2**20


def rss_mib() -> float:
    """Current resident set size of this process, in MiB."""
    try:
        import psutil
    except ImportError:  # psutil is in the bench extra; /proc works on Linux without it
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return psutil.Process().memory_info().rss / 2**20


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    if not values:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(values))


def ratio_of_medians(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """``median(numerator) / median(denominator)`` (the protocol's figure for A vs B)."""
    return median(numerator) / median(denominator)


# ---------------------------------------------------------------------------------------------
# Environment


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux), else what ``platform`` says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_revision() -> str | None:
    """The repository's HEAD commit (read only), with ``+dirty`` when the tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment(packages: Sequence[str] = ("torch", "transformers", "trl", "rlhfkit")) -> dict:
    """Machine and software description stored with every result."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git": git_revision(),
        "versions": {name: package_version(name) for name in packages},
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------------------------
# Alternating worker processes


class WorkerError(RuntimeError):
    """A worker process failed; the message carries its traceback."""


@dataclass
class Worker:
    """A persistent process that runs one side of a benchmark, one command at a time.

    The worker's target is ``target(conn, *args)``: it sends a first message when it is ready,
    then answers every command it receives (``"step"``, ``"stop"``) with exactly one message. A
    message ``{"error": traceback}`` means the worker failed.
    """

    name: str
    process: Any
    conn: Any
    ready: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, name: str, target: Callable[..., None], *args: Any) -> Worker:
        """Spawn the worker (fresh interpreter: its memory is its own) without waiting."""
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=target, args=(child, *args), name=name, daemon=True)
        process.start()
        child.close()
        return cls(name=name, process=process, conn=parent)

    def receive(self, timeout: float = 3600.0) -> dict[str, Any]:
        """Wait for the worker's next message; raise if it failed or died."""
        if not self.conn.poll(timeout):
            raise WorkerError(f"{self.name}: no answer within {timeout:.0f} s")
        try:
            message = self.conn.recv()
        except EOFError as err:
            raise WorkerError(f"{self.name}: the process exited ({self.process.exitcode})") from err
        if "error" in message:
            raise WorkerError(f"{self.name} failed:\n{message['error']}")
        return message

    def wait_ready(self) -> dict[str, Any]:
        """Wait for the worker's first message (set-up done)."""
        self.ready = self.receive()
        return self.ready

    def request(self, command: str) -> dict[str, Any]:
        """Send one command and wait for its answer (only this worker computes meanwhile)."""
        self.conn.send(command)
        return self.receive()

    def close(self) -> None:
        """Wait briefly for the process to exit, then terminate it."""
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)


def alternate(
    workers: Sequence[Worker], steps: int, before_round: Callable[[], Any] | None = None
) -> tuple[dict[str, list[dict[str, Any]]], list[Any]]:
    """Ask each worker for one step in turn, ``steps`` rounds: A B A B ...

    Args:
        workers: The sides, in the order they run within a round.
        steps: Rounds (steps per worker).
        before_round: Called before each round while every worker waits (for example a short
            matmul-rate sample, so that the hardware limit is sampled under the same load as
            the steps); its results are returned.

    Returns:
        The step answers of each worker, by worker name, and the ``before_round`` results.
    """
    answers: dict[str, list[dict[str, Any]]] = {w.name: [] for w in workers}
    extras = []
    for _ in range(steps):
        if before_round is not None:
            extras.append(before_round())
        for worker in workers:
            answers[worker.name].append(worker.request("step"))
    return answers, extras


def model_facts(model: Any, compute_dtype: str | None = None) -> dict[str, Any]:
    """Parameter count, attention implementation and compute dtype (default: the weights')."""
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "attn_implementation": model.config._attn_implementation,
        "compute_dtype": compute_dtype or str(next(model.parameters()).dtype),
    }


def profiled(step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``step`` under torch.profiler; its answer plus the top operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        answer = step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    return {**answer, "profile": table}


def worker_main(conn: Any, body: Callable[[], None]) -> None:
    """Run a worker body, turning an exception into an ``{"error": ...}`` message."""
    import traceback

    try:
        body()
    except BaseException:  # report every failure to the driver, then exit
        conn.send({"error": traceback.format_exc()})
        raise
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Reporting


@dataclass
class Reporter:
    """Collects figures, prints ``BENCH <name> <value>`` lines and writes the JSON result."""

    benchmark: str
    figures: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(
        cls, benchmark: str, parser: Any, argv: list[str] | None, run_dir: str
    ) -> tuple[Any, Path, Reporter]:
        """Parse ``argv`` (adding ``--run-dir``, default ``runs/<run_dir>`` in the checkout),
        create the run directory and a reporter: (args, the resolved directory, the reporter).
        """
        root = Path(__file__).resolve().parent.parent
        parser.add_argument("--run-dir", type=Path, default=root / "runs" / run_dir)
        args = parser.parse_args(argv)
        runs = args.run_dir.resolve()
        runs.mkdir(parents=True, exist_ok=True)
        return args, runs, cls.for_run(benchmark, args)

    @classmethod
    def for_run(cls, benchmark: str, args: Any) -> Reporter:
        """A reporter whose details hold the environment and the parsed ``args``."""
        report = cls(benchmark)
        report.details["environment"] = environment()
        report.details["args"] = {k: str(v) for k, v in vars(args).items()}
        return report

    def figure(self, name: str, value: float) -> None:
        """Record a figure and print its machine-readable line."""
        key = f"{self.benchmark}.{name}"
        self.figures[key] = float(value)
        print(f"BENCH {key} {value:.6g}", flush=True)

    def write(self, path: Path | None = None) -> Path:
        """Write figures, details and environment to ``path`` (default: a timestamped file)."""
        if path is None:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            path = RESULTS_DIR / f"{self.benchmark}-{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"benchmark": self.benchmark, "figures": self.figures, **self.details}
        path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        return path
