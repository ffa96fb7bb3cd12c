"""Security: access control, CSRF, escaping, SQL injection, secrets at rest, limits, logs."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from feedback_helpers import ADMIN_TOKEN, Site, candidate_rows, field_value, make_site

from rlhfkit.feedback.middleware import RateLimit
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
    limiter = RateLimit(None, rate=2.0, burst=3)
    assert [limiter.allow("k", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.allow("k", 0.0) == pytest.approx(0.5)  # empty: one token in 1 / rate
    assert limiter.allow("k", 0.25) == pytest.approx(0.25)
    assert limiter.allow("k", 0.5) == 0.0
    assert limiter.allow("other", 0.5) == 0.0  # buckets are per key
    assert limiter.allow("k", 100.0) == 0.0 and limiter.buckets["k"][0] == pytest.approx(2.0)


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
