"""Time to quality: held-out pairwise accuracy of a reward model trained from the embedded model.

Runs ``rlhfkit rm train --config configs/rm.yaml`` (Bradley-Terry on ``builtin:preferences``,
accuracy measured against the task's programmatic gold preference) in a subprocess and reports
the wall time of the whole command (model loading, data, every evaluation and saving included),
the held-out accuracy at each evaluation with the seconds since the command started, and the
first time the accuracy reached the target.

    python benchmarks/rm_accuracy.py [--target 0.8] [-- extra rlhfkit flags]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    """Run the training command and report accuracy over time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.8, help="held-out accuracy to reach")
    parser.add_argument("extra", nargs="*", help="extra flags for rlhfkit rm train")
    args = parser.parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="rm-accuracy-"))
    command = [
        sys.executable, "-m", "rlhfkit", "rm", "train", "--config", str(ROOT / "configs/rm.yaml"),
        "--log.run-dir", str(run_dir), "--log.progress", "False", *args.extra,
    ]  # fmt: skip
    start = time.time()
    subprocess.run(command, check=True, cwd=ROOT)
    wall = time.time() - start
    evals = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval/accuracy" in record:
            evals.append((record["step"], record["time"] - start, record["eval/accuracy"]))
    reached = next((t for _, t, acc in evals if acc >= args.target), None)
    report = common.Reporter("rm_quality")
    for step, seconds, accuracy in evals:
        print(f"step {step:3d}  {seconds:7.1f} s  held-out accuracy {accuracy:.3f}")
    report.figure("final_accuracy", evals[-1][2])
    report.figure("seconds_total", wall)
    report.figure("seconds_to_target", reached if reached is not None else float("nan"))
    report.figure("target", args.target)
    per_category = json.loads((run_dir / "eval.json").read_text())["per_category"]
    for name, summary in per_category.items():
        report.figure(f"accuracy.{name}", summary["accuracy"])
    report.details.update(evals=evals, command=command, environment=common.environment())
    print(f"wrote {report.write()}")


if __name__ == "__main__":
    main()
