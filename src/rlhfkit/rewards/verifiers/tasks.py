r"""Verifiers of the procedural tasks: Countdown, string manipulation and reasoning-gym.

All three return 1.0 for a correct completion and 0.0 otherwise (reasoning-gym may give partial
credit); a completion with no recognisable answer is wrong (0.0), never unscorable (None).

- ``countdown`` (:func:`countdown_reward`): the completion's expression must use only the
  example's ``numbers`` (each at most once) and equal its ``target`` exactly.
- ``strings`` (:func:`string_reward`): the completion's final answer must equal ``answer`` after
  normalisation.
- ``reasoning_gym`` (:func:`reasoning_gym_reward`): the dataset's own ``score_answer``.

Answer extraction, shared by all three: the content of the last ``<answer>...</answer>`` pair
when the completion has one; otherwise a rule per verifier (see each function).
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from functools import cache
from typing import Any

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
ANSWER_LINE = re.compile(r"^\s*(?:final\s+)?answer\s*:\s*(.*)$", re.IGNORECASE)
EXPRESSION_SPAN = re.compile(r"[\d(][\d. \t+\-*/()]*[\d)]|\d")
"""A run of expression characters that starts with a digit or ``(`` and ends with one or ``)``."""
EXPRESSION_CHARS = re.compile(r"[\d\s+\-*/().]*")
"""The only characters an expression may contain (checked before parsing)."""
OPERATOR = re.compile(r"[+\-*/]")
MAX_EXPRESSION_CHARS = 200
"""Longer expressions are rejected before parsing (bounds the parser's work and depth)."""
QUOTES = "\"'`“”‘’"


def _tag_content(completion: str) -> str | None:
    """The content of the last ``<answer>...</answer>`` pair, or None when there is none."""
    matches = ANSWER_TAG.findall(completion)
    return matches[-1] if matches else None


# --- countdown -------------------------------------------------------------------------------


def extract_expression(completion: str) -> str | None:
    """The arithmetic expression a Countdown completion proposes, or None.

    Rule: (1) restrict the search to the content of the last ``<answer>...</answer>`` pair when
    there is one; (2) scan its lines from the last one up, keeping only the part of a line
    before its first ``=`` (``(3 + 5) * 2 = 16`` proposes ``(3 + 5) * 2``), and return the last
    span of expression characters on the first such line whose span contains an operator;
    (3) if no line has one, return the last span of the text (a bare number). A span is a run
    of digits, ``.``, spaces, ``+ - * /`` and parentheses that starts with a digit or ``(`` and
    ends with a digit or ``)``; ``×`` and ``÷`` read as ``*`` and ``/``. Words around the
    expression are thus ignored, and a step-by-step derivation without tags is judged by its
    last equation (``8 * 2 = 16`` after ``3 + 5 = 8``), which must then be a whole solution.
    A ``-`` before the expression is not read (``- 2 * 7`` is more often a list bullet than a
    negation; targets are positive, so a leading minus is never needed); unary minus inside
    (``(-(2 - 7)) * 3``) is.

    Args:
        completion: The model's reply.

    Returns:
        The expression text (not yet validated), or None when there is no digit to read.
    """
    content = _tag_content(completion)
    text = (completion if content is None else content).replace("×", "*").replace("÷", "/")
    for line in reversed(text.splitlines()):
        spans = EXPRESSION_SPAN.findall(line.split("=", 1)[0])
        with_operator = [span for span in spans if OPERATOR.search(span)]
        if with_operator:
            return with_operator[-1].strip()
    spans = EXPRESSION_SPAN.findall(text)
    return spans[-1].strip() if spans else None


_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
}


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """Exact value of a parsed expression made only of integers, ``+ - * /`` and unary minus.

    Appends each integer literal to ``used``.

    Raises:
        ValueError: Any other syntax (names, calls, attributes, floats, powers, ...).
        ZeroDivisionError: A division by zero.
    """
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand, used)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        return _BINARY[type(node.op)](left, right)
    raise ValueError(f"not allowed in a Countdown expression: {type(node).__name__}")


def evaluate_expression(expression: str) -> tuple[Fraction, list[int]] | None:
    """Parse and evaluate an arithmetic expression safely and exactly.

    Only digits, whitespace, ``.``, ``+ - * /`` and parentheses may occur (so no name can reach
    the parser); the text is parsed with :func:`ast.parse` (never evaluated as code) and walked:
    only integer literals, binary ``+ - * /``, unary ``-``/``+`` and parentheses are accepted;
    anything else (floats, ``**``, ``//``, ...) makes the expression invalid.
    Arithmetic is exact (:class:`fractions.Fraction`), so ``(1 / 3) * 3 == 1``.

    Args:
        expression: The expression text (at most :data:`MAX_EXPRESSION_CHARS` characters).

    Returns:
        ``(value, integer literals in order of appearance)``, or None when the expression is too
        long, malformed, uses anything not allowed or divides by zero.
    """
    if len(expression) > MAX_EXPRESSION_CHARS or not EXPRESSION_CHARS.fullmatch(expression):
        return None
    used: list[int] = []
    try:
        value = _evaluate(ast.parse(expression.strip(), mode="eval"), used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None
    return value, used


def countdown_reward(completion: str, numbers: Sequence[int], target: int | str) -> float:
    """1.0 if the completion's expression uses only ``numbers`` and equals ``target``, else 0.0.

    The expression is found by :func:`extract_expression` and evaluated by
    :func:`evaluate_expression`. It must use each given number at most once and no other number
    (as multisets: ``Counter(literals) <= Counter(numbers)``; unused numbers are allowed) and
    its exact value must equal the target. Unparseable, unsafe or unrecognisable expressions
    and divisions by zero score 0.0.

    Args:
        completion: The model's reply.
        numbers: The example's ``numbers`` field (integers, or integer strings).
        target: The example's ``target`` field (an integer, or an integer string).

    Returns:
        1.0 or 0.0.

    Raises:
        ValueError: ``numbers`` or ``target`` is not made of integers (a dataset error).
    """
    try:
        allowed = Counter(int(number) for number in numbers)
        goal = int(target)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"countdown example needs integer 'numbers' and 'target', got {numbers!r}, {target!r}"
        ) from err
    expression = extract_expression(completion)
    result = None if expression is None else evaluate_expression(expression)
    if result is None:
        return 0.0
    value, used = result
    return float(Counter(used) <= allowed and value == goal)


# --- strings ---------------------------------------------------------------------------------


def extract_final_answer(completion: str) -> str | None:
    """The final answer: tag content, else the last ``Answer:`` line, else the last line.

    ``Answer:`` (or ``Final answer:``) is matched case-insensitively at the start of a line;
    the last line is the last non-empty one.

    Args:
        completion: The model's reply.

    Returns:
        The raw answer text, or None for a completion that is empty or only whitespace (and has
        no answer tag).
    """
    content = _tag_content(completion)
    if content is not None:
        return content
    lines = [line for line in completion.splitlines() if line.strip()]
    for line in reversed(lines):
        match = ANSWER_LINE.match(line)
        if match:
            return match.group(1)
    return lines[-1] if lines else None


def normalize_string_answer(text: str, *, case_sensitive: bool = True) -> str:
    """Normalise an answer for exact comparison.

    Strips surrounding whitespace and one trailing period, then surrounding quotes and backticks
    (straight or curly) and whitespace again, collapses inner runs of whitespace to one space and
    lower-cases the result unless ``case_sensitive``.

    Args:
        text: An extracted or reference answer.
        case_sensitive: Keep the case (tasks about case); otherwise compare in lower case.
    """
    text = text.strip()
    text = text.removesuffix(".").strip().strip(QUOTES).strip()
    text = " ".join(text.split())
    return text if case_sensitive else text.lower()


def string_reward(completion: str, answer: str, case_sensitive: bool = True) -> float:
    """1.0 if the completion's final answer equals ``answer`` after normalisation, else 0.0.

    The answer is extracted by :func:`extract_final_answer` and both sides are normalised by
    :func:`normalize_string_answer` (quotes, whitespace and a trailing period ignored; case
    ignored unless ``case_sensitive``).

    Args:
        completion: The model's reply.
        answer: The example's reference answer.
        case_sensitive: The example's ``case_sensitive`` field (``builtin:strings`` sets it for
            the uppercase/lowercase tasks); True when the example has none.

    Returns:
        1.0 or 0.0 (0.0 for an empty completion).
    """
    extracted = extract_final_answer(completion)
    if extracted is None:
        return 0.0
    got = normalize_string_answer(extracted, case_sensitive=case_sensitive)
    want = normalize_string_answer(str(answer), case_sensitive=case_sensitive)
    return float(got == want)


# --- reasoning-gym ---------------------------------------------------------------------------


@cache
def _rg_scorer(name: str) -> Any:
    """The ``score_answer`` method of the reasoning-gym dataset ``name`` (default config)."""
    # Imported here: reasoning-gym (the rgym extra) is slow to import and only needed for these.
    from rlhfkit.data.tasks.reasoning_gym import create_dataset

    return create_dataset(name, size=1, seed=0).score_answer


def extract_rg_answer(completion: str) -> str | None:
    """The answer given to reasoning-gym: the last ``<answer>`` content, else the last line.

    Both are stripped of surrounding whitespace; None for an empty completion.
    """
    content = _tag_content(completion)
    if content is not None:
        return content.strip()
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    return lines[-1] if lines else None


# Errors a dataset's scorer may raise on a malformed answer (it parses the answer itself): the
# answer is then wrong, not the training run.
_SCORER_ERRORS = (
    ArithmeticError,
    AttributeError,
    IndexError,
    KeyError,
    RecursionError,
    SyntaxError,
    TypeError,
    ValueError,
)


def reasoning_gym_reward(completion: str, rg_dataset: str, rg_entry: dict[str, Any] | str) -> float:
    """Score with the reasoning-gym dataset's own ``score_answer(answer, entry)``.

    The answer is :func:`extract_rg_answer` of the completion; the scorer belongs to a dataset
    of that name built with its default configuration (the configuration
    :mod:`rlhfkit.data.tasks.reasoning_gym` generates with). Most datasets give 1.0 for a
    correct answer and 0.0 otherwise; some give partial credit in between. The score is clipped
    to [0, 1] (float sums in some scorers overshoot: reasoning-gym 0.1.25's ``spell_backward``
    gives 1.0000000000000002 to a wrong answer that starts with the right one). A scorer that
    raises on a malformed answer gives 0.0.

    Args:
        completion: The model's reply.
        rg_dataset: The example's ``rg_dataset`` field (a reasoning-gym dataset name).
        rg_entry: The example's ``rg_entry`` field: the reasoning-gym entry (``question``,
            ``answer``, ``metadata``) as a dict, or as its JSON text.

    Returns:
        The score, clipped to [0, 1].

    Raises:
        ValueError: An unknown dataset name or an entry that is not a JSON object.
        MissingExtraError: When reasoning-gym (the ``rgym`` extra) is not installed.
    """
    entry = json.loads(rg_entry) if isinstance(rg_entry, str) else rg_entry
    if not isinstance(entry, dict):
        raise ValueError(f"rg_entry must be a JSON object, got {type(entry).__name__}")
    score_answer = _rg_scorer(rg_dataset)
    answer = extract_rg_answer(completion)
    try:
        score = float(score_answer(answer, entry))
    except _SCORER_ERRORS:
        return 0.0
    return min(max(score, 0.0), 1.0)
