"""The report of a scored (M, N) grid: accuracy, pass@k, pass^k, maj@k, rewards and lengths.

A sample is correct when its reward reaches the threshold (1.0 for the binary verifiers).
Per prompt with n scored samples of which c are correct, pass@k and pass^k are the unbiased
estimators of :mod:`rlhfkit.eval.reasoning`; every figure is the mean over prompts (prompts with
fewer than k scored samples are left out of that k). maj@k takes the first k samples, votes on
their extracted answers (:func:`rlhfkit.rewards.verifiers.math.majority_vote`) and counts the
prompt correct when a sample carrying the voted answer is correct.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from rlhfkit.eval.reasoning import pass_at_k, pass_hat_k
from rlhfkit.rewards.verifiers.math import answers_match, extract_answer, majority_vote


def majority_correct(texts: Sequence[str], correct: Sequence[bool]) -> bool:
    """Whether the majority-vote answer of ``texts`` is a correct one (False with no answer)."""
    answers = [extract_answer(t) for t in texts]
    voted = majority_vote(answers)
    if voted is None:
        return False
    return any(
        ok and a is not None and answers_match(a, voted, symbolic=False)
        for a, ok in zip(answers, correct, strict=True)
    )


def _block(rows: Sequence[int], grid: Any, ks: Sequence[int], threshold: float) -> dict[str, Any]:
    """The figures of the prompts ``rows`` of ``grid``."""
    rewards = [r for i in rows for r in grid.rewards[i] if not math.isnan(r)]
    lengths = [n for i in rows for n in grid.lengths[i]]
    finish = Counter(f for i in rows for f in grid.finish[i])
    total = sum(finish.values())
    out: dict[str, Any] = {
        "prompts": len(rows),
        "samples": total,
        "scored": len(rewards) / total if total else math.nan,
        "accuracy": statistics.fmean(r >= threshold for r in rewards) if rewards else math.nan,
        "reward_mean": statistics.fmean(rewards) if rewards else math.nan,
        "reward_std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
        "length_mean": statistics.fmean(lengths) if lengths else math.nan,
        "length_median": statistics.median(lengths) if lengths else math.nan,
        "length_max": max(lengths, default=0),
        "finish": {k: v / total for k, v in sorted(finish.items())},
    }
    for k in ks:
        at_k, hat_k, maj_k = [], [], []
        for i in rows:
            scored = [r for r in grid.rewards[i] if not math.isnan(r)]
            n, c = len(scored), sum(r >= threshold for r in scored)
            if n >= k:
                at_k.append(pass_at_k(n, c, k))
                hat_k.append(pass_hat_k(n, c, k))
            if len(grid.texts[i]) >= k:
                first = [not math.isnan(r) and r >= threshold for r in grid.rewards[i][:k]]
                maj_k.append(majority_correct(grid.texts[i][:k], first))
        if at_k:
            out[f"pass@{k}"] = statistics.fmean(at_k)
            out[f"pass^{k}"] = statistics.fmean(hat_k)
        if maj_k:
            out[f"maj@{k}"] = statistics.fmean(maj_k)
    return out


def grid_report(
    grid: Any, fields: Sequence[dict[str, Any]], *, ks: Sequence[int] = (1,), threshold: float = 1.0
) -> dict[str, Any]:
    """Overall and per-task figures of a scored grid.

    Args:
        grid: A scored :class:`rlhfkit.eval.run.Grid` (M prompts x N samples).
        fields: The M prompts' fields (their ``task`` groups the per-task figures).
        ks: The k of pass@k, pass^k and maj@k; those above N are left out.
        threshold: A sample is correct when its reward is at least this.
    """
    m, n = grid.shape
    ks = sorted({k for k in ks if 1 <= k <= n} or {1})
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(fields):
        by_task[str(f.get("task", "all"))].append(i)
    report: dict[str, Any] = {
        "samples_per_prompt": n, "threshold": threshold, "ks": ks,
        "overall": _block(range(m), grid, ks, threshold),
    }  # fmt: skip
    if len(by_task) > 1:
        report["by_task"] = {t: _block(rows, grid, ks, threshold) for t, rows in by_task.items()}
    return report


def print_grid_report(report: dict[str, Any], title: str = "evaluation") -> None:
    """The report as one table: a row per group (overall, then each task)."""
    ks = report["ks"]
    metrics = ["accuracy"] + [f"{p}{k}" for k in ks for p in ("pass@", "pass^", "maj@")]
    table = Table(title=title)
    for name in ["group", "prompts", *metrics, "reward", "length", "finished"]:
        table.add_column(name, justify="left" if name == "group" else "right")
    groups = {"overall": report["overall"], **report.get("by_task", {})}
    for name, block in groups.items():
        finished = 1.0 - block["finish"].get("length", 0.0)
        table.add_row(
            name, str(block["prompts"]),
            *[f"{block[m]:.3f}" if m in block else "-" for m in metrics],
            f"{block['reward_mean']:.3f}", f"{block['length_mean']:.1f}", f"{finished:.2f}",
        )  # fmt: skip
    Console().print(table)
