"""Chat backends of the LLM judge: a local causal LM or an OpenAI-compatible endpoint.

- :class:`ChatBackend`: the protocol: a batch of conversations in, one reply each out, in order.
- :class:`LocalChatBackend`: the embedded model or any local or hub causal LM, greedy, batched
  (transformers' ``generate``: ``rewards`` may not import ``rollout``: docs/api/index.md).
- :class:`OpenAIChatBackend`: any OpenAI-compatible ``/chat/completions`` endpoint (vLLM,
  llama.cpp, hosted APIs), standard library only: retries with backoff on 429/5xx and connection
  errors, the API key read from an environment variable and never logged, concurrent requests
  answered in order.
- :func:`load_backend`: ``<model name or path>`` or ``openai:<base_url>#<model>``.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import GenerationConfig

from rlhfkit.data.templates import render_prompt
from rlhfkit.models.embedded import EMBEDDED_NAME
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.models.precision import default_device, resolve_precision

Messages = list[dict[str, str]]


@runtime_checkable
class ChatBackend(Protocol):
    """A chat model: a batch of conversations in, one reply text per conversation out (in order)."""

    def complete(
        self, messages_batch: list[Messages], *, max_tokens: int, temperature: float = 0.0
    ) -> list[str]:
        """One reply of at most ``max_tokens`` tokens to each conversation."""
        ...


@runtime_checkable
class VerdictBackend(Protocol):
    """A chat backend that also gives the log-probabilities of the verdict token.

    ``complete_with_verdict`` returns, per conversation, the greedy reply and a mapping from
    each choice (for example ``"A"`` and ``"B"``) to the log-probability of its first token at
    the verdict position: right after the reply's last ``[[``. The mapping is None when the
    reply has no ``[[<choice>`` there.
    """

    def complete_with_verdict(
        self, messages_batch: list[Messages], *, max_tokens: int, choices: tuple[str, ...]
    ) -> list[tuple[str, dict[str, float] | None]]:
        """Greedy replies and the choices' log-probabilities at their verdicts."""
        ...


@runtime_checkable
class PrefixBackend(Protocol):
    """A chat backend that scores the next token after a fixed start of its reply.

    ``prefix_logprobs`` returns, per conversation, the log-probability of each choice's first
    token right after the assistant's reply has begun with ``prefix`` (one forward pass, no
    generation): the classic way of reading a model's preference between lettered options.
    """

    def prefix_logprobs(
        self, messages_batch: list[Messages], *, prefix: str, choices: tuple[str, ...]
    ) -> list[dict[str, float]]:
        """Per conversation, ``{choice: log p(first token of choice | chat, prefix)}``."""
        ...


def verdict_position(pieces: list[str], choices: tuple[str, ...]) -> int | None:
    """Index of the verdict token: the last piece that starts a choice right after ``[[``.

    Args:
        pieces: The reply's tokens as text, in order.
        choices: The verdict's possible values (upper case).
    """
    text, found = "", None
    for t, piece in enumerate(pieces):
        head = piece.strip().upper()
        if head and text.rstrip().endswith("[[") and any(c.startswith(head) for c in choices):
            found = t
        text += piece
    return found


class LocalChatBackend:
    """A Hugging Face causal LM as the judge: chat template, greedy, batched, KV cache.

    Prompts are rendered with the model's chat template and generation prompt, sorted by
    length, left-padded in batches of ``batch_size`` and decoded greedily with
    ``model.generate`` (transformers' KV cache); the replies come back in input order.

    Args:
        model_name_or_path: Hub id, directory, or the embedded ``smollm2-135m-instruct``.
        precision: Compute dtype name (``auto``, ``bf16``, ``fp32``, ``fp16``).
        model: An already loaded causal LM (then ``tokenizer`` is needed and nothing is loaded).
        tokenizer: Its tokenizer.
        batch_size: Conversations per generate call.
        max_prompt_len: Keep only the last ``max_prompt_len`` prompt tokens.
        trust_remote_code: Allow model code from the hub.
    """

    def __init__(
        self,
        model_name_or_path: str = EMBEDDED_NAME,
        precision: str = "auto",
        *,
        model: Any = None,
        tokenizer: Any = None,
        batch_size: int = 8,
        max_prompt_len: int = 4096,
        trust_remote_code: bool = False,
    ) -> None:
        if model is None:
            device = default_device()
            tokenizer = load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code)
            model = load_model(
                model_name_or_path, dtype=resolve_precision(precision, device).compute,
                trust_remote_code=trust_remote_code, device=device,
            )  # fmt: skip
        elif tokenizer is None:
            raise ValueError("LocalChatBackend(model=...) needs the tokenizer too")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name = getattr(model.config, "_name_or_path", "") or model_name_or_path
        self.batch_size, self.max_prompt_len = batch_size, max_prompt_len

    def complete(
        self, messages_batch: list[Messages], *, max_tokens: int, temperature: float = 0.0
    ) -> list[str]:
        """Greedy replies (``temperature`` must be 0: a judge is deterministic)."""
        if temperature != 0.0:
            raise ValueError("LocalChatBackend decodes greedily: use temperature 0")
        return [
            text for text, _, _ in self.generate_replies(messages_batch, max_tokens, logits=False)
        ]

    def complete_with_verdict(
        self, messages_batch: list[Messages], *, max_tokens: int, choices: tuple[str, ...]
    ) -> list[tuple[str, dict[str, float] | None]]:
        """Greedy replies and the choices' log-probabilities at the verdict (see the protocol)."""
        first = {c: self.tokenizer.encode(c, add_special_tokens=False)[0] for c in choices}
        out: list[tuple[str, dict[str, float] | None]] = []
        for text, ids, logits in self.generate_replies(messages_batch, max_tokens, logits=True):
            pieces = [self.tokenizer.decode([i]) for i in ids]
            t = verdict_position(pieces, choices)
            if t is None or logits is None:
                out.append((text, None))
                continue
            logp = torch.log_softmax(logits[t].float(), dim=-1)
            out.append((text, {c: float(logp[i]) for c, i in first.items()}))
        return out

    def prefix_logprobs(
        self, messages_batch: list[Messages], *, prefix: str, choices: tuple[str, ...]
    ) -> list[dict[str, float]]:
        """Log-probs of the choices' first tokens after the reply starts with ``prefix``.

        One batched forward pass per ``batch_size`` conversations (left padding); the
        log-softmax is over the whole vocabulary.
        """
        first = {c: self.tokenizer.encode(c, add_special_tokens=False)[0] for c in choices}
        start = self.tokenizer.encode(prefix, add_special_tokens=False)
        ids = [
            render_prompt(self.tokenizer, m, max_len=self.max_prompt_len - len(start)) + start
            for m in messages_batch
        ]
        device = next(self.model.parameters()).device
        out: list[dict[str, float]] = [{} for _ in ids]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for begin in range(0, len(order), self.batch_size):
            rows = order[begin : begin + self.batch_size]
            batch, attention = self._left_pad([ids[i] for i in rows])
            with torch.no_grad():
                logits = self.model(
                    input_ids=batch.to(device), attention_mask=attention.to(device)
                ).logits[:, -1]  # (rows, V): the next token after each prefix
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for r, i in enumerate(rows):
                out[i] = {c: float(logp[r, t]) for c, t in first.items()}
        return out

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, width) ids and attention mask, left-padded so every row ends at the right."""
        width = max(len(s) for s in seqs)
        batch = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(batch)
        for r, s in enumerate(seqs):
            batch[r, width - len(s) :] = torch.tensor(s)
            attention[r, width - len(s) :] = 1
        return batch, attention

    def generate_replies(
        self, messages_batch: list[Messages], max_tokens: int, *, logits: bool
    ) -> list[tuple[str, list[int], torch.Tensor | None]]:
        """Per conversation, in input order: reply text, reply token ids and per-step logits."""
        ids = [
            render_prompt(self.tokenizer, m, max_len=self.max_prompt_len) for m in messages_batch
        ]
        config = GenerationConfig(
            max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id, output_logits=logits,
            return_dict_in_generate=True,
        )  # fmt: skip
        device = next(self.model.parameters()).device
        specials = set(self.tokenizer.all_special_ids)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together
        out: list[tuple[str, list[int], torch.Tensor | None]] = [("", [], None)] * len(ids)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch, attention = self._left_pad([ids[i] for i in rows])
            width = batch.shape[1]  # every reply starts at column ``width``
            with torch.no_grad():
                result = self.model.generate(
                    input_ids=batch.to(device), attention_mask=attention.to(device),
                    generation_config=config,
                )  # fmt: skip  # sequences (rows, width + T), logits T x (rows, V)
            steps = torch.stack(result.logits, dim=1).cpu() if logits else None  # (rows, T, V)
            for r, i in enumerate(rows):
                reply = result.sequences[r, width:].tolist()
                end = next((k for k, t in enumerate(reply) if t in specials), len(reply))
                reply = reply[:end]  # up to the end of text (then only padding follows)
                text = self.tokenizer.decode(reply, skip_special_tokens=True).strip()
                out[i] = (text, reply, None if steps is None else steps[r, : len(reply)])
        return out

    def __repr__(self) -> str:
        return f"LocalChatBackend({self.name!r})"


class JudgeBackendError(RuntimeError):
    """A chat endpoint failed (the message names the URL and the HTTP status, never the key)."""


_RETRIED = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


class OpenAIChatBackend:
    """Any OpenAI-compatible chat endpoint: ``POST {base_url}/chat/completions``.

    The body is the standard ``{"model", "messages", "temperature", "max_tokens"}``; the reply is
    ``choices[0].message.content``. The key is read from the environment variable
    ``api_key_env`` when set (sent as ``Authorization: Bearer ...``; local servers need none).
    HTTP 429 and 5xx answers, connection errors and time-outs are retried ``max_retries``
    times, waiting ``backoff * 2**k`` seconds before retry k; other errors raise at once.
    Conversations are sent ``concurrency`` at a time; replies keep the input order.

    Args:
        base_url: The API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: Model name sent in each request.
        api_key_env: Environment variable holding the API key (None: send no key).
        timeout: Seconds per request.
        max_retries: Retries after the first attempt.
        concurrency: Requests in flight at once.
        backoff: First retry delay in seconds (doubling).
        top_logprobs: Alternatives asked for per token when verdict log-probs are wanted.

    Raises:
        ValueError: When ``base_url`` is not an http(s) URL.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        concurrency: int = 4,
        backoff: float = 1.0,
        top_logprobs: int = 20,
    ) -> None:
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"judge endpoint {base_url!r}: need an http(s) URL such as "
                             "http://127.0.0.1:8000/v1")  # fmt: skip
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.timeout = model, api_key_env, timeout
        self.max_retries, self.concurrency, self.backoff = max_retries, max(1, concurrency), backoff
        self.top_logprobs = top_logprobs
        self._opener = urllib.request.build_opener()

    def __repr__(self) -> str:
        return f"OpenAIChatBackend({self.url!r}, model={self.model!r})"

    def complete(
        self, messages_batch: list[Messages], *, max_tokens: int, temperature: float = 0.0
    ) -> list[str]:
        """One reply per conversation, in order (see the class docstring).

        Raises:
            JudgeBackendError: A request failed for good, or the answer had no reply.
        """
        headers = self._headers()

        def one(messages: Messages) -> str:
            body = {"model": self.model, "messages": messages, "temperature": temperature,
                    "max_tokens": max_tokens}  # fmt: skip
            return self._content(self._post(json.dumps(body).encode(), headers))

        return self._map(one, messages_batch)

    def complete_with_verdict(
        self, messages_batch: list[Messages], *, max_tokens: int, choices: tuple[str, ...]
    ) -> list[tuple[str, dict[str, float] | None]]:
        """Greedy replies and the choices' log-probabilities at the verdict (see the protocol).

        Asks for ``logprobs`` with the ``top_logprobs`` alternatives of every token. A choice
        missing from the alternatives at the verdict gets ``-inf``; a server that returns no
        log-probs gives None (the caller falls back to the verdict text).
        """
        headers = self._headers()

        def one(messages: Messages) -> tuple[str, dict[str, float] | None]:
            body = {
                "model": self.model, "messages": messages, "temperature": 0.0,
                "max_tokens": max_tokens, "logprobs": True, "top_logprobs": self.top_logprobs,
            }  # fmt: skip
            answer = self._post(json.dumps(body).encode(), headers)
            return self._content(answer), _verdict_logprobs(answer, choices)

        return self._map(one, messages_batch)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _map(self, fn: Any, messages_batch: list[Messages]) -> list[Any]:
        if not messages_batch:
            return []
        with ThreadPoolExecutor(min(self.concurrency, len(messages_batch))) as pool:
            return list(pool.map(fn, messages_batch))

    def _post(self, body: bytes, headers: dict[str, str]) -> bytes:
        """The answer's body, after retries (see the class docstring)."""
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode("utf-8", "replace").strip()
                last = f"POST {self.url}: HTTP {err.code} {err.reason}: {detail}"
                if err.code != 429 and err.code < 500:
                    raise JudgeBackendError(last) from None
            except _RETRIED as err:
                last = f"POST {self.url}: {getattr(err, 'reason', None) or err!r}"
        raise JudgeBackendError(f"{last} (gave up after {self.max_retries + 1} attempts)")

    def _content(self, payload: bytes) -> str:
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeBackendError(
                f"POST {self.url}: no choices[0].message.content in the answer {payload[:200]!r}"
            ) from None
        return content or ""


def _verdict_logprobs(payload: bytes, choices: tuple[str, ...]) -> dict[str, float] | None:
    """The choices' log-probabilities at the verdict of an answer with ``logprobs``, or None."""
    try:
        tokens = json.loads(payload)["choices"][0]["logprobs"]["content"]
        pieces = [str(t["token"]) for t in tokens]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    t = verdict_position(pieces, choices)
    if t is None:
        return None
    found: dict[str, list[float]] = {c: [] for c in choices}
    for alt in tokens[t].get("top_logprobs") or [tokens[t]]:
        head = str(alt.get("token", "")).strip().upper()
        for c in choices:
            if head and c.startswith(head):
                found[c].append(float(alt["logprob"]))
    return {c: (torch.tensor(v).logsumexp(0).item() if v else -math.inf) for c, v in found.items()}


def load_backend(spec: str, **options: Any) -> ChatBackend:
    """The chat backend named ``<model name or path>`` or ``openai:<base_url>#<model>``.

    A leading ``judge:`` is ignored; an empty name is the embedded model. ``options`` go to
    the backend's constructor.

    Raises:
        ValueError: When an ``openai:`` spec lacks ``#<model>``.
    """
    name = spec.removeprefix("judge:")
    if name.startswith("openai:"):
        base_url, sep, model = name.removeprefix("openai:").rpartition("#")
        if not sep or not base_url or not model:
            raise ValueError(
                f"judge {spec!r}: expected openai:<base_url>#<model>, e.g. "
                "judge:openai:http://127.0.0.1:8000/v1#my-model"
            )
        return OpenAIChatBackend(base_url, model, **options)
    return LocalChatBackend(name or EMBEDDED_NAME, **options)
