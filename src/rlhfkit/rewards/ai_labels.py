"""AI preference labels under a constitution (RLAIF; Constitutional AI's RL stage).

For each pair of replies to a prompt, a principle with a preference question is drawn from the
constitution (uniform, a pure function of the seed and the pair's position). A judge model is
shown the conversation and both replies, and is asked the principle's question. It is asked
twice, with the replies in both orders, in one backend batch. Two ways of reading its verdict:

- **generative**: it explains, then ends its answer with ``[[A]]`` or ``[[B]]`` (parsed);
- **classic** (Bai et al.'s labelling): its reply is begun for it with "The answer is: (" and
  the verdict is P(A) against P(B) for the next token, renormalised over the two (one forward
  pass, nothing to parse). Small models that never write a well-formed verdict still give one.

- Both orders pick the same reply: the pair is labelled with it.
- The orders disagree (the judge picked a position, not a reply), a verdict is missing, or it
  is a tie: the pair is dropped.

What is reported with the labels: ``consistency`` (the share of pairs whose two verdicts
agree), ``position_bias`` (the share of parsed verdicts that picked the reply shown first; 0.5
is none) and the count of unparseable answers.

Soft labels. Where the backend gives the log-probabilities of the two verdict tokens,
:func:`soft_label` turns them into P(first reply preferred) = softmax over the two verdicts,
averaged over both orders. That value suits a reward model's margin or cDPO's label smoothing
(epsilon = 1 - P).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from rlhfkit.data.constitution import Constitution, Principle
from rlhfkit.rewards.chat import ChatBackend, PrefixBackend, VerdictBackend
from rlhfkit.rewards.judge import Prompt, conversation_block, parse_verdict, section_block

PRINCIPLE_SYSTEM = (
    "You are an impartial judge. You are shown a conversation between a user and an AI "
    "assistant, then two candidate replies to the user's last message, from Assistant A and "
    "Assistant B, and a question about them. Answer the question for these two replies only; "
    "the order in which they are shown and their length must not influence you. Explain in "
    "one or two sentences, then end with [[A]] or [[B]]: the reply the question favours."
)


def principle_messages(
    prompt: Prompt, reply_a: str, reply_b: str, question: str, classic: bool = False
) -> list[dict[str, str]]:
    """The judge's chat for one ordered pair under a principle's preference question.

    ``classic`` asks for the letter alone, as ``(A)`` or ``(B)`` (the classic mode reads the
    letter's probability after :data:`CLASSIC_PREFIX`).
    """
    ask = ("Answer with (A) or (B)." if classic
           else "Explain briefly, then answer [[A]] or [[B]].")  # fmt: skip
    parts = [
        conversation_block(prompt), section_block("Reply of Assistant A", reply_a),
        section_block("Reply of Assistant B", reply_b), f"Question: {question.strip()}\n{ask}",
    ]  # fmt: skip
    return [
        {"role": "system", "content": CLASSIC_SYSTEM if classic else PRINCIPLE_SYSTEM},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


CLASSIC_SYSTEM = (
    "You are an impartial judge. You are shown a conversation between a user and an AI "
    "assistant, then two candidate replies to the user's last message, (A) and (B), and a "
    "question about them. Answer the question for these two replies only; the order in which "
    "they are shown and their length must not influence you."
)
CLASSIC_PREFIX = "The answer is: ("
"""How the judge's reply begins in the classic mode; the next token is the verdict."""


def _classic_text(logprobs: dict[str, float]) -> str:
    """A classic verdict written as a generative one, so one parser reads both."""
    p = _p_first((logprobs["A"], logprobs["B"]))
    verdict = "A" if p > 0.5 else "B" if p < 0.5 else "C"
    return f"P(A) = {p:.4f} [[{verdict}]]"


def soft_label(forward: tuple[float, float], swapped: tuple[float, float]) -> float:
    """P(reply A preferred) from the verdict log-probabilities of both orders.

    Args:
        forward: ``(log p([[A]]), log p([[B]]))`` with A shown first.
        swapped: The same with B shown first (its ``[[A]]`` names reply B).

    Returns:
        The mean of softmax(forward)[A] and softmax(swapped)[B].
    """
    return 0.5 * (_p_first(forward) + (1.0 - _p_first(swapped)))


def _p_first(pair: tuple[float, float]) -> float:
    """Softmax over ``(log p([[A]]), log p([[B]]))``, its first entry."""
    gap = pair[1] - pair[0]
    return 0.0 if gap > 700 else 1.0 / (1.0 + math.exp(gap))  # exp overflows past ~709


@dataclass
class AILabels:
    """The labels of a batch of pairs, and how reliable the judge was.

    Attributes:
        preferred: Per pair, ``"a"`` or ``"b"`` when both orders agree, else None (dropped).
        principles: The principle each pair was judged under.
        verdicts: Per pair, the parsed verdicts ``(A-first, B-first)`` in shown positions.
        outputs: The judge's raw answers, in the same layout.
        soft: Per pair, P(reply a preferred) from the verdict log-probs of both orders
            (:func:`soft_label`), or None where the backend gave none.
    """

    preferred: list[str | None]
    principles: list[Principle]
    verdicts: list[tuple[str | None, str | None]]
    outputs: list[tuple[str, str]]
    soft: list[float | None] | None = None

    def metrics(self) -> dict[str, float]:
        """``kept``, ``consistency``, ``position_bias`` and ``unparseable`` (see the module)."""
        return verdict_metrics(self.preferred, self.verdicts)


def verdict_metrics(
    preferred: Sequence[str | None], verdicts: Sequence[Sequence[str | None]]
) -> dict[str, float]:
    """How reliable a judge was over pairs judged in both orders (NaN where undefined).

    Args:
        preferred: Per pair, the kept label or None.
        verdicts: Per pair, the parsed verdicts (A-first, B-first) in shown positions.

    Returns:
        ``pairs``; ``kept`` (share labelled); ``consistency`` (share of fully parsed pairs whose
        orders pick the same reply); ``position_bias`` (share of parsed verdicts naming the
        reply shown first); ``unparseable`` (count of verdicts that could not be read).
    """
    n = len(preferred)
    parsed = [v for pair in verdicts for v in pair if v in ("A", "B")]
    both = [pair for pair in verdicts if all(v in ("A", "B") for v in pair)]
    agree = sum(first != second for first, second in both)  # A then B = same reply
    return {
        "pairs": float(n),
        "kept": sum(p is not None for p in preferred) / n if n else math.nan,
        "consistency": agree / len(both) if both else math.nan,
        "position_bias": sum(v == "A" for v in parsed) / len(parsed) if parsed else math.nan,
        "unparseable": float(sum(v is None for pair in verdicts for v in pair)),
    }


def label_pairs(
    backend: ChatBackend,
    prompts: Sequence[Prompt],
    replies_a: Sequence[str],
    replies_b: Sequence[str],
    constitution: Constitution,
    *,
    seed: int = 0,
    start: int = 0,
    max_tokens: int = 256,
    mode: str = "generative",
) -> AILabels:
    """Label pairs with a judge under drawn principles (pair ``i`` is number ``start + i``).

    Args:
        backend: The judge.
        prompts: The conversations the replies answer.
        replies_a: First replies.
        replies_b: Second replies.
        constitution: Principles (those with a preference question are drawn).
        seed: Seed of the draws.
        start: Number of the first pair in the run.
        max_tokens: Tokens per generative answer.
        mode: ``generative`` (the judge explains, then writes ``[[A]]``/``[[B]]``), ``classic``
            (one forward pass: P(A) vs P(B) after the reply starts "The answer is: (";
            needs a :class:`~rlhfkit.rewards.chat.PrefixBackend`), or ``auto`` (classic where
            the backend supports it).

    Raises:
        ValueError: Inputs of different lengths, or an unknown or unsupported mode.
        DataError: The constitution has no principle with a preference question.
    """
    n = len(prompts)
    if not n == len(replies_a) == len(replies_b):
        raise ValueError(f"{n} prompts, {len(replies_a)} first and {len(replies_b)} second replies")
    usable = constitution.with_preference()
    principles = [usable.draw(seed, start + i) for i in range(n)]
    items = list(zip(prompts, replies_a, replies_b, principles, strict=True))
    if mode == "auto":
        mode = "classic" if isinstance(backend, PrefixBackend) else "generative"
    if mode not in ("generative", "classic"):
        raise ValueError(f"AI label mode {mode!r}: expected auto, classic or generative")
    classic = mode == "classic"
    chats = [principle_messages(p, a, b, pr.preference or "", classic) for p, a, b, pr in items]
    chats += [principle_messages(p, b, a, pr.preference or "", classic) for p, a, b, pr in items]
    logprobs: list[dict[str, float] | None] = [None] * len(chats)
    if classic:
        if not isinstance(backend, PrefixBackend):
            raise ValueError(f"{backend!r} cannot score a reply's next token: use the "
                             "generative mode")  # fmt: skip
        scored = backend.prefix_logprobs(chats, prefix=CLASSIC_PREFIX, choices=("A", "B"))
        logprobs = list(scored)
        texts = [_classic_text(lp) for lp in scored]
    elif isinstance(backend, VerdictBackend):
        answers = backend.complete_with_verdict(chats, max_tokens=max_tokens, choices=("A", "B"))
        texts = [text for text, _ in answers]
        logprobs = [lp for _, lp in answers]
    else:
        texts = list(backend.complete(chats, max_tokens=max_tokens, temperature=0.0))
    if len(texts) != 2 * n:
        raise ValueError(f"the judge backend returned {len(texts)} replies for {2 * n} chats")
    verdicts = [(parse_verdict(texts[i]), parse_verdict(texts[n + i])) for i in range(n)]
    agreed = {("A", "B"): "a", ("B", "A"): "b"}  # B shown first: its [[A]] names reply b
    soft = [_soft(logprobs[i], logprobs[n + i]) for i in range(n)]
    return AILabels(
        [agreed.get(v) for v in verdicts], principles, verdicts,
        [(texts[i], texts[n + i]) for i in range(n)], soft,
    )  # fmt: skip


def _soft(forward: dict[str, float] | None, swapped: dict[str, float] | None) -> float | None:
    """:func:`soft_label` of two orders' verdict log-probs, None when either is missing."""
    if forward is None or swapped is None:
        return None
    pairs = [(lp["A"], lp["B"]) for lp in (forward, swapped)]
    if any(math.isinf(a) and math.isinf(b) for a, b in pairs):
        return None
    return soft_label(pairs[0], pairs[1])
