"""What RLHF buys in the demo: the pipeline's headline over several seeds, with time and memory.

Runs ``rlhfkit demo`` (the pipeline's defaults on the embedded model) once per seed, each in
its own run directory (``runs/gain-seed<N>``; a finished run is only read again, unless
``--fresh`` removes it first: after a change of defaults), and prints one
row per seed: gold reward of the SFT and the final model on the held-out prompts, the gain with
its 95% interval over prompts, win/tie/loss against the SFT model (gold judge), the same gain on
the held-out prompts of the task types the preference stages saw and on those of the types they
never saw, the reward model's held-out accuracy on wrong-answer pairs and on the SFT model's own
samples, the wall time and the peak resident memory of the whole process tree (sampled every
second).

    python benchmarks/pipeline_gain.py --seeds 0 1 [--fresh] [-- extra rlhfkit flags]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import common

ROOT = Path(__file__).resolve().parent.parent


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc)."""
    parents, rss = {}, {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue
        child = int(status.parent.name)
        parents[child] = int(fields.get("PPid", "0").strip())
        rss[child] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total = 0
    for child in rss:
        node = child
        while node not in (0, 1, pid) and node in parents:
            node = parents[node]
        total += rss[child] if node == pid else 0
    return total


def run_seed(seed: int, extra: list[str], fresh: bool = False) -> dict:
    """Run (or read) the demo for one seed; wall seconds and peak bytes of a fresh run.

    ``fresh`` removes the seed's run directory first, so that nothing of an earlier run (with
    other defaults) is read or resumed.
    """
    run_dir = ROOT / "runs" / f"gain-seed{seed}"
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    command = [
        sys.executable, "-m", "rlhfkit", "demo", "--seed", str(seed),
        "--log.run-dir", str(run_dir), *extra,
    ]  # fmt: skip
    fresh = not (run_dir / "report.html").exists()
    start, peak = time.time(), 0
    proc = subprocess.Popen(command, cwd=ROOT)
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(1.0)
    if proc.returncode:
        raise SystemExit(f"seed {seed}: rlhfkit demo exited with {proc.returncode}")
    ev = json.loads((run_dir / "eval.json").read_text())
    return {
        "seed": seed,
        "eval": ev,
        "wall_s": time.time() - start if fresh else None,
        "peak_gib": peak / 2**30 if fresh else None,
    }


def _ci(x: dict) -> str:
    return f"{x['mean']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}]"


def main(argv: list[str] | None = None) -> None:
    """Run every seed and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--fresh", action="store_true", help="remove each seed's run directory and run it again"
    )
    parser.add_argument("extra", nargs="*", help="extra flags for rlhfkit demo")
    args = parser.parse_args(argv)
    print(f"CPU: {common.cpu_model()}")
    rows = [run_seed(seed, args.extra, args.fresh) for seed in args.seeds]
    head = ["seed", "gold SFT", "gold final", "gain [95%]", "win/tie/loss", "wins per loss",
            "seen-task gain [95%]", "unseen gain [95%]", "RM wrong_answer",
            "RM on own samples (right vs wrong)", "wall", "peak RSS"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for r in rows:
        ev, all_ = r["eval"], r["eval"]["headline"]["all"]
        wtl = all_["win_tie_loss"]
        seen, unseen = ev["headline"].get("seen"), ev["headline"].get("unseen")
        rm = ev["reward_model"]
        live = rm.get("on_policy", {})
        cells = [
            r["seed"], f"{all_['sft']['mean']:.3f}", f"{all_['final']['mean']:.3f}",
            _ci(all_["gain"]),
            f"{wtl['win']['mean']:.2f}/{wtl['tie']['mean']:.2f}/{wtl['loss']['mean']:.2f}",
            f"{wtl['wins_per_loss']:.2f}", _ci(seen["gain"]) if seen else "n/a",
            _ci(unseen["gain"]) if unseen else "n/a",
            f"{rm['by_category'].get('wrong_answer', float('nan')):.3f}",
            f"{live.get('accuracy', float('nan')):.3f} "
            f"({live.get('correctness_accuracy', float('nan')):.3f})",
            f"{r['wall_s'] / 60:.1f} min" if r["wall_s"] else "(read)",
            f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] else "(read)",
        ]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
