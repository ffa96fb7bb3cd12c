"""Commands of the labelling app: ``label serve``, ``label export``, ``label task``.

- ``rlhfkit label serve --db labels.sqlite [--host 127.0.0.1 --port 8000]``: run the web app
  with uvicorn. The admin token comes from the environment variable named by
  ``--admin-token-env``; when it is unset a token is generated and printed once on stdout
  (never logged). uvicorn's access log is off; the app logs requests without secrets.
- ``rlhfkit label export --db labels.sqlite --task 1 --output pairs.jsonl [--format pairs]``:
  write the labels in a training format and, with ``--stats-output``, the agreement and
  per-labeller statistics as JSON.
- ``rlhfkit label task --db labels.sqlite --input candidates.jsonl --name NAME --invite a b``:
  create a task from the command line and print each labeller's link (or, with ``--task ID``,
  invite more labellers to an existing task).

``label serve`` needs the ``app`` extra (``pip install 'rlhfkit[app]'``: FastAPI, uvicorn, ...);
``label export`` and ``label task`` need no extra.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhfkit.atomic import atomic_write_text
from rlhfkit.extras import import_optional, require_extra
from rlhfkit.feedback.auth import hash_token, new_token

log = logging.getLogger(__name__)

_APP = "the labelling web app (rlhfkit label serve)"


@dataclass
class LabelServeConfig:
    """Serve the labelling web app."""

    db: str = "labels.sqlite"
    """SQLite database file (created and migrated on start)."""
    host: str = "127.0.0.1"
    """Address to listen on; serve beyond loopback only behind HTTPS (see secure_cookies)."""
    port: int = 8000
    """TCP port."""
    admin_token_env: str = "RLHFKIT_ADMIN_TOKEN"
    """Environment variable holding the admin token; unset: generate one and print it once."""
    max_body_bytes: int = 64 * 1024
    """Largest request body in bytes (413 above)."""
    max_upload_bytes: int = 16 * 1024 * 1024
    """Largest candidate upload in bytes."""
    rate_per_second: float = 20.0
    """Requests per second per client (a labeller's session, or an address without one), on
    average; 0 disables rate limiting. A fast labeller makes at most about 10."""
    rate_burst: int = 200
    """Requests a client may make in a burst."""
    address_rate_per_second: float = 300.0
    """Requests per second from one address, all clients together (labellers behind one NAT
    share it: 20 labellers at their fastest make about 200); 0: no per-address limit."""
    address_burst: int = 3000
    """Requests one address may make in a burst."""
    secure_cookies: bool = False
    """Mark cookies Secure (when served behind HTTPS)."""


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(cfg: LabelServeConfig) -> None:
    """Run the app with uvicorn until interrupted.

    Raises:
        MissingExtraError: When the ``app`` extra (FastAPI, uvicorn, ...) is not installed.
    """
    require_extra("app", _APP)
    uvicorn = import_optional("uvicorn", "app", _APP)

    from rlhfkit.feedback.app import create_app  # the web modules import FastAPI at their top

    token = os.environ.get(cfg.admin_token_env, "").strip()
    if not token:
        token = new_token()
        # Printed once for the person starting the server; deliberately not a log record.
        print(
            f"admin token (shown once; set {cfg.admin_token_env} to choose it): {token}",
            file=sys.stdout,
            flush=True,
        )
    if not _loopback(cfg.host) and not cfg.secure_cookies:
        log.warning("serving on %s without secure_cookies: put it behind HTTPS", cfg.host)
    app = create_app(
        cfg.db,
        admin_token_hash=hash_token(token),
        max_body_bytes=cfg.max_body_bytes,
        max_upload_bytes=cfg.max_upload_bytes,
        rate_per_second=cfg.rate_per_second,
        rate_burst=cfg.rate_burst,
        address_rate_per_second=cfg.address_rate_per_second,
        address_burst=cfg.address_burst,
        secure_cookies=cfg.secure_cookies,
    )
    del token
    uvicorn.run(app, host=cfg.host, port=cfg.port, access_log=False, log_level="info")


@dataclass
class LabelExportConfig:
    """Export a task's labels for the reward-model and DPO recipes."""

    db: str = "labels.sqlite"
    """SQLite database file of the app."""
    task: int = 1
    """Task id (shown on the admin pages)."""
    output: str = "labels.jsonl"
    """Output JSONL file."""
    format: Literal["pairs", "likert", "ratings", "rankings"] = "pairs"
    """Row format: pairs (preference schema) or likert for Likert tasks, ratings for rating
    tasks, rankings for ranking tasks."""
    ties: Literal["drop", "keep"] = "drop"
    """Likert ties in pairs: drop them (BT/DPO) or keep them with margin 0 and tie: true."""
    margin: bool = True
    """Write the Likert strength |s - midpoint| as the pair's margin."""
    aggregate: Literal["votes", "item"] = "votes"
    """One row per vote, or one per item (majority side / mean rating / mean rank)."""
    stats_output: str = ""
    """Also write agreement and per-labeller statistics to this JSON file ('' : don't)."""


def export_main(cfg: LabelExportConfig) -> None:
    """Write the export (and the statistics) atomically."""
    from rlhfkit.feedback.export import export_rows, task_stats
    from rlhfkit.feedback.storage import connect

    if not Path(cfg.db).is_file():
        raise SystemExit(f"{cfg.db}: no such database (start with `rlhfkit label serve`)")
    conn = connect(cfg.db)
    try:
        rows = export_rows(
            conn,
            cfg.task,
            format=cfg.format,
            ties=cfg.ties,
            margin=cfg.margin,
            aggregate=cfg.aggregate,
        )
        stats = task_stats(conn, cfg.task) if cfg.stats_output else None
    finally:
        conn.close()
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    log.info("wrote %d %s rows of task %d to %s", len(rows), cfg.format, cfg.task, cfg.output)
    if stats is not None:
        atomic_write_text(cfg.stats_output, json.dumps(stats, indent=2) + "\n")
        log.info("wrote statistics to %s", cfg.stats_output)


@dataclass
class LabelTaskConfig:
    """Create a labelling task and/or invite labellers from the command line."""

    db: str = "labels.sqlite"
    """SQLite database file of the app (created if missing)."""
    task: int = 0
    """Existing task to invite labellers to; 0: create a new task from input."""
    input: str = ""
    """Candidates JSONL (prompt or messages, and completions / a, b / chosen, rejected)."""
    name: str = ""
    """Name of the new task (default: the input file's name)."""
    mode: Literal["likert5", "likert8", "rating", "ranking"] = "likert5"
    """Labelling mode of the new task."""
    overlap: int = 1
    """Labels wanted per item."""
    guidelines: str = ""
    """Markdown file with the guidelines shown to labellers."""
    invite: list[str] = field(default_factory=list)
    """Names of labellers to invite; each gets a personal link, printed once."""
    base_url: str = "http://127.0.0.1:8000"
    """Where the app is served, for the printed links."""


def task_main(cfg: LabelTaskConfig) -> None:
    """Create the task (unless ``task`` is set), invite labellers, print their links."""
    from rlhfkit.feedback.importer import parse_candidates
    from rlhfkit.feedback.storage import connect, create_task, init_db, invite

    init_db(cfg.db)
    conn = connect(cfg.db)
    try:
        task_id = cfg.task
        if not task_id:
            if not cfg.input:
                raise SystemExit("give --input candidates.jsonl (or --task ID to invite)")
            path = Path(cfg.input)
            items = parse_candidates(path.read_text(encoding="utf-8"), cfg.mode, name=str(path))
            guidelines = Path(cfg.guidelines).read_text(encoding="utf-8") if cfg.guidelines else ""
            task_id = create_task(
                conn,
                name=cfg.name or path.stem,
                mode=cfg.mode,
                overlap=cfg.overlap,
                guidelines=guidelines,
                items=items,
            )
            print(f"task {task_id}: {len(items)} items, mode {cfg.mode}, overlap {cfg.overlap}")
        for _, name, token in invite(conn, task_id, cfg.invite):
            print(f"{name}: {cfg.base_url.rstrip('/')}/l/{token}")
    finally:
        conn.close()
