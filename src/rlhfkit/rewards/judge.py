r"""LLM-as-judge: pairwise verdicts and single-answer ratings (Zheng et al. 2023).

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
layers (docs/api/index.md), so this module may not import the sampler. The embedded 135M model
runs but is too small to be a useful judge (it rarely writes a well-formed verdict); use a larger
local model or an endpoint.

The backends live in :mod:`rlhfkit.rewards.chat` (re-exported here).

The prompts are written for rlhfkit after the MT-Bench judge (Zheng et al. 2023, "Judging
LLM-as-a-Judge with MT-Bench and Chatbot Arena"): position swap, ``[[A]]/[[B]]/[[C]]``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rlhfkit.rewards.chat import (
    ChatBackend,
    JudgeBackendError,
    LocalChatBackend,
    OpenAIChatBackend,
    load_backend,
)

__all__ = [
    "ChatBackend", "JudgeBackendError", "JudgeResult", "LocalChatBackend", "OpenAIChatBackend",
    "PairwiseJudge", "RatingJudge", "RatingResult", "judge_reward", "load_backend",
    "pairwise_messages", "parse_rating", "parse_verdict", "rating_messages", "win_rate",
]  # fmt: skip

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


def conversation_block(prompt: Prompt) -> str:
    """The conversation a reply continues, as text (one ``Role: content`` block per message)."""
    if isinstance(prompt, str):
        return section_block("Conversation", f"User: {prompt.strip()}")
    if not prompt:
        raise ValueError("a judge prompt needs at least one message")
    turns = []
    for i, message in enumerate(prompt):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"judge prompt message {i}: need a dict with 'role' and 'content'")
        turns.append(f"{str(message['role']).capitalize()}: {str(message['content']).strip()}")
    return section_block("Conversation", "\n\n".join(turns))


def section_block(title: str, text: str) -> str:
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
    parts = [conversation_block(prompt)]
    if reference is not None:
        parts.append(section_block("Reference answer", reference))
    parts += [
        section_block("Reply of Assistant A", reply_a),
        section_block("Reply of Assistant B", reply_b),
    ]
    system = PAIRWISE_SYSTEM + (REFERENCE_NOTE if reference is not None else "")
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": "\n\n".join([*parts, PAIRWISE_ASK])},
    ]


def rating_messages(prompt: Prompt, reply: str, reference: str | None = None) -> Messages:
    """The judge's chat for rating one reply (see :func:`pairwise_messages`)."""
    parts = [conversation_block(prompt)]
    if reference is not None:
        parts.append(section_block("Reference answer", reference))
    parts.append(section_block("Reply of the assistant", reply))
    system = RATING_SYSTEM + (REFERENCE_NOTE if reference is not None else "")
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": "\n\n".join([*parts, RATING_ASK])},
    ]


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


def complete_checked(backend: ChatBackend, chats: list[Messages], max_tokens: int) -> list[str]:
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
        texts = complete_checked(self.backend, chats, self.max_tokens)
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
        outputs = complete_checked(self.backend, chats, self.max_tokens)
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
