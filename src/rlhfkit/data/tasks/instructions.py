"""The built-in instruction-tuning dataset (``builtin:instructions``), generated deterministically.

Rows are ``sft`` records ``{"messages": [...], "task": "<type>"}`` over fourteen single-turn task
types (worked arithmetic, reversing a word, upper/lower-casing a sentence, sorting numbers,
counting words and letters, antonyms, country capitals, unit conversion, short definitions,
turning a list into a sentence, a fixed-format thank-you note, even/odd), plus ``multi_turn``
rows (a follow-up question about the previous answer) and ``with_system`` rows (a leading system
message, one of which changes the reply's opening).

House style, so that a small model visibly picks it up after a few fine-tuning steps: every
reply is one short line of working followed by a final line ``Answer: <answer>``.

Splits: each task draws its items (a word, a fact, a random problem) from one pool without
replacement, held-out rows first, so the ``heldout`` and ``train`` splits never share an item or a
prompt. Everything derives from ``SEED`` through ``random.Random``; ``main()`` rewrites the
shipped ``instructions_train.jsonl`` and ``instructions_heldout.jsonl`` (a test checks they equal
a fresh build).

The hand-written word lists and facts the rows are built from live in ``instruction_facts.py``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rlhfkit.data.tasks.instruction_facts import (
    ANTONYMS,
    CAPITALS,
    DEFINITIONS,
    GIFTS,
    LISTS,
    NAMES,
    SENTENCES,
    SYSTEM_PROMPTS,
    UNITS,
    WORDS,
)

SEED = 20240611

_PACKAGE = "rlhfkit.data.tasks"
"""The package that ships ``instructions_train.jsonl`` and ``instructions_heldout.jsonl``."""


# --- Renderers: (item, rng) -> (user message, assistant reply) -------------------------------

Turn = tuple[str, str]


def _reply(work: str, answer: object) -> str:
    return f"{work}\nAnswer: {answer}"


def _draw_arithmetic(rng: random.Random) -> tuple[int, str, int]:
    op = rng.choice("+-*")
    if op == "*":
        return rng.randint(11, 99), op, rng.randint(2, 9)
    a, b = rng.randint(11, 99), rng.randint(11, 99)
    return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)


def _arithmetic_value(item: tuple[int, str, int]) -> int:
    a, op, b = item
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def _arithmetic(item: tuple[int, str, int], rng: random.Random) -> Turn:
    a, op, b = item
    expr, result = f"{a} {op} {b}", _arithmetic_value(item)
    tens, ones = a - a % 10, a % 10
    if op == "*":
        work = f"{tens} * {b} = {tens * b} and {ones} * {b} = {ones * b}, "
        work += f"so {tens * b} + {ones * b} = {result}."
    elif op == "+":
        bt, bo = b - b % 10, b % 10
        work = f"{tens} + {bt} = {tens + bt} and {ones} + {bo} = {ones + bo}, "
        work += f"so {tens + bt} + {ones + bo} = {result}."
    else:
        bt, bo = b - b % 10, b % 10
        work = f"{a} - {bt} = {a - bt}, then {a - bt} - {bo} = {result}."
    template = rng.choice(
        ("What is {e}?", "Calculate {e}.", "What does {e} equal?", "Work out {e}.")
    )
    return template.format(e=expr), _reply(f"{expr}: {work}", result)


def _reverse(word: str, rng: random.Random) -> Turn:
    template = rng.choice(
        (
            "Reverse the word '{w}'.",
            "Spell '{w}' backwards.",
            "Write the word '{w}' in reverse order.",
        )
    )
    work = (
        f"The letters of '{word}' are {'-'.join(word)}. In reverse order: {'-'.join(word[::-1])}."
    )
    return template.format(w=word), _reply(work, word[::-1])


def _uppercase(sentence: str, rng: random.Random) -> Turn:
    template = rng.choice(
        ('Rewrite this sentence in capital letters: "{s}"', 'Convert to uppercase: "{s}"')
    )
    return template.format(s=sentence), _reply(
        "Every letter becomes a capital letter.", sentence.upper()
    )


def _lowercase(sentence: str, rng: random.Random) -> Turn:
    template = rng.choice(
        ('Rewrite this sentence in lowercase letters: "{s}"', 'Convert to lowercase: "{s}"')
    )
    work = "Every capital letter becomes a lowercase letter."
    return template.format(s=sentence.upper()), _reply(work, sentence.lower())


def _draw_sort(rng: random.Random) -> tuple[tuple[int, ...], bool]:
    return tuple(rng.sample(range(1, 100), rng.randint(4, 6))), rng.random() < 0.5


def _sort(item: tuple[tuple[int, ...], bool], rng: random.Random) -> Turn:
    numbers, ascending = item
    listed = ", ".join(map(str, numbers))
    if ascending:
        template = rng.choice(
            (
                "Sort these numbers from smallest to largest: {n}.",
                "Put these numbers in order, smallest first: {n}.",
            )
        )
        work = f"The smallest is {min(numbers)} and the largest is {max(numbers)}."
    else:
        template = rng.choice(
            (
                "Sort these numbers from largest to smallest: {n}.",
                "Put these numbers in order, largest first: {n}.",
            )
        )
        work = f"The largest is {max(numbers)} and the smallest is {min(numbers)}."
    ordered = sorted(numbers, reverse=not ascending)
    return template.format(n=listed), _reply(work, ", ".join(map(str, ordered)))


def _count_words(sentence: str, rng: random.Random) -> Turn:
    template = rng.choice(
        ('How many words are in this sentence? "{s}"', 'Count the words in: "{s}"')
    )
    words = sentence.rstrip(".").split()
    numbered = " ".join(f"{word} ({i})" for i, word in enumerate(words, 1))
    return template.format(s=sentence), _reply(f"Numbering the words: {numbered}.", len(words))


def _count_letters(word: str, rng: random.Random) -> Turn:
    template = rng.choice(
        ("How many letters are in the word '{w}'?", "Count the letters in '{w}'.")
    )
    work = f"Spelled out: {'-'.join(word)}. That is {len(word)} letters."
    return template.format(w=word), _reply(work, len(word))


def _antonym(item: tuple[str, str], rng: random.Random) -> Turn:
    word, opposite = item
    template = rng.choice(
        (
            "What is the opposite of '{w}'?",
            "Give the antonym of '{w}'.",
            "What word means the opposite of '{w}'?",
        )
    )
    return template.format(w=word), _reply(f"The opposite of '{word}' is '{opposite}'.", opposite)


def _capital(item: tuple[str, str], rng: random.Random) -> Turn:
    country, city = item
    template = rng.choice(
        (
            "What is the capital of {c}?",
            "Which city is the capital of {c}?",
            "Name the capital city of {c}.",
        )
    )
    return template.format(c=country), _reply(f"The capital of {country} is {city}.", city)


def _draw_unit(rng: random.Random) -> tuple[int, int]:
    return rng.randint(2, 15), rng.randrange(len(UNITS))


def _unit(item: tuple[int, int], rng: random.Random) -> Turn:
    value, index = item
    source, singular, target, factor = UNITS[index]
    template = rng.choice(("Convert {v} {s} to {t}.", "How many {t} are in {v} {s}?"))
    work = f"One {singular} is {factor} {target}, so {value} * {factor} = {value * factor}."
    return template.format(v=value, s=source, t=target), _reply(work, f"{value * factor} {target}")


def _definition(item: tuple[str, str, str], rng: random.Random) -> Turn:
    word, definition, example = item
    template = rng.choice(("What does '{w}' mean?", "Define the word '{w}'."))
    return template.format(w=word), _reply(f"For example: {example}", definition)


def _draw_list(rng: random.Random) -> tuple[int, tuple[str, ...]]:
    kind = rng.randrange(len(LISTS))
    return kind, tuple(sorted(rng.sample(LISTS[kind][2], rng.randint(3, 4))))


def _list_sentence(item: tuple[int, tuple[str, ...]], rng: random.Random) -> Turn:
    kind, opening, _ = LISTS[item[0]]
    items = rng.sample(item[1], len(item[1]))  # a shuffled copy: the order shown varies
    bullets = "\n".join(f"- {thing}" for thing in items)
    user = f"Turn this {kind} list into one sentence that starts with '{opening}':\n{bullets}"
    sentence = f"{opening} {', '.join(items[:-1])} and {items[-1]}."
    return user, _reply(
        "I joined the items with commas and put 'and' before the last one.", sentence
    )


def _draw_thanks(rng: random.Random) -> tuple[str, str]:
    return rng.choice(NAMES), rng.choice(GIFTS)


def _thanks(item: tuple[str, str], rng: random.Random) -> Turn:
    name, gift = item
    template = rng.choice(
        ("Write a short thank-you note to {n} for the {g}.", "Help me thank {n} for the {g}.")
    )
    note = f"Thank you so much for the {gift}, {name}! It really made my day."
    return template.format(n=name, g=gift), _reply("Here is a short, friendly note.", note)


def _even_odd(n: int, rng: random.Random) -> Turn:
    template = rng.choice(("Is {n} even or odd?", "Is the number {n} odd or even?"))
    digit, parity = n % 10, "even" if n % 2 == 0 else "odd"
    return template.format(n=n), _reply(
        f"{n} ends in {digit}, and {digit} is {parity}, so {n} is {parity}.", parity
    )


# --- Follow-up turns for multi-turn rows: (first item, rng) -> second turn -------------------


def _times_followup(item: tuple[int, str, int], rng: random.Random) -> Turn:
    value, k = _arithmetic_value(item), rng.randint(2, 5)
    return f"Now multiply that by {k}.", _reply(f"{value} * {k} = {value * k}.", value * k)


def _caps_followup(word: str, rng: random.Random) -> Turn:
    reversed_word = word[::-1]
    work = f"In capital letters, {reversed_word} becomes {reversed_word.upper()}."
    return "Now write that in capital letters.", _reply(work, reversed_word.upper())


def _largest_followup(item: tuple[tuple[int, ...], bool], rng: random.Random) -> Turn:
    largest = max(item[0])
    return "Which of them is the largest?", _reply(
        f"The largest number in the list is {largest}.", largest
    )


# --- Tasks, quotas and the build ------------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    """Where a task's items come from and how one is written as a turn."""

    items: Sequence[Any] | Callable[[random.Random], Hashable]
    """A finite list (drawn without replacement) or a function drawing one random item."""
    render: Callable[[Any, random.Random], Turn]


TASKS: dict[str, _Task] = {
    "arithmetic": _Task(_draw_arithmetic, _arithmetic),
    "reverse_word": _Task(WORDS, _reverse),
    "uppercase": _Task(SENTENCES, _uppercase),
    "lowercase": _Task(SENTENCES, _lowercase),
    "sort_numbers": _Task(_draw_sort, _sort),
    "count_words": _Task(SENTENCES, _count_words),
    "count_letters": _Task(WORDS, _count_letters),
    "antonyms": _Task(ANTONYMS, _antonym),
    "capitals": _Task(CAPITALS, _capital),
    "unit_conversion": _Task(_draw_unit, _unit),
    "definitions": _Task(DEFINITIONS, _definition),
    "list_to_sentence": _Task(_draw_list, _list_sentence),
    "thank_you_note": _Task(_draw_thanks, _thanks),
    "even_odd": _Task(lambda rng: rng.randint(10, 999), _even_odd),
}
"""Single-turn task type -> its items and renderer."""

QUOTAS: dict[str, tuple[int, int]] = {
    "arithmetic": (40, 8),
    "reverse_word": (28, 6),
    "uppercase": (20, 4),
    "lowercase": (20, 4),
    "sort_numbers": (30, 6),
    "count_words": (26, 5),
    "count_letters": (24, 5),
    "antonyms": (28, 6),
    "capitals": (34, 7),
    "unit_conversion": (30, 6),
    "definitions": (26, 5),
    "list_to_sentence": (24, 5),
    "thank_you_note": (24, 5),
    "even_odd": (20, 4),
    "multi_turn": (20, 4),
    "with_system": (20, 4),
}
"""Task type -> (train rows, held-out rows)."""

FOLLOW_UPS = (
    ("arithmetic", _times_followup),
    ("reverse_word", _caps_followup),
    ("sort_numbers", _largest_followup),
)
SYSTEM_TASKS = ("arithmetic", "even_odd", "unit_conversion", "sort_numbers", "count_letters")


class _Pool:
    """Draws a task's items without replacement, deterministically."""

    def __init__(self, name: str, task: _Task, seed: int) -> None:
        self.name, self.task = name, task
        self.rng = random.Random(f"{seed}:{name}")
        self.seen: set[Hashable] = set()
        self.queue = None if callable(task.items) else self.rng.sample(task.items, len(task.items))

    def take(self) -> Any:
        if self.queue is not None:
            if not self.queue:
                raise RuntimeError(f"task {self.name!r} ran out of hand-written items")
            return self.queue.pop()
        for _ in range(10_000):
            item = self.task.items(self.rng)
            if item not in self.seen:
                self.seen.add(item)
                return item
        raise RuntimeError(f"task {self.name!r} found no new item in 10000 draws")

    def turn(self) -> tuple[Any, Turn]:
        item = self.take()
        return item, self.task.render(item, self.rng)


def _messages(*turns: Turn, system: str | None = None) -> list[dict[str, str]]:
    messages = [] if system is None else [{"role": "system", "content": system}]
    for user, reply in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages


def _split_rows(pools: dict[str, _Pool], index: int) -> list[dict[str, Any]]:
    """Rows of one split (``index`` 0 = train, 1 = held-out quota)."""
    rows = []
    for name in TASKS:
        for _ in range(QUOTAS[name][index]):
            rows.append({"messages": _messages(pools[name].turn()[1]), "task": name})
    for i in range(QUOTAS["multi_turn"][index]):
        name, follow_up = FOLLOW_UPS[i % len(FOLLOW_UPS)]
        item, first = pools[name].turn()
        second = follow_up(item, pools[name].rng)
        rows.append({"messages": _messages(first, second), "task": "multi_turn"})
    for i in range(QUOTAS["with_system"][index]):
        system, opening = SYSTEM_PROMPTS[i % len(SYSTEM_PROMPTS)]
        user, reply = pools[SYSTEM_TASKS[i % len(SYSTEM_TASKS)]].turn()[1]
        rows.append(
            {"messages": _messages((user, opening + reply), system=system), "task": "with_system"}
        )
    return rows


def build(seed: int = SEED) -> dict[str, list[dict[str, Any]]]:
    """Build both splits.

    Args:
        seed: Master seed; each task's pool is seeded from it and the task name.

    Returns:
        ``{"train": rows, "heldout": rows}``, each shuffled deterministically.
    """
    pools = {name: _Pool(name, task, seed) for name, task in TASKS.items()}
    heldout = _split_rows(pools, 1)  # first, so held-out items never depend on train quotas
    train = _split_rows(pools, 0)
    shuffle = random.Random(f"{seed}:shuffle")
    shuffle.shuffle(heldout)
    shuffle.shuffle(train)
    return {"train": train, "heldout": heldout}


def builtin_split(split: str) -> list[dict[str, Any]]:
    """The shipped ``builtin:instructions`` rows of one split (``instructions_SPLIT.jsonl``).

    Args:
        split: ``"train"`` or ``"heldout"``.

    Returns:
        The rows, in file order.

    Raises:
        ValueError: An unknown split.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")
    text = resources.files(_PACKAGE).joinpath(f"instructions_{split}.jsonl").read_text("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Write rows as JSON lines (UTF-8, one object per line)."""
    lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
    path.write_text("".join(lines), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    """Regenerate ``instructions_train.jsonl`` and ``instructions_heldout.jsonl``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for split, rows in build(args.seed).items():
        path = args.out_dir / f"instructions_{split}.jsonl"
        write_jsonl(rows, path)
        print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
