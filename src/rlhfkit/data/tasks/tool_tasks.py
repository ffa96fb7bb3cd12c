"""Tasks of the built-in environments, and tool-use traces to warm-start on.

- ``builtin:calculator`` (schema ``verifiable``): word problems whose answer is the product of
  two 3-digit numbers, each row with the call that solves it::

      {"prompt": "A crate holds 347 bottles. How many bottles are in 128 crates?",
       "answer": "44416", "verifier": "math", "task": "calculator",
       "tool_call": {"name": "calculator", "arguments": {"expression": "347 * 128"}}}

- ``builtin:calculator_traces`` (schema ``sft``): the same problems (train split) solved with
  the tool, as conversations for SFT on tool use: the system prompt of the calculator
  environment (its tools listed in the ``hermes`` call format), the user's problem, the
  assistant's call, the tool's result and the assistant's answer. Train with
  ``--data.mask-mode all_assistant_turns`` so that both assistant turns are labelled and the
  tool's output is not.
- ``builtin:guess_number`` (schema ``verifiable``, the secret as its ``answer``): games of
  guess-the-number, a secret in [1, ``high``] per row (``high`` 20).
- ``builtin:guess_number_traces`` (schema ``sft``): those games played by a guesser that picks
  uniformly among the numbers the feedback still allows (it follows the feedback but does not
  bisect): a warm start for RL on the game.

Generation is deterministic; the held-out split shares no prompt with the train split.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from typing import Any

from rlhfkit.data.tasks.splits import disjoint_split, distinct_rows
from rlhfkit.envs.base import with_tools
from rlhfkit.envs.builtin import CalculatorEnv, GuessNumberEnv, calculator
from rlhfkit.envs.calls import ToolCall, get_format

STORIES = (
    ("A crate holds {a} bottles. How many bottles are in {b} crates?", "bottles"),
    ("A train seat costs {a} cents. What do {b} seats cost in cents?", "cents"),
    ("A farm has {b} rows of {a} apple trees. How many apple trees are there?", "trees"),
    ("A book has {a} pages. How many pages do {b} copies have in total?", "pages"),
    ("Each box holds {a} screws. How many screws are in {b} boxes?", "screws"),
    ("A runner trains {a} minutes a week for {b} weeks. How many minutes is that?", "minutes"),
    ("A hall has {b} rows with {a} seats each. How many seats are there?", "seats"),
    ("A printer prints {a} pages an hour. How many pages does it print in {b} hours?", "pages"),
)
"""Word-problem templates: the answer is a * b."""


def calculator_rows(n: int, *, seed: int, exclude: Collection[str] = ()) -> list[dict[str, Any]]:
    """``n`` distinct 3-digit-by-3-digit word problems with their answer and expected call."""

    def draw(rng: random.Random, seen: set[str]) -> dict[str, Any]:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        story, _ = rng.choice(STORIES)
        expression = f"{a} * {b}"
        return {
            "prompt": story.format(a=a, b=b), "answer": str(a * b), "verifier": "math",
            "task": "calculator",
            "tool_call": {"name": "calculator", "arguments": {"expression": expression}},
        }  # fmt: skip

    return distinct_rows(n, random.Random(seed), draw, exclude=exclude, max_attempts=10 * n + 100)


def calculator_trace(row: dict[str, Any], call_format: str = "hermes") -> dict[str, Any]:
    """The conversation that solves ``row`` with the calculator, as an ``sft`` row."""
    env = CalculatorEnv(call_format=call_format)
    call = ToolCall(row["tool_call"]["name"], dict(row["tool_call"]["arguments"]))
    result = calculator(**call.arguments)
    messages, _ = with_tools(env.reset(row), env.tools, call_format, native=False)
    messages += [
        {"role": "assistant", "content": get_format(call_format).render([call])},
        {"role": "tool", "content": result},
        {"role": "assistant", "content": f"The answer is {result}."},
    ]
    return {"messages": messages, "task": "calculator"}


def guess_number_rows(
    n: int, *, seed: int, high: int = 20, exclude: Collection[str] = ()
) -> list[dict[str, Any]]:
    """``n`` games; each prompt names its game (``Game 1234``) so that rows stay distinct."""

    def draw(rng: random.Random, seen: set[str]) -> dict[str, Any]:
        secret, game = rng.randint(1, high), rng.randint(1, 10**6)
        return {"prompt": f"Game {game}", "answer": str(secret), "secret": secret, "high": high,
                "task": "guess_number"}  # fmt: skip

    return distinct_rows(n, random.Random(seed), draw, exclude=exclude, max_attempts=10 * n + 100)


def guess_number_trace(row: dict[str, Any], max_guesses: int = 6) -> dict[str, Any]:
    """A game of ``row`` played by guessing uniformly among the numbers still possible.

    The player follows the feedback but does not bisect, so it wins most games of a small
    range within ``max_guesses`` guesses and plays them longer than needed: a warm start that
    RL can improve on. The draw is seeded by the row's prompt.
    """
    env = GuessNumberEnv(max_guesses=max_guesses)
    messages = env.reset(row)
    rng = random.Random(row["prompt"])
    low, high = 1, int(row.get("high", 20))
    for _ in range(max_guesses):
        guess = rng.randint(low, high)
        messages.append({"role": "assistant", "content": str(guess)})
        step = env.step(str(guess))
        if step.done:
            break
        messages += step.messages
        low, high = (guess + 1, high) if guess < env.secret else (low, guess - 1)
    if messages[-1]["role"] != "assistant":  # ended on feedback: drop it
        messages.pop()
    return {"messages": messages, "task": "guess_number", "solved": step.reward > 0}


def calculator_split(split: str) -> list[dict[str, Any]]:
    """``builtin:calculator``: 2000 train rows, 200 held-out rows."""
    return disjoint_split(calculator_rows, split, train=2000, heldout=200)


def calculator_traces_split(split: str) -> list[dict[str, Any]]:
    """``builtin:calculator_traces``: the tool-use conversation of each ``calculator`` row."""
    return [calculator_trace(row) for row in calculator_split(split)]


def guess_number_split(split: str) -> list[dict[str, Any]]:
    """``builtin:guess_number``: 2000 train games, 200 held-out games (numbers 1 to 20)."""
    return disjoint_split(guess_number_rows, split, train=2000, heldout=200)


def guess_number_traces_split(split: str) -> list[dict[str, Any]]:
    """``builtin:guess_number_traces``: each ``guess_number`` game played by a random guesser."""
    return [guess_number_trace(row) for row in guess_number_split(split)]
