"""Load test on a live server (loopback): 20 labellers x 50 votes, SIGKILL and restart mid-run.

Every vote the server acknowledged (303) must be in the database exactly once afterwards, with
the value that was sent; clients retry a POST with the same form (same nonce) when the
connection fails, so a vote committed just before the kill is not stored twice.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from feedback_helpers import candidate_rows, jsonl

from rlhfkit.feedback.bridge import create_task_from_requests, invite_labellers
from rlhfkit.feedback.storage import connect
from rlhfkit.feedback.voting import task_votes

LABELLERS, VOTES = 20, 50
KILL_AFTER = 300
"""Acknowledged votes before the server is killed."""
DEADLINE_S = 90.0

SERVER = """
import logging, sys
from rlhfkit.feedback.serve import LabelServeConfig, serve
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
serve(LabelServeConfig(db=sys.argv[1], port=int(sys.argv[2]), rate_per_second=50, rate_burst=100))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, db: Path, port: int, logs: Path) -> None:
        self.db, self.port, self.logs = db, port, logs
        self.starts = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if k != "RLHFKIT_ADMIN_TOKEN"}
        out = open(self.logs / f"stdout{self.starts}.txt", "w")  # noqa: SIM115
        err = open(self.logs / f"stderr{self.starts}.txt", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(self.db), str(self.port)],
            stdout=out,
            stderr=err,
            env=env,
        )
        out.close()
        err.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.logs / f"stderr{self.starts}.txt").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError("the server did not come up in 30 s")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


FAILURES = [0]
"""Requests that failed on the connection (the kill must cause some)."""


def retry(call, deadline: float):
    """Call until the server answers (connection errors and 429 are retried)."""
    while True:
        try:
            response = call()
            if response.status_code != 429:
                return response
            time.sleep(float(response.headers.get("retry-after", "1")))
        except httpx.TransportError:
            FAILURES[0] += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def labeller(base: str, link: str, acked: list, counter: list, lock: threading.Lock) -> None:
    deadline = time.monotonic() + DEADLINE_S
    with httpx.Client(base_url=base, timeout=10) as client:
        login = retry(lambda: client.get(link, follow_redirects=False), deadline)
        assert login.status_code == 303
        for n in range(VOTES):
            page = retry(lambda: client.get("/label"), deadline)
            assert page.status_code == 200, page.text
            assert 'id="done"' not in page.text, f"offered only {n} items"
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
            nonce = re.search(r'name="nonce" value="([^"]+)"', page.text).group(1)
            choice = str(n % 5 + 1)
            data = {"csrf": csrf, "nonce": nonce, "choice": choice}
            response = retry(lambda d=data: client.post("/label/vote", data=d), deadline)
            assert response.status_code == 303, response.text
            with lock:
                acked.append((nonce, int(choice)))
                counter[0] += 1


def test_concurrent_labellers_survive_a_kill(tmp_path: Path):
    db, requests = tmp_path / "labels.sqlite", tmp_path / "requests.jsonl"
    requests.write_text(jsonl(candidate_rows(VOTES)))
    task, _ = create_task_from_requests(db, requests, name="load", overlap=LABELLERS)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    links = [
        link.replace(base, "")
        for _, link in invite_labellers(
            db, task, [f"lab{i}" for i in range(LABELLERS)], base_url=base
        )
    ]
    server = Server(db, port, tmp_path)
    server.start()
    acked: list[tuple[str, int]] = []
    FAILURES[0] = 0
    counter, lock = [0], threading.Lock()
    try:
        with ThreadPoolExecutor(LABELLERS) as pool:
            futures = [pool.submit(labeller, base, link, acked, counter, lock) for link in links]
            while counter[0] < KILL_AFTER and not any(f.done() for f in futures):
                time.sleep(0.01)
            killed_at = counter[0]
            server.kill()
            server.start()  # same database, same port; the clients retry meanwhile
            for future in futures:
                future.result()
    finally:
        server.stop()
    assert KILL_AFTER <= killed_at < LABELLERS * VOTES, "the kill did not happen mid-run"
    assert FAILURES[0] > 0, "no client saw the outage"
    assert len(acked) == LABELLERS * VOTES
    with connect(db) as conn:
        votes = task_votes(conn, task)
    stored = {v["nonce"]: v for v in votes}
    assert len(stored) == len(votes) == LABELLERS * VOTES  # nonces are unique
    for nonce, choice in acked:
        assert nonce in stored and stored[nonce]["display_value"] == choice
    per_labeller = {}
    for v in votes:
        per_labeller.setdefault(v["labeller"], set()).add(v["item_id"])
    assert all(len(items) == VOTES for items in per_labeller.values())
    # Each start printed a fresh admin token on stdout; no token reached the logs.
    tokens = [(tmp_path / f"stdout{i}.txt").read_text().split()[-1] for i in (1, 2)]
    assert tokens[0] != tokens[1]
    logs = (tmp_path / "stderr1.txt").read_text() + (tmp_path / "stderr2.txt").read_text()
    assert "GET /l/*** 303" in logs and "POST /label/vote 303" in logs
    for secret in [*tokens, *(link.rsplit("/", 1)[1] for link in links)]:
        assert secret not in logs
