"""Format rewards (moved to :mod:`rlhfkit.rewards.verifiers.format`; re-exported here).

``--rewards rlhfkit.rewards.format:think_answer`` (``boxed``, ``bare_number``, ...) keeps working.
"""

from __future__ import annotations

from rlhfkit.rewards.verifiers.format import (
    BARE_NUMBER,
    BOXED,
    THINK_ANSWER,
    bare_number,
    boxed,
    format_reward,
    think_answer,
)

__all__ = [
    "BARE_NUMBER",
    "BOXED",
    "THINK_ANSWER",
    "bare_number",
    "boxed",
    "format_reward",
    "think_answer",
]
