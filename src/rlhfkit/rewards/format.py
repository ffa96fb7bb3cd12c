r"""Format rewards: 1.0 when a completion has the requested shape, else 0.0.

Usable as ``--rewards rlhfkit.rewards.format:<name>`` next to a correctness reward (each
component is logged on its own; weights with ``--weights``):

- ``think_answer``: ``<think> ... </think>`` then ``<answer> ... </answer>`` and nothing else
  (the DeepSeek-R1 template).
- ``boxed``: exactly one ``\boxed{...}``.
- ``bare_number``: the whole completion is one number (optionally ending with a period), as the
  built-in arithmetic prompts ask ("Answer with just the number").
"""

from __future__ import annotations

import re

THINK_ANSWER = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
BOXED = re.compile(r"\\boxed\{")
BARE_NUMBER = re.compile(r"\s*-?\d[\d,]*(?:\.\d+)?\.?\s*")


def think_answer(completion: str) -> float:
    """1.0 if the completion is a think block followed by an answer block, nothing else."""
    return float(
        THINK_ANSWER.fullmatch(completion) is not None and completion.count("<think>") == 1
    )


def boxed(completion: str) -> float:
    r"""1.0 if the completion contains exactly one ``\boxed{``."""
    return float(len(BOXED.findall(completion)) == 1)


def bare_number(completion: str) -> float:
    """1.0 if the completion is a single number and nothing else."""
    return float(BARE_NUMBER.fullmatch(completion) is not None)
