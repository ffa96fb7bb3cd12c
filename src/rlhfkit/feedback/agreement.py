"""Inter-annotator agreement and per-labeller statistics (pure functions).

A *unit* is one thing several labellers judged, with one nominal category per labeller:

- Likert modes: the item; the category is the side, ``"a"``, ``"tie"`` or ``"b"`` (canonical
  value below, at or above the midpoint (S + 1) / 2);
- ``rating``: one (item, completion); the category is the rating 1..5;
- ``ranking``: one (item, completion i, completion j) with i < j; the category is whether i was
  ranked above j.

Formulas (n_i labels on unit i, n_ik of them in category k, N units with n_i >= 2):

- percent agreement: P_i = sum_k n_ik (n_ik - 1) / (n_i (n_i - 1)), reported as the mean
  P_bar = (1/N) sum_i P_i; for two labellers, the fraction of units they agree on.
- Fleiss' kappa (Fleiss 1971): kappa = (P_bar - P_e) / (1 - P_e), P_e = sum_k p_k^2 with
  p_k = sum_i n_ik / sum_i n_i. With a varying number of labels per unit this is the usual
  generalisation (each unit's P_i uses its own n_i).
- Cohen's kappa (Cohen 1960), two labellers on their common units: kappa = (p_o - p_e) /
  (1 - p_e), p_o the fraction of agreement, p_e = sum_k p_k^(1) p_k^(2) from each labeller's
  own category frequencies.

Each kappa is None where it is undefined (no unit, or P_e = 1: everyone used one category).
"""

from __future__ import annotations

import itertools
import statistics
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

Units = dict[Hashable, dict[str, Hashable]]
"""unit key -> {labeller name -> category}."""


def percent_agreement(units: Sequence[Sequence[Hashable]]) -> float | None:
    """Mean pairwise agreement P_bar over units with >= 2 labels (None if there are none).

    Args:
        units: For each unit, the categories its labellers gave.
    """
    shares = []
    for labels in units:
        n = len(labels)
        if n >= 2:
            counts = Counter(labels).values()
            shares.append(sum(c * (c - 1) for c in counts) / (n * (n - 1)))
    return sum(shares) / len(shares) if shares else None


def fleiss_kappa(units: Sequence[Sequence[Hashable]]) -> float | None:
    """Fleiss' kappa over units with >= 2 labels (see the module docstring for the formula).

    Args:
        units: For each unit, the categories its labellers gave.
    """
    rated = [labels for labels in units if len(labels) >= 2]
    p_bar = percent_agreement(rated)
    if p_bar is None:
        return None
    totals = Counter(itertools.chain.from_iterable(rated))
    n_all = sum(totals.values())
    p_e = sum((c / n_all) ** 2 for c in totals.values())
    return None if p_e >= 1.0 else (p_bar - p_e) / (1.0 - p_e)


def cohen_kappa(first: Sequence[Hashable], second: Sequence[Hashable]) -> float | None:
    """Cohen's kappa of two labellers' categories on the same units (paired by position).

    Args:
        first: Labeller 1's category per unit.
        second: Labeller 2's category per unit (same length).
    """
    if len(first) != len(second):
        raise ValueError(f"need one pair per unit, got {len(first)} and {len(second)} labels")
    n = len(first)
    if n == 0:
        return None
    p_o = sum(a == b for a, b in zip(first, second, strict=True)) / n
    c1, c2 = Counter(first), Counter(second)
    p_e = sum(c1[k] * c2[k] for k in c1) / (n * n)
    return None if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e)


def majority(categories: Sequence[Hashable]) -> Hashable | None:
    """The unique most frequent category, or None when two or more share the top count."""
    if not categories:
        return None
    ranked = Counter(categories).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None
    return ranked[0][0]


def agreement_summary(units: Units) -> dict[str, Any]:
    """Percent agreement, Fleiss' kappa and pairwise Cohen's kappa of a set of units.

    Returns:
        ``{"units", "percent_agreement", "fleiss_kappa", "cohen_kappa", "pairwise"}``:
        ``units`` counts units with >= 2 labels; ``cohen_kappa`` is set when exactly two
        labellers took part; ``pairwise`` lists Cohen's kappa of every pair of labellers with
        a common unit.
    """
    lists = [list(by.values()) for by in units.values()]
    names = sorted({name for by in units.values() for name in by})
    pairwise = []
    for a, b in itertools.combinations(names, 2):
        common = [by for by in units.values() if a in by and b in by]
        if common:
            kappa = cohen_kappa([by[a] for by in common], [by[b] for by in common])
            pairwise.append({"a": a, "b": b, "units": len(common), "kappa": kappa})
    return {
        "units": sum(len(labels) >= 2 for labels in lists),
        "percent_agreement": percent_agreement(lists),
        "fleiss_kappa": fleiss_kappa(lists),
        "cohen_kappa": pairwise[0]["kappa"] if len(names) == 2 and pairwise else None,
        "pairwise": pairwise,
    }


def majority_agreement(units: Units, name: str) -> tuple[float | None, int]:
    """How often a labeller matches the majority of the *other* labellers of each unit.

    Units where the others have no unique majority (or there are no others) are left out.

    Returns:
        (fraction of agreement or None, number of units compared).
    """
    hits = compared = 0
    for by in units.values():
        if name not in by:
            continue
        others = majority([cat for other, cat in by.items() if other != name])
        if others is not None:
            compared += 1
            hits += by[name] == others
    return (hits / compared if compared else None), compared


def labeller_stats(
    votes: Sequence[dict[str, Any]], units: Units, midpoint: float | None
) -> list[dict[str, Any]]:
    """Per-labeller count, time per item, agreement with the majority, position bias.

    Args:
        votes: Stored answers (:func:`rlhfkit.feedback.voting.task_votes`).
        units: The task's units (for agreement with the majority).
        midpoint: The Likert midpoint for pairwise tasks (None otherwise).

    Returns:
        One dict per labeller: ``labeller, labels, skips, mean_seconds, median_seconds,
        majority_agreement, majority_units, left_rate, left_votes``. ``left_rate`` is the share
        of the labeller's non-tie pairwise votes that preferred the completion shown on the
        left (0.5 = no position bias); None for other modes or without such votes.
    """
    by_name: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for vote in votes:
        by_name[vote["labeller"]].append(vote)
    out = []
    for name, mine in sorted(by_name.items()):
        answered = [v for v in mine if not v["skipped"]]
        seconds = [v["seconds"] for v in answered]
        sided = []
        if midpoint is not None:
            sided = [
                v["display_value"] < midpoint for v in answered if v["display_value"] != midpoint
            ]
        agree, compared = majority_agreement(units, name)
        out.append(
            {
                "labeller": name,
                "labels": len(answered),
                "skips": len(mine) - len(answered),
                "mean_seconds": statistics.fmean(seconds) if seconds else None,
                "median_seconds": statistics.median(seconds) if seconds else None,
                "majority_agreement": agree,
                "majority_units": compared,
                "left_rate": sum(sided) / len(sided) if sided else None,
                "left_votes": len(sided),
            }
        )
    return out
