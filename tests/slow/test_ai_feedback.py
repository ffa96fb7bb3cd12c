"""AI feedback end to end on the embedded model: it answers, critiques, revises and judges, both
loaded directly and behind ``rlhfkit serve``'s OpenAI-compatible endpoint (slow: real model)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from rlhfkit.inference.serve import create_app
from rlhfkit.recipes import cai, cai_label
from rlhfkit.rewards.chat import LocalChatBackend

pytestmark = pytest.mark.slow


def _serve(backend: LocalChatBackend):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(backend, "smollm2"), host="127.0.0.1", port=port,
                       log_level="warning")
    )  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return server, thread, f"openai:http://127.0.0.1:{port}/v1#smollm2"


def test_revise_then_label_through_the_endpoint_and_directly(tmp_path: Path, monkeypatch):
    backend = LocalChatBackend()
    server, thread, spec = _serve(backend)
    try:
        revise = cai.CAIReviseConfig(limit=2, max_tokens=24, model=spec,
                                     output=str(tmp_path / "cai"))  # fmt: skip
        out = cai.main(revise)
        steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
        assert len(steps) == 2 and all(s["rounds"][0]["critique"] for s in steps)
        via = cai_label.main(cai_label.CAILabelConfig(
            pairs=str(out / "pairs.jsonl"), judge=spec, max_tokens=24,
            output=str(tmp_path / "endpoint"), backend_options={"api_key_env": ""},
        ))  # fmt: skip
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    monkeypatch.setattr(cai_label, "load_backend", lambda name, **kw: backend)
    direct = cai_label.main(cai_label.CAILabelConfig(
        pairs=str(out / "pairs.jsonl"), max_tokens=24, output=str(tmp_path / "direct"),
    ))  # fmt: skip
    for run in (via, direct):
        records = [json.loads(x) for x in (run / "labels.jsonl").read_text().splitlines()]
        metrics = json.loads((run / "metrics.json").read_text())
        assert len(records) == 2 and metrics["pairs"] == 2
        assert all(len(r["outputs"]) == 2 and r["principle"] for r in records)
        assert (run / "judge_cache.sqlite").is_file()
