"""Export a task's labels in the formats the reward-model and DPO recipes read, with statistics.

Formats (schemas of :mod:`rlhfkit.data.schemas`; every row also carries the item's source
``id``, its other imported fields, and, per vote, ``labeller`` and ``note``):

============  ========================  =======================================================
format        modes                     row
============  ========================  =======================================================
``pairs``     likert5, likert8          ``preference``: prompt, chosen, rejected, margin
``likert``    likert5, likert8          ``likert``: prompt, completions [A, B], likert, scale
``ratings``   rating                    ``ratings``: prompt, completions, ratings
``rankings``  ranking                   ``rankings``: prompt, completions, ranking (best first)
============  ========================  =======================================================

``aggregate="votes"`` writes one row per answer (skips never appear). ``aggregate="item"``
writes one row per labelled item: pairs by the majority side (the side with the most votes;
a shared top count is a tie) with the mean margin of the votes on that side; ratings as the
mean rating per completion; rankings by mean rank position (Borda), ties to the lower index.
The ``likert`` format is always per vote.

Pairs follow docs/data_formats.md: binarised by side, margin = |s - m| with m = (S + 1) / 2 (the
Likert strength: 1 or 2 on the 5-point scale, 0.5 to 3.5 on the 8-point scale) when
``margin`` is on. Ties are dropped (``ties="drop"``) or kept (``ties="keep"``) as a row with
completion A as ``chosen``, margin 0 and ``"tie": true``, for evaluation (scored 0.5).
"""

from __future__ import annotations

import sqlite3
import statistics
from collections import Counter, defaultdict
from typing import Any, Literal

from rlhfkit.data.preferences import likert_midpoint
from rlhfkit.feedback.agreement import Units, agreement_summary, labeller_stats, majority
from rlhfkit.feedback.storage import Item, Task, get_task, list_items
from rlhfkit.feedback.voting import likert_scale, task_votes

FORMATS = {
    "pairs": ("likert5", "likert8"),
    "likert": ("likert5", "likert8"),
    "ratings": ("rating",),
    "rankings": ("ranking",),
}
"""Export format -> the task modes it applies to."""


def side(value: int, scale: int) -> str:
    """The side a canonical Likert value favours: ``"a"``, ``"tie"`` or ``"b"``."""
    mid = likert_midpoint(scale)
    return "a" if value < mid else "b" if value > mid else "tie"


def vote_units(votes: list[dict[str, Any]], mode: str) -> Units:
    """The agreement units of a task's answers (see :mod:`rlhfkit.feedback.agreement`)."""
    units: Units = defaultdict(dict)
    for vote in votes:
        if vote["skipped"]:
            continue
        value, name, item = vote["value"], vote["labeller"], vote["item_id"]
        if mode in ("likert5", "likert8"):
            units[item][name] = side(value, likert_scale(mode))
        elif mode == "rating":
            for index, rating in enumerate(value):
                units[(item, index)][name] = rating
        else:
            rank = {completion: place for place, completion in enumerate(value)}
            for i in range(len(value)):
                for j in range(i + 1, len(value)):
                    units[(item, i, j)][name] = rank[i] < rank[j]
    return dict(units)


def _base(item: Item) -> dict[str, Any]:
    row = dict(item.meta)
    if item.source_id is not None:
        row["id"] = item.source_id
    row["prompt"] = item.prompt
    return row


def _pair(item: Item, winner: str, strength: float, margin: bool, ties: str) -> dict | None:
    if winner == "tie":
        if ties == "drop":
            return None
        a, b = item.completions
        return {**_base(item), "chosen": a, "rejected": b, "margin": 0.0, "tie": True}
    chosen, rejected = item.completions if winner == "a" else item.completions[::-1]
    row = {**_base(item), "chosen": chosen, "rejected": rejected}
    if margin:
        row["margin"] = strength
    return row


def _vote_row(item: Item, task: Task, vote: dict[str, Any], fmt: str, **opts: Any) -> dict | None:
    value = vote["value"]
    extra = {"labeller": vote["labeller"], "note": vote["note"]}
    if fmt == "pairs":
        scale = likert_scale(task.mode)
        strength = abs(value - likert_midpoint(scale))
        row = _pair(item, side(value, scale), strength, opts["margin"], opts["ties"])
        return None if row is None else {**row, "likert": value, "scale": scale, **extra}
    key = {"likert": "likert", "ratings": "ratings", "rankings": "ranking"}[fmt]
    row = {**_base(item), "completions": item.completions, key: value, **extra}
    if fmt == "likert":
        row["scale"] = likert_scale(task.mode)
    return row


def _item_row(item: Item, task: Task, values: list[Any], fmt: str, **opts: Any) -> dict | None:
    n = {"labels": len(values)}
    if fmt == "pairs":
        scale = likert_scale(task.mode)
        sides = [side(v, scale) for v in values]
        winner = majority(sides) or "tie"
        strengths = [abs(v - likert_midpoint(scale)) for v, s in zip(values, sides, strict=True)]
        won = [x for x, s in zip(strengths, sides, strict=True) if s == winner]
        row = _pair(item, winner, statistics.fmean(won), opts["margin"], opts["ties"])
        return None if row is None else {**row, **n, "votes": dict(Counter(sides))}
    k = len(item.completions)
    if fmt == "ratings":
        ratings = [statistics.fmean(v[i] for v in values) for i in range(k)]
        return {**_base(item), "completions": item.completions, "ratings": ratings, **n}
    places = [statistics.fmean(v.index(i) for v in values) for i in range(k)]
    ranking = sorted(range(k), key=lambda i: (places[i], i))
    return {**_base(item), "completions": item.completions, "ranking": ranking, **n}


def export_rows(
    conn: sqlite3.Connection,
    task_id: int,
    *,
    format: str = "pairs",
    ties: Literal["drop", "keep"] = "drop",
    margin: bool = True,
    aggregate: Literal["votes", "item"] = "votes",
) -> list[dict[str, Any]]:
    """The task's labels as rows of a training format (see the module docstring).

    Args:
        conn: Connection.
        task_id: The task.
        format: ``pairs``, ``likert``, ``ratings`` or ``rankings`` (must fit the task's mode).
        ties: Drop or keep Likert ties (``pairs`` only).
        margin: Write the Likert strength as the pair's ``margin`` (``pairs`` only).
        aggregate: One row per answer (``votes``) or per item (``item``).

    Returns:
        Rows in item order (per vote: in answer order within an item).

    Raises:
        ValueError: Unknown task, or a format that does not fit the task's mode.
    """
    task = get_task(conn, task_id)
    if task is None:
        raise ValueError(f"no task with id {task_id}")
    if task.mode not in FORMATS.get(format, ()):
        fits = [name for name, modes in FORMATS.items() if task.mode in modes]
        raise ValueError(
            f"format {format!r} does not fit task {task_id} (mode {task.mode}); use {fits}"
        )
    votes: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for vote in task_votes(conn, task_id):
        if not vote["skipped"]:
            votes[vote["item_id"]].append(vote)
    rows = []
    for item in list_items(conn, task_id):
        mine = votes.get(item.id, [])
        if aggregate == "item" and format != "likert":
            built = (
                [
                    _item_row(
                        item, task, [v["value"] for v in mine], format, ties=ties, margin=margin
                    )
                ]
                if mine
                else []
            )
        else:
            built = [_vote_row(item, task, v, format, ties=ties, margin=margin) for v in mine]
        rows.extend(row for row in built if row is not None)
    return rows


def task_stats(conn: sqlite3.Connection, task_id: int) -> dict[str, Any]:
    """Coverage, agreement and per-labeller statistics of a task.

    Returns:
        ``{"task", "mode", "items", "items_complete", "labels", "skips", "agreement",
        "labellers"}`` (agreement: :func:`~rlhfkit.feedback.agreement.agreement_summary`;
        labellers: :func:`~rlhfkit.feedback.agreement.labeller_stats`).
    """
    task = get_task(conn, task_id)
    if task is None:
        raise ValueError(f"no task with id {task_id}")
    votes = task_votes(conn, task_id)
    units = vote_units(votes, task.mode)
    labels = Counter(v["item_id"] for v in votes if not v["skipped"])
    items = list_items(conn, task_id)
    midpoint = likert_midpoint(likert_scale(task.mode)) if task.mode.startswith("likert") else None
    return {
        "task": task.id,
        "name": task.name,
        "mode": task.mode,
        "overlap": task.overlap,
        "items": len(items),
        "items_complete": sum(labels[item.id] >= task.overlap for item in items),
        "labels": sum(labels.values()),
        "skips": sum(v["skipped"] for v in votes),
        "agreement": agreement_summary(units),
        "labellers": labeller_stats(votes, units, midpoint),
    }
