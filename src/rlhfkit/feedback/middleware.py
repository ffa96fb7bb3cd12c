"""ASGI middleware of the labelling app: body size limit, rate limit, security headers, access log.

Plain ASGI classes (no ``BaseHTTPMiddleware``), outermost first in :func:`create_app`:

- :class:`AccessLog` logs method, path, status and duration. Token links ``/l/<token>`` are
  logged as ``/l/***`` and query strings are never logged, so no secret reaches the logs
  (uvicorn's own access log is turned off by :func:`rlhfkit.feedback.serve.serve`).
- :class:`SecurityHeaders` adds a strict Content-Security-Policy (scripts and styles only from
  ``/static``; no inline script, no framing, forms only to this origin), ``nosniff``,
  ``no-referrer`` (the token link never leaks through a Referer) and ``no-store``.
- :class:`RateLimit`: a token bucket per client (login paths keyed by client address, other
  requests by session cookie when present, else by address) and a larger one per address,
  shared by everyone behind it. Over a limit: 429 with ``Retry-After``.
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


class TokenBuckets:
    """Token buckets by key: ``rate`` tokens per second on average, at most ``burst`` at once.

    Bucket: tokens += (now - last) * rate, capped at ``burst``; a request takes one token or
    is refused when fewer than one is left. A key seen for the first time has a full bucket.
    """

    MAX_KEYS = 10_000

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, float(burst)
        self.buckets: dict[str, tuple[float, float]] = {}

    def wait(self, key: str, now: float) -> float:
        """0 if ``key`` has a token now, else the seconds until it has one (takes nothing)."""
        tokens, last = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def take(self, key: str, now: float) -> None:
        """Take a token from ``key``'s bucket (call after :meth:`wait` said 0)."""
        tokens, last = self.buckets.get(key, (self.burst, now))
        self.buckets[key] = (min(self.burst, tokens + (now - last) * self.rate) - 1.0, now)
        if len(self.buckets) > self.MAX_KEYS:  # forget idle keys (their buckets are full)
            idle = now - self.burst / self.rate
            self.buckets = {k: v for k, v in self.buckets.items() if v[1] > idle}

    def allow(self, key: str, now: float) -> float:
        """Take a token if there is one; returns 0 if allowed, else the seconds to wait."""
        wait = self.wait(key, now)
        if wait == 0.0:
            self.take(key, now)
        return wait


RATE_PER_SECOND = 20.0
"""Default requests per second of one client (a labeller's session; an address without one)."""
RATE_BURST = 200
"""Default bucket size of one client."""
ADDRESS_RATE_PER_SECOND = 300.0
"""Default requests per second from one address, all its clients together."""
ADDRESS_BURST = 3000
"""Default bucket size of one address."""


class RateLimit:
    """Token buckets per client and per address (see :class:`TokenBuckets`); 429 when empty.

    Every counted request needs a token from two buckets, and takes one from each only when
    both have one (a refused request costs nothing, so one client over its limit does not use
    up its neighbours' address bucket):

    - its *client*'s bucket (``rate``, ``burst``): the session cookie's hash for requests that
      carry one, the client address for requests without one and for the login paths (token
      guessing is limited per address, whatever the cookie);
    - its *address*'s bucket (``address_rate``, ``address_burst``), shared by everyone behind
      one address (a NAT, an office proxy). It also caps a flood that sends a fresh made-up
      session cookie with each request, which would otherwise get a new, full client bucket
      every time.

    ``/static/``, ``/healthz`` and ``/favicon.ico`` are not counted. Over a limit: 429 with
    ``Retry-After``.

    The defaults are sized so that labelling never meets them, with a wide margin. A fast
    labeller on keyboard shortcuts gives about 3 answers a second, up to 5 in a run of easy
    items or skips, and each answer costs 2 counted requests (the form post and the next page;
    its stylesheet, script and favicon are not counted): at most 10 requests a second, half the
    client rate of 20, and a burst of 200 absorbs reloads, extra tabs and double presses.
    Twenty such labellers behind one address, all at their fastest at once, make 200 a second,
    two thirds of the address rate of 300 (at a steady 3 answers a second, 50 labellers fit),
    with 3000 requests in reserve. A flood still gets 429: one session or one cookie-less
    client after 200 requests beyond 20 a second, made-up cookies from one address after 3000
    beyond 300 a second.
    """

    EXEMPT = ("/static/", "/healthz", "/favicon.ico")

    def __init__(
        self,
        app: ASGIApp,
        *,
        rate: float,
        burst: int,
        address_rate: float = ADDRESS_RATE_PER_SECOND,
        address_burst: int = ADDRESS_BURST,
    ) -> None:
        self.app, self.rate = app, rate
        self.clients = TokenBuckets(rate, burst)
        self.addresses = TokenBuckets(address_rate, address_burst) if address_rate > 0 else None

    @staticmethod
    def address(scope: Scope) -> str:
        """The client address of a request (``?`` when the server does not know it)."""
        client = scope.get("client")
        return client[0] if client else "?"

    def key(self, scope: Scope) -> str:
        """The client bucket of a request: session cookie hash, or client address."""
        address = f"ip:{self.address(scope)}"
        if scope["path"].startswith(LOGIN_PREFIXES):
            return address
        session = cookie_parser(_header(scope, b"cookie") or "").get(SESSION_COOKIE)
        if session:
            return "s:" + hashlib.sha256(session.encode()).hexdigest()[:24]
        return address

    def check(self, scope: Scope, now: float) -> float:
        """Take the request's tokens; returns 0 if allowed, else the seconds to wait."""
        client = self.key(scope)
        wait = self.clients.wait(client, now)
        address = self.address(scope)
        if self.addresses is not None:
            wait = max(wait, self.addresses.wait(address, now))
        if wait > 0:
            return wait
        self.clients.take(client, now)
        if self.addresses is not None:
            self.addresses.take(address, now)
        return 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 429 when a bucket of the request is empty, else run the request."""
        if scope["type"] != "http" or scope["path"].startswith(self.EXEMPT) or self.rate <= 0:
            await self.app(scope, receive, send)
            return
        wait = self.check(scope, time.monotonic())
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
