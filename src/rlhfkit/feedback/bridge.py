"""The pipeline's ``human`` labelling mode on top of the app's database.

The pipeline writes ``label_requests.jsonl`` (``{"id", "prompt", "a", "b"}`` rows); it calls
:func:`create_task_from_requests` once to turn them into a pairwise task (each item keeps the
request ``id``), people label it in the web app (``rlhfkit label serve``), and
:func:`labels_for_task` returns the ``{"id", "choice"}`` rows the pipeline reads once every
item has its target number of labels. Canonical Likert values are in the request's terms
(completion A = ``a``), whatever left/right order each labeller saw.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from rlhfkit.feedback.agreement import majority
from rlhfkit.feedback.export import side
from rlhfkit.feedback.importer import parse_candidates
from rlhfkit.feedback.storage import connect, create_task, get_task, init_db, invite, list_items
from rlhfkit.feedback.voting import likert_scale, task_votes

PAIRWISE_MODES = ("likert5", "likert8")


def create_task_from_requests(
    db_path: str | Path,
    requests_jsonl: str | Path,
    *,
    name: str,
    mode: str = "likert5",
    overlap: int = 1,
    guidelines: str = "",
) -> tuple[int, dict[str, Any]]:
    """Create a pairwise task from the pipeline's label requests.

    Args:
        db_path: The app's database (created if missing).
        requests_jsonl: ``{"id", "prompt", "a", "b"}`` rows (any candidate format is accepted).
        name: Task name.
        mode: ``likert5`` or ``likert8``.
        overlap: Labels wanted per item.
        guidelines: Markdown shown to labellers.

    Returns:
        ``(task_id, info)``; info holds ``task_id, name, mode, overlap, items, db, admin_path``.
    """
    if mode not in PAIRWISE_MODES:
        raise ValueError(
            f"the pipeline compares pairs: mode must be likert5 or likert8, got {mode!r}"
        )
    path = Path(requests_jsonl)
    items = parse_candidates(path.read_text(encoding="utf-8"), mode, name=str(path))
    init_db(db_path)
    conn = connect(db_path)
    try:
        task_id = create_task(
            conn, name=name, mode=mode, overlap=overlap, guidelines=guidelines, items=items
        )
    finally:
        conn.close()
    info = {
        "task_id": task_id,
        "name": name,
        "mode": mode,
        "overlap": overlap,
        "items": len(items),
        "db": str(db_path),
        "admin_path": f"/admin/tasks/{task_id}",
    }
    return task_id, info


def invite_labellers(
    db_path: str | Path, task_id: int, names: list[str], *, base_url: str = "http://127.0.0.1:8000"
) -> list[tuple[str, str]]:
    """Create labellers and return ``(name, personal link)``; the links are not stored."""
    init_db(db_path)
    conn = connect(db_path)
    try:
        created = invite(conn, task_id, names)
    finally:
        conn.close()
    return [(name, f"{base_url.rstrip('/')}/l/{token}") for _, name, token in created]


def labels_for_task(db_path: str | Path, task_id: int) -> list[dict[str, Any]] | None:
    """The task's labels as ``{"id": request id, "choice": "a" | "b" | "tie"}``, in item order.

    The choice is the majority side of the item's Likert votes; a shared top count is a tie.

    Returns:
        The rows, or None while any item has fewer than its target number of labels (skips do
        not count).
    """
    conn = connect(db_path)
    try:
        task = get_task(conn, task_id)
        if task is None:
            raise ValueError(f"{db_path}: no task with id {task_id}")
        if task.mode not in PAIRWISE_MODES:
            raise ValueError(f"task {task_id} is a {task.mode} task, not a pairwise one")
        scale = likert_scale(task.mode)
        sides: dict[int, list[str]] = defaultdict(list)
        for vote in task_votes(conn, task_id):
            if not vote["skipped"]:
                sides[vote["item_id"]].append(side(vote["value"], scale))
        items = list_items(conn, task_id)
    finally:
        conn.close()
    if any(len(sides[item.id]) < task.overlap for item in items):
        return None
    return [{"id": item.source_id, "choice": majority(sides[item.id]) or "tie"} for item in items]
