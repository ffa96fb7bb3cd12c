"""Pair-level record conversions (docs/data_formats.md): multi-turn pairs and KTO records.

- :func:`final_turn_pair`: two full conversations -> a ``PreferenceExample`` on the final turn,
  the earlier turns taken from the chosen branch.
- :func:`unpaired_from_pairs`: pairs -> ``UnpairedExample`` records (x, y_c, True),
  (x, y_r, False); :func:`class_ratio` gives their desirable fraction.

Re-exported by :mod:`rlhfkit.data.preferences`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhfkit.data.messages import parse_conversation
from rlhfkit.data.schemas import PreferenceExample, UnpairedExample
from rlhfkit.data.sources import DataError


def final_turn_pair(
    chosen_conversation: Any, rejected_conversation: Any, location: str = ""
) -> PreferenceExample:
    """A preference pair on the final turn of two conversations (multi-turn).

    The final turn is the last user message and the reply after it (assistant messages,
    possibly with tool calls and results). The prompt is the chosen conversation up to and
    including that user message, so earlier turns follow the chosen branch even where the
    rejected one differs (:func:`~rlhfkit.data.messages.split_implicit_prompt`, used by the
    ``preference`` schema without a ``prompt``, needs them shared). Chosen and rejected are the
    two final replies; the final user messages must be equal.

    Args:
        chosen_conversation: The preferred full conversation (a list of messages).
        rejected_conversation: The dispreferred full conversation.
        location: Where the row came from, for errors and the example.

    Returns:
        ``PreferenceExample(chosen's earlier turns + final user message, chosen reply,
        rejected reply)``.

    Raises:
        DataError: An invalid conversation, different final user messages, or identical
            final replies.
    """
    chosen = parse_conversation(chosen_conversation, "chosen", location)
    rejected = parse_conversation(rejected_conversation, "rejected", location)
    c, r = (
        max(i for i, m in enumerate(msgs) if m["role"] == "user") for msgs in (chosen, rejected)
    )
    if chosen[c] != rejected[r]:
        raise DataError(
            location,
            f"rejected[{r}]",
            f"final user message differs from 'chosen[{c}]'; a pair compares two replies to "
            "the same message",
        )
    if chosen[c + 1 :] == rejected[r + 1 :]:
        raise DataError(location, "rejected", "final reply is identical to 'chosen'")
    return PreferenceExample(chosen[: c + 1], chosen[c + 1 :], rejected[r + 1 :], location=location)


def unpaired_from_pairs(examples: Sequence[PreferenceExample]) -> list[UnpairedExample]:
    """Split each pair into two KTO records: (x, y_c, desirable) and (x, y_r, undesirable).

    Args:
        examples: Preference pairs.

    Returns:
        ``2 * len(examples)`` records, chosen then rejected for each pair, keeping meta and
        location.
    """
    return [
        UnpairedExample(ex.prompt, completion, label, meta=dict(ex.meta), location=ex.location)
        for ex in examples
        for completion, label in ((ex.chosen, True), (ex.rejected, False))
    ]


def class_ratio(examples: Sequence[UnpairedExample]) -> float:
    """The fraction of desirable records (reported for KTO, whose weights depend on it).

    Args:
        examples: Unpaired records.

    Returns:
        (number labelled desirable) / (number of records).

    Raises:
        ValueError: No records.
    """
    if not examples:
        raise ValueError("class_ratio needs at least one example")
    return sum(ex.label for ex in examples) / len(examples)
