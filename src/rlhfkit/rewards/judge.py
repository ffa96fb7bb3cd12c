r"""LLM-as-judge: pairwise verdicts and single-answer ratings (METHODS.md section 3.10).

A judge is a chat model asked, at temperature 0, to explain briefly and then give a verdict:

- **Pairwise** (:class:`PairwiseJudge`): the conversation and two replies, shown as Assistant A
  and Assistant B; the verdict is ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie). With ``swap`` (the
  default) every pair is judged in both orders, in one backend batch, to cancel position bias:
  both orders agree -> that result; they disagree -> tie. The score of a pair is 1.0 (A wins),
  0.0 (B wins), 0.5 (tie) or None when a verdict cannot be parsed (excluded from win rates).
  The win rate of A is the mean of the scores that are not None.
- **Single answer** (:class:`RatingJudge`): the conversation and one reply, rated ``[[n]]`` on
  1-10. It is a batched reward (``score_batch``), so ``rlhfkit eval --rewards judge:...`` and RL
  can use it.

Both take an optional reference answer and multi-turn prompts (a list of messages, shown as the
conversation that the reply continues).

What the parsers accept (the **last** match in the judge's output counts; earlier ones are the
judge quoting the format or changing its mind):

- verdict: ``[[A]]``, ``[[B]]``, ``[[C]]``, case-insensitive, spaces allowed inside the brackets
  (``[[ b ]]``), any text around (``Verdict: **[[B]]**.``). Anything else (``[A]``, ``[[D]]``,
  ``[[AB]]``, ``[[Tie]]``) is no verdict.
- rating: ``[[n]]`` with a decimal number n (``[[7]]``, ``[[7.5]]``, ``[[ 8 ]]``), optionally
  written out of 10 (``[[7/10]]``). When the last such number lies outside 1-10 the rating is
  None (an earlier in-range number is not used instead).

Judges run on a :class:`ChatBackend`: :class:`LocalChatBackend` (the embedded model or any local
or hub causal LM, greedy, batched) or :class:`OpenAIChatBackend` (any OpenAI-compatible
``/chat/completions`` endpoint, e.g. vLLM or llama.cpp servers, standard library only). As a
reward, a judge is named ``judge:<model name or path>`` or ``judge:openai:<base_url>#<model>``
(:func:`judge_reward`). The local backend decodes with transformers' ``model.generate`` rather
than :class:`rlhfkit.rollout.sampler.HFGenerator`: ``rewards`` and ``rollout`` are independent
layers (DESIGN.md section 1), so this module may not import the sampler. The embedded 135M model
runs but is too small to be a useful judge (it rarely writes a well-formed verdict); use a larger
local model or an endpoint.

This one file holds the prompts, parsers, judges and both backends (over the ~400-line budget)
because they are one feature that is read and changed together; the backends could move to
``rewards/chat.py`` if another module needs them.

The prompts are written for rlhfkit after the MT-Bench judge (Zheng et al. 2023, "Judging
LLM-as-a-Judge with MT-Bench and Chatbot Arena"): position swap, ``[[A]]/[[B]]/[[C]]``.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from transformers import GenerationConfig

from rlhfkit.data.templates import render_prompt
from rlhfkit.models.embedded import EMBEDDED_NAME
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.models.precision import default_device, resolve_precision

Messages = list[dict[str, str]]
Prompt = str | Sequence[dict[str, Any]]

_RULES = (
    "Judge the content only: the order in which the replies are shown, their length and the "
    "names of the assistants must not influence you. "
)
PAIRWISE_SYSTEM = (
    "You are an impartial judge. You are shown a conversation between a user and an AI "
    "assistant, then two candidate replies to the user's last message, written by Assistant A "
    "and Assistant B. Decide which reply serves the user better, weighing helpfulness, "
    "correctness, relevance, depth and clarity. " + _RULES + "First explain your comparison in "
    "a few sentences. Then end with your verdict in exactly this format: [[A]] if Assistant A's "
    "reply is better, [[B]] if Assistant B's reply is better, [[C]] if they are equally good."
)
RATING_SYSTEM = (
    "You are an impartial judge. You are shown a conversation between a user and an AI "
    "assistant, then the assistant's reply to the user's last message. Rate the reply from 1 "
    "(useless or wrong) to 10 (excellent), weighing helpfulness, correctness, relevance, depth "
    "and clarity. Judge the content only: the length of the reply must not influence you. "
    "First explain your assessment in a few sentences. Then end with the rating in exactly "
    "this format: [[rating]], for example [[5]]."
)
REFERENCE_NOTE = " A reference answer is given: use it to find mistakes in the replies."
PAIRWISE_ASK = "Explain briefly, then give your verdict: [[A]], [[B]] or [[C]]."
RATING_ASK = "Explain briefly, then give your rating from 1 to 10 as [[rating]]."

_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]", re.IGNORECASE)
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*(?:/\s*10\s*)?\]\]")
_SCORE = {"A": 1.0, "B": 0.0, "C": 0.5}
"""Verdict in the shown order -> score of the first-shown reply."""


def parse_verdict(text: str) -> str | None:
    """The last ``[[A]]``, ``[[B]]`` or ``[[C]]`` in ``text`` (upper case), or None.

    Case-insensitive, with spaces allowed inside the brackets (see the module docstring).
    """
    matches = _VERDICT.findall(text)
    return matches[-1].upper() if matches else None


def parse_rating(text: str) -> float | None:
    """The number of the last ``[[n]]`` (or ``[[n/10]]``) in ``text`` if 1 <= n <= 10, else None."""
    matches = _RATING.findall(text)
    if not matches:
        return None
    value = float(matches[-1])
    return value if 1.0 <= value <= 10.0 else None


def _conversation(prompt: Prompt) -> str:
    """The conversation a reply continues, as text (one ``Role: content`` block per message)."""
    if isinstance(prompt, str):
        return _section("Conversation", f"User: {prompt.strip()}")
    if not prompt:
        raise ValueError("a judge prompt needs at least one message")
    turns = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"judge prompt message {i}: need a dict with 'role' and 'content'")
        turns.append(f"{str(message['role']).capitalize()}: {str(message['content']).strip()}")
    return _section("Conversation", "\n\n".join(turns))


def _section(title: str, text: str) -> str:
    return f"[{title}]\n{text.strip()}\n[End of {title}]"


def pairwise_messages(
    prompt: Prompt, reply_a: str, reply_b: str, reference: str | None = None
) -> Messages:
    """The judge's chat for one ordered pair: system instructions, then conversation and replies.

    Args:
        prompt: The user's message, or the conversation (messages) the replies continue.
        reply_a: Shown as Assistant A's reply.
        reply_b: Shown as Assistant B's reply.
        reference: Optional reference answer, shown before the replies.
    """
    parts = [_conversation(prompt)]
    if reference is not None:
        parts.append(_section("Reference answer", reference))
    parts += [_section("Reply of Assistant A", reply_a), _section("Reply of Assistant B", reply_b)]
    system = PAIRWISE_SYSTEM + (REFERENCE_NOTE if reference is not None else "")
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": "\n\n".join([*parts, PAIRWISE_ASK])},
    ]


def rating_messages(prompt: Prompt, reply: str, reference: str | None = None) -> Messages:
    """The judge's chat for rating one reply (see :func:`pairwise_messages`)."""
    parts = [_conversation(prompt)]
    if reference is not None:
        parts.append(_section("Reference answer", reference))
    parts.append(_section("Reply of the assistant", reply))
    system = RATING_SYSTEM + (REFERENCE_NOTE if reference is not None else "")
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": "\n\n".join([*parts, RATING_ASK])},
    ]


@runtime_checkable
class ChatBackend(Protocol):
    """A chat model: a batch of conversations in, one reply text per conversation out (in order)."""

    def complete(
        self, messages_batch: list[Messages], *, max_tokens: int, temperature: float = 0.0
    ) -> list[str]:
        """One reply of at most ``max_tokens`` tokens to each conversation."""
        ...


@dataclass
class JudgeResult:
    """Pairwise verdicts of a batch.

    Attributes:
        scores: Per pair, 1.0 (A wins), 0.0 (B wins), 0.5 (tie) or None (unparseable).
        verdicts: Per pair, the parsed verdicts (A/B/C or None) in the order shown: A first,
            then, with swap, B first (None in that slot without swap).
        outputs: Per pair, the judge's raw outputs in the same two slots.
        swap: Whether each pair was judged in both orders.
    """

    scores: list[float | None]
    verdicts: list[tuple[str | None, str | None]]
    outputs: list[tuple[str, str | None]]
    swap: bool

    @property
    def unparseable(self) -> int:
        """Pairs without a score (some judge output had no verdict)."""
        return sum(s is None for s in self.scores)

    @property
    def unparseable_outputs(self) -> int:
        """Judge outputs without a verdict."""
        first = sum(v1 is None for v1, _ in self.verdicts)
        return first + (sum(v2 is None for _, v2 in self.verdicts) if self.swap else 0)

    @property
    def ties(self) -> int:
        """Pairs scored 0.5 (tie verdicts and, with swap, inconsistent orders)."""
        return sum(s == 0.5 for s in self.scores)

    @property
    def consistency(self) -> float | None:
        """Share of pairs whose two orders agree, among pairs parsed in both (None without swap)."""
        if not self.swap:
            return None
        both = [(_SCORE[a], 1.0 - _SCORE[b]) for a, b in self.verdicts if a and b]
        return sum(x == y for x, y in both) / len(both) if both else None

    def metrics(self) -> dict[str, float | int | None]:
        """Win rate of A, counts and consistency, for logging."""
        return {
            "win_rate": win_rate(self.scores),
            "pairs": len(self.scores),
            "ties": self.ties,
            "unparseable": self.unparseable,
            "unparseable_outputs": self.unparseable_outputs,
            "consistency": self.consistency,
        }


def win_rate(scores: JudgeResult | Sequence[float | None]) -> float | None:
    """Mean of the pair scores that are not None (ties count 0.5); None when there are none."""
    values = [
        s for s in (scores.scores if isinstance(scores, JudgeResult) else scores) if s is not None
    ]
    return sum(values) / len(values) if values else None


def _check_lengths(**lists: Sequence[Any] | None) -> int:
    sizes = {name: len(v) for name, v in lists.items() if v is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"judge inputs differ in length: {sizes}")
    return next(iter(sizes.values()))


def _complete(backend: ChatBackend, chats: list[Messages], max_tokens: int) -> list[str]:
    """The backend's replies at temperature 0, checked to be one string per chat."""
    texts = list(backend.complete(chats, max_tokens=max_tokens, temperature=0.0))
    if len(texts) != len(chats):
        raise ValueError(f"the judge backend returned {len(texts)} replies for {len(chats)} chats")
    return texts


def _pair_score(first: str | None, second: str | None, swap: bool) -> float | None:
    """Score of A from the verdict with A shown first and, with swap, the one with B first.

    Both orders agree -> that score; they disagree -> 0.5; a missing verdict -> None.
    """
    if first is None or (swap and second is None):
        return None
    if not swap or second is None:
        return _SCORE[first]
    return _SCORE[first] if _SCORE[first] == 1.0 - _SCORE[second] else 0.5


class PairwiseJudge:
    """Compares two replies per prompt with a chat model (see the module docstring).

    Args:
        backend: The judge model.
        swap: Judge both orders (cancels position bias; inconsistent orders give a tie).
        max_tokens: Tokens the judge may write per verdict.
    """

    def __init__(self, backend: ChatBackend, *, swap: bool = True, max_tokens: int = 256) -> None:
        self.backend, self.swap, self.max_tokens = backend, swap, max_tokens

    def compare(
        self,
        prompts: Sequence[Prompt],
        completions_a: Sequence[str],
        completions_b: Sequence[str],
        references: Sequence[str | None] | None = None,
    ) -> JudgeResult:
        """Score each pair (A = ``completions_a[i]``, B = ``completions_b[i]``).

        All judge calls (both orders of every pair) go to the backend as one batch.

        Raises:
            ValueError: When the inputs differ in length.
        """
        n = _check_lengths(
            prompts=prompts, completions_a=completions_a, completions_b=completions_b,
            references=references,
        )  # fmt: skip
        refs = list(references) if references is not None else [None] * n
        chats = [
            pairwise_messages(p, a, b, r)
            for p, a, b, r in zip(prompts, completions_a, completions_b, refs, strict=True)
        ]
        if self.swap:
            chats += [
                pairwise_messages(p, b, a, r)
                for p, a, b, r in zip(prompts, completions_a, completions_b, refs, strict=True)
            ]
        texts = _complete(self.backend, chats, self.max_tokens)
        forward = texts[:n]
        swapped: list[str | None] = list(texts[n:]) if self.swap else [None] * n
        verdicts = [
            (parse_verdict(f), None if s is None else parse_verdict(s))
            for f, s in zip(forward, swapped, strict=True)
        ]
        scores = [_pair_score(v1, v2, self.swap) for v1, v2 in verdicts]
        return JudgeResult(scores, verdicts, list(zip(forward, swapped, strict=True)), self.swap)


@dataclass
class RatingResult:
    """Ratings of a batch: ``scores`` (1-10 or None when unparseable) and the raw ``outputs``."""

    scores: list[float | None]
    outputs: list[str]

    @property
    def unparseable(self) -> int:
        """Outputs without a rating in 1-10."""
        return sum(s is None for s in self.scores)


class RatingJudge:
    """Rates single replies 1-10 with a chat model; also a batched reward function.

    As a reward, the example's ``prompt`` field is the conversation and ``reference_field`` (if
    present in the example) the reference answer. ``rated`` and ``unparseable`` count the
    replies scored so far and those without a rating (their reward is None: skipped).

    Args:
        backend: The judge model.
        max_tokens: Tokens the judge may write per rating.
        reference_field: Example field holding a reference answer (None: never use one).
    """

    def __init__(
        self,
        backend: ChatBackend,
        *,
        max_tokens: int = 256,
        reference_field: str | None = "reference",
    ) -> None:
        self.backend, self.max_tokens, self.reference_field = backend, max_tokens, reference_field
        self.rated = self.unparseable = 0

    def rate(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        references: Sequence[str | None] | None = None,
    ) -> RatingResult:
        """Rate ``completions[i]`` as a reply to ``prompts[i]`` (one backend batch)."""
        n = _check_lengths(prompts=prompts, completions=completions, references=references)
        refs = list(references) if references is not None else [None] * n
        chats = [
            rating_messages(p, c, r) for p, c, r in zip(prompts, completions, refs, strict=True)
        ]
        outputs = _complete(self.backend, chats, self.max_tokens)
        result = RatingResult([parse_rating(o) for o in outputs], list(outputs))
        self.rated += n
        self.unparseable += result.unparseable
        return result

    def score_batch(
        self, completions: Sequence[str], fields: Sequence[dict[str, Any]]
    ) -> list[float | None]:
        """Ratings of every completion given its example's fields (None where unparseable)."""
        prompts, refs = [], []
        for i, f in enumerate(fields):
            if f.get("prompt") is None:
                raise ValueError(f"completion {i}: the judge needs the example's 'prompt'")
            prompts.append(f["prompt"])
            ref = f.get(self.reference_field) if self.reference_field else None
            refs.append(None if ref is None else str(ref))
        return self.rate(prompts, completions, refs).scores

    def __call__(self, completion: str, **fields: Any) -> float | None:
        """Rating of one completion (prefer :meth:`score_batch` for many)."""
        return self.score_batch([completion], [fields])[0]


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
        self.batch_size, self.max_prompt_len = batch_size, max_prompt_len

    def complete(
        self, messages_batch: list[Messages], *, max_tokens: int, temperature: float = 0.0
    ) -> list[str]:
        """Greedy replies (``temperature`` must be 0: a judge is deterministic)."""
        if temperature != 0.0:
            raise ValueError("LocalChatBackend decodes greedily: use temperature 0")
        ids = [
            render_prompt(self.tokenizer, m, max_len=self.max_prompt_len) for m in messages_batch
        ]
        config = GenerationConfig(
            max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )  # fmt: skip
        device = next(self.model.parameters()).device
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together
        out: list[str] = [""] * len(ids)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in rows)
            batch = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros_like(batch)
            for r, i in enumerate(rows):  # left padding: every reply starts at column ``width``
                batch[r, width - len(ids[i]) :] = torch.tensor(ids[i])
                attention[r, width - len(ids[i]) :] = 1
            with torch.no_grad():
                generated = self.model.generate(
                    input_ids=batch.to(device), attention_mask=attention.to(device),
                    generation_config=config,
                )  # fmt: skip  # (rows, width + T)
            texts = self.tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
            for i, text in zip(rows, texts, strict=True):
                out[i] = text.strip()
        return out


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
    ) -> None:
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"judge endpoint {base_url!r}: need an http(s) URL such as "
                             "http://127.0.0.1:8000/v1")  # fmt: skip
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.timeout = model, api_key_env, timeout
        self.max_retries, self.concurrency, self.backoff = max_retries, max(1, concurrency), backoff
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
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"

        def one(messages: Messages) -> str:
            body = {"model": self.model, "messages": messages, "temperature": temperature,
                    "max_tokens": max_tokens}  # fmt: skip
            return self._post(json.dumps(body).encode(), headers)

        if not messages_batch:
            return []
        with ThreadPoolExecutor(min(self.concurrency, len(messages_batch))) as pool:
            return list(pool.map(one, messages_batch))

    def _post(self, body: bytes, headers: dict[str, str]) -> str:
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return self._content(response.read())
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


def judge_reward(
    spec: str,
    *,
    max_tokens: int = 256,
    reference_field: str | None = "reference",
    **backend_options: Any,
) -> RatingJudge:
    """A rating judge as a reward: ``judge:<model name or path>`` or ``judge:openai:<url>#<model>``.

    Args:
        spec: The judge's name (see :func:`load_backend`).
        max_tokens: Tokens the judge may write per rating.
        reference_field: Example field holding a reference answer.
        backend_options: Passed to the backend (e.g. ``precision``, ``concurrency``).
    """
    backend = load_backend(spec, **backend_options)
    return RatingJudge(backend, max_tokens=max_tokens, reference_field=reference_field)
