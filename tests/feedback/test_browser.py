"""Headless Chromium (Debian's, driven by Playwright) labels by mouse and by keyboard.

The server runs in a thread on a free loopback port; the export must contain exactly the
votes the browser gave. Without Chromium the test fails (``make test`` installs it).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from feedback_helpers import jsonl

from headless import FLAGS, find_browser
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.auth import hash_token
from rlhfkit.feedback.bridge import create_task_from_requests, invite_labellers
from rlhfkit.feedback.export import export_rows
from rlhfkit.feedback.storage import connect, create_task

XSS = ' <script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    db = tmp_path / "labels.sqlite"
    app = create_app(db, admin_token_hash=hash_token("unused-admin-token"), rate_per_second=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", db
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser_page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_browser(), args=FLAGS, headless=True)
        page = browser.new_context().new_page()  # page.context.new_page() opens a second tab
        page.context.set_default_timeout(15_000)
        try:
            yield page
        finally:
            browser.close()


def shown(page: Any, k: int) -> list[str]:
    """The completions shown left to right, as imported (with the XSS payload)."""
    texts = [page.locator(f"#completion-{pos} .output").inner_text() for pos in range(k)]
    return [re.search(r"resp-\d+-\d+", t).group(0) + XSS for t in texts]


def test_label_by_mouse_and_keyboard(live, browser_page):
    base, db = live
    rows = [
        {"id": i, "prompt": f"question {i}", "a": f"resp-{i}-0{XSS}", "b": f"resp-{i}-1{XSS}"}
        for i in range(4)
    ]
    requests = db.parent / "requests.jsonl"
    requests.write_text(jsonl(rows))
    task, _ = create_task_from_requests(db, requests, name="browser", guidelines="Be **fair**.")
    ((_, link),) = invite_labellers(db, task, ["ann"], base_url=base)
    page = browser_page
    page.goto(link)
    assert page.url == f"{base}/label"  # the token left the address bar
    assert page.locator(".guidelines strong").inner_text() == "fair"
    expected = set()

    # 1. Mouse: "Left much better".
    left, right = shown(page, 2)
    with page.expect_navigation():
        page.get_by_role("button", name=re.compile("Left much better")).click()
    expected.add((left, right, 2.0, ""))
    # 2. Keyboard: 4 = right better.
    assert "labelled 1, skipped 0" in page.locator("#progress").inner_text()
    left, right = shown(page, 2)
    with page.expect_navigation():
        page.keyboard.press("4")
    expected.add((right, left, 1.0, ""))
    # 3. Keyboard: n opens the note, Escape leaves it, 3 = tie (kept in this export).
    left, right = shown(page, 2)
    page.keyboard.press("n")
    page.keyboard.type("typed note 2 s n")  # digits and shortcut letters inside the note
    page.keyboard.press("Escape")
    with page.expect_navigation():
        page.keyboard.press("3")
    tie = (left.replace(XSS, ""), right.replace(XSS, ""))
    # 4. Keyboard: s = skip.
    with page.expect_navigation():
        page.keyboard.press("s")
    assert page.locator("#done").is_visible()
    assert "labelled 3 item(s) and skipped 1" in page.content()
    assert page.evaluate("window.__pwned") is None  # the model's script never ran

    with connect(db) as conn:
        exported = export_rows(conn, task, format="pairs", ties="keep")
    got = {
        (r["chosen"], r["rejected"], r["margin"], r["note"]) for r in exported if not r.get("tie")
    }
    assert got == expected
    (tied,) = [r for r in exported if r.get("tie")]
    assert tied["note"] == "typed note 2 s n"
    assert {tied["chosen"].replace(XSS, ""), tied["rejected"].replace(XSS, "")} == set(tie)
    assert len(exported) == 3


def test_rank_by_keyboard_and_rate_by_mouse(live, browser_page):
    base, db = live
    rows = [
        {"id": i, "prompt": f"question {i}", "completions": [f"resp-{i}-{j}" for j in range(3)]}
        for i in range(1)
    ]
    from rlhfkit.feedback.importer import parse_candidates

    with connect(db) as conn:
        ranking = create_task(
            conn,
            name="rank",
            mode="ranking",
            overlap=1,
            guidelines="",
            items=parse_candidates(jsonl(rows), "ranking"),
        )
        rating = create_task(
            conn,
            name="rate",
            mode="rating",
            overlap=1,
            guidelines="",
            items=parse_candidates(jsonl(rows), "rating"),
        )
    page = browser_page
    ((_, link),) = invite_labellers(db, ranking, ["ann"], base_url=base)
    page.goto(link)
    texts = [t.replace(XSS, "") for t in shown(page, 3)]
    # Press 3 then 1: position 2 best, position 0 second, position 1 filled in last.
    page.keyboard.press("3")
    page.keyboard.press("1")
    assert [page.locator(f"select[name=rank_{p}]").input_value() for p in range(3)] == [
        "2",
        "3",
        "1",
    ]
    with page.expect_navigation():
        page.keyboard.press("Enter")
    best_first = [int(texts[p][-1]) for p in (2, 0, 1)]

    ((_, link),) = invite_labellers(db, rating, ["bob"], base_url=base)
    page.goto(link)
    texts = [t.replace(XSS, "") for t in shown(page, 3)]
    for pos, value in enumerate((5, 2, 4)):
        page.locator(f"#completion-{pos} input[value='{value}']").click()
    with page.expect_navigation():
        page.get_by_role("button", name=re.compile("Submit")).click()
    ratings = [0, 0, 0]
    for pos, value in enumerate((5, 2, 4)):
        ratings[int(texts[pos][-1])] = value

    with connect(db) as conn:
        assert [r["ranking"] for r in export_rows(conn, ranking, format="rankings")] == [best_first]
        assert [r["ratings"] for r in export_rows(conn, rating, format="ratings")] == [ratings]


def test_answer_from_a_stale_second_tab_is_refused_on_the_page(live, browser_page):
    base, db = live
    rows = [
        {"id": i, "prompt": f"question {i}", "a": f"resp-{i}-0", "b": f"resp-{i}-1"}
        for i in range(3)
    ]
    requests = db.parent / "requests.jsonl"
    requests.write_text(jsonl(rows))
    task, _ = create_task_from_requests(db, requests, name="tabs")
    ((_, link),) = invite_labellers(db, task, ["ann"], base_url=base)
    tab1 = browser_page
    tab1.goto(link)
    tab2 = tab1.context.new_page()
    tab2.goto(f"{base}/label")
    first = shown(tab1, 2)
    assert shown(tab2, 2) == first  # both tabs show the open item
    with tab1.expect_navigation():
        tab1.keyboard.press("1")
    with tab2.expect_navigation() as refused:
        tab2.keyboard.press("5")  # the stale tab answers the same item again
    assert refused.value.status == 409
    notice = tab2.locator("#notice").inner_text()
    assert "already labelled this item" in notice and "this one was not stored" in notice
    assert shown(tab2, 2) == shown(tab1, 2) != first  # the page went on to the next item
    assert tab2.url == f"{base}/label"  # a reload loads the page, it does not post again
    assert "labelled 1, skipped 0" in tab2.locator("#progress").inner_text()
    # A held key answers once: its repeats reach the next page and are ignored there.
    with tab2.expect_navigation():
        tab2.keyboard.down("s")
    tab2.keyboard.down("s")  # auto-repeat (event.repeat) on the next item
    tab2.keyboard.down("s")
    tab2.keyboard.up("s")
    tab2.wait_for_timeout(300)
    assert "labelled 1, skipped 1" in tab2.locator("#progress").inner_text()
    with connect(db) as conn:
        (row,) = export_rows(conn, task, format="likert")
    left_is_a = re.match(r"resp-\d+-0", first[0]) is not None
    assert row["likert"] == (1 if left_is_a else 5)  # the first tab's answer, "Left much better"
