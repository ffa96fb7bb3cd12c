"""SQLite storage of the labelling app: versioned schema, WAL, short write transactions.

One database file holds every task. Connections are opened per request (``connect``) in
autocommit mode; writes run inside :func:`transaction` (``BEGIN IMMEDIATE``: the write lock is
taken up front, so two writers queue on the busy timeout instead of failing on upgrade) and are
committed before the HTTP response is sent. WAL mode lets readers run beside the one writer,
and ``synchronous=FULL`` makes every commit durable even against a power cut, not only a killed
process. All SQL is parameterised; no value is ever formatted into a statement.

Tables (schema version 2):

================  ===============================================================
table             rows
================  ===============================================================
schema_version    one row: the schema's version (migrations run up to ``VERSION``)
settings          server secrets that must survive a restart (the CSRF key)
tasks             name, mode (likert5, likert8, rating, ranking), overlap, guidelines
items             one prompt with K >= 2 completions, its source id and extra fields
labellers         name, task, SHA-256 of the personal token (never the token)
sessions          SHA-256 of the session cookie, role, labeller, expiry
presentations     one shown form: nonce, labeller, item, left-to-right order, time
votes             one answer (or skip) per (item, labeller); the form's nonce is unique,
                  ``form_id`` names the rendered copy of the form it came from (v2)
================  ===============================================================

The form nonce is the vote's idempotency key: a POST retried after a lost response (the same
copy of the form, the same answer) finds its vote and is answered as a success without a second
row; any other answer to an answered item (another tab, another answer) is refused as already
labelled (:func:`rlhfkit.feedback.voting.record_vote`), and ``UNIQUE(item_id, labeller_id)``
keeps anyone from answering an item twice.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.feedback.auth import hash_token, new_token

VERSION = 2
"""The schema version this code reads and writes."""

MODES = ("likert5", "likert8", "rating", "ranking")
"""Labelling modes: pairwise Likert (5-point with tie, 8-point without), 1-5 rating, ranking."""

_V1 = """
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    mode TEXT NOT NULL CHECK (mode IN ('likert5', 'likert8', 'rating', 'ranking')),
    overlap INTEGER NOT NULL CHECK (overlap >= 1),
    guidelines TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL
);
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL REFERENCES tasks(id),
    position INTEGER NOT NULL,
    source_id TEXT,
    prompt TEXT NOT NULL,
    completions TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    UNIQUE (task_id, position)
);
CREATE TABLE labellers (
    id INTEGER PRIMARY KEY,
    task_id INTEGER NOT NULL REFERENCES tasks(id),
    name TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    revoked INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,
    role TEXT NOT NULL CHECK (role IN ('admin', 'labeller')),
    labeller_id INTEGER REFERENCES labellers(id),
    expires_at REAL NOT NULL
);
CREATE TABLE presentations (
    nonce TEXT PRIMARY KEY,
    labeller_id INTEGER NOT NULL REFERENCES labellers(id),
    item_id INTEGER NOT NULL REFERENCES items(id),
    display_order TEXT NOT NULL,
    shown_at REAL NOT NULL
);
CREATE INDEX presentations_by_labeller ON presentations (labeller_id, shown_at);
CREATE INDEX presentations_by_item ON presentations (item_id);
CREATE TABLE votes (
    id INTEGER PRIMARY KEY,
    nonce TEXT NOT NULL UNIQUE,
    item_id INTEGER NOT NULL REFERENCES items(id),
    labeller_id INTEGER NOT NULL REFERENCES labellers(id),
    skipped INTEGER NOT NULL,
    value TEXT,
    display_value TEXT,
    display_order TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    shown_at REAL NOT NULL,
    answered_at REAL NOT NULL,
    UNIQUE (item_id, labeller_id)
);
CREATE INDEX votes_by_labeller ON votes (labeller_id);
"""

_V2 = """
ALTER TABLE votes ADD COLUMN form_id TEXT;
"""

MIGRATIONS: list[str] = [_V1, _V2]
"""``MIGRATIONS[v]`` upgrades a database from version v to v + 1 (version 0: empty file)."""


class StorageError(RuntimeError):
    """The database cannot be used by this version of rlhfkit."""


def connect(path: str | Path) -> sqlite3.Connection:
    """Open a connection in autocommit mode with the app's pragmas (WAL, FULL sync, FKs).

    Args:
        path: The SQLite file (created if missing).

    Returns:
        A connection whose rows are :class:`sqlite3.Row`; use :func:`transaction` to write.
    """
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` if the block raises)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def schema_version(conn: sqlite3.Connection) -> int:
    """The database's schema version (0 for a new, empty file)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def init_db(path: str | Path) -> None:
    """Create or migrate the database to ``VERSION`` and make sure the server secret exists.

    Raises:
        StorageError: The file was written by a newer schema version.
    """
    conn = connect(path)
    try:
        with transaction(conn):
            version = schema_version(conn)
            if version > VERSION:
                raise StorageError(
                    f"{path}: schema version {version} is newer than this rlhfkit's "
                    f"({VERSION}); upgrade rlhfkit to open it"
                )
            if version == 0:
                conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            for step in range(version, VERSION):
                for statement in MIGRATIONS[step].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("UPDATE schema_version SET version = ?", (step + 1,))
            conn.execute(
                "INSERT OR IGNORE INTO settings (key, value) VALUES ('secret', ?)",
                (secrets.token_hex(32),),
            )
    finally:
        conn.close()


def get_setting(conn: sqlite3.Connection, key: str) -> str:
    """A value of the ``settings`` table (``KeyError`` if missing)."""
    row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
    if row is None:
        raise KeyError(key)
    return str(row[0])


# ---------------------------------------------------------------------------------------------
# Tasks, items, labellers


@dataclass(frozen=True)
class Task:
    """A labelling task.

    Attributes:
        id: Row id.
        name: Shown to admins and labellers.
        mode: One of ``MODES``.
        overlap: Target number of labels per item.
        guidelines: Markdown shown to labellers.
    """

    id: int
    name: str
    mode: str
    overlap: int
    guidelines: str


@dataclass(frozen=True)
class Item:
    """One prompt and its completions, as imported.

    Attributes:
        id: Row id.
        task_id: The task.
        position: Order of import (0-based).
        source_id: The row's own ``id`` (any JSON value), or None.
        prompt: The prompt as imported (string or message list).
        completions: The completions as imported (strings or message lists).
        meta: The imported row's other fields.
    """

    id: int
    task_id: int
    position: int
    source_id: Any
    prompt: Any
    completions: list[Any]
    meta: dict[str, Any]


def create_task(
    conn: sqlite3.Connection,
    *,
    name: str,
    mode: str,
    overlap: int,
    guidelines: str,
    items: list[dict[str, Any]],
) -> int:
    """Insert a task and its items in one transaction.

    Args:
        conn: Connection.
        name: Task name.
        mode: One of ``MODES``.
        overlap: Labels wanted per item (>= 1).
        guidelines: Markdown for labellers.
        items: ``{"source_id", "prompt", "completions", "meta"}`` dicts (see
            :func:`rlhfkit.feedback.importer.parse_candidates`).

    Returns:
        The new task id.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if overlap < 1:
        raise ValueError(f"overlap must be >= 1 labels per item, got {overlap}")
    with transaction(conn):
        cur = conn.execute(
            "INSERT INTO tasks (name, mode, overlap, guidelines, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (name, mode, overlap, guidelines, time.time()),
        )
        task_id = int(cur.lastrowid or 0)
        conn.executemany(
            "INSERT INTO items (task_id, position, source_id, prompt, completions, meta) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    task_id,
                    i,
                    None if it.get("source_id") is None else json.dumps(it["source_id"]),
                    json.dumps(it["prompt"]),
                    json.dumps(it["completions"]),
                    json.dumps(it.get("meta", {})),
                )
                for i, it in enumerate(items)
            ],
        )
    return task_id


def _task(row: sqlite3.Row) -> Task:
    return Task(row["id"], row["name"], row["mode"], row["overlap"], row["guidelines"])


def get_task(conn: sqlite3.Connection, task_id: int) -> Task | None:
    """The task, or None."""
    row = conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
    return None if row is None else _task(row)


def list_tasks(conn: sqlite3.Connection) -> list[Task]:
    """All tasks, oldest first."""
    return [_task(row) for row in conn.execute("SELECT * FROM tasks ORDER BY id")]


def item_from_row(row: sqlite3.Row) -> Item:
    """Decode an ``items`` row."""
    source = row["source_id"]
    return Item(
        id=row["id"],
        task_id=row["task_id"],
        position=row["position"],
        source_id=None if source is None else json.loads(source),
        prompt=json.loads(row["prompt"]),
        completions=json.loads(row["completions"]),
        meta=json.loads(row["meta"]),
    )


def get_item(conn: sqlite3.Connection, item_id: int) -> Item | None:
    """The item, or None."""
    row = conn.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
    return None if row is None else item_from_row(row)


def list_items(conn: sqlite3.Connection, task_id: int) -> list[Item]:
    """The task's items in import order."""
    rows = conn.execute("SELECT * FROM items WHERE task_id = ? ORDER BY position", (task_id,))
    return [item_from_row(row) for row in rows]


def invite(conn: sqlite3.Connection, task_id: int, names: list[str]) -> list[tuple[int, str, str]]:
    """Create one labeller per name with a fresh personal token (stored only as its hash).

    Returns:
        ``(labeller id, name, token)`` per name; the token is shown to the admin once.
    """
    if get_task(conn, task_id) is None:
        raise ValueError(f"no task with id {task_id}")
    out = []
    with transaction(conn):
        for name in names:
            token = new_token()
            cur = conn.execute(
                "INSERT INTO labellers (task_id, name, token_hash, created_at) VALUES (?, ?, ?, ?)",
                (task_id, name, hash_token(token), time.time()),
            )
            out.append((int(cur.lastrowid or 0), name, token))
    return out


def labeller_by_token(conn: sqlite3.Connection, token: str) -> sqlite3.Row | None:
    """The active labeller whose token hashes to ``hash_token(token)``, or None."""
    return conn.execute(
        "SELECT * FROM labellers WHERE token_hash = ? AND revoked = 0", (hash_token(token),)
    ).fetchone()


def revoke(conn: sqlite3.Connection, labeller_id: int) -> None:
    """Disable a labeller's token and end their sessions."""
    with transaction(conn):
        conn.execute("UPDATE labellers SET revoked = 1 WHERE id = ?", (labeller_id,))
        conn.execute("DELETE FROM sessions WHERE labeller_id = ?", (labeller_id,))


def list_labellers(conn: sqlite3.Connection, task_id: int) -> list[sqlite3.Row]:
    """The task's labellers with their answered and skipped counts."""
    return conn.execute(
        "SELECT l.id, l.name, l.revoked, "
        "COALESCE(SUM(v.skipped = 0), 0) AS answered, COALESCE(SUM(v.skipped = 1), 0) AS skipped "
        "FROM labellers l LEFT JOIN votes v ON v.labeller_id = l.id "
        "WHERE l.task_id = ? GROUP BY l.id ORDER BY l.id",
        (task_id,),
    ).fetchall()


# ---------------------------------------------------------------------------------------------
# Sessions


def create_session(
    conn: sqlite3.Connection, role: str, labeller_id: int | None, ttl_s: float
) -> str:
    """Start a session; returns the cookie value (only its hash is stored)."""
    session = new_token()
    with transaction(conn):
        now = time.time()
        conn.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
        conn.execute(
            "INSERT INTO sessions (id_hash, role, labeller_id, expires_at) VALUES (?, ?, ?, ?)",
            (hash_token(session), role, labeller_id, now + ttl_s),
        )
    return session


def get_session(conn: sqlite3.Connection, session: str) -> sqlite3.Row | None:
    """The live session of a cookie value, or None."""
    return conn.execute(
        "SELECT * FROM sessions WHERE id_hash = ? AND expires_at >= ?",
        (hash_token(session), time.time()),
    ).fetchone()


def end_session(conn: sqlite3.Connection, session: str) -> None:
    """Delete a session."""
    with transaction(conn):
        conn.execute("DELETE FROM sessions WHERE id_hash = ?", (hash_token(session),))
