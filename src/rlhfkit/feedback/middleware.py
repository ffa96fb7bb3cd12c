"""ASGI middleware of the labelling app: body size limit, rate limit, security headers, access log.

Plain ASGI classes (no ``BaseHTTPMiddleware``), outermost first in :func:`create_app`:

- :class:`AccessLog` logs method, path, status and duration. Token links ``/l/<token>`` are
  logged as ``/l/***`` and query strings are never logged, so no secret reaches the logs
  (uvicorn's own access log is turned off by :func:`rlhfkit.feedback.serve.serve`).
- :class:`SecurityHeaders` adds a strict Content-Security-Policy (scripts and styles only from
  ``/static``; no inline script, no framing, forms only to this origin), ``nosniff``,
  ``no-referrer`` (the token link never leaks through a Referer) and ``no-store``.
- :class:`RateLimit`: a token bucket per client. Login paths are keyed by client address;
  other requests by session cookie when present, else by address. Over the limit: 429 with
  ``Retry-After``.
- :class:`BodyLimit`: 413 when ``Content-Length`` (or the streamed body) exceeds the limit; the
  task-upload path has its own, larger limit.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import cookie_parser

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SESSION_COOKIE = "rlhf_session"
"""Name of the session cookie."""

LOGIN_PREFIXES = ("/l/", "/admin/login")
"""Paths that accept a token: rate-limited per client address, never per cookie."""

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
"""Content-Security-Policy of every response."""

access_log = logging.getLogger("rlhfkit.feedback.access")


async def _plain(send: Send, status: int, text: str, headers: list | None = None) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def redact(path: str) -> str:
    """A request path safe to log: token links become ``/l/***``."""
    return "/l/***" if path.startswith("/l/") else path


class AccessLog:
    """Log one line per request without secrets (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request and log it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logged)
        finally:
            ms = (time.perf_counter() - start) * 1000
            access_log.info(
                "%s %s %d %.1fms", scope["method"], redact(scope["path"]), status[0], ms
            )


class SecurityHeaders:
    """Add the security headers to every HTTP response."""

    HEADERS = (
        (b"content-security-policy", CSP.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
        (b"cache-control", b"no-store"),
        (b"cross-origin-opener-policy", b"same-origin"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request, adding the headers to its response."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in self.HEADERS if k not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RateLimit:
    """Token bucket per client: ``rate`` requests per second on average, bursts of ``burst``.

    Bucket: tokens += (now - last) * rate, capped at ``burst``; a request takes one token or
    is refused with 429 when fewer than one is left.
    """

    EXEMPT = ("/static/", "/healthz")
    MAX_BUCKETS = 10_000

    def __init__(self, app: ASGIApp, *, rate: float, burst: int) -> None:
        self.app, self.rate, self.burst = app, rate, float(burst)
        self.buckets: dict[str, tuple[float, float]] = {}

    def key(self, scope: Scope) -> str:
        """The bucket of a request: session cookie hash, or client address."""
        client = scope.get("client")
        address = f"ip:{client[0] if client else '?'}"
        if scope["path"].startswith(LOGIN_PREFIXES):
            return address
        session = cookie_parser(_header(scope, b"cookie") or "").get(SESSION_COOKIE)
        if session:
            return "s:" + hashlib.sha256(session.encode()).hexdigest()[:24]
        return address

    def allow(self, key: str, now: float) -> float:
        """Take a token; returns 0 if allowed, else the seconds until one is available."""
        tokens, last = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self.buckets[key] = (tokens - 1.0, now)
        if len(self.buckets) > self.MAX_BUCKETS:  # forget idle clients (their buckets are full)
            idle = now - self.burst / self.rate
            self.buckets = {k: v for k, v in self.buckets.items() if v[1] > idle}
        return 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 429 when the client's bucket is empty, else run the request."""
        if scope["type"] != "http" or scope["path"].startswith(self.EXEMPT) or self.rate <= 0:
            await self.app(scope, receive, send)
            return
        wait = self.allow(self.key(scope), time.monotonic())
        if wait > 0:
            retry = str(max(1, round(wait + 0.5))).encode()
            await _plain(send, 429, "too many requests; slow down", [(b"retry-after", retry)])
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (``upload_bytes`` on ``upload_paths``) with 413."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, upload_bytes: int, upload_paths: tuple[str, ...]
    ) -> None:
        self.app, self.max_bytes, self.upload_bytes = app, max_bytes, upload_bytes
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 413 for a declared oversize body; count a streamed one as it arrives."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_bytes if scope["path"] in self.upload_paths else self.max_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _plain(send, 400, "invalid Content-Length")
                return
            if int(declared) > limit:
                await _plain(send, 413, f"request body too large (limit {limit} bytes)")
                return
        seen = [0]

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:  # a chunked body without Content-Length
                    raise HTTPException(413, f"request body too large (limit {limit} bytes)")
            return message

        await self.app(scope, counted, send)
