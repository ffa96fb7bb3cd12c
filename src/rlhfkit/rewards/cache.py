"""A response cache on disk for chat backends, so that a rerun asks the model nothing again.

:class:`CachedBackend` wraps any :class:`~rlhfkit.rewards.chat.ChatBackend`. Each request is
keyed by the SHA-256 of the backend's identity (its ``repr``: the model name or endpoint and
model), the method, the conversation and the generation settings; its answer is stored in an
SQLite file. Only the conversations not yet in the file go to the backend, in one batch, and
their answers are written in one transaction as soon as they come back, so an interrupted run
keeps what it paid for. Answers come back in input order either way. ``calls`` counts the
conversations the backend itself was asked.

Only deterministic requests are worth caching: judges decode greedily (temperature 0).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from rlhfkit.rewards.chat import ChatBackend, Messages


class CachedBackend:
    """``backend`` with its answers kept in the SQLite file ``path`` (see the module).

    Args:
        backend: The chat backend to ask on a miss.
        path: The cache file (created with its directory).
    """

    def __init__(self, backend: ChatBackend, path: str | Path) -> None:
        self.backend, self.path = backend, Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT)")
        self._db.commit()
        self.calls = self.hits = 0
        if hasattr(backend, "complete_with_verdict"):
            self.complete_with_verdict = self._complete_with_verdict
        if hasattr(backend, "prefix_logprobs"):
            self.prefix_logprobs = self._prefix_logprobs

    def __repr__(self) -> str:
        return repr(self.backend)

    def _key(self, method: str, messages: Messages, settings: dict[str, Any]) -> str:
        blob = json.dumps([repr(self.backend), method, messages, settings], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cached(
        self, method: str, batch: list[Messages], settings: dict[str, Any], ask: Any
    ) -> list:
        keys = [self._key(method, m, settings) for m in batch]
        found: dict[str, Any] = {}
        for start in range(0, len(keys), 500):  # SQLite's limit on bound parameters
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, value FROM answers WHERE key IN ({marks})", chunk)
            found.update((k, json.loads(v)) for k, v in rows)
        missing = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(keys) - len(missing)
        if missing:
            answers = list(ask([batch[i] for i in missing]))
            self.calls += len(missing)
            with self._db:
                self._db.executemany(
                    "INSERT OR REPLACE INTO answers VALUES (?, ?)",
                    [(keys[i], json.dumps(a)) for i, a in zip(missing, answers, strict=True)],
                )
            found.update((keys[i], a) for i, a in zip(missing, answers, strict=True))
        return [found[k] for k in keys]

    def complete(
        self, messages_batch: list[Messages], *, max_tokens: int, temperature: float = 0.0
    ) -> list[str]:
        """The backend's replies, from the cache where it has them."""
        settings = {"max_tokens": max_tokens, "temperature": temperature}
        return self._cached("complete", messages_batch, settings,
                            lambda batch: self.backend.complete(batch, **settings))  # fmt: skip

    def _complete_with_verdict(
        self, messages_batch: list[Messages], *, max_tokens: int, choices: tuple[str, ...]
    ) -> list[tuple[str, dict[str, float] | None]]:
        """The backend's replies and verdict log-probs, from the cache where it has them."""
        settings = {"max_tokens": max_tokens, "choices": list(choices)}
        ask = self.backend.complete_with_verdict  # type: ignore[attr-defined]
        answers = self._cached(
            "verdict", messages_batch, settings,
            lambda batch: ask(batch, max_tokens=max_tokens, choices=choices),
        )  # fmt: skip
        return [(text, logprobs) for text, logprobs in answers]

    def _prefix_logprobs(
        self, messages_batch: list[Messages], *, prefix: str, choices: tuple[str, ...]
    ) -> list[dict[str, float]]:
        """The backend's choice log-probs after ``prefix``, from the cache where it has them."""
        settings = {"prefix": prefix, "choices": list(choices)}
        ask = self.backend.prefix_logprobs  # type: ignore[attr-defined]
        return self._cached(
            "prefix", messages_batch, settings,
            lambda batch: ask(batch, prefix=prefix, choices=choices),
        )  # fmt: skip

    def close(self) -> None:
        """Close the file."""
        self._db.close()


def cached(backend: ChatBackend, path: str | Path | None) -> ChatBackend:
    """``backend`` behind a :class:`CachedBackend` at ``path``; itself when ``path`` is None."""
    return backend if path is None else CachedBackend(backend, path)  # type: ignore[return-value]
