"""``rlhfkit serve``: a local model behind a minimal OpenAI-compatible chat endpoint.

For judges, critics and rubric graders that expect an endpoint (``openai:<url>#<model>``) when
the model is local, and for tests of the endpoint path without a network. It implements what the
judge backends use of the OpenAI chat API, no more:

- ``POST /v1/chat/completions`` with ``messages``, ``max_tokens`` and ``temperature`` (only 0:
  the model decodes greedily, as a judge should), and optionally ``logprobs`` with
  ``top_logprobs``: each reply token's log-probability and its most likely alternatives, in the
  API's ``choices[0].logprobs.content`` layout;
- ``GET /v1/models``: the one model served.

Requests are answered one at a time (one model, one lock). For serving at scale use vLLM.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from rlhfkit.models.embedded import EMBEDDED_NAME
from rlhfkit.rewards.chat import LocalChatBackend


@dataclass
class ServeConfig:
    """rlhfkit serve: a local model as an OpenAI-compatible chat endpoint (greedy)."""

    model: str = EMBEDDED_NAME
    """Model name or path (the embedded model by default)."""
    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 8000
    """Port to listen on."""
    precision: str = "auto"
    """Compute dtype (auto, bf16, fp32, fp16)."""
    max_tokens_limit: int = 2048
    """The largest max_tokens a request may ask for."""

    def problems(self) -> list[tuple[str, str]]:
        """A port or limit out of range."""
        out = []
        if not 0 <= self.port < 65536:
            out.append(("port", f"must be in 0-65535, got {self.port}"))
        if self.max_tokens_limit < 1:
            out.append(("max_tokens_limit", f"must be at least 1, got {self.max_tokens_limit}"))
        return out


class ChatRequest(BaseModel):
    """The fields of a chat completion request that the server reads."""

    model: str | None = None
    messages: list[dict[str, Any]]
    max_tokens: int = 256
    temperature: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0


def _token_logprobs(
    backend: LocalChatBackend, ids: list[int], logits: torch.Tensor, top: int
) -> list[dict[str, Any]]:
    """The API's ``logprobs.content``: per reply token, its log-prob and the ``top`` best."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (T, V)
    best = logp.topk(max(top, 1), dim=-1)
    out = []
    for t, token in enumerate(ids):
        alternatives = [
            {"token": backend.tokenizer.decode([i]), "logprob": float(v)}
            for v, i in zip(best.values[t].tolist(), best.indices[t].tolist(), strict=True)
        ][:top]
        out.append({"token": backend.tokenizer.decode([token]), "logprob": float(logp[t, token]),
                    "top_logprobs": alternatives})  # fmt: skip
    return out


def create_app(backend: LocalChatBackend, model_name: str, max_tokens_limit: int = 2048) -> Any:
    """The FastAPI app answering for ``backend`` under the name ``model_name``."""
    from fastapi import FastAPI, HTTPException

    app = FastAPI(title="rlhfkit serve")
    lock = threading.Lock()

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model"}]}

    @app.post("/v1/chat/completions")
    def chat(request: ChatRequest) -> dict[str, Any]:
        if request.temperature != 0.0:
            raise HTTPException(400, "this server decodes greedily: use temperature 0")
        if not 1 <= request.max_tokens <= max_tokens_limit:
            raise HTTPException(400, f"max_tokens must be in 1-{max_tokens_limit}")
        if not 0 <= request.top_logprobs <= 20:
            raise HTTPException(400, "top_logprobs must be in 0-20")
        messages = [{"role": str(m.get("role")), "content": str(m.get("content", ""))}
                    for m in request.messages]  # fmt: skip
        with lock:
            [(text, ids, logits)] = backend.generate_replies(
                [messages], request.max_tokens, logits=request.logprobs
            )
        choice: dict[str, Any] = {
            "index": 0, "message": {"role": "assistant", "content": text},
            "finish_reason": "length" if len(ids) >= request.max_tokens else "stop",
        }  # fmt: skip
        if request.logprobs and logits is not None:
            content = _token_logprobs(backend, ids, logits, request.top_logprobs)
            choice["logprobs"] = {"content": content}
        return {"id": "chatcmpl-rlhfkit", "object": "chat.completion", "model": model_name,
                "choices": [choice]}  # fmt: skip

    return app


def main(cfg: ServeConfig) -> None:
    """Load the model and serve until interrupted."""
    import uvicorn

    backend = LocalChatBackend(cfg.model, cfg.precision)
    app = create_app(backend, cfg.model, cfg.max_tokens_limit)
    print(f"serving {cfg.model} at http://{cfg.host}:{cfg.port}/v1 "
          f"(judge:openai:http://{cfg.host}:{cfg.port}/v1#{cfg.model})", flush=True)  # fmt: skip
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
