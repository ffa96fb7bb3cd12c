"""Serving items to labellers and recording their answers.

Assignment: a labeller gets one item at a time, never one they answered or skipped, never one
that already has its target number of labels. Among the eligible items the least-covered one
comes first, counting labels plus items shown to others in the last ``CLAIM_S`` seconds and not
yet answered, then import order; this spreads many simultaneous labellers over the items.
Reloading the page shows the same open form again (same order, same nonce), with a fresh
``form_id`` for each rendered copy: a POST repeated from the same copy with the same answer is a
retry, anything else for an answered item is refused as already labelled (:func:`record_vote`).

Each shown form is a *presentation*: a random nonce, the item, and the random left-to-right
order of its completions (``order[pos]`` = the completion index shown at position ``pos``).
Answers arrive in display terms (left/right, positions) and are stored both as given and in the
item's own terms:

- ``likert5`` / ``likert8`` (scale S): the labeller's d in 1..S, 1 = left much better. With the
  item's completion 0 on the left the canonical value is d, otherwise S + 1 - d; canonical 1
  means completion 0 (A) much better, as in the ``likert`` schema.
- ``rating``: one rating in 1..5 per shown completion; stored per completion index.
- ``ranking``: a rank 1..K per shown completion (a permutation); stored as completion indices,
  best first, as in the ``rankings`` schema.
"""

from __future__ import annotations

import json
import random
import secrets
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rlhfkit.feedback.storage import Item, Task, get_item, transaction

CLAIM_S = 600.0
"""How long a shown, unanswered form counts against its item when assigning others."""

RATING_SCALE = 5
"""Ratings are integers 1..RATING_SCALE."""

MAX_NOTE_CHARS = 2000
"""Longest optional note."""


MAX_FORM_ID_CHARS = 64
"""Longest ``form_id`` kept (the app makes 12-character ones)."""

ALREADY_LABELLED = (
    "You already labelled this item (in another tab or window?). Your first answer is kept; "
    "this one was not stored."
)
"""What a labeller is told when a second answer to the same item is refused."""


class VoteError(ValueError):
    """An answer that cannot be stored; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class AlreadyLabelled(VoteError):
    """The labeller already answered this item; the new answer was not stored (409)."""

    def __init__(self, message: str = ALREADY_LABELLED) -> None:
        super().__init__(message, 409)


@dataclass(frozen=True)
class Presentation:
    """One form shown to one labeller.

    Attributes:
        nonce: The form's idempotency key.
        item: The item shown.
        order: ``order[pos]`` = the completion index at display position ``pos``.
        shown_at: When it was first shown (Unix seconds).
    """

    nonce: str
    item: Item
    order: list[int]
    shown_at: float


def new_form_id() -> str:
    """A fresh id for one rendered copy of a form (tells a retried POST from a second tab)."""
    return secrets.token_urlsafe(9)


def likert_scale(mode: str) -> int:
    """5 or 8 for the Likert modes."""
    return {"likert5": 5, "likert8": 8}[mode]


def _open_presentation(
    conn: sqlite3.Connection, labeller_id: int, overlap: int
) -> Presentation | None:
    row = conn.execute(
        "SELECT p.* FROM presentations p WHERE p.labeller_id = ? AND NOT EXISTS "
        "(SELECT 1 FROM votes v WHERE v.item_id = p.item_id AND v.labeller_id = p.labeller_id) "
        "ORDER BY p.shown_at DESC LIMIT 1",
        (labeller_id,),
    ).fetchone()
    if row is None:
        return None
    labels = conn.execute(
        "SELECT COUNT(*) FROM votes WHERE item_id = ? AND skipped = 0", (row["item_id"],)
    ).fetchone()[0]
    item = get_item(conn, row["item_id"])
    if labels >= overlap or item is None:
        return None
    return Presentation(row["nonce"], item, json.loads(row["display_order"]), row["shown_at"])


_NEXT_ITEM = """
SELECT id FROM (
    SELECT i.id, i.position,
        (SELECT COUNT(*) FROM votes v WHERE v.item_id = i.id AND v.skipped = 0) AS labels,
        (SELECT COUNT(DISTINCT p.labeller_id) FROM presentations p
            WHERE p.item_id = i.id AND p.shown_at > :since AND p.labeller_id != :me
            AND NOT EXISTS (SELECT 1 FROM votes w
                            WHERE w.item_id = i.id AND w.labeller_id = p.labeller_id)) AS pending
    FROM items i
    WHERE i.task_id = :task
      AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.item_id = i.id AND v.labeller_id = :me)
)
WHERE labels < :overlap
ORDER BY labels + pending, position
LIMIT 1
"""


def next_presentation(
    conn: sqlite3.Connection, labeller_id: int, task: Task, rng: random.Random | None = None
) -> Presentation | None:
    """The labeller's open form, or a new one for the next eligible item (None when done).

    Args:
        conn: Connection (a write transaction is opened when a new form is made).
        labeller_id: The labeller.
        task: Their task.
        rng: Source of the left/right order (default: the OS's randomness).

    Returns:
        The presentation, or None when no item is left for this labeller.
    """
    rng = rng or random.SystemRandom()
    with transaction(conn):
        found = _open_presentation(conn, labeller_id, task.overlap)
        if found is not None:
            return found
        params = {
            "task": task.id,
            "me": labeller_id,
            "overlap": task.overlap,
            "since": time.time() - CLAIM_S,
        }
        row = conn.execute(_NEXT_ITEM, params).fetchone()
        if row is None:
            return None
        item = get_item(conn, row["id"])
        assert item is not None  # selected in this transaction
        k = len(item.completions)
        order = rng.sample(range(k), k)
        nonce, now = secrets.token_urlsafe(18), time.time()
        conn.execute(
            "INSERT INTO presentations (nonce, labeller_id, item_id, display_order, shown_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (nonce, labeller_id, item.id, json.dumps(order), now),
        )
    return Presentation(nonce, item, order, now)


# ---------------------------------------------------------------------------------------------
# Answers


def _int_field(form: Mapping[str, str], key: str, low: int, high: int) -> int:
    raw = form.get(key, "")
    if not raw.strip().isdigit() or not low <= int(raw) <= high:
        raise VoteError(f"field '{key}': expected an integer in {low}..{high}, got {raw[:20]!r}")
    return int(raw)


def parse_answer(mode: str, form: Mapping[str, str], order: list[int]) -> tuple[Any, Any]:
    """Turn a submitted form into ``(canonical value, value as given)`` (see module docstring).

    Args:
        mode: The task mode.
        form: Form fields: ``choice`` (likert 1..S), ``rating_<pos>`` or ``rank_<pos>``.
        order: The presentation's order.

    Returns:
        The canonical value (Likert int, per-completion ratings, ranking best first) and the
        display-space value.

    Raises:
        VoteError: A missing or out-of-range field, or ranks that are not a permutation.
    """
    k = len(order)
    if mode in ("likert5", "likert8"):
        scale = likert_scale(mode)
        given = _int_field(form, "choice", 1, scale)
        return (given if order[0] == 0 else scale + 1 - given), given
    if mode == "rating":
        shown = [_int_field(form, f"rating_{pos}", 1, RATING_SCALE) for pos in range(k)]
        ratings = [0] * k
        for pos, rating in enumerate(shown):
            ratings[order[pos]] = rating
        return ratings, shown
    if mode == "ranking":
        ranks = [_int_field(form, f"rank_{pos}", 1, k) for pos in range(k)]
        if sorted(ranks) != list(range(1, k + 1)):
            raise VoteError(f"ranks must be 1..{k}, each used once; got {ranks}")
        best_first = sorted(range(k), key=lambda pos: ranks[pos])
        return [order[pos] for pos in best_first], ranks
    raise VoteError(f"unknown mode {mode!r}", 500)


def _form_id(form: Mapping[str, str]) -> str | None:
    return form.get("form_id", "")[:MAX_FORM_ID_CHARS] or None


def _same_answer(
    stored: sqlite3.Row, mode: str, form: Mapping[str, str], order: list[int], note: str
) -> bool:
    """Whether ``form`` repeats the stored vote: same form, same copy of it, same answer."""
    form_id = _form_id(form)
    if form.get("nonce") != stored["nonce"]:
        return False
    if form_id is not None and stored["form_id"] is not None and form_id != stored["form_id"]:
        return False  # the same form rendered again (a second tab): not a retry
    if note != stored["note"] or (form.get("choice") == "skip") != bool(stored["skipped"]):
        return False
    if stored["skipped"]:
        return True
    try:
        _, given = parse_answer(mode, form, order)
    except VoteError:
        return False
    return stored["display_value"] == json.dumps(given)


def record_vote(
    conn: sqlite3.Connection, labeller_id: int, mode: str, form: Mapping[str, str]
) -> bool:
    """Store the answer of a form once; a retried POST is recognised, a second answer refused.

    A submission for an item the labeller already answered is a *retry* when it repeats the
    stored vote exactly: the same nonce, the same copy of the form (``form_id``, when both
    carry one) and the same answer and note. It is answered as a success and stores nothing.
    Anything else (the item answered in another tab, or a different answer sent after the
    first) raises :class:`AlreadyLabelled`; the first vote is kept.

    Args:
        conn: Connection.
        labeller_id: The session's labeller (must own the nonce).
        mode: The task mode.
        form: The submitted fields: ``nonce``, ``form_id`` (the rendered copy of the form),
            ``choice`` (``"skip"`` to skip, a Likert value, or ``"submit"``), per-position
            fields, optional ``note``.

    Returns:
        True if stored now, False if this exact answer was already stored (a retried POST).

    Raises:
        VoteError: Unknown or foreign nonce (404), bad fields (400).
        AlreadyLabelled: The item already has this labeller's vote (409).
    """
    nonce, note = form.get("nonce", ""), form.get("note", "").strip()
    if len(note) > MAX_NOTE_CHARS:
        raise VoteError(f"the note is longer than {MAX_NOTE_CHARS} characters")
    with transaction(conn):
        shown = conn.execute(
            "SELECT * FROM presentations WHERE nonce = ? AND labeller_id = ?",
            (nonce, labeller_id),
        ).fetchone()
        if shown is None:
            raise VoteError("this form is unknown or belongs to someone else", 404)
        order = json.loads(shown["display_order"])
        stored = conn.execute(
            "SELECT * FROM votes WHERE item_id = ? AND labeller_id = ?",
            (shown["item_id"], labeller_id),
        ).fetchone()
        if stored is not None:
            if _same_answer(stored, mode, form, order, note):
                return False
            raise AlreadyLabelled()
        skipped = form.get("choice") == "skip"
        value, given = (None, None) if skipped else parse_answer(mode, form, order)
        try:
            conn.execute(
                "INSERT INTO votes (nonce, item_id, labeller_id, skipped, value, display_value, "
                "display_order, note, shown_at, answered_at, form_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    nonce,
                    shown["item_id"],
                    labeller_id,
                    int(skipped),
                    None if skipped else json.dumps(value),
                    None if skipped else json.dumps(given),
                    shown["display_order"],
                    note,
                    shown["shown_at"],
                    time.time(),
                    _form_id(form),
                ),
            )
        except sqlite3.IntegrityError:  # UNIQUE(item_id, labeller_id): a guard behind the check
            raise AlreadyLabelled() from None
    return True


@dataclass(frozen=True)
class Progress:
    """A labeller's progress in their task.

    Attributes:
        answered: Items they labelled.
        skipped: Items they skipped.
        remaining: Items still open to them (fewer than the target labels, not seen by them).
        total: Items in the task.
    """

    answered: int
    skipped: int
    remaining: int
    total: int


def progress(conn: sqlite3.Connection, labeller_id: int, task: Task) -> Progress:
    """Counts for the labeller's progress bar."""
    answered, skipped = conn.execute(
        "SELECT COALESCE(SUM(skipped = 0), 0), COALESCE(SUM(skipped = 1), 0) FROM votes "
        "WHERE labeller_id = ?",
        (labeller_id,),
    ).fetchone()
    total = conn.execute("SELECT COUNT(*) FROM items WHERE task_id = ?", (task.id,)).fetchone()[0]
    remaining = conn.execute(
        "SELECT COUNT(*) FROM items i WHERE i.task_id = ? "
        "AND NOT EXISTS (SELECT 1 FROM votes v WHERE v.item_id = i.id AND v.labeller_id = ?) "
        "AND (SELECT COUNT(*) FROM votes v WHERE v.item_id = i.id AND v.skipped = 0) < ?",
        (task.id, labeller_id, task.overlap),
    ).fetchone()[0]
    return Progress(int(answered), int(skipped), int(remaining), int(total))


def task_votes(conn: sqlite3.Connection, task_id: int) -> list[dict[str, Any]]:
    """Every stored answer of a task (skips included), in the order they were given.

    Returns:
        Dicts with ``vote_id, nonce, item_id, position, labeller_id, labeller, skipped, value,
        display_value, order, note, seconds`` (time from showing to answering).
    """
    rows = conn.execute(
        "SELECT v.*, i.position, l.name FROM votes v JOIN items i ON i.id = v.item_id "
        "JOIN labellers l ON l.id = v.labeller_id WHERE i.task_id = ? ORDER BY v.id",
        (task_id,),
    ).fetchall()
    return [
        {
            "vote_id": r["id"],
            "nonce": r["nonce"],
            "item_id": r["item_id"],
            "position": r["position"],
            "labeller_id": r["labeller_id"],
            "labeller": r["name"],
            "skipped": bool(r["skipped"]),
            "value": None if r["value"] is None else json.loads(r["value"]),
            "display_value": None if r["display_value"] is None else json.loads(r["display_value"]),
            "order": json.loads(r["display_order"]),
            "note": r["note"],
            "seconds": r["answered_at"] - r["shown_at"],
        }
        for r in rows
    ]
