"""Security: access control, CSRF, escaping, SQL injection, secrets at rest, limits, logs."""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time

import pytest
from fastapi.testclient import TestClient
from feedback_helpers import ADMIN_TOKEN, Admin, Site, candidate_rows, field_value, make_site

from rlhfkit.feedback import middleware
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.auth import hash_token
from rlhfkit.feedback.middleware import (
    ADDRESS_BURST,
    ADDRESS_RATE_PER_SECOND,
    RATE_BURST,
    RATE_PER_SECOND,
    RateLimit,
    TokenBuckets,
)
from rlhfkit.feedback.serve import LabelServeConfig
from rlhfkit.feedback.storage import connect
from rlhfkit.feedback.voting import task_votes

INJECTIONS = [
    "'; DROP TABLE votes; --",
    '" OR 1=1 --',
    "x'); DELETE FROM items WHERE ('1'='1",
    "1; UPDATE labellers SET revoked=1",
    "Robert'); DROP TABLE tasks;--",
]

ADMIN_GETS = [
    "/admin",
    "/admin/tasks/new",
    "/admin/tasks/{t}",
    "/admin/tasks/{t}/export",
    "/admin/tasks/{t}/stats",
]
ADMIN_POSTS = ["/admin/tasks", "/admin/tasks/{t}/invite", "/admin/labellers/1/revoke"]


def test_labeller_cannot_open_admin_pages(site: Site):
    task = site.admin.create_task(candidate_rows(2))
    (lab,) = site.labellers(task, ["ann"])
    page = lab.open()
    csrf = field_value(page, "csrf")
    for path in ADMIN_GETS:
        assert lab.client.get(path.format(t=task), follow_redirects=False).status_code == 403
    for path in ADMIN_POSTS:
        response = lab.client.post(path.format(t=task), data={"csrf": csrf, "names": "eve"})
        assert response.status_code == 403, path
    # Anonymous visitors are sent to the login page (GET) or refused (POST).
    anon = TestClient(site.app)
    assert anon.get("/admin", follow_redirects=False).headers["location"] == "/admin/login"
    assert anon.post(f"/admin/tasks/{task}/invite", data={"names": "x"}).status_code == 403
    assert anon.get("/label").status_code == 401
    # The labeller's token is not the admin token.
    login = anon.get("/admin/login").text
    token = lab.link.rsplit("/", 1)[1]
    bad = anon.post("/admin/login", data={"csrf": field_value(login, "csrf"), "token": token})
    assert bad.status_code == 403


def test_labeller_cannot_reach_another_labellers_data(site: Site):
    task = site.admin.create_task(candidate_rows(3))
    ann, bob = site.labellers(task, ["ann", "bob"])
    ann.open()
    ann_nonce = field_value(ann.page, "nonce")
    bob.open()
    # Bob posts Ann's form with his own (valid) CSRF token: refused, nothing stored.
    data = {"csrf": field_value(bob.page, "csrf"), "nonce": ann_nonce, "choice": "1"}
    assert bob.client.post("/label/vote", data=data).status_code == 404
    with connect(site.db) as conn:
        assert task_votes(conn, task) == []
    ann.submit({"choice": "2", "note": "ann's private note"})
    assert "private note" not in bob.client.get("/label/votes").text
    assert "ann&#39;s private note" in ann.client.get("/label/votes").text


def test_forged_posts_without_csrf_are_refused(site: Site):
    task = site.admin.create_task(candidate_rows(2))
    (lab,) = site.labellers(task, ["ann"])
    lab.open()
    nonce = field_value(lab.page, "nonce")
    other = TestClient(site.app)
    other_csrf = field_value(other.get("/admin/login").text, "csrf")  # valid for another cookie
    for csrf in (None, "", "0" * 64, other_csrf):
        data = {"nonce": nonce, "choice": "1"} | ({} if csrf is None else {"csrf": csrf})
        assert lab.client.post("/label/vote", data=data).status_code == 403
        admin_data = {"names": "mallory"} | ({} if csrf is None else {"csrf": csrf})
        assert (
            site.admin.client.post(f"/admin/tasks/{task}/invite", data=admin_data).status_code
            == 403
        )
        assert site.admin.client.post("/logout", data=admin_data).status_code == 403
    fresh = TestClient(site.app)  # no cookie at all: login refused even with a real token
    assert (
        fresh.post("/admin/login", data={"token": ADMIN_TOKEN, "csrf": other_csrf}).status_code
        == 403
    )
    with connect(site.db) as conn:
        assert task_votes(conn, task) == []
        assert conn.execute("SELECT COUNT(*) FROM labellers").fetchone()[0] == 1
    # The same posts with the right token go through.
    lab.submit({"choice": "1"})


def test_model_output_script_renders_inert(site: Site):
    rows = [
        {
            "id": 1,
            "prompt": "<script>alert('p')</script> hi",
            "a": "<script>alert(1)</script>\n\n<img src=x onerror=alert(2)>\n\n"
            "[click](javascript:alert(3))\n\n```html\n<script>alert(4)</script>\n```",
            "b": "</textarea><b>bold</b>",
        }
    ]
    task = site.admin.create_task(rows)
    (lab,) = site.labellers(task, ["ann"])
    page = lab.open()
    assert "<script>alert" not in page and "<img" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    assert 'href="javascript:' not in page
    assert '<pre><code class="language-html">&lt;script&gt;alert(4)&lt;/script&gt;' in page
    # The only script is the static keyboard file; the CSP forbids inline scripts.
    assert page.count("<script") == 1 and 'src="/static/label.js"' in page
    csp = lab.client.get("/label").headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp


def test_sql_injection_strings_stored_as_text(site: Site):
    rows = [
        {"id": s, "prompt": f"prompt {s}", "a": f"A {s}", "b": f"B {s}", "extra": s}
        for s in INJECTIONS
    ]
    task = site.admin.create_task(rows, name=INJECTIONS[0], guidelines=INJECTIONS[1], overlap=2)
    names = [f"lab {s}" for s in INJECTIONS[:2]]
    labs = site.labellers(task, names)
    for n, lab in enumerate(labs):
        while not lab.done():
            lab.submit({"choice": "1", "note": INJECTIONS[n]})
    # The forms' free fields were injection strings too: invalid ones are refused as values.
    rows_out = site.admin.export(task, format="likert")
    assert len(rows_out) == 2 * len(INJECTIONS)
    assert {r["id"] for r in rows_out} == set(INJECTIONS)
    assert {r["labeller"] for r in rows_out} == set(names)
    assert {r["note"] for r in rows_out} == set(INJECTIONS[:2])
    for r in rows_out:
        assert r["prompt"] == f"prompt {r['id']}" and r["extra"] == r["id"]
    stats = site.admin.stats(task)
    assert stats["name"] == INJECTIONS[0]
    with connect(site.db) as conn:
        assert conn.execute("SELECT guidelines FROM tasks").fetchone()[0] == INJECTIONS[1]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"votes", "items", "tasks", "labellers"} <= tables
    lab = labs[0]
    assert (
        lab.client.post(
            "/label/vote",
            data={"csrf": field_value(lab.page, "csrf"), "nonce": INJECTIONS[0], "choice": "1"},
        ).status_code
        == 404
    )


def test_tokens_not_stored_in_plain_text(site: Site):
    task = site.admin.create_task(candidate_rows(1))
    (lab,) = site.labellers(task, ["ann"])
    lab.open()
    session = lab.client.cookies.get("rlhf_session")
    admin_session = site.admin.client.cookies.get("rlhf_session")
    token = lab.link.rsplit("/", 1)[1]
    with connect(site.db) as conn:
        conn.execute("PRAGMA wal_checkpoint(FULL)")
    raw = b"".join(p.read_bytes() for p in site.db.parent.glob("labels.sqlite*"))
    for secret in (token, session, admin_session, ADMIN_TOKEN):
        assert secret and secret.encode() not in raw


def test_revoked_labeller_is_locked_out(site: Site):
    task = site.admin.create_task(candidate_rows(1))
    (lab,) = site.labellers(task, ["ann"])
    csrf = field_value(site.admin.client.get(f"/admin/tasks/{task}").text, "csrf")
    response = site.admin.client.post(
        "/admin/labellers/1/revoke", data={"csrf": csrf}, follow_redirects=False
    )
    assert response.status_code == 303
    assert lab.client.get("/label").status_code == 401
    path = lab.link.split("testserver", 1)[1]
    assert lab.client.get(path).status_code == 403


def test_oversized_request_refused(tmp_path):
    site = make_site(tmp_path, max_body_bytes=2000, max_upload_bytes=5000)
    task = site.admin.create_task(candidate_rows(2))
    (lab,) = site.labellers(task, ["ann"])
    lab.open()
    big = {
        "csrf": field_value(lab.page, "csrf"),
        "nonce": field_value(lab.page, "nonce"),
        "choice": "1",
        "note": "x" * 3000,
    }
    assert lab.client.post("/label/vote", data=big).status_code == 413

    def chunks():
        yield b"note=" + b"y" * 1500
        yield b"y" * 1500

    streamed = lab.client.post(
        "/label/vote",
        content=chunks(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert streamed.status_code == 413
    too_big = site.admin.create_task(candidate_rows(200), expect=413)
    assert "too large" in too_big.text
    with connect(site.db) as conn:
        assert task_votes(conn, task) == []


def test_token_bucket_arithmetic():
    buckets = TokenBuckets(rate=2.0, burst=3)
    assert [buckets.allow("k", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.allow("k", 0.0) == pytest.approx(0.5)  # empty: one token in 1 / rate
    assert buckets.allow("k", 0.25) == pytest.approx(0.25)
    assert buckets.allow("k", 0.5) == 0.0
    assert buckets.allow("other", 0.5) == 0.0  # buckets are per key
    assert buckets.allow("k", 100.0) == 0.0 and buckets.buckets["k"][0] == pytest.approx(2.0)
    assert buckets.wait("new", 100.0) == 0.0 and "new" not in buckets.buckets  # waits take none


class Clock:
    """Virtual time for the rate limiter (stands in for the ``time`` module it reads)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    @staticmethod
    def perf_counter() -> float:
        return time.perf_counter()


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(middleware, "time", fake)
    return fake


async def _ok(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def default_limiter(tmp_path) -> RateLimit:
    """The rate limiter as ``create_app`` sets it up by default, in front of a no-op app."""
    app = create_app(tmp_path / "limits.sqlite", admin_token_hash=hash_token(ADMIN_TOKEN))
    (config,) = [m for m in app.user_middleware if m.cls is RateLimit]
    return RateLimit(_ok, *config.args, **config.kwargs)


Request = tuple[float, str, str, str | None]
"""A simulated request: (time, client address, path, session cookie or None)."""


def run(limiter: RateLimit, clock: Clock, requests: list[Request]) -> list[tuple[Request, int]]:
    """Pass the requests through the limiter in time order; each with its status."""

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def main() -> list[tuple[Request, int]]:
        out: list[tuple[Request, int]] = []
        for request in sorted(requests, key=lambda r: r[0]):
            at, address, path, session = request
            clock.now = 1000.0 + at
            headers = [(b"cookie", f"rlhf_session={session}".encode())] if session else []
            scope = {
                "type": "http",
                "method": "POST" if path == "/label/vote" else "GET",
                "path": path,
                "headers": headers,
                "client": (address, 50000),
            }
            got: list[int] = []

            async def send(message: dict, got: list[int] = got) -> None:
                if message["type"] == "http.response.start":
                    got.append(message["status"])

            await limiter(scope, receive, send)
            out.append((request, got[0]))
        return out

    return asyncio.run(main())


NAT = "203.0.113.7"
"""The one public address of an office full of labellers."""

PAGE = ("/label", "/static/app.css", "/static/label.js", "/favicon.ico")
"""What a browser fetches for the labelling page."""


def labelling(labellers: int, seconds: float, address: str = NAT, seed: int = 0) -> list[Request]:
    """Fast keyboard labelling by several labellers from one address.

    Each opens their link, then answers about 3 items a second (5 a second for a 20 s run of
    easy items, everybody at once); an answer is the form post and the next page (with its
    stylesheet, script and favicon), and now and then a double press, a reload, a look at the
    labeller's own answers.
    """
    rng = random.Random(seed)
    out: list[Request] = []
    for n in range(labellers):
        session = f"{address}-session-{n}"
        at = rng.uniform(0.0, 5.0)
        out.append((at, address, f"/l/token-{n}", None))
        out += [(at + 0.05, address, path, session) for path in PAGE]
        while at < seconds:
            at += rng.uniform(0.18, 0.22) if 30 <= at < 50 else rng.uniform(0.25, 0.45)
            out.append((at, address, "/label/vote", session))
            if rng.random() < 0.05:
                out.append((at + 0.08, address, "/label/vote", session))  # a double press
            out += [(at + 0.02, address, path, session) for path in PAGE]
            if rng.random() < 0.02:
                out += [(at + 0.1, address, "/label/votes", session)]
                out += [(at + 0.1, address, path, session) for path in PAGE]
    return out


def test_realistic_labelling_from_one_address_gets_no_429(tmp_path, clock):
    traffic = labelling(labellers=20, seconds=90.0)
    results = run(default_limiter(tmp_path), clock, traffic)
    assert len(results) > 20_000 and {status for _, status in results} == {200}
    # A demanding test: over 150 counted requests in one second from the one address.
    per_second = collections.Counter(
        int(at) for at, _, path, _ in traffic if not path.startswith(("/static/", "/favicon"))
    )
    assert max(per_second.values()) > 150


def test_floods_get_429_and_spare_the_neighbours(tmp_path, clock):
    neighbours = labelling(labellers=5, seconds=60.0)
    # One labeller's session scripted at 100 requests a second, behind the same address.
    scripted = [(t / 100, NAT, "/label", "scripted") for t in range(6000)]
    # Link guessing without a cookie at 50 a second, from the same address.
    guessing = [(t / 50, NAT, f"/l/guess-{t}", None) for t in range(3000)]
    results = run(default_limiter(tmp_path), clock, [*neighbours, *scripted, *guessing])
    refused = collections.Counter(
        session or "guessing" for (_, _, _, session), status in results if status == 429
    )
    # Each is held to about its client bucket: 200 at once, then 20 a second.
    assert refused["scripted"] >= 6000 - (200 + 20 * 60) - 1
    assert refused["guessing"] >= 3000 - (200 + 20 * 60) - 1
    assert set(refused) == {"scripted", "guessing"}  # the neighbours were never refused


def test_flood_with_made_up_cookies_gets_429(tmp_path, clock):
    limiter = default_limiter(tmp_path)
    # 1000 requests a second for 10 s from one address, each with a fresh made-up session
    # cookie (each would get a new, full client bucket): the address bucket stops them.
    flood = [(t / 1000, "198.51.100.9", "/label", f"made-up-{t}") for t in range(10_000)]
    elsewhere = labelling(labellers=2, seconds=10.0, address="192.0.2.1")
    results = run(limiter, clock, [*flood, *elsewhere])
    flooded = [status for request, status in results if request[1] == "198.51.100.9"]
    assert flooded.count(200) <= 3000 + 300 * 10 + 1 and flooded.count(429) >= 3999
    assert all(status == 200 for request, status in results if request[1] == "192.0.2.1")
    assert len(limiter.clients.buckets) <= flooded.count(200) + 10  # refusals leave no bucket


def test_default_limits_through_the_app(tmp_path, clock):
    # The real app with its default limits: labellers behind one address (the test client's)
    # label at 5 items a second, and one of them floods the home page.
    db = tmp_path / "labels.sqlite"
    app = create_app(db, admin_token_hash=hash_token(ADMIN_TOKEN), rng=random.Random(0))
    site = Site(app, db, Admin(TestClient(app)))
    site.admin.login()
    task = site.admin.create_task(candidate_rows(12), overlap=3)
    labs = site.labellers(task, ["ann", "bob", "cy"])
    for _ in range(12):
        clock.now += 0.2
        for lab in labs:
            page = lab.open()
            for path in PAGE[1:]:
                assert lab.client.get(path).status_code in (200, 204)
            assert 'id="done"' not in page
            lab.submit({"choice": "3"})
    assert all(lab.done() for lab in labs)
    flood = [labs[0].client.get("/", follow_redirects=False).status_code for _ in range(230)]
    assert flood.count(429) >= 20 and flood[-1] == 429
    assert labs[1].client.get("/label").status_code == 200  # the neighbour carries on


def test_serve_defaults_are_the_app_defaults():
    cfg = LabelServeConfig()
    assert (cfg.rate_per_second, cfg.rate_burst) == (RATE_PER_SECOND, RATE_BURST)
    assert (cfg.address_rate_per_second, cfg.address_burst) == (
        ADDRESS_RATE_PER_SECOND,
        ADDRESS_BURST,
    )


def test_rate_limit(tmp_path):
    site = make_site(tmp_path, rate_per_second=0.01, rate_burst=5)  # no refill during the test
    anon = TestClient(site.app)
    codes = [anon.get("/").status_code for _ in range(7)]
    assert codes.count(200) >= 1 and codes[-2:] == [429, 429]
    assert codes == sorted(codes)  # once empty, the bucket refuses until it refills
    refused = anon.get("/")
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert anon.get("/healthz").status_code == 200  # health checks are exempt
    # Token guessing on the login link is limited per address, whatever the cookie.
    guesser = TestClient(site.app)
    guesser.cookies.set("rlhf_session", "bogus")
    assert {guesser.get(f"/l/guess{n}").status_code for n in range(3)} == {429}


def test_logs_hold_no_secret(site: Site, caplog):
    caplog.set_level(logging.DEBUG)
    task = site.admin.create_task(candidate_rows(1))
    (lab,) = site.labellers(task, ["ann"])
    lab.open()
    lab.submit({"choice": "1"})
    token = lab.link.rsplit("/", 1)[1]
    # The server's records (the test client's own httpx log shows the URL it requested).
    text = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("httpx"))
    assert "GET /l/*** 303" in text and "POST /label/vote 303" in text
    for secret in (token, ADMIN_TOKEN, lab.client.cookies.get("rlhf_session")):
        assert secret not in text


def test_security_headers_everywhere(site: Site):
    for path in ("/", "/admin/login", "/static/label.js", "/nope"):
        headers = TestClient(site.app).get(path).headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert "default-src 'none'" in headers["content-security-policy"]


@pytest.mark.parametrize("cookie_flag", ["httponly", "samesite=lax"])
def test_session_cookie_flags(site: Site, cookie_flag):
    task = site.admin.create_task(candidate_rows(1))
    link = site.admin.invite(task, ["ann"])[0].split("testserver", 1)[1]
    response = TestClient(site.app).get(link, follow_redirects=False)
    assert cookie_flag in response.headers["set-cookie"].lower()
