"""Request helpers shared by the labeller and admin routes: database, viewer, CSRF, pages.

Every POST handler reads its form with :func:`read_form` on the event loop, then does all of
its database work in a worker thread (``run_in_threadpool``): SQLite calls block, and the
write lock may be held for a moment by another request. GET handlers are plain functions, which
FastAPI already runs in the thread pool.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.datastructures import UploadFile

from rlhfkit.feedback.auth import csrf_token, csrf_valid, new_token
from rlhfkit.feedback.middleware import SESSION_COOKIE
from rlhfkit.feedback.render import render
from rlhfkit.feedback.storage import connect, get_session

ANON_COOKIE = "rlhf_anon"
"""Cookie that binds the CSRF token of forms shown before login."""


@dataclass(frozen=True)
class Settings:
    """What the routes need to know about the server (``app.state.settings``).

    Attributes:
        db_path: The SQLite file.
        admin_token_hash: SHA-256 of the admin token.
        secret: HMAC key of the CSRF tokens (from the database's settings table).
        secure_cookies: Mark cookies ``Secure`` (behind HTTPS).
        labeller_session_s: Lifetime of a labeller session.
        admin_session_s: Lifetime of an admin session.
    """

    db_path: str
    admin_token_hash: str
    secret: str
    secure_cookies: bool = False
    labeller_session_s: float = 30 * 24 * 3600.0
    admin_session_s: float = 12 * 3600.0


@dataclass(frozen=True)
class Viewer:
    """Who is asking.

    Attributes:
        role: ``"admin"``, ``"labeller"`` or None (not logged in).
        labeller: The labeller's row (for role labeller).
        binding: The cookie value the CSRF token is bound to (session, or anonymous cookie).
        new_anon: The anonymous cookie is new and must be set on the response.
    """

    role: str | None
    labeller: sqlite3.Row | None
    binding: str
    new_anon: bool = False


def settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


@contextmanager
def database(request: Request) -> Iterator[sqlite3.Connection]:
    """A connection for the length of one request."""
    conn = connect(settings(request).db_path)
    try:
        yield conn
    finally:
        conn.close()


def viewer(request: Request, conn: sqlite3.Connection) -> Viewer:
    """Identify the session cookie's owner (or an anonymous visitor)."""
    session = request.cookies.get(SESSION_COOKIE)
    if session:
        row = get_session(conn, session)
        if row is not None:
            labeller = None
            if row["role"] == "labeller":
                labeller = conn.execute(
                    "SELECT * FROM labellers WHERE id = ? AND revoked = 0", (row["labeller_id"],)
                ).fetchone()
                if labeller is None:
                    return Viewer(None, None, session)
            return Viewer(row["role"], labeller, session)
    anon = request.cookies.get(ANON_COOKIE)
    return Viewer(None, None, anon or new_token(), new_anon=not anon)


def require_admin(request: Request, who: Viewer) -> None:
    """403 for labellers; a redirect to the admin login for visitors."""
    if who.role == "admin":
        return
    if who.role == "labeller":
        raise HTTPException(403, "labellers cannot open admin pages")
    if request.method == "GET":
        raise HTTPException(303, "log in first", headers={"Location": "/admin/login"})
    raise HTTPException(403, "log in as admin first")


def require_labeller(who: Viewer) -> sqlite3.Row:
    """The labeller's row, or 401 (open your personal link)."""
    if who.role != "labeller" or who.labeller is None:
        raise HTTPException(401, "open your personal labelling link to log in")
    return who.labeller


async def read_form(request: Request) -> dict[str, Any]:
    """The posted form as a dict (uploaded files stay :class:`UploadFile`)."""
    form = await request.form()
    out: dict[str, Any] = {}
    for key, value in form.multi_items():
        out.setdefault(key, value if isinstance(value, UploadFile) else str(value))
    return out


def check_csrf(request: Request, who: Viewer, form: dict[str, Any]) -> None:
    """403 unless the form's ``csrf`` field is the token of the viewer's cookie."""
    token = form.get("csrf")
    binding = None if who.new_anon else who.binding
    if not csrf_valid(settings(request).secret, binding, token if isinstance(token, str) else None):
        raise HTTPException(403, "invalid or missing CSRF token; reload the page and try again")


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    """Set an HttpOnly, SameSite=Lax cookie (Secure when configured)."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        httponly=True,
        samesite="lax",
        secure=settings(request).secure_cookies,
        path="/",
    )


def page(
    request: Request, who: Viewer, template: str, status: int = 200, **context: Any
) -> Response:
    """Render a page with the viewer's CSRF token (setting the anonymous cookie if new)."""
    csrf = csrf_token(settings(request).secret, who.binding)
    html = render(template, csrf=csrf, role=who.role, **context)
    response = HTMLResponse(html, status_code=status)
    if who.new_anon:
        set_cookie(request, response, ANON_COOKIE, who.binding, 24 * 3600)
    return response


def redirect(url: str) -> RedirectResponse:
    """303 See Other (the answer to a successful form post)."""
    return RedirectResponse(url, status_code=303)
