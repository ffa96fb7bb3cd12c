"""Storage, assignment, answer decoding and candidate import (no HTTP)."""

from __future__ import annotations

import json
import random
import sqlite3

import pytest
from feedback_helpers import candidate_rows, jsonl

from rlhfkit.data.sources import DataError
from rlhfkit.feedback import storage
from rlhfkit.feedback.importer import parse_candidates
from rlhfkit.feedback.storage import (
    VERSION,
    StorageError,
    connect,
    create_task,
    get_task,
    init_db,
    invite,
    schema_version,
)
from rlhfkit.feedback.voting import (
    AlreadyLabelled,
    VoteError,
    next_presentation,
    parse_answer,
    progress,
    record_vote,
    task_votes,
)


@pytest.fixture
def conn(tmp_path):
    init_db(tmp_path / "db.sqlite")
    connection = connect(tmp_path / "db.sqlite")
    yield connection
    connection.close()


def make_task(conn, n=4, mode="likert5", overlap=1, k=2):
    items = parse_candidates(jsonl(candidate_rows(n, k)), mode)
    return create_task(conn, name="t", mode=mode, overlap=overlap, guidelines="", items=items)


def test_schema_versioned_wal_and_idempotent_init(tmp_path, conn):
    assert schema_version(conn) == VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    secret = storage.get_setting(conn, "secret")
    init_db(tmp_path / "db.sqlite")  # re-running keeps data and the secret
    assert storage.get_setting(conn, "secret") == secret
    assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1


def test_newer_schema_is_refused(tmp_path, conn):
    conn.execute("UPDATE schema_version SET version = ?", (VERSION + 1,))
    with pytest.raises(StorageError, match="newer than this rlhfkit"):
        init_db(tmp_path / "db.sqlite")


def test_migration_runs_from_an_empty_file(tmp_path, monkeypatch):
    # A further migration is applied on top of the current version and recorded.
    monkeypatch.setattr(storage, "MIGRATIONS", [*storage.MIGRATIONS, "ALTER TABLE tasks ADD x INT"])
    monkeypatch.setattr(storage, "VERSION", VERSION + 1)
    init_db(tmp_path / "m.sqlite")
    c = connect(tmp_path / "m.sqlite")
    assert schema_version(c) == VERSION + 1
    assert "x" in [row[1] for row in c.execute("PRAGMA table_info(tasks)")]
    c.close()


def test_transaction_rolls_back(conn):
    with pytest.raises(RuntimeError), storage.transaction(conn):
        conn.execute("INSERT INTO settings (key, value) VALUES ('k', 'v')")
        raise RuntimeError
    assert conn.execute("SELECT COUNT(*) FROM settings WHERE key = 'k'").fetchone()[0] == 0


def test_tokens_stored_only_as_hashes(tmp_path, conn):
    task = make_task(conn)
    ((_, _, token),) = invite(conn, task, ["ann"])
    session = storage.create_session(conn, "labeller", 1, 60)
    conn.execute("PRAGMA wal_checkpoint(FULL)")
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("db.sqlite"))
    assert token.encode() not in raw and session.encode() not in raw
    assert storage.labeller_by_token(conn, token)["name"] == "ann"
    assert storage.labeller_by_token(conn, token + "x") is None
    assert storage.get_session(conn, session)["labeller_id"] == 1


def test_canonical_answers():
    # Likert: display 1 = left much better. Completion 1 on the left -> canonical 5 (B much better).
    assert parse_answer("likert5", {"choice": "1"}, [1, 0]) == (5, 1)
    assert parse_answer("likert5", {"choice": "2"}, [0, 1]) == (2, 2)
    assert parse_answer("likert5", {"choice": "3"}, [1, 0]) == (3, 3)
    assert parse_answer("likert8", {"choice": "7"}, [1, 0]) == (2, 7)
    # Rating: shown order [2, 0, 1]; position ratings 5, 1, 3 -> per completion [1, 3, 5].
    form = {"rating_0": "5", "rating_1": "1", "rating_2": "3"}
    assert parse_answer("rating", form, [2, 0, 1]) == ([1, 3, 5], [5, 1, 3])
    # Ranking: positions ranked 2, 3, 1 under order [2, 0, 1] -> best first: pos 2, 0, 1 ->
    # completions 1, 2, 0.
    form = {"rank_0": "2", "rank_1": "3", "rank_2": "1"}
    assert parse_answer("ranking", form, [2, 0, 1]) == ([1, 2, 0], [2, 3, 1])


@pytest.mark.parametrize(
    ("mode", "form", "order", "match"),
    [
        ("likert5", {"choice": "6"}, [0, 1], "1..5"),
        ("likert5", {"choice": "-1"}, [0, 1], "1..5"),
        ("likert8", {}, [0, 1], "choice"),
        ("rating", {"rating_0": "3"}, [0, 1], "rating_1"),
        ("ranking", {"rank_0": "1", "rank_1": "1"}, [0, 1], "each used once"),
        ("ranking", {"rank_0": "1 OR 1=1", "rank_1": "2"}, [0, 1], "rank_0"),
    ],
)
def test_bad_answers(mode, form, order, match):
    with pytest.raises(VoteError, match=match):
        parse_answer(mode, form, order)


def test_assignment_never_repeats_and_respects_overlap(conn):
    task_id = make_task(conn, n=3, overlap=2)
    task = get_task(conn, task_id)
    ids = [row[0] for row in invite(conn, task_id, ["a", "b", "c"])]
    rng = random.Random(0)
    seen: dict[int, list[int]] = {i: [] for i in ids}
    for labeller in ids[:2]:
        while (shown := next_presentation(conn, labeller, task, rng)) is not None:
            # The open form is shown again until it is answered.
            assert next_presentation(conn, labeller, task, rng).nonce == shown.nonce
            seen[labeller].append(shown.item.id)
            record_vote(conn, labeller, "likert5", {"nonce": shown.nonce, "choice": "2"})
    assert sorted(seen[ids[0]]) == sorted(seen[ids[1]]) and len(set(seen[ids[0]])) == 3
    assert next_presentation(conn, ids[2], task, rng) is None  # every item has 2 labels
    assert progress(conn, ids[2], task).remaining == 0
    assert progress(conn, ids[0], task) == progress(conn, ids[0], task).__class__(3, 0, 0, 3)


def test_spreading_prefers_items_not_shown_to_others(conn):
    task_id = make_task(conn, n=2, overlap=1)
    task = get_task(conn, task_id)
    a, b = (row[0] for row in invite(conn, task_id, ["a", "b"]))
    first = next_presentation(conn, a, task)
    second = next_presentation(conn, b, task)
    assert first.item.id != second.item.id


def test_vote_idempotent_on_nonce_and_unique_per_item(conn):
    task_id = make_task(conn, n=2)
    task = get_task(conn, task_id)
    a, b = (row[0] for row in invite(conn, task_id, ["a", "b"]))
    shown = next_presentation(conn, a, task, random.Random(1))
    form = {"nonce": shown.nonce, "choice": "1", "note": "  why  "}
    assert record_vote(conn, a, "likert5", form) is True
    assert record_vote(conn, a, "likert5", form) is False  # the retried POST
    with pytest.raises(VoteError) as err:
        record_vote(conn, b, "likert5", form)  # someone else's form
    assert err.value.status == 404
    votes = task_votes(conn, task_id)
    assert len(votes) == 1 and votes[0]["note"] == "why"
    expected = 1 if shown.order == [0, 1] else 5
    assert votes[0]["value"] == expected and votes[0]["display_value"] == 1
    # A second form for the same item (e.g. a forged nonce row) cannot add a second vote.
    conn.execute(
        "INSERT INTO presentations VALUES ('other', ?, ?, '[0, 1]', 0)", (a, shown.item.id)
    )
    with pytest.raises(VoteError) as err:
        record_vote(conn, a, "likert5", {"nonce": "other", "choice": "2"})
    assert err.value.status == 409
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(
            "INSERT INTO votes (nonce, item_id, labeller_id, skipped, display_order, shown_at, "
            "answered_at) VALUES ('x', ?, ?, 0, '[]', 0, 0)",
            (shown.item.id, a),
        )


def test_second_answer_to_an_answered_item_is_refused(conn):
    task_id = make_task(conn, n=2)
    task = get_task(conn, task_id)
    ((a, _, _),) = invite(conn, task_id, ["a"])
    shown = next_presentation(conn, a, task, random.Random(1))
    # Two tabs show the same open form (same nonce), each its own copy (form_id).
    tab1 = {"nonce": shown.nonce, "form_id": "tab1"}
    tab2 = {"nonce": shown.nonce, "form_id": "tab2"}
    assert record_vote(conn, a, "likert5", tab1 | {"choice": "1", "note": "first"}) is True
    refused = [
        tab2 | {"choice": "4"},  # another answer from the second tab
        tab2 | {"choice": "1", "note": "first"},  # even the same answer from another copy
        tab1 | {"choice": "2", "note": "first"},  # another answer from the same copy
        tab1 | {"choice": "1", "note": "changed"},  # another note
        tab1 | {"choice": "skip", "note": "first"},
        tab1 | {"choice": "9", "note": "first"},  # not even a valid answer: still 409
        {"nonce": shown.nonce, "choice": "5"},  # no form_id: the answer decides
    ]
    for form in refused:
        with pytest.raises(AlreadyLabelled, match="already labelled") as err:
            record_vote(conn, a, "likert5", form)
        assert err.value.status == 409
    # The same copy with the same answer is a retried POST; so is one without a form_id.
    assert record_vote(conn, a, "likert5", tab1 | {"choice": "1", "note": " first "}) is False
    retry = {"nonce": shown.nonce, "choice": "1", "note": "first"}
    assert record_vote(conn, a, "likert5", retry) is False
    (vote,) = task_votes(conn, task_id)
    assert vote["display_value"] == 1 and vote["note"] == "first"  # the first answer is kept
    # A skip is repeated as a skip, whatever else the retry carries.
    second = next_presentation(conn, a, task)
    skip = {"nonce": second.nonce, "form_id": "x", "choice": "skip"}
    assert record_vote(conn, a, "likert5", skip) is True
    assert record_vote(conn, a, "likert5", skip) is False
    with pytest.raises(AlreadyLabelled):
        record_vote(conn, a, "likert5", skip | {"choice": "3"})
    assert [v["skipped"] for v in task_votes(conn, task_id)] == [False, True]


def test_version_1_database_is_migrated_with_its_votes(tmp_path, monkeypatch):
    path = tmp_path / "v1.sqlite"
    with monkeypatch.context() as patch:
        patch.setattr(storage, "VERSION", 1)
        init_db(path)
        conn = connect(path)
        task_id = make_task(conn, n=2)
        task = get_task(conn, task_id)
        ((a, _, _),) = invite(conn, task_id, ["a"])
        shown = next_presentation(conn, a, task)
        conn.execute(  # a vote as version 1 wrote it (no form_id column)
            "INSERT INTO votes (nonce, item_id, labeller_id, skipped, value, display_value, "
            "display_order, note, shown_at, answered_at) "
            "VALUES (?, ?, ?, 0, '2', '2', ?, '', 0, 1)",
            (shown.nonce, shown.item.id, a, json.dumps(shown.order)),
        )
        conn.close()
    init_db(path)
    conn = connect(path)
    assert schema_version(conn) == VERSION == 2
    assert "form_id" in [row[1] for row in conn.execute("PRAGMA table_info(votes)")]
    form = {"nonce": shown.nonce, "form_id": "new-copy"}
    assert record_vote(conn, a, "likert5", form | {"choice": "2"}) is False  # a retry
    with pytest.raises(AlreadyLabelled):
        record_vote(conn, a, "likert5", form | {"choice": "5"})
    assert len(task_votes(conn, task_id)) == 1
    conn.close()


def test_skip_counts_as_seen_but_not_as_label(conn):
    task_id = make_task(conn, n=1, overlap=1)
    task = get_task(conn, task_id)
    a, b = (row[0] for row in invite(conn, task_id, ["a", "b"]))
    shown = next_presentation(conn, a, task)
    record_vote(conn, a, "likert5", {"nonce": shown.nonce, "choice": "skip"})
    assert next_presentation(conn, a, task) is None
    assert next_presentation(conn, b, task).item.id == shown.item.id
    assert progress(conn, a, task).skipped == 1


def test_import_formats_and_errors():
    rows = [
        {"id": 7, "prompt": "p", "a": "x", "b": "y"},
        {"prompt": "p", "chosen": "x", "rejected": "y", "source": "s"},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "more"},
            ],
            "completions": ["x", "y"],
        },
    ]
    items = parse_candidates(jsonl(rows) + "\n\n", "likert5")
    assert [it["source_id"] for it in items] == [7, None, None]
    assert items[1]["meta"] == {"source": "s"} and items[0]["completions"] == ["x", "y"]
    assert len(items[2]["prompt"]) == 3
    bad = [
        ('{"prompt": "p", "completions": ["a", "b", "c"]}', "likert5", "mode likert5 compares"),
        ('{"prompt": "p", "completions": ["a"]}', "ranking", "at least 2"),
        ('{"completions": ["a", "b"]}', "rating", "prompt"),
        ('{"prompt": "p"}', "rating", "no completions"),
        ("not json", "rating", "not valid JSON"),
        ('{"prompt": "p", "completions": ["a", ""]}', "rating", "empty completion"),
        (
            '{"prompt": [{"role": "assistant", "content": "x"}], "a": "1", "b": "2"}',
            "likert5",
            "prompt",
        ),
    ]
    for text, mode, match in bad:
        with pytest.raises(DataError, match=match) as err:
            parse_candidates('{"prompt": "ok", "a": "1", "b": "2"}\n' + text, mode, name="up")
        assert "up:2" in str(err.value)
    with pytest.raises(DataError, match="no candidate rows"):
        parse_candidates("\n", "likert5")
