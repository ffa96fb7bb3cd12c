r"""Format rewards: does a completion have the requested shape (RLHF book ch. 7)?

- :func:`format_reward` (registered as ``verifier:format``): the DeepSeek-R1 template
  ``<think> ... </think> <answer> ... </answer>``, scored ``strict`` (1 or 0) or ``partial``
  (0.25 per tag). It is meant as a small bonus beside a correctness reward,
  ``r = correctness + w_fmt * format`` with ``w_fmt`` well below 1 (reference 0.5).
- :func:`think_answer`: the strict score as a one-argument reward.
- :func:`boxed`: exactly one ``\boxed{...}``.
- :func:`bare_number`: the whole completion is one number (optionally ending with a period), as
  the built-in arithmetic prompts ask ("Answer with just the number").
- :func:`split_think`: a completion's reasoning and its reply, for the verifiers that look at
  one of them (language consistency, instruction constraints).

Each is usable as ``--rewards rlhfkit.rewards.verifiers.format:<name>`` (or the older path
``rlhfkit.rewards.format:<name>``).
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
"""The four tags of the R1 template, each worth 0.25 in ``partial`` mode."""

THINK_ANSWER = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
"""The strict template, matched against the whole (whitespace-stripped) completion."""
BOXED = re.compile(r"\\boxed\{")
BARE_NUMBER = re.compile(r"\s*-?\d[\d,]*(?:\.\d+)?\.?\s*")

FORMAT_MODES = ("strict", "partial")


def format_reward(completion: str, *, mode: str = "strict") -> float:
    r"""Reward for the ``<think>...</think><answer>...</answer>`` template.

    - ``strict``: 1.0 iff the completion, stripped of surrounding whitespace, fully matches
      ``^<think>.*?</think>\s*<answer>.*?</answer>$`` (DOTALL) and each of the four tags
      occurs exactly once; else 0.0. (Stripping lets a trailing newline from generation pass;
      the once-each rule rejects ``<think>a</think></think><answer>..``, which the lazy pattern
      alone would accept.)
    - ``partial``: ``0.25 * #{tag in TAGS : completion.count(tag) == 1}``, as in the reference
      code: a tag earns its quarter only when it occurs exactly once, so repeating tags never
      pays. Order is not checked.

    Args:
        completion: The model's reply.
        mode: ``"strict"`` or ``"partial"``.

    Returns:
        The format reward in ``[0, 1]``.

    Raises:
        ValueError: An unknown ``mode``.
    """
    if mode == "strict":
        once_each = all(completion.count(tag) == 1 for tag in TAGS)
        return float(once_each and THINK_ANSWER.fullmatch(completion.strip()) is not None)
    if mode == "partial":
        return 0.25 * sum(completion.count(tag) == 1 for tag in TAGS)
    raise ValueError(f"format_reward: unknown mode {mode!r}; use one of {FORMAT_MODES}")


def think_answer(completion: str) -> float:
    """1.0 if the completion is a think block followed by an answer block, nothing else.

    The ``strict`` mode of :func:`format_reward`.
    """
    return format_reward(completion, mode="strict")


def boxed(completion: str) -> float:
    r"""1.0 if the completion contains exactly one ``\boxed{``."""
    return float(len(BOXED.findall(completion)) == 1)


def bare_number(completion: str) -> float:
    """1.0 if the completion is a single number and nothing else."""
    return float(BARE_NUMBER.fullmatch(completion) is not None)


def split_think(completion: str) -> tuple[str | None, str]:
    """Split a completion into its reasoning (the think block) and its reply (what follows).

    - With a ``</think>``: the reasoning is the text before the last ``</think>``, starting
      after the first ``<think>`` when there is one (chat templates such as DeepSeek-R1's put
      the opening tag in the prompt, so the completion may hold only the closing one); any
      think tags left inside are removed. The reply is the text after the last ``</think>``.
    - With only a ``<think>`` (generation cut off mid-thought): the reasoning is everything
      after it, and the reply is empty.
    - With neither: no reasoning (None), and the reply is the whole completion.

    Returns:
        ``(reasoning, reply)``.
    """
    close = completion.rfind(THINK_CLOSE)
    if close >= 0:
        before, reply = completion[:close], completion[close + len(THINK_CLOSE) :]
    elif THINK_OPEN in completion:
        before, reply = completion, ""
    else:
        return None, completion
    start = before.find(THINK_OPEN)
    if start >= 0:
        before = before[start + len(THINK_OPEN) :]
    reasoning = before.replace(THINK_OPEN, " ").replace(THINK_CLOSE, " ")
    return reasoning, reply
