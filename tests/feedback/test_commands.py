"""The command entry points: ``label task``, ``label export`` and the configs' CLI flags."""

from __future__ import annotations

import json

import pytest
from feedback_helpers import candidate_rows, jsonl

from rlhfkit.config import parse_cli
from rlhfkit.feedback.serve import (
    LabelExportConfig,
    LabelServeConfig,
    LabelTaskConfig,
    export_main,
    task_main,
)
from rlhfkit.feedback.storage import connect, get_task, labeller_by_token
from rlhfkit.feedback.voting import next_presentation, record_vote


def test_cli_flags_parse():
    cfg = parse_cli(
        LabelServeConfig,
        ["--db", "x.sqlite", "--port", "9000", "--admin-token-env", "MY_TOKEN"],
        prog="rlhfkit label serve",
        description="",
    )
    assert (cfg.db, cfg.port, cfg.admin_token_env, cfg.host) == (
        "x.sqlite",
        9000,
        "MY_TOKEN",
        "127.0.0.1",
    )
    export = parse_cli(
        LabelExportConfig,
        ["--task", "3", "--format", "ratings", "--ties", "keep", "--stats-output", "s.json"],
        prog="rlhfkit label export",
        description="",
    )
    assert (export.task, export.format, export.ties, export.stats_output) == (
        3,
        "ratings",
        "keep",
        "s.json",
    )


def test_task_then_export(tmp_path, capsys):
    db = tmp_path / "labels.sqlite"
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text(jsonl(candidate_rows(2)))
    guidelines = tmp_path / "guide.md"
    guidelines.write_text("# Rules")
    task_main(
        LabelTaskConfig(
            db=str(db),
            input=str(candidates),
            overlap=1,
            guidelines=str(guidelines),
            invite=["ann", "bob"],
            base_url="http://example.test:8000/",
        )
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "task 1: 2 items, mode likert5, overlap 1"
    links = dict(line.split(": ", 1) for line in lines[1:])
    assert set(links) == {"ann", "bob"}
    assert all(link.startswith("http://example.test:8000/l/") for link in links.values())
    with connect(db) as conn:
        task = get_task(conn, 1)
        assert task.name == "candidates" and task.guidelines == "# Rules"
        ann = labeller_by_token(conn, links["ann"].rsplit("/", 1)[1])
        while (shown := next_presentation(conn, ann["id"], task)) is not None:
            record_vote(conn, ann["id"], "likert5", {"nonce": shown.nonce, "choice": "3"})
    out, stats = tmp_path / "out" / "pairs.jsonl", tmp_path / "stats.json"
    export_main(LabelExportConfig(db=str(db), task=1, output=str(out), stats_output=str(stats)))
    assert out.read_text() == ""  # both votes were ties, dropped
    export_main(LabelExportConfig(db=str(db), task=1, output=str(out), ties="keep"))
    assert len(out.read_text().splitlines()) == 2
    summary = json.loads(stats.read_text())
    assert summary["labels"] == 2 and summary["labellers"][0]["labeller"] == "ann"
    task_main(LabelTaskConfig(db=str(db), task=1, invite=["cy"]))
    assert capsys.readouterr().out.startswith("cy: http://127.0.0.1:8000/l/")


def test_export_errors(tmp_path):
    with pytest.raises(SystemExit, match="no such database"):
        export_main(LabelExportConfig(db=str(tmp_path / "missing.sqlite")))
    with pytest.raises(SystemExit, match="--input"):
        task_main(LabelTaskConfig(db=str(tmp_path / "x.sqlite")))
