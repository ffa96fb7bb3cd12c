"""Reward over-optimisation on the built-in task with the embedded model, measured.

1. ``rlhfkit overopt`` with its defaults (label budgets 64, 256 and 1024; best-of-n up to 64 from
   64 samples of 24 held-out prompts; GRPO against each proxy), timed against its 20-minute
   budget. Checked: the small-budget proxy's best-of-n gold curve peaks and then declines while
   its proxy score keeps rising; the large-budget proxy peaks later (at a larger n) or not at
   all; the R_bon fits' R^2.
2. The mitigations, on the small budget (where over-optimisation is strongest), once per seed
   (``--seeds``): three reward models per run (seeds 0..2), their worst case (``min``), the
   uncertainty-weighted mean (``uwo``) and their WARM average, with best-of-n and GRPO against
   the single proxy and against each mitigation. Reported per mitigation: the gold reward at
   n = 64 and at the end of RL minus the single proxy's, with a 95% interval over seeds, and
   WARM's held-out accuracy against the mean of its members'.

Figures print as ``BENCH overopt.<name> <value>`` and go with the commands to
``benchmarks/results/overopt-<UTC time>.json``.

    python benchmarks/overopt.py [--seeds 0 1 2] [--skip-mitigations] [--bon-prompts 48]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import common
from grpo_arithmetic import run_command
from rlhfkit.eval.intervals import mean_interval

BUDGET_S = 20 * 60.0
MITIGATIONS = ("min", "uwo", "warm")


def overopt(*args: str) -> list[str]:
    """A ``python -m rlhfkit overopt`` command line."""
    return [sys.executable, "-m", "rlhfkit", "overopt", *args]


def read(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's best-of-n and RL results."""
    return json.loads((run / "bon.json").read_text()), json.loads((run / "rl.json").read_text())


def curve(bon: dict[str, Any], budget: int, proxy: str) -> dict[str, Any]:
    """One best-of-n curve of ``bon.json``."""
    return next(c for c in bon["curves"] if c["budget"] == budget and c["proxy"] == proxy)


def rl_final_gold(rl: dict[str, Any], budget: int, proxy: str, last: int = 2) -> float:
    """Mean gold reward of the last ``last`` points of the RL curve (each averages 4 steps)."""
    run = next(r for r in rl["runs"] if r["budget"] == budget and r["proxy"] == proxy)
    golds = [p["gold"] for p in run["points"][-last:] if p["gold"] is not None]
    return sum(golds) / len(golds)


def default_study(report: common.Reporter, runs: Path, prompts: int | None = None) -> Path:
    """Step 1: the defaults (or ``prompts`` held-out prompts), timed; the curves per budget."""
    name = "default" if prompts is None else f"prompts{prompts}"
    run = runs / name
    finished = (run / "overopt.html").exists()  # then the command only reads it back
    extra = [] if prompts is None else ["--bon.prompts", str(prompts)]
    timing = run_command(overopt("--log.run-dir", str(run), *extra), runs / f"{name}.log")
    stages = json.loads((run / "stages.json").read_text())
    report.details["default_stages_s"] = stages
    wall = sum(stages.values()) if finished else timing["wall_s"]
    report.figure("default.wall_s", wall)
    report.figure("default.within_budget", float(wall <= BUDGET_S))
    bon, rl = read(run)
    budgets = sorted({c["budget"] for c in bon["curves"]})
    for budget in budgets:
        c = curve(bon, budget, "single")
        pts, fit = c["points"], c["gold_fit"] or {}
        report.figure(f"bon.b{budget}.gold_n1", pts[0]["gold"])
        report.figure(f"bon.b{budget}.gold_peak", c["gold_peak"])
        report.figure(f"bon.b{budget}.gold_peak_n", c["gold_peak_n"])
        report.figure(f"bon.b{budget}.gold_nmax", pts[-1]["gold"])
        report.figure(f"bon.b{budget}.proxy_gain_nmax", pts[-1]["proxy"] - pts[0]["proxy"])
        rising = all(b["proxy"] >= a["proxy"] for a, b in itertools.pairwise(pts))
        report.figure(f"bon.b{budget}.proxy_monotone", float(rising))
        report.figure(f"bon.b{budget}.r2", fit.get("r2", float("nan")))
        report.figure(f"bon.b{budget}.d_star", fit.get("d_star", float("nan")))
        report.figure(f"bon.b{budget}.on_policy_accuracy", c["on_policy_accuracy"])
        report.figure(f"rl.b{budget}.gold_final", rl_final_gold(rl, budget, "single"))
    small, large = curve(bon, budgets[0], "single"), curve(bon, budgets[-1], "single")
    declines = small["gold_peak"] > small["points"][-1]["gold"] and small["gold_peak_n"] < 64
    report.figure("small_peaks_then_declines", float(declines))
    report.figure("large_peaks_later", float(large["gold_peak_n"] > small["gold_peak_n"]))
    return run


def mitigation_study(
    report: common.Reporter, runs: Path, seeds: list[int], policy: str, cache: Path,
    prompts: int | None = None, independent: bool = False,
) -> None:  # fmt: skip
    """Step 2: ensembles and WARM against the single proxy, over seeds.

    ``independent``: the members are initialised with their own seeds (no WARM, which needs one
    initialisation), in ``mitigations-independent-s<seed>``.
    """
    mitigations = tuple(m for m in MITIGATIONS if not (independent and m == "warm"))
    diffs: dict[str, dict[str, list[float]]] = {m: {"bon": [], "rl": []} for m in mitigations}
    warm_minus_members: list[float] = []
    extra = [] if prompts is None else ["--bon.prompts", str(prompts)]
    for seed in seeds:
        run = runs / f"mitigations{'-independent' if independent else ''}-s{seed}"
        command = overopt(
            "--policy", policy, "--seed", str(seed), "--proxies.budgets", "64",
            "--proxies.ensemble", "3", "--proxies.warm", str(not independent), "--rl-on",
            "single", *mitigations, "--cache-dir", str(cache), "--log.run-dir", str(run), *extra,
        )  # fmt: skip
        timing = run_command(command, run.with_suffix(".log"))
        report.figure(f"mitigations.s{seed}.wall_s", timing["wall_s"])
        bon, rl = read(run)
        single_bon = curve(bon, 64, "single")["points"][-1]["gold"]
        single_rl = rl_final_gold(rl, 64, "single")
        for m in mitigations:
            diffs[m]["bon"].append(curve(bon, 64, m)["points"][-1]["gold"] - single_bon)
            diffs[m]["rl"].append(rl_final_gold(rl, 64, m) - single_rl)
            name = f"mitigations.s{seed}.{m}"
            report.figure(f"{name}.bon_gold_nmax", diffs[m]["bon"][-1] + single_bon)
            report.figure(f"{name}.rl_gold_final", diffs[m]["rl"][-1] + single_rl)
        report.figure(f"mitigations.s{seed}.single.bon_gold_nmax", single_bon)
        report.figure(f"mitigations.s{seed}.single.rl_gold_final", single_rl)
        accuracy = bon["heldout_accuracy"]
        members = [accuracy[name]["all"] for name in accuracy if name != "b64-warm"]
        report.figure(f"mitigations.s{seed}.members_mean_accuracy", sum(members) / len(members))
        if "b64-warm" in accuracy:
            report.figure(f"mitigations.s{seed}.warm_accuracy", accuracy["b64-warm"]["all"])
            warm_minus_members.append(accuracy["b64-warm"]["all"] - sum(members) / len(members))
    for m in mitigations:
        for kind in ("bon", "rl"):
            values = diffs[m][kind]
            if len(values) > 1:
                interval = mean_interval(values)
                for key in ("mean", "low", "high"):
                    report.figure(f"{m}_minus_single.{kind}.{key}", interval[key])
            else:
                report.figure(f"{m}_minus_single.{kind}.mean", values[0])
    if warm_minus_members:
        report.figure("warm_minus_members_mean", sum(warm_minus_members) / len(warm_minus_members))


def main(argv: list[str] | None = None) -> None:
    """Run both studies and write the result file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-mitigations", action="store_true")
    parser.add_argument("--independent", action="store_true",
                        help="ensemble members of their own initialisations")  # fmt: skip
    parser.add_argument("--bon-prompts", type=int, default=None,
                        help="held-out prompts of best-of-n (default: 24)")  # fmt: skip
    args, runs, report = common.Reporter.start("overopt", parser, argv, "bench_overopt")
    run = default_study(report, runs, args.bon_prompts)  # a finished one is read back
    if not args.skip_mitigations:
        mitigation_study(report, runs, args.seeds, str(run / "sft" / "final"), run / "cache",
                         args.bon_prompts, args.independent)  # fmt: skip
    print("written:", report.write(), flush=True)


if __name__ == "__main__":
    main()
