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
   WARM's held-out accuracy against the mean of its members'. The end of RL is read two ways:
   the rollouts of the last 8 steps (training prompts) and the final policy's samples of the
   held-out best-of-n prompts (``rl_heldout``, the same test set for every run).

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
from rlhfkit.eval.overopt import bon_curve_unbiased, pairwise_agreement

BUDGET_S = 20 * 60.0
MITIGATIONS = ("min", "uwo", "warm")


def overopt(*args: str) -> list[str]:
    """A ``python -m rlhfkit overopt`` command line."""
    return [sys.executable, "-m", "rlhfkit", "overopt", *args]


def read(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's best-of-n and RL results."""
    return read_bon(run), json.loads((run / "rl.json").read_text())


def read_bon(run: Path) -> dict[str, Any]:
    """The run's best-of-n results."""
    return json.loads((run / "bon.json").read_text())


def curve(bon: dict[str, Any], budget: int, proxy: str) -> dict[str, Any]:
    """One best-of-n curve of ``bon.json``."""
    return next(c for c in bon["curves"] if c["budget"] == budget and c["proxy"] == proxy)


def rl_run(rl: dict[str, Any], budget: int, proxy: str) -> dict[str, Any]:
    """One RL run of ``rl.json``."""
    return next(r for r in rl["runs"] if r["budget"] == budget and r["proxy"] == proxy)


def rl_final_gold(rl: dict[str, Any], budget: int, proxy: str, last: int = 2) -> float:
    """Mean gold reward of the last ``last`` points of the RL curve (each averages 4 steps)."""
    points = rl_run(rl, budget, proxy)["points"][-last:]
    golds = [p["gold"] for p in points if p["gold"] is not None]
    return sum(golds) / len(golds)


def rl_heldout_gold(rl: dict[str, Any], budget: int, proxy: str) -> float:
    """Gold of the RL run's final policy on the held-out best-of-n prompts."""
    return rl_run(rl, budget, proxy)["heldout"]["gold"]


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
    prompts: int | None = None, independent: bool = False, rl_on: tuple[str, ...] | None = None,
) -> None:  # fmt: skip
    """Step 2: ensembles and WARM against the single proxy, over seeds.

    ``independent``: the members are initialised with their own seeds (no WARM, which needs one
    initialisation), in ``mitigations-independent-s<seed>``. ``rl_on``: the proxies RL runs
    against (default: the single proxy and every mitigation; empty: no RL).
    """
    mitigations = tuple(m for m in MITIGATIONS if not (independent and m == "warm"))
    rl_on = ("single", *mitigations) if rl_on is None else rl_on
    if rl_on and "single" not in rl_on:
        rl_on = ("single", *rl_on)
    diffs: dict[str, list[float]] = {}
    extra = [] if prompts is None else ["--bon.prompts", str(prompts)]
    for seed in seeds:
        run = runs / f"mitigations{'-independent' if independent else ''}-s{seed}"
        command = overopt(
            "--policy", policy, "--seed", str(seed), "--proxies.budgets", "64",
            "--proxies.ensemble", "3", "--proxies.warm", str(not independent), "--rl-on",
            *rl_on, "--cache-dir", str(cache), "--log.run-dir", str(run), *extra,
        )  # fmt: skip
        timing = run_command(command, run.with_suffix(".log"))
        report.figure(f"mitigations.s{seed}.wall_s", timing["wall_s"])
        bon, rl = read(run) if rl_on else (read_bon(run), {"runs": []})
        figures = seed_figures(bon, rl, mitigations, rl_on)
        scores = json.loads((run / "samples.json").read_text())["scores"]  # read once
        figures.update(members_figures(scores, figures, mitigations))
        figures.update(warm_figures(scores, bon))
        for name, value in figures.items():
            report.figure(f"mitigations.s{seed}.{name}", value)
            if "_minus_" in name:
                diffs.setdefault(name, []).append(value)
    for name, values in diffs.items():
        interval(report, name, values)


def seed_figures(
    bon: dict[str, Any], rl: dict[str, Any], mitigations: tuple[str, ...], rl_on: tuple[str, ...]
) -> dict[str, float]:
    """One seed's gold at n = 64 and at the end of RL per proxy, and each mitigation's margin.

    Names: ``<proxy>.bon_gold_nmax``, ``<proxy>.rl_gold_final`` (rollouts of the last 8
    steps), ``<proxy>.rl_heldout_gold`` (final policy on the best-of-n prompts), and
    ``<mitigation>_minus_single.{bon,rl,rl_heldout}``.
    """
    out = {"start_gold": curve(bon, 64, "single")["points"][0]["gold"]}
    for m in ("single", "mean", *mitigations):
        out[f"{m}.bon_gold_nmax"] = curve(bon, 64, m)["points"][-1]["gold"]
        out[f"{m}.on_policy_accuracy"] = curve(bon, 64, m)["on_policy_accuracy"]
        if m in rl_on:
            out[f"{m}.rl_gold_final"] = rl_final_gold(rl, 64, m)
            out[f"{m}.rl_heldout_gold"] = rl_heldout_gold(rl, 64, m)
    for m in mitigations:
        for kind, key in (("bon", "bon_gold_nmax"), ("rl", "rl_gold_final"),
                          ("rl_heldout", "rl_heldout_gold")):  # fmt: skip
            if f"{m}.{key}" in out:
                out[f"{m}_minus_single.{kind}"] = out[f"{m}.{key}"] - out[f"single.{key}"]
    return out


def members_figures(
    scores: dict[str, Any], figures: dict[str, float], mitigations: tuple[str, ...]
) -> dict[str, float]:
    """Each member's own best-of-64 gold, their mean, and each mitigation's margin over it.

    Member 0 is the single proxy of the RL runs; any member could have been, so the mean of
    the members' best-of-n curves is the less noisy baseline for best-of-n.
    """
    names = sorted(name for name in scores if name.startswith("b64-s"))
    out = {}
    for name in names:
        points = bon_curve_unbiased(scores[name], scores["gold"], [64])
        out[f"{name}.bon_gold_nmax"] = points[0]["gold"]
    out["members_mean.bon_gold_nmax"] = sum(out.values()) / len(names)
    for m in ("mean", *mitigations):
        if m != "warm" and f"{m}.bon_gold_nmax" in figures:
            margin = figures[f"{m}.bon_gold_nmax"] - out["members_mean.bon_gold_nmax"]
            out[f"{m}_minus_members_mean.bon"] = margin
    return out


def warm_figures(scores: dict[str, Any], bon: dict[str, Any]) -> dict[str, float]:
    """Members' mean accuracy and, with WARM, its accuracy and margin over that mean.

    Two accuracies: on the task's held-out pairs (``heldout``) and the agreement with gold on
    every pair of the policy's held-out samples with different gold scores (``on_policy``).
    """
    accuracy = bon["heldout_accuracy"]
    members = [accuracy[name]["all"] for name in accuracy if name != "b64-warm"]
    out = {"members_mean_accuracy": sum(members) / len(members)}
    if "b64-warm" not in accuracy:
        return out
    names = [name for name in accuracy if name != "b64-warm"]
    on_policy = [pairwise_agreement(scores[name], scores["gold"]) for name in names]
    out.update({
        "warm_accuracy": accuracy["b64-warm"]["all"],
        "members_mean_on_policy": sum(on_policy) / len(on_policy),
        "warm_on_policy": pairwise_agreement(scores["b64-warm"], scores["gold"]),
    })  # fmt: skip
    out["warm_minus_members_mean.heldout"] = out["warm_accuracy"] - out["members_mean_accuracy"]
    out["warm_minus_members_mean.on_policy"] = out["warm_on_policy"] - out["members_mean_on_policy"]
    return out


def interval(report: common.Reporter, name: str, values: list[float]) -> None:
    """The mean of ``values`` and, with two or more, its 95% interval (figures ``name.*``)."""
    if len(values) > 1:
        for key, value in mean_interval(values).items():
            if key in ("mean", "low", "high"):
                report.figure(f"{name}.{key}", value)
    elif values:
        report.figure(f"{name}.mean", values[0])


def main(argv: list[str] | None = None) -> None:
    """Run both studies and write the result file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-mitigations", action="store_true")
    parser.add_argument("--independent", action="store_true",
                        help="ensemble members of their own initialisations")  # fmt: skip
    parser.add_argument("--bon-prompts", type=int, default=None,
                        help="held-out prompts of best-of-n (default: 24)")  # fmt: skip
    parser.add_argument(
        "--rl-on",
        nargs="*",
        default=None,
        choices=["single", *MITIGATIONS],
        help="proxies of the mitigation runs' RL (default: all; none: no RL)",
    )
    parser.add_argument(
        "--policy",
        default=None,
        help="skip the default study: the mitigations start from this policy "
        "(the default study's sft/final), with its samples cached beside it",
    )
    args, runs, report = common.Reporter.start("overopt", parser, argv, "bench_overopt")
    if args.policy is None:
        run = default_study(report, runs, args.bon_prompts)  # a finished one is read back
        policy, cache = run / "sft" / "final", run / "cache"
    else:
        policy, cache = Path(args.policy), runs / "policy-cache"
    if not args.skip_mitigations:
        rl_on = None if args.rl_on is None else tuple(args.rl_on)
        mitigation_study(report, runs, args.seeds, str(policy), cache, args.bon_prompts,
                         args.independent, rl_on)  # fmt: skip
    print("written:", report.write(), flush=True)


if __name__ == "__main__":
    main()
