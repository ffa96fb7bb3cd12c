"""The FastAPI app: login, the labelling page, votes (admin pages: :mod:`.admin`).

Routes (admin routes in :mod:`rlhfkit.feedback.admin`):

========================  ====  ==============================================================
path                      who   what
========================  ====  ==============================================================
``GET /``                 any   redirect to the viewer's home, or the login page
``GET /healthz``          any   ``{"ok": true}`` once the database is open
``GET /l/{token}``        any   labeller login from the personal link; sets the session cookie
``GET /label``            lab.  the next item (or the open one again), or "all done"
``POST /label/vote``      lab.  store an answer or a skip (a retried POST is stored once; a second
                                answer to an answered item: 409 and the next item, with a notice)
``GET /label/votes``      lab.  the labeller's own answers
``GET|POST /admin/login`` any   admin login with the admin token
``POST /logout``          any   end the session
========================  ====  ==============================================================

Every form carries a CSRF token (:mod:`rlhfkit.feedback.auth`); the session cookie is
HttpOnly and SameSite=Lax and holds a random session id whose hash is stored, never a token.
"""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlhfkit.feedback import admin
from rlhfkit.feedback.auth import token_matches
from rlhfkit.feedback.middleware import (
    ADDRESS_BURST,
    ADDRESS_RATE_PER_SECOND,
    RATE_BURST,
    RATE_PER_SECOND,
    SESSION_COOKIE,
    AccessLog,
    BodyLimit,
    RateLimit,
    SecurityHeaders,
)
from rlhfkit.feedback.render import STATIC, messages_of, render
from rlhfkit.feedback.storage import (
    connect,
    create_session,
    end_session,
    get_setting,
    get_task,
    init_db,
    labeller_by_token,
)
from rlhfkit.feedback.voting import (
    RATING_SCALE,
    AlreadyLabelled,
    VoteError,
    likert_scale,
    new_form_id,
    next_presentation,
    progress,
    record_vote,
)
from rlhfkit.feedback.web import (
    Settings,
    Viewer,
    check_csrf,
    database,
    page,
    read_form,
    redirect,
    require_labeller,
    set_cookie,
    settings,
    viewer,
)

LIKERT_LABELS = {
    5: ["Left much better", "Left better", "Tie", "Right better", "Right much better"],
    8: [
        "Left far better",
        "Left better",
        "Left slightly better",
        "Left marginally better",
        "Right marginally better",
        "Right slightly better",
        "Right better",
        "Right far better",
    ],
}
"""Button labels of the Likert scales, in display terms (value = position + 1)."""


def create_app(
    db_path: str | Path,
    *,
    admin_token_hash: str,
    max_body_bytes: int = 64 * 1024,
    max_upload_bytes: int = 16 * 1024 * 1024,
    rate_per_second: float = RATE_PER_SECOND,
    rate_burst: int = RATE_BURST,
    address_rate_per_second: float = ADDRESS_RATE_PER_SECOND,
    address_burst: int = ADDRESS_BURST,
    secure_cookies: bool = False,
    rng: random.Random | None = None,
) -> FastAPI:
    """Build the labelling app on a database (created or migrated here).

    Args:
        db_path: The SQLite file.
        admin_token_hash: ``hash_token(admin token)``; the token itself is never kept.
        max_body_bytes: Largest request body (413 above).
        max_upload_bytes: Largest candidate upload (``POST /admin/tasks``).
        rate_per_second: Requests per second per client: per session, or per address without
            one (token bucket; 0 disables all rate limiting). See
            :class:`~rlhfkit.feedback.middleware.RateLimit` for how the defaults were chosen.
        rate_burst: Size of a client's bucket.
        address_rate_per_second: Requests per second from one address, all clients together
            (labellers behind one NAT share it; 0: no per-address limit).
        address_burst: Size of an address's bucket.
        secure_cookies: Mark cookies Secure (serve behind HTTPS).
        rng: Source of the left/right orders (tests pass a seeded one).

    Returns:
        The ASGI app.
    """
    init_db(db_path)
    conn = connect(db_path)
    try:
        secret = get_setting(conn, "secret")
    finally:
        conn.close()
    app = FastAPI(title="rlhfkit labelling", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = Settings(str(db_path), admin_token_hash, secret, secure_cookies)
    app.state.rng = rng or random.SystemRandom()
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.include_router(admin.router)
    _routes(app)
    app.add_exception_handler(StarletteHTTPException, _error_page)
    app.add_middleware(
        BodyLimit,
        max_bytes=max_body_bytes,
        upload_bytes=max_upload_bytes,
        upload_paths=(admin.UPLOAD_PATH,),
    )
    app.add_middleware(
        RateLimit,
        rate=rate_per_second,
        burst=rate_burst,
        address_rate=address_rate_per_second,
        address_burst=address_burst,
    )
    app.add_middleware(SecurityHeaders)
    app.add_middleware(AccessLog)
    return app


async def _error_page(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    html = render("error.html", status=exc.status_code, detail=exc.detail, role=None, csrf="")
    return HTMLResponse(html, status_code=exc.status_code, headers=exc.headers)


def _home(request: Request) -> Response:
    with database(request) as conn:
        who = viewer(request, conn)
    if who.role == "labeller":
        return redirect("/label")
    if who.role == "admin":
        return redirect("/admin")
    return page(request, who, "login.html", title="Log in")


def _labeller_login(request: Request, token: str) -> Response:
    with database(request) as conn:
        row = labeller_by_token(conn, token)
        if row is None:
            raise HTTPException(403, "this link is not valid (mistyped, or revoked)")
        ttl = settings(request).labeller_session_s
        session = create_session(conn, "labeller", row["id"], ttl)
    response = redirect("/label")
    set_cookie(request, response, SESSION_COOKIE, session, int(ttl))
    return response


def _label_page(request: Request) -> Response:
    with database(request) as conn:
        who = viewer(request, conn)
        return _next_item(request, conn, who)


def _next_item(
    request: Request,
    conn: sqlite3.Connection,
    who: Viewer,
    *,
    notice: str = "",
    status: int = 200,
) -> Response:
    """The labeller's open (or next) item, or "all done"; ``notice`` is shown above it."""
    labeller = require_labeller(who)
    task = get_task(conn, labeller["task_id"])
    assert task is not None  # labellers reference their task
    shown = next_presentation(conn, labeller["id"], task, request.app.state.rng)
    done = progress(conn, labeller["id"], task)
    context: dict[str, Any] = {
        "task": task,
        "progress": done,
        "name": labeller["name"],
        "notice": notice,
    }
    if shown is None:
        return page(request, who, "done.html", status, title="All done", **context)
    prompt, completions = messages_of(shown.item.prompt, shown.item.completions)
    context |= {
        "nonce": shown.nonce,
        "form_id": new_form_id(),
        "prompt": prompt,
        "shown": [completions[index] for index in shown.order],
        "first": done.answered + done.skipped == 0,
    }
    if task.mode.startswith("likert"):
        context["likert"] = LIKERT_LABELS[likert_scale(task.mode)]
    context["ratings"] = list(range(1, RATING_SCALE + 1))
    return page(request, who, "label.html", status, title=task.name, **context)


def _vote(request: Request, form: dict[str, Any]) -> Response:
    """Store the answer and go on to the next item (303).

    A second answer to an item this labeller already answered (another tab, or a different
    answer after the first) is not stored: the reply is 409 with the next item and a notice
    saying so, so the labeller sees it and carries on.
    """
    with database(request) as conn:
        who = viewer(request, conn)
        check_csrf(request, who, form)
        labeller = require_labeller(who)
        task = get_task(conn, labeller["task_id"])
        assert task is not None
        try:
            record_vote(conn, labeller["id"], task.mode, form)
        except AlreadyLabelled as err:
            return _next_item(request, conn, who, notice=str(err), status=err.status)
        except VoteError as err:
            raise HTTPException(err.status, str(err)) from None
    return redirect("/label")


def _own_votes(request: Request) -> Response:
    with database(request) as conn:
        who = viewer(request, conn)
        labeller = require_labeller(who)
        rows = conn.execute(
            "SELECT v.skipped, v.display_value, v.note, v.answered_at, i.prompt "
            "FROM votes v JOIN items i ON i.id = v.item_id WHERE v.labeller_id = ? "
            "ORDER BY v.id DESC",
            (labeller["id"],),
        ).fetchall()
    votes = [
        {
            "prompt": messages_of(json.loads(row["prompt"]), [])[0][-1]["content"],
            "answer": "skipped" if row["skipped"] else row["display_value"],
            "note": row["note"],
        }
        for row in rows
    ]
    return page(request, who, "votes.html", title="Your answers", votes=votes)


def _admin_login(request: Request, form: dict[str, Any]) -> Response:
    with database(request) as conn:
        who = viewer(request, conn)
        check_csrf(request, who, form)
        token = form.get("token")
        if not isinstance(token, str) or not token_matches(
            token.strip(), settings(request).admin_token_hash
        ):
            raise HTTPException(403, "wrong admin token")
        ttl = settings(request).admin_session_s
        session = create_session(conn, "admin", None, ttl)
    response = redirect("/admin")
    set_cookie(request, response, SESSION_COOKIE, session, int(ttl))
    return response


def _logout(request: Request, form: dict[str, Any]) -> Response:
    with database(request) as conn:
        who = viewer(request, conn)
        check_csrf(request, who, form)
        if who.role is not None:
            end_session(conn, who.binding)
    response = redirect("/")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def _routes(app: FastAPI) -> None:
    app.get("/", include_in_schema=False)(_home)
    app.get("/l/{token}", include_in_schema=False)(_labeller_login)
    app.get("/label")(_label_page)
    app.get("/label/votes")(_own_votes)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"ok": True})

    @app.get("/admin/login")
    def admin_login_page(request: Request) -> Response:
        with database(request) as conn:
            who = viewer(request, conn)
        return page(request, who, "admin_login.html", title="Admin login")

    @app.post("/label/vote")
    async def vote(request: Request) -> Response:
        return await run_in_threadpool(_vote, request, await read_form(request))

    @app.post("/admin/login")
    async def admin_login(request: Request) -> Response:
        return await run_in_threadpool(_admin_login, request, await read_form(request))

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        return await run_in_threadpool(_logout, request, await read_form(request))
