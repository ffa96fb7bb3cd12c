"""AI preference labels under a constitution (RLAIF; Constitutional AI's RL stage).

For each pair of replies to a prompt, a principle with a preference question is drawn from the
constitution (uniform, a pure function of the seed and the pair's position). A judge model is
shown the conversation and both replies, and is asked the principle's question. It is asked
twice, with the replies in both orders, in one backend batch. It ends each answer with
``[[A]]`` or ``[[B]]``.

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
from rlhfkit.rewards.chat import ChatBackend, VerdictBackend
from rlhfkit.rewards.judge import Prompt, conversation_block, parse_verdict, section_block

PRINCIPLE_SYSTEM = (
    "You are an impartial judge. You are shown a conversation between a user and an AI "
    "assistant, then two candidate replies to the user's last message, from Assistant A and "
    "Assistant B, and a question about them. Answer the question for these two replies only; "
    "the order in which they are shown and their length must not influence you. Explain in "
    "one or two sentences, then end with [[A]] or [[B]]: the reply the question favours."
)


def principle_messages(
    prompt: Prompt, reply_a: str, reply_b: str, question: str
) -> list[dict[str, str]]:
    """The judge's chat for one ordered pair under a principle's preference question."""
    parts = [
        conversation_block(prompt), section_block("Reply of Assistant A", reply_a),
        section_block("Reply of Assistant B", reply_b),
        f"Question: {question.strip()}\nExplain briefly, then answer [[A]] or [[B]].",
    ]  # fmt: skip
    return [
        {"role": "system", "content": PRINCIPLE_SYSTEM},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def soft_label(forward: tuple[float, float], swapped: tuple[float, float]) -> float:
    """P(reply A preferred) from the verdict log-probabilities of both orders.

    Args:
        forward: ``(log p([[A]]), log p([[B]]))`` with A shown first.
        swapped: The same with B shown first (its ``[[A]]`` names reply B).

    Returns:
        The mean of softmax(forward)[A] and softmax(swapped)[B].
    """

    def first(pair: tuple[float, float]) -> float:
        gap = pair[1] - pair[0]
        return 0.0 if gap > 700 else 1.0 / (1.0 + math.exp(gap))  # exp overflows past ~709

    return 0.5 * (first(forward) + (1.0 - first(swapped)))


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
        n = len(self.preferred)
        parsed = [v for pair in self.verdicts for v in pair if v in ("A", "B")]
        both = [pair for pair in self.verdicts if all(v in ("A", "B") for v in pair)]
        agree = sum(first != second for first, second in both)  # A then B = same reply
        return {
            "pairs": float(n),
            "kept": sum(p is not None for p in self.preferred) / n if n else math.nan,
            "consistency": agree / len(both) if both else math.nan,
            "position_bias": sum(v == "A" for v in parsed) / len(parsed) if parsed else math.nan,
            "unparseable": float(sum(v is None for pair in self.verdicts for v in pair)),
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
) -> AILabels:
    """Label pairs with a judge under drawn principles (pair ``i`` is number ``start + i``).

    Raises:
        ValueError: Inputs of different lengths.
        DataError: The constitution has no principle with a preference question.
    """
    n = len(prompts)
    if not n == len(replies_a) == len(replies_b):
        raise ValueError(f"{n} prompts, {len(replies_a)} first and {len(replies_b)} second replies")
    usable = constitution.with_preference()
    principles = [usable.draw(seed, start + i) for i in range(n)]
    items = list(zip(prompts, replies_a, replies_b, principles, strict=True))
    chats = [principle_messages(p, a, b, pr.preference or "") for p, a, b, pr in items]
    chats += [principle_messages(p, b, a, pr.preference or "") for p, a, b, pr in items]
    logprobs: list[dict[str, float] | None] = [None] * len(chats)
    if isinstance(backend, VerdictBackend):
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
