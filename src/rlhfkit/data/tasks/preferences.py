"""Built-in preference pairs with a programmatic gold judge (``builtin:preferences``).

The gold judge, :func:`gold_score`, scores any completion of a ``builtin:instructions`` prompt
against that prompt's reference reply (one working line, then ``Answer: <answer>``)::

    gold = 1.0 * correct + 0.3 * house_format - length_penalty      (0.0 for an empty completion)

- ``correct``: the value of the completion's last ``Answer:`` line (case-insensitive label,
  Markdown ``*``/``_`` around it tolerated) equals the reference's answer after normalisation:
  surrounding whitespace, quotes, backticks and ``*``/``_`` removed, then trailing
  ``. , ! ? ; :``; inner whitespace collapsed, commas followed by one space, numbers compared
  by value (``"1,234" == "1234"``, ``"12.0" == "12"``), and case ignored unless the task is
  about case (``task`` is ``"uppercase"`` or ``"lowercase"``, or the reference answer is all
  capitals). A reference without an ``Answer:`` line uses its last non-empty line as answer.
- ``house_format``: after stripping, the completion is exactly two lines, a non-empty working
  line and a last line ``Answer: <non-empty value>``, with nothing after it.
- ``length_penalty``: ``0.02`` per whitespace-separated word beyond the budget (the reference's
  word count + 10), capped at ``0.5``.

So scores lie in ``[-0.5, 1.3]``: the reference itself scores 1.3, a correct but padded reply
0.8, a well-formatted wrong answer 0.3, a refusal or a reply without an ``Answer:`` line 0.0.

Pairs: every ``builtin:instructions`` row of a split (multi-turn and system-prompt rows too; the
prompt is every message before the final assistant reply) gives ``PAIRS_PER_ROW`` pairs whose
``chosen`` is the reference reply and whose ``rejected`` is one perturbation of it (the row's
``category``), cycling through ``CATEGORIES`` so that each is about equally common:

- ``wrong_answer``: the same working line with a plausible wrong answer (a nearby number, a
  mis-sorted list, a misspelled or unreversed word, the wrong casing, another word, city or
  definition from the task's pool, a dropped list item, the wrong gift, the other parity);
- ``no_answer_line``: the working line alone, or the answer in a hedging sentence;
- ``verbose``: the correct reply with filler sentences on its working line (35+ extra words);
- ``refusal``: a polite refusal;
- ``off_topic``: the reference reply of a prompt of another task type in the same split.

A pair is kept only if ``gold(chosen) - gold(rejected) >= MIN_GAP``; otherwise the next category
is tried. Each split draws only from its own instruction rows, so the splits share no prompt,
and every choice comes from ``random.Random`` seeded with ``SEED`` and the split name.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache, partial
from typing import Any

from rlhfkit.data.tasks.instruction_facts import ANTONYMS, CAPITALS, DEFINITIONS, GIFTS, LISTS
from rlhfkit.data.tasks.instructions import FOLLOW_UPS, SYSTEM_TASKS
from rlhfkit.data.tasks.instructions import builtin_split as instruction_rows

SEED = 20240612
CORRECT_REWARD = 1.0
FORMAT_REWARD = 0.3
LENGTH_SLACK = 10
"""Words a completion may have beyond the reference's word count before the length penalty."""
LENGTH_PENALTY_PER_WORD = 0.02
MAX_LENGTH_PENALTY = 0.5
MIN_GAP = 0.25
"""Smallest gold difference between the chosen and rejected completion of a kept pair."""
PAIRS_PER_ROW = 2
WRONG_ANSWERS_PER_ROW = 1
"""Pairs per instruction row of ``builtin:wrong_answers`` (:func:`build_wrong_answers`)."""
CASE_TASKS = frozenset({"uppercase", "lowercase"})
"""Tasks whose answers are compared case-sensitively."""

_ANSWER_LINE = re.compile(r"^[ \t*_#>]*answer[ \t*_]*:(.*)$", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])", re.ASCII)
_EDGE_QUOTES = " \t\r\n\"'`*_"


# --- The gold judge --------------------------------------------------------------------------


def _canonical_number(match: re.Match[str]) -> str:
    """A number written canonically: no thousands commas or trailing zeros, ``-0`` as ``0``."""
    try:
        value = Decimal(match.group().replace(",", ""))
        integral = value.to_integral_value()
        text = format(integral if value == integral else value.normalize(), "f")
    except (ArithmeticError, ValueError):
        return match.group()
    return "0" if value == 0 else text


def _normalise(answer: str, case_sensitive: bool) -> str:
    """An answer value normalised for comparison (see the module docstring)."""
    text = answer.strip(_EDGE_QUOTES).rstrip(".,!?;:").strip(_EDGE_QUOTES)
    text = _NUMBER.sub(_canonical_number, text)
    text = re.sub(r"\s*,\s*", ", ", " ".join(text.split()))
    return text if case_sensitive else text.casefold()


def _last_answer(text: str) -> str | None:
    """The value of the last ``Answer:`` line, or None when there is none or it is empty."""
    matches = _ANSWER_LINE.findall(text)
    if not matches:
        return None
    value = matches[-1].strip(" \t\r*_")
    return value or None


def _has_house_format(completion: str) -> bool:
    """Exactly a non-empty working line and a final ``Answer: <value>`` line."""
    lines = completion.strip().splitlines()
    if len(lines) != 2 or not lines[0].strip() or _ANSWER_LINE.match(lines[0]):
        return False
    return lines[1].startswith("Answer: ") and bool(lines[1][len("Answer: ") :].strip())


# --- The gold judge's terms, one by one (rubric rules use them) ---------------------------------


def _target(reference: str, task: str | None) -> tuple[str, bool]:
    """The reference's answer and whether it is compared case-sensitively."""
    lines = [line for line in reference.splitlines() if line.strip()] or [""]
    target = _last_answer(reference) or lines[-1]
    letters = [char for char in target if char.isalpha()]
    return target, task in CASE_TASKS or (len(letters) >= 2 and target.upper() == target)


def answer_is_correct(completion: str, reference: str, task: str | None = None) -> bool:
    """Whether the completion's last ``Answer:`` line equals the reference's answer (normalised)."""
    target, case_sensitive = _target(reference, task)
    answer = _last_answer(completion)
    return answer is not None and (
        _normalise(answer, case_sensitive) == _normalise(target, case_sensitive)
    )


def mentions_answer(completion: str, reference: str, task: str | None = None) -> bool:
    """Whether the reference's answer occurs in the completion (normalised, as whole words)."""
    target, case_sensitive = _target(reference, task)
    needle = _normalise(target, case_sensitive)
    if not needle:
        return False
    hay = _normalise(completion, case_sensitive)
    return re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", hay) is not None


def has_answer_line(completion: str) -> bool:
    """Whether the completion has a non-empty ``Answer:`` line."""
    return _last_answer(completion) is not None


def within_word_budget(completion: str, reference: str) -> bool:
    """Whether the completion has at most ``LENGTH_SLACK`` more words than the reference."""
    return len(completion.split()) - len(reference.split()) <= LENGTH_SLACK


def has_house_format(completion: str) -> bool:
    """Exactly a non-empty working line and a final ``Answer: <value>`` line."""
    return _has_house_format(completion)


def gold_score(completion: str, reference: str, task: str | None = None) -> float:
    """Gold score of a completion of a ``builtin:instructions`` prompt.

    ``gold = 1.0 * correct + 0.3 * house_format - min(0.5, 0.02 * max(0, words - budget))``
    with ``budget = words(reference) + 10``, and 0.0 for an empty or blank completion; the
    terms are defined in the module docstring. Never raises on text input.

    Args:
        completion: Any model output.
        reference: The reference assistant reply of the prompt.
        task: The instruction row's ``task`` (makes ``uppercase``/``lowercase`` answers
            case-sensitive); None judges from the reference alone.

    Returns:
        A score in ``[-0.5, 1.3]``.
    """
    if not completion.strip():
        return 0.0
    correct = answer_is_correct(completion, reference, task)
    extra = len(completion.split()) - len(reference.split()) - LENGTH_SLACK
    penalty = min(MAX_LENGTH_PENALTY, LENGTH_PENALTY_PER_WORD * max(0, extra))
    score = CORRECT_REWARD * correct + FORMAT_REWARD * _has_house_format(completion) - penalty
    return round(score, 10)  # drops float noise such as 0.27999999999999997


def gold_margin(a: str, b: str, reference: str, task: str | None = None) -> float:
    """gold(a) - gold(b) for two completions of the same prompt (see :func:`gold_score`)."""
    return gold_score(a, reference, task) - gold_score(b, reference, task)


def preference_of(margin: float) -> float:
    """1.0 if ``margin`` > 0, 0.0 if < 0, 0.5 (a tie) if it is within 1e-9 of 0."""
    return 0.5 if abs(margin) < 1e-9 else float(margin > 0)


def gold_prefers(a: str, b: str, reference: str, task: str | None = None) -> float:
    """Gold preference between two completions of the same prompt.

    Args:
        a: First completion.
        b: Second completion.
        reference: The prompt's reference reply.
        task: The instruction row's ``task`` (see :func:`gold_score`).

    Returns:
        1.0 if ``a`` scores higher, 0.0 if ``b`` does, 0.5 if the scores differ by < 1e-9.
    """
    return preference_of(gold_margin(a, b, reference, task))


# --- Wrong answers: (answer, rng) -> a plausible wrong answer ----------------------------------


def _nearby_number(answer: str, rng: random.Random) -> str:
    match = re.search(r"\d+", answer)
    if match is None:
        return _by_shape(answer, rng)
    n = int(match.group())
    deltas = [d for d in ((-2, -1, 1, 2) if n < 20 else (-10, -2, -1, 1, 2, 10)) if n + d >= 0]
    return answer[: match.start()] + str(n + rng.choice(deltas)) + answer[match.end() :]


def _missort(answer: str, rng: random.Random) -> str:
    items = answer.split(", ")
    i = rng.randrange(len(items) - 1)
    items[i], items[i + 1] = items[i + 1], items[i]
    return ", ".join(items)


def _misspell(answer: str, rng: random.Random) -> str:
    options = [answer[::-1]]
    if answer.isupper():
        options.append(answer.lower())
    swaps = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    if swaps:
        i = rng.choice(swaps)
        options.append(answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :])
    return rng.choice(options)


def _miscase(answer: str, rng: random.Random) -> str:
    words = answer.split(" ")
    i = rng.randrange(len(words))
    words[i] = words[i].lower() if answer.isupper() else words[i].upper()
    sentence_case = answer[:1].upper() + answer[1:].lower()
    return rng.choice([" ".join(words), sentence_case])


def _other_from(pool: Sequence[str], answer: str, rng: random.Random) -> str:
    return rng.choice([item for item in pool if item.casefold() != answer.casefold()])


def _drop_item(answer: str, rng: random.Random) -> str:
    opening = next((o for _, o, _ in LISTS if answer.startswith(o + " ")), None)
    if opening is None:
        return _by_shape(answer, rng)
    body = answer[len(opening) + 1 :].rstrip(".")
    items = body.replace(" and ", ", ").split(", ")
    del items[rng.randrange(len(items))]
    return f"{opening} {', '.join(items[:-1])} and {items[-1]}." if len(items) > 1 else answer


def _swap_gift(answer: str, rng: random.Random) -> str:
    gift = max((g for g in GIFTS if f"the {g}," in answer), key=len, default=None)
    if gift is None:
        return _by_shape(answer, rng)
    other = rng.choice([g for g in GIFTS if g != gift])
    return answer.replace(f"the {gift},", f"the {other},")


def _flip_parity(answer: str, rng: random.Random) -> str:
    return {"even": "odd", "odd": "even"}.get(answer.lower(), answer + " and odd")


def _by_shape(answer: str, rng: random.Random) -> str:
    """A wrong answer chosen by the answer's form (for multi-turn and system-prompt rows)."""
    if answer.lower() in ("even", "odd"):
        return _flip_parity(answer, rng)
    if re.fullmatch(r"\d+(, \d+)+", answer):
        return _missort(answer, rng)
    if re.match(r"\d", answer):
        return _nearby_number(answer, rng)
    if re.fullmatch(r"[A-Za-z]{2,}", answer):
        return _misspell(answer, rng)
    return " ".join(answer.split()[:-1]) or answer + "s"


WRONG_ANSWERS: dict[str, Callable[[str, random.Random], str]] = {
    "arithmetic": _nearby_number,
    "count_words": _nearby_number,
    "count_letters": _nearby_number,
    "unit_conversion": _nearby_number,
    "sort_numbers": _missort,
    "reverse_word": _misspell,
    "uppercase": _miscase,
    "lowercase": _miscase,
    "antonyms": partial(_other_from, [word for pair in ANTONYMS for word in pair]),
    "capitals": partial(_other_from, [city for _, city in CAPITALS]),
    "definitions": partial(_other_from, [text for _, text, _ in DEFINITIONS]),
    "list_to_sentence": _drop_item,
    "thank_you_note": _swap_gift,
    "even_odd": _flip_parity,
}
"""Task type -> wrong-answer maker; other tasks (multi-turn, system prompt) use ``_by_shape``."""


# --- Perturbations of the reference: (context, rng) -> rejected completion -------------------

# fmt: off
REFUSALS = (
    "I'm sorry, I can't help with that.", "Sorry, but I am not able to answer this question.",
    "I'm afraid I can't assist with that request.", "Unfortunately, I cannot help with this one.",
    "I would rather not answer that. Is there anything else I can do for you?",
    "As an assistant, I am unable to respond to this request.",
)
HEDGES = (
    "Hmm, let me think about this one. I believe it is {answer}, but I could be wrong.",
    "Good question! My best guess would be {answer}, though you may want to check it.",
    "I think the answer might be {answer}.",
)
FILLERS = (
    "That is a great question, and I am happy to walk through it carefully.",
    "Let me take a moment to think about this step by step before answering.",
    "It is always a good idea to double-check this kind of thing.",
    "Questions like this come up quite often, so it is worth being thorough.",
    "I want to make sure that everything here is explained clearly.",
    "There are a few things to keep in mind, but the idea is simple.",
    "I hope this explanation is clear and useful for you.",
    "Please let me know if you would like more detail on any part of it.",
    "Taking it slowly like this helps to avoid small mistakes.",
    "Many people find this easier once they see it written out.",
)
# fmt: on


@dataclass(frozen=True)
class _Context:
    """One instruction row, as the perturbations see it."""

    reference: str
    work: str
    answer: str
    task: str
    off_topic: Sequence[str]
    """Reference replies of other task types in the same split."""


def _wrong_answer(ctx: _Context, rng: random.Random) -> str:
    wrong = WRONG_ANSWERS.get(ctx.task, _by_shape)(ctx.answer, rng)
    return f"{ctx.work}\nAnswer: {wrong}"


def _no_answer_line(ctx: _Context, rng: random.Random) -> str:
    return rng.choice([ctx.work, rng.choice(HEDGES).format(answer=ctx.answer.rstrip(".!"))])


def _verbose(ctx: _Context, rng: random.Random) -> str:
    target = len(ctx.reference.split()) + LENGTH_SLACK
    target += round(MAX_LENGTH_PENALTY / LENGTH_PENALTY_PER_WORD)
    fillers = rng.sample(FILLERS, len(FILLERS))
    before, after = [fillers.pop()], []
    while fillers and len(" ".join([*before, ctx.work, *after, ctx.answer]).split()) + 1 < target:
        after.append(fillers.pop())
    return " ".join([*before, ctx.work, *after]) + f"\nAnswer: {ctx.answer}"


def _refusal(ctx: _Context, rng: random.Random) -> str:
    return rng.choice(REFUSALS)


def _off_topic(ctx: _Context, rng: random.Random) -> str:
    return rng.choice(ctx.off_topic)


CATEGORIES: dict[str, Callable[[_Context, random.Random], str]] = {
    "wrong_answer": _wrong_answer,
    "no_answer_line": _no_answer_line,
    "verbose": _verbose,
    "refusal": _refusal,
    "off_topic": _off_topic,
}
"""Category (the perturbation that made ``rejected``) -> perturbation of the reference."""

_RELATED_TASKS: dict[str, frozenset[str]] = {
    "with_system": frozenset(SYSTEM_TASKS),
    "multi_turn": frozenset(name for name, _ in FOLLOW_UPS),
}
"""Task types whose replies are not off-topic for a row of the key's type."""


# --- Building the splits -------------------------------------------------------------------------


def _context(row: dict[str, Any], singles: Sequence[tuple[str, str]]) -> _Context:
    reference, task = row["messages"][-1]["content"], row["task"]
    work, _, answer = reference.rpartition("\nAnswer: ")
    excluded = {task} | _RELATED_TASKS.get(task, frozenset())
    others = [reply for other, reply in singles if other not in excluded]
    return _Context(reference, work, answer, task, others)


def _pair(
    row: dict[str, Any], ctx: _Context, category: str, rng: random.Random
) -> dict[str, Any] | None:
    """One preference row, or None if the perturbation is not clearly worse than the reference."""
    rejected = CATEGORIES[category](ctx, rng)
    gold_chosen = gold_score(ctx.reference, ctx.reference, ctx.task)
    gold_rejected = gold_score(rejected, ctx.reference, ctx.task)
    if rejected == ctx.reference or gold_chosen - gold_rejected < MIN_GAP:
        return None
    return {
        "prompt": copy.deepcopy(row["messages"][:-1]),
        "chosen": ctx.reference,
        "rejected": rejected,
        "category": category,
        "task": ctx.task,
        "reference": ctx.reference,
        "gold_chosen": gold_chosen,
        "gold_rejected": gold_rejected,
    }


def build(rows: Sequence[dict[str, Any]], *, seed: int | str) -> list[dict[str, Any]]:
    """Preference rows from the instruction rows of one split (see the module docstring).

    Args:
        rows: ``builtin:instructions`` rows ``{"messages": [...], "task": ...}`` of one split.
        seed: Seed of the ``random.Random`` behind every choice.

    Returns:
        ``PAIRS_PER_ROW`` rows per instruction row (fewer where no category gives a clear gap),
        in instruction-row order.
    """
    rng = random.Random(seed)
    singles = [
        (row["task"], row["messages"][-1]["content"])
        for row in rows
        if row["task"] not in _RELATED_TASKS
    ]
    pairs: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        pairs += _row_pairs(row, _context(row, singles), i * PAIRS_PER_ROW, rng)
    return pairs


def _row_pairs(
    row: dict[str, Any], ctx: _Context, turn: int, rng: random.Random
) -> list[dict[str, Any]]:
    """The pairs of one row: categories in cycle order from ``turn``, each at most once."""
    names, pairs = list(CATEGORIES), []
    for start in range(turn, turn + PAIRS_PER_ROW):
        tried = (names[(start + j) % len(names)] for j in range(len(names)))
        untried = [name for name in tried if name not in {p["category"] for p in pairs}]
        pair = next(filter(None, (_pair(row, ctx, name, rng) for name in untried)), None)
        pairs += [pair] if pair is not None else []
    return pairs


def build_wrong_answers(
    rows: Sequence[dict[str, Any]], *, seed: int | str, per_row: int = WRONG_ANSWERS_PER_ROW
) -> list[dict[str, Any]]:
    """Correctness pairs: each instruction row's reference against distinct wrong answers.

    Args:
        rows: ``builtin:instructions`` rows of one split.
        seed: Seed of the ``random.Random`` behind every choice.
        per_row: Pairs per row, each with another wrong answer (fewer where the row's
            wrong-answer maker gives fewer distinct ones in ``4 * per_row`` draws).

    Returns:
        Rows of category ``wrong_answer`` in instruction-row order (the :func:`build` fields).
    """
    rng = random.Random(seed)
    pairs: list[dict[str, Any]] = []
    for row in rows:
        ctx, seen = _context(row, ()), set()
        for _ in range(4 * per_row):
            pair = _pair(row, ctx, "wrong_answer", rng)
            if pair is not None and pair["rejected"] not in seen:
                seen.add(pair["rejected"])
                pairs.append(pair)
            if len(seen) == per_row:
                break
    return pairs


@lru_cache(maxsize=2)
def _cached_split(split: str) -> tuple[dict[str, Any], ...]:
    return tuple(build(instruction_rows(split), seed=f"{SEED}:{split}"))


@lru_cache(maxsize=2)
def _cached_wrong_answers(split: str) -> tuple[dict[str, Any], ...]:
    return tuple(build_wrong_answers(instruction_rows(split), seed=f"{SEED}:wrong:{split}"))


def wrong_answers_split(split: str) -> list[dict[str, Any]]:
    """The ``builtin:wrong_answers`` rows of one split (:func:`build_wrong_answers`).

    These pairs teach a reward model whether the final answer is right, not only the format.

    Raises:
        ValueError: An unknown split.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")
    return copy.deepcopy(list(_cached_wrong_answers(split)))


def builtin_split(split: str) -> list[dict[str, Any]]:
    """The ``builtin:preferences`` rows of one split (built once, then copied from a cache).

    Args:
        split: ``"train"`` or ``"heldout"``.

    Returns:
        Rows ``{"prompt", "chosen", "rejected", "category", "task", "reference",
        "gold_chosen", "gold_rejected"}`` (schema ``preference``; the extra keys become meta).

    Raises:
        ValueError: An unknown split.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")
    return copy.deepcopy(list(_cached_split(split)))
