"""``rlhfkit decontam``: flag training rows that overlap evaluation sets (8-gram rule).

The loop:

1. Load the training rows (``train``, split ``train_split``) and every eval set (``eval``,
   split ``eval_split``) with :func:`rlhfkit.data.sources.load_rows`.
2. Turn each row into one text (:func:`row_text`): the ``fields`` it names, each rendered as
   text (a string as is, chat messages as their contents), joined by newlines. The default,
   ``prompt``, is the prompt's messages; a row with only ``messages`` (SFT rows) uses the
   messages before its last assistant message.
3. Flag a training row for an eval set when it shares a word n-gram (``n``, default 8) with one
   of its texts, or, with ``substring`` set (e.g. 50), contains a substring of that many
   characters of one (:func:`rlhfkit.eval.decontamination.contamination_report`).
4. Print a table of the rates per eval set; write the JSON report (``report``, with the flagged
   row indices and locations) and the clean training rows as JSONL (``output``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from rlhfkit.atomic import atomic_write_text
from rlhfkit.data.sources import load_rows
from rlhfkit.eval.decontamination import contamination_report


@dataclass
class DecontamConfig:
    """rlhfkit decontam: n-gram / substring overlap of training rows with evaluation sets."""

    train: str = ""
    """Training data: a .jsonl/.json/.parquet/.csv file, builtin:NAME or a hub dataset."""
    eval: tuple[str, ...] = ()
    """Evaluation sets to check against (same kinds of sources)."""
    train_split: str = "train"
    """Split of a hub or built-in training source."""
    eval_split: str = "heldout"
    """Split of hub or built-in eval sources (hub test sets are usually 'test')."""
    fields: tuple[str, ...] = ("prompt",)
    """Row fields whose text is compared (prompt: the prompt messages, or the messages before
    the last assistant message of SFT rows); the same fields on both sides."""
    n: int = 8
    """Word n-gram length: a row sharing one n-gram with an eval text is contaminated."""
    substring: int | None = None
    """Also flag rows containing a substring of this many characters of an eval text (50)."""
    output: str | None = None
    """Write the training rows that are NOT contaminated here, as JSONL."""
    report: str | None = None
    """Write the JSON report (rates, flagged row indices and locations) here."""


def _text(value: Any) -> str:
    """A field value as text: strings as is, messages as their contents, lists joined."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _text(value.get("content")) if "content" in value else json.dumps(value)
    if isinstance(value, list | tuple):
        return "\n".join(t for t in (_text(v) for v in value) if t)
    return str(value)


def _prompt_messages(data: dict[str, Any]) -> Any:
    """The ``prompt`` field, or the messages before the last assistant message."""
    if data.get("prompt") is not None or not isinstance(data.get("messages"), list):
        return data.get("prompt")
    messages = data["messages"]
    last = max(
        (i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
        default=len(messages),
    )
    return messages[:last]


def row_text(data: dict[str, Any], fields: Sequence[str] = ("prompt",)) -> str:
    """The text of a row that decontamination compares: its fields' texts joined by newlines.

    ``prompt`` falls back to the messages before the last assistant message when the row has
    no ``prompt`` field; a missing field contributes nothing.
    """
    parts = [_text(_prompt_messages(data) if f == "prompt" else data.get(f)) for f in fields]
    return "\n".join(p for p in parts if p)


def _print_table(report: dict[str, Any]) -> None:
    """Rates per eval set and overall."""
    rule = f"{report['n']}-gram" + (
        f" or {report['substring']}-char substring" if report["substring"] else ""
    )
    table = Table(title=f"decontamination: {report['train_rows']} training rows, {rule}")
    for column in ("eval set", "eval rows", "too short", "flagged", "rate"):
        table.add_column(column, justify="left" if column == "eval set" else "right")
    for name, s in report["sets"].items():
        table.add_row(
            name, str(s["eval_rows"]), str(s["eval_too_short"]), str(s["count"]), f"{s['rate']:.2%}"
        )
    both = report["any"]
    table.add_row("[bold]any", "", "", str(both["count"]), f"{both['rate']:.2%}")
    Console().print(table)


def main(cfg: DecontamConfig) -> dict[str, Any]:
    """Steps 1-4; returns the report."""
    if not cfg.train or not cfg.eval:
        raise ValueError("set the training data (--train FILE) and at least one eval set (--eval)")
    if not cfg.fields:
        raise ValueError("fields must name at least one row field (default: prompt)")
    train = load_rows(cfg.train, split=cfg.train_split)
    train_texts = [row_text(row.data, cfg.fields) for row in train]
    eval_sets = {
        source: [row_text(row.data, cfg.fields) for row in load_rows(source, split=cfg.eval_split)]
        for source in cfg.eval
    }
    report = contamination_report(train_texts, eval_sets, cfg.n, substring=cfg.substring)
    report = {"train": cfg.train, "fields": list(cfg.fields), **report}
    for entry in (*report["sets"].values(), report["any"]):
        entry["locations"] = [train[i].location for i in entry["flagged"]]
    _print_table(report)
    if cfg.report:
        atomic_write_text(cfg.report, json.dumps(report, indent=2) + "\n")
    if cfg.output:
        dirty = set(report["any"]["flagged"])
        lines = [json.dumps(row.data) for i, row in enumerate(train) if i not in dirty]
        atomic_write_text(cfg.output, "".join(line + "\n" for line in lines))
        Console().print(f"kept {len(lines)} of {len(train)} training rows -> {cfg.output}")
    return report
