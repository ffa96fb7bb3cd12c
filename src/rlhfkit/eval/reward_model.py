"""Reward-model evaluation on preference pairs: scoring, the report, and its printed table.

``rlhfkit rm eval`` and the reward-model recipe's held-out evaluation share these functions
(docs/methods/reward_models.md): pairwise accuracy overall and per category and per source, mean
margin, the BT loss, expected calibration error of sigma(r_c - r_r), the reward distribution and
the correlation of reward with length (a length-biased reward model shows a high one).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rlhfkit.data.groups import TokenizedGroup
from rlhfkit.eval.metrics import (
    expected_calibration_error,
    pairwise_accuracy,
    pearson,
    reward_distribution,
)
from rlhfkit.models.heads import score_examples


@dataclass
class ScoredPair:
    """Rewards of one (chosen, rejected) pair with what it is grouped by."""

    chosen: float
    rejected: float
    chosen_tokens: int
    rejected_tokens: int
    category: str
    source: str


def source_name(location: str) -> str:
    """The file or dataset part of a ``source:row N`` / ``file:LINE`` location."""
    head, sep, tail = location.rpartition(":")
    if not sep:
        return location
    number = tail.removeprefix("row ").strip()
    return head if number.isdigit() else location


def score_pairs(
    model: nn.Module,
    groups: Sequence[TokenizedGroup],
    *,
    packing: bool,
    pad_id: int,
    max_tokens: int = 8192,
    category_key: str = "category",
) -> list[ScoredPair]:
    """Score every sequence once, then form all pairs (i, j) with score_i > score_j per group.

    A group's sequences share their prompt: they are scored as one prefix tree.
    """
    sequences = [s for g in groups for s in g.sequences]
    keys = [gi for gi, g in enumerate(groups) for _ in g.sequences]
    rewards = score_examples(
        model, sequences, packing=packing, pad_id=pad_id, max_tokens=max_tokens, prefix_keys=keys
    )[:, 0].tolist()
    pairs: list[ScoredPair] = []
    start = 0
    for g in groups:
        k = len(g.sequences)
        r, seqs = rewards[start : start + k], g.sequences
        category = str(g.meta.get(category_key, "all"))
        source = source_name(g.source)
        for i in range(k):
            for j in range(i + 1, k):
                if g.scores[i] > g.scores[j]:
                    lengths = len(seqs[i].input_ids), len(seqs[j].input_ids)
                    pairs.append(ScoredPair(r[i], r[j], *lengths, category, source))
        start += k
    return pairs


def _summary(pairs: Sequence[ScoredPair]) -> dict[str, float]:
    chosen = torch.tensor([p.chosen for p in pairs], dtype=torch.float64)
    rejected = torch.tensor([p.rejected for p in pairs], dtype=torch.float64)
    margin = chosen - rejected
    return {
        "pairs": len(pairs),
        "accuracy": pairwise_accuracy(chosen, rejected),
        "mean_margin": float(margin.mean()) if len(pairs) else math.nan,
        "loss": float(torch.nn.functional.softplus(-margin).mean()) if len(pairs) else math.nan,
    }


def rm_report(pairs: Sequence[ScoredPair], *, bins: int = 10) -> dict[str, Any]:
    """Everything ``rm eval`` reports, as JSON-ready values.

    Returns:
        ``overall`` (pairs, accuracy with ties 0.5, mean margin r_c - r_r, BT loss, mean chosen
        and rejected reward, ECE over ``bins`` bins), ``per_category`` and ``per_source``
        (pairs, accuracy, mean margin, loss), ``reward_distribution`` of every scored reward and
        ``length_correlation`` (Pearson between reward and sequence length in tokens).
    """
    chosen = [p.chosen for p in pairs]
    rejected = [p.rejected for p in pairs]
    overall = _summary(pairs)
    overall["mean_chosen"] = sum(chosen) / len(pairs) if pairs else math.nan
    overall["mean_rejected"] = sum(rejected) / len(pairs) if pairs else math.nan
    overall["ece"] = expected_calibration_error(chosen, rejected, bins=bins)
    by_category: dict[str, list[ScoredPair]] = defaultdict(list)
    by_source: dict[str, list[ScoredPair]] = defaultdict(list)
    for p in pairs:
        by_category[p.category].append(p)
        by_source[p.source].append(p)
    rewards = chosen + rejected
    lengths = [p.chosen_tokens for p in pairs] + [p.rejected_tokens for p in pairs]
    return {
        "overall": overall,
        "per_category": {k: _summary(v) for k, v in sorted(by_category.items())},
        "per_source": {k: _summary(v) for k, v in sorted(by_source.items())},
        "reward_distribution": reward_distribution(rewards, bins=bins) if rewards else {},
        "length_correlation": pearson(rewards, lengths) if len(rewards) > 1 else math.nan,
    }


def print_report(report: dict[str, Any], title: str = "reward model") -> None:
    """Print the report as tables (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"{title}: pairwise accuracy")
    for column in ("group", "pairs", "accuracy", "mean margin", "BT loss"):
        table.add_column(column, justify="left" if column == "group" else "right")

    def row(name: str, s: dict[str, float]) -> None:
        table.add_row(
            name, str(s["pairs"]), f"{s['accuracy']:.3f}", f"{s['mean_margin']:.3f}",
            f"{s['loss']:.4f}",
        )  # fmt: skip

    row("overall", report["overall"])
    for name, s in report["per_category"].items():
        row(f"category {name}", s)
    if len(report["per_source"]) > 1:
        for name, s in report["per_source"].items():
            row(f"source {name}", s)
    console.print(table)
    dist = report["reward_distribution"]
    o = report["overall"]
    console.print(
        f"ECE {o['ece']:.3f} | mean chosen {o['mean_chosen']:.3f}, rejected "
        f"{o['mean_rejected']:.3f} | reward mean {dist.get('mean', math.nan):.3f} std "
        f"{dist.get('std', math.nan):.3f} [p05 {dist.get('p05', math.nan):.3f}, p95 "
        f"{dist.get('p95', math.nan):.3f}] | corr(reward, length) "
        f"{report['length_correlation']:.3f}"
    )
