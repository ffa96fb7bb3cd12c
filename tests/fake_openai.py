"""A fake OpenAI-compatible chat server for tests: 127.0.0.1, a random port, a thread.

    with FakeOpenAI(reply=lambda body: "[[A]]") as server:
        backend = OpenAIChatBackend(server.base_url, "fake-judge")
        ...
        server.requests  # every request: path, headers (lower-case names), JSON body

``statuses`` is a script of error answers given before replying normally (e.g. ``[429]``: one
"too many requests", then success); ``status_forever`` answers every request with that status.
``delay(body)`` seconds are slept before answering (to shuffle completion order);
``max_in_flight`` is the largest number of requests handled at once. ``logprobs(body, content)``
gives the ``logprobs.content`` list of an answer to a request that asks for log-probs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAI:
    def __init__(
        self,
        reply: Callable[[dict[str, Any]], str] = lambda body: "[[C]]",
        *,
        statuses: list[int] | None = None,
        status_forever: int | None = None,
        delay: Callable[[dict[str, Any]], float] | None = None,
        logprobs: Callable[[dict[str, Any], str], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.reply, self.delay, self.logprobs = reply, delay, logprobs
        self.statuses, self.status_forever = list(statuses or []), status_forever
        self.requests: list[dict[str, Any]] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        # a short poll interval: shutdown() waits for the serving loop to notice
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def _answer(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            status = self.statuses.pop(0) if self.statuses else self.status_forever
        if status is not None:
            return status, {"error": {"message": f"fake error {status}"}}
        content = self.reply(body)
        extra = {}
        if body.get("logprobs") and self.logprobs is not None:
            extra = {"logprobs": {"content": self.logprobs(body, content)}}
        return 200, {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                    **extra,
                }
            ],
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                with fake.lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                    body = json.loads(raw)
                    with fake.lock:
                        fake.requests.append(
                            {
                                "path": self.path,
                                "headers": {k.lower(): v for k, v in self.headers.items()},
                                "body": body,
                            }
                        )
                    if fake.delay is not None:
                        time.sleep(fake.delay(body))
                    status, payload = fake._answer(body)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

        return Handler
