"""Built-in environments: a calculator for arithmetic word problems, and guess-the-number.

- :class:`CalculatorEnv` (``--env.name calculator``): a word problem whose answer needs a
  multiplication of two 3-digit numbers, which a small model gets wrong in its head; the tool
  :func:`calculator` evaluates an arithmetic expression exactly. The final answer (the reply
  without a tool call) earns 1 when its last number is the row's ``answer``. Rows:
  ``builtin:calculator``.
- :class:`GuessNumberEnv` (``--env.name guess_number``): the environment thinks of a whole
  number between 1 and ``high``; each reply is a guess, answered with "higher" or "lower" until
  it is right (reward 1) or the turns run out (reward 0). A multi-turn task with no tools: what
  the policy must learn is to use the feedback. Rows: ``builtin:guess_number``.
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any

from rlhfkit.envs.base import Message, StepResult, ToolEnv

_OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos,
}  # fmt: skip
MAX_EXPONENT = 100
"""Largest exponent :func:`calculator` raises to (bigger powers are refused, not computed)."""


def _evaluate(node: ast.AST) -> int | float:
    """Evaluate a parsed arithmetic expression: numbers, + - * / // % ** and parentheses."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large (at most {MAX_EXPONENT})")
        return _OPERATORS[type(node.op)](left, right)
    raise ValueError(f"unsupported expression element: {ast.dump(node)[:60]}")


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, for example "347 * 128".
    """
    value = _evaluate(ast.parse(expression.replace("×", "*").replace("^", "**"), mode="eval"))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _normalised(expression: Any) -> str:
    return re.sub(r"\s+", "", str(expression)).replace("×", "*")


class CalculatorEnv(ToolEnv):
    """Arithmetic word problems with a calculator tool; 1 for the right final number."""

    DATASET = "builtin:calculator"
    TOOLS = (calculator,)
    SYSTEM = "Use the calculator tool for arithmetic, then give the final answer as a number."

    def __init__(self, **options: Any) -> None:
        options.setdefault("isolation", "inline")  # the calculator is pure and bounded
        super().__init__(**options)

    def score(self, answer: str, fields: dict[str, Any]) -> float:
        """1.0 when the answer's last number equals the row's ``answer``."""
        numbers = re.findall(r"-?\d+(?:\.\d+)?", answer.replace(",", ""))
        return float(bool(numbers) and numbers[-1] == str(fields.get("answer", "")).strip())

    def same_arguments(self, got: dict[str, Any], expected: dict[str, Any]) -> bool:
        """The same expression up to spaces."""
        return set(got) == set(expected) and all(
            _normalised(got[k]) == _normalised(expected[k]) for k in expected
        )


class GuessNumberEnv:
    """Guess a whole number in [1, high] with "higher"/"lower" feedback after each guess.

    The row gives the game (its ``prompt``, a name such as ``Game 1234``), the number
    (``secret``) and the range (``high``). A reply whose last whole number is the secret wins
    (reward 1, done); another number gets "Higher." or "Lower."; a reply without a number is
    told how to answer. ``info`` counts guesses, invalid replies and guesses that contradict
    earlier feedback.

    Args:
        max_guesses: End the episode (reward 0) after this many guesses (None: the rollout's
            turn cap ends it).
        high: Play on [1, high] instead of the row's range (the row's secret is mapped into it,
            ``1 + (secret - 1) % high``): a smaller range makes an easier game.
    """

    DATASET = "builtin:guess_number"
    SYSTEM = (
        "You are playing a guessing game. Reply with one whole number, your guess, and nothing "
        "else. After each guess you are told whether the number is higher or lower."
    )

    def __init__(self, max_guesses: int | None = None, high: int | None = None) -> None:
        if high is not None and high < 1:
            raise ValueError(f"high must be at least 1, got {high}")
        self.tools: list[dict[str, Any]] = []
        self.call_format: str | None = None
        self.max_guesses, self.range_top = max_guesses, high
        self.secret, self.low, self.high, self.guesses = 0, 1, 100, 0

    def reset(self, fields: dict[str, Any]) -> list[Message]:
        """Start the row's game; returns the system message and the question."""
        top = self.range_top or int(fields.get("high", 100))
        self.secret, self.low, self.high, self.guesses = (
            1 + (int(fields["secret"]) - 1) % top,
            1,
            top,
            0,
        )
        name = fields.get("prompt") or "Game"
        if isinstance(name, list):  # messages (a prompt schema's form)
            name = next(m["content"] for m in reversed(name) if m["role"] == "user")
        question = f"{name}: I am thinking of a whole number between 1 and {top}. Your guess?"
        return [{"role": "system", "content": self.SYSTEM}, {"role": "user", "content": question}]

    def step(self, message: str) -> StepResult:
        """Judge a guess: right (reward 1), higher, lower, or not a number."""
        numbers = re.findall(r"-?\d+", message)
        if not numbers:
            return self._reply("Reply with just one whole number.", {"invalid": 1.0})
        guess = int(numbers[-1])
        self.guesses += 1
        info = {"guesses": 1.0, "inconsistent": float(not self.low <= guess <= self.high)}
        if guess == self.secret:
            return StepResult([], 1.0, True, {**info, "solved": 1.0})
        if guess < self.secret:
            self.low = max(self.low, guess + 1)
            return self._reply(f"{guess} is too low. Higher.", info)
        self.high = min(self.high, guess - 1)
        return self._reply(f"{guess} is too high. Lower.", info)

    def _reply(self, text: str, info: dict[str, float]) -> StepResult:
        done = self.max_guesses is not None and self.guesses >= self.max_guesses
        return StepResult([] if done else [{"role": "user", "content": text}], 0.0, done, info)
