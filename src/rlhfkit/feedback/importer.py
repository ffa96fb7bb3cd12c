"""Candidate rows (JSONL) -> task items, validated with the dataset message rules.

One JSON object per line, with a prompt and two or more completions:

- the prompt: ``prompt`` (a string, or messages ending with a user/tool message: a multi-turn
  conversation so far) or ``messages`` (the same, under the chat key);
- the completions: ``completions`` (a list of strings or assistant message lists), or the
  pipeline's label requests ``a`` and ``b``, or a preference row's ``chosen`` and ``rejected``;
- optional ``id`` (kept as the item's source id and written back on export); every other field
  is kept and exported unchanged.

Pairwise Likert modes need exactly two completions; rating and ranking take K >= 2.
"""

from __future__ import annotations

import json
from typing import Any

from rlhfkit.data.messages import parse_completion, parse_prompt
from rlhfkit.data.sources import DataError

PAIR_KEYS = (("a", "b"), ("chosen", "rejected"))
"""Alternative field pairs that hold two completions."""

MAX_COMPLETIONS = 9
"""Most completions per item (one digit key each on the labelling page)."""


def _completions(data: dict[str, Any], loc: str) -> tuple[list[Any], tuple[str, ...]]:
    if "completions" in data:
        value = data["completions"]
        if not isinstance(value, list) or len(value) < 2:
            raise DataError(loc, "completions", "expected a list of at least 2 completions")
        return value, ("completions",)
    for first, second in PAIR_KEYS:
        if first in data and second in data:
            return [data[first], data[second]], (first, second)
    raise DataError(
        loc,
        None,
        "no completions: give 'completions' (a list), or 'a' and 'b', or 'chosen' and 'rejected'",
    )


def parse_candidate(data: Any, loc: str, mode: str) -> dict[str, Any]:
    """Validate one candidate row and turn it into an item dict.

    Args:
        data: The decoded JSON row.
        loc: Where it came from (``file:line``), for errors.
        mode: The task mode (pairwise modes need exactly two completions).

    Returns:
        ``{"source_id", "prompt", "completions", "meta"}`` with prompt and completions as given.

    Raises:
        DataError: Naming the location, the field and the fix.
    """
    if not isinstance(data, dict):
        raise DataError(loc, None, "expected a JSON object per line")
    key = "prompt" if "prompt" in data else "messages" if "messages" in data else None
    if key is None:
        raise DataError(loc, "prompt", "missing; give 'prompt' (or a 'messages' conversation)")
    prompt = parse_prompt(data[key], key, loc)
    completions, used = _completions(data, loc)
    for i, completion in enumerate(completions):
        parse_completion(completion, f"{used[0]}[{i}]", loc, prompt[-1]["role"])
    if mode.startswith("likert") and len(completions) != 2:
        raise DataError(
            loc,
            used[0],
            f"mode {mode} compares two completions, got {len(completions)}; "
            "use mode 'rating' or 'ranking' for more",
        )
    if len(completions) > MAX_COMPLETIONS:
        raise DataError(loc, used[0], f"at most {MAX_COMPLETIONS} completions per item")
    meta = {k: v for k, v in data.items() if k not in (key, "id", *used)}
    return {
        "source_id": data.get("id"),
        "prompt": data[key],
        "completions": completions,
        "meta": meta,
    }


def parse_candidates(text: str, mode: str, *, name: str = "<upload>") -> list[dict[str, Any]]:
    """Parse a JSONL document of candidates (blank lines are ignored).

    Raises:
        DataError: For the first bad line, or when there is no row at all.
    """
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        loc = f"{name}:{n}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(loc, None, f"not valid JSON ({err.msg})") from None
        items.append(parse_candidate(data, loc, mode))
    if not items:
        raise DataError(name, None, "no candidate rows")
    return items
