"""Admin routes: tasks, candidate upload, invitations, statistics, export.

=====================================  ====  ====================================================
path                                   verb  what
=====================================  ====  ====================================================
``/admin``                             GET   tasks with their coverage
``/admin/tasks/new``                   GET   the new-task form
``/admin/tasks``                       POST  create a task from an uploaded candidates JSONL
``/admin/tasks/{id}``                  GET   coverage, agreement, labellers, invite, export
``/admin/tasks/{id}/invite``           POST  one personal link per name (shown once)
``/admin/labellers/{id}/revoke``       POST  disable a labeller's link and sessions
``/admin/tasks/{id}/export``           GET   JSONL: ``format``, ``ties``, ``aggregate``, ``margin``
``/admin/tasks/{id}/stats``            GET   the statistics as JSON
=====================================  ====  ====================================================

Every route checks the admin session first: a labeller's session gets 403.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from rlhfkit.data.sources import DataError
from rlhfkit.feedback.export import FORMATS, export_rows, task_stats
from rlhfkit.feedback.importer import parse_candidates
from rlhfkit.feedback.storage import MODES, create_task, get_task, invite, list_tasks, revoke
from rlhfkit.feedback.web import check_csrf, database, page, read_form, redirect, require_admin
from rlhfkit.feedback.web import viewer as get_viewer

router = APIRouter()

UPLOAD_PATH = "/admin/tasks"
"""The one path that accepts large bodies (the candidate upload)."""

MAX_INVITES = 200
"""Most labellers invited by one form."""


def _index(request: Request) -> Response:
    with database(request) as conn:
        who = get_viewer(request, conn)
        require_admin(request, who)
        tasks = [(task, task_stats(conn, task.id)) for task in list_tasks(conn)]
    return page(request, who, "admin_index.html", title="Tasks", tasks=tasks)


def _new(request: Request) -> Response:
    with database(request) as conn:
        who = get_viewer(request, conn)
        require_admin(request, who)
    return page(request, who, "admin_new.html", title="New task", modes=MODES)


def _int(form: dict[str, Any], key: str, default: int) -> int:
    raw = form.get(key) or str(default)
    if not isinstance(raw, str) or not raw.strip().isdigit():
        raise HTTPException(400, f"field '{key}': expected a whole number")
    return int(raw)


def _create(request: Request, form: dict[str, Any], upload: bytes) -> Response:
    with database(request) as conn:
        who = get_viewer(request, conn)
        check_csrf(request, who, form)
        require_admin(request, who)
        mode, name = form.get("mode", ""), str(form.get("name", "")).strip()
        if mode not in MODES:
            raise HTTPException(400, f"field 'mode': expected one of {', '.join(MODES)}")
        if not name:
            raise HTTPException(400, "field 'name': give the task a name")
        try:
            items = parse_candidates(upload.decode("utf-8"), mode, name="candidates.jsonl")
        except UnicodeDecodeError:
            raise HTTPException(400, "the candidates file is not UTF-8 text") from None
        except DataError as err:
            raise HTTPException(400, str(err)) from None
        task_id = create_task(
            conn,
            name=name,
            mode=mode,
            overlap=max(1, _int(form, "overlap", 1)),
            guidelines=str(form.get("guidelines", "")),
            items=items,
        )
    return redirect(f"/admin/tasks/{task_id}")


def _task(request: Request, task_id: int) -> Response:
    with database(request) as conn:
        who = get_viewer(request, conn)
        require_admin(request, who)
        task = get_task(conn, task_id)
        if task is None:
            raise HTTPException(404, f"no task {task_id}")
        stats = task_stats(conn, task_id)
    formats = [name for name, modes in FORMATS.items() if task.mode in modes]
    return page(
        request, who, "admin_task.html", title=task.name, task=task, stats=stats, formats=formats
    )


def _invite(request: Request, task_id: int, form: dict[str, Any]) -> Response:
    with database(request) as conn:
        who = get_viewer(request, conn)
        check_csrf(request, who, form)
        require_admin(request, who)
        if get_task(conn, task_id) is None:
            raise HTTPException(404, f"no task {task_id}")
        names = [n.strip() for n in str(form.get("names", "")).splitlines() if n.strip()]
        if not names or len(names) > MAX_INVITES:
            raise HTTPException(400, f"field 'names': give 1 to {MAX_INVITES} names, one a line")
        created = invite(conn, task_id, [name[:100] for name in names])
    base = str(request.base_url).rstrip("/")
    links = [(name, f"{base}/l/{token}") for _, name, token in created]
    return page(
        request, who, "admin_invited.html", title="Invitations", links=links, task_id=task_id
    )


def _revoke(request: Request, labeller_id: int, form: dict[str, Any]) -> Response:
    with database(request) as conn:
        who = get_viewer(request, conn)
        check_csrf(request, who, form)
        require_admin(request, who)
        row = conn.execute("SELECT task_id FROM labellers WHERE id = ?", (labeller_id,)).fetchone()
        if row is None:
            raise HTTPException(404, f"no labeller {labeller_id}")
        revoke(conn, labeller_id)
    return redirect(f"/admin/tasks/{row['task_id']}")


def _export(request: Request, task_id: int) -> Response:
    query = request.query_params
    with database(request) as conn:
        require_admin(request, get_viewer(request, conn))
        if get_task(conn, task_id) is None:
            raise HTTPException(404, f"no task {task_id}")
        ties, aggregate = query.get("ties", "drop"), query.get("aggregate", "votes")
        if ties not in ("drop", "keep") or aggregate not in ("votes", "item"):
            raise HTTPException(400, "ties: drop|keep; aggregate: votes|item")
        try:
            rows = export_rows(
                conn,
                task_id,
                format=query.get("format", "pairs"),
                ties=ties,  # type: ignore[arg-type]
                margin=query.get("margin", "1") not in ("0", "false", "no"),
                aggregate=aggregate,  # type: ignore[arg-type]
            )
        except ValueError as err:
            raise HTTPException(400, str(err)) from None
    body = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    filename = f"task{task_id}-{query.get('format', 'pairs')}.jsonl"
    return Response(
        body,
        media_type="application/x-ndjson",
        headers={"content-disposition": f'attachment; filename="{filename}"'},
    )


def _stats(request: Request, task_id: int) -> Response:
    with database(request) as conn:
        require_admin(request, get_viewer(request, conn))
        if get_task(conn, task_id) is None:
            raise HTTPException(404, f"no task {task_id}")
        return JSONResponse(task_stats(conn, task_id))


router.get("/admin")(_index)
router.get("/admin/tasks/new")(_new)
router.get("/admin/tasks/{task_id}")(_task)
router.get("/admin/tasks/{task_id}/export")(_export)
router.get("/admin/tasks/{task_id}/stats")(_stats)


@router.post(UPLOAD_PATH)
async def create(request: Request) -> Response:
    """Create a task from the uploaded candidates."""
    form = await read_form(request)
    upload = form.get("file")
    data = await upload.read() if isinstance(upload, UploadFile) else str(upload or "").encode()
    return await run_in_threadpool(_create, request, form, data)


@router.post("/admin/tasks/{task_id}/invite")
async def invite_labellers(request: Request, task_id: int) -> Response:
    """Invite labellers; shows their links once."""
    return await run_in_threadpool(_invite, request, task_id, await read_form(request))


@router.post("/admin/labellers/{labeller_id}/revoke")
async def revoke_labeller(request: Request, labeller_id: int) -> Response:
    """Revoke a labeller."""
    return await run_in_threadpool(_revoke, request, labeller_id, await read_form(request))
