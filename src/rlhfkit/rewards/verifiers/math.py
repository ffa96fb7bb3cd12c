r"""Math answers: extraction, normalisation, comparison and majority vote (RLHF book ch. 7).

Reward = 1.0 when the answer extracted from a completion matches the reference, else 0.0::

    math_reward(r"... so the area is \boxed{\frac{1}{2}}", answer="0.5")  # 1.0

Extraction tries a row of named rules in order (:data:`DEFAULT_ORDER`) and keeps the first one
that finds something:

``answer_tag``     the content of the last complete ``<answer>...</answer>`` pair
``boxed``          the content of the last complete ``\boxed{...}`` / ``\fbox{...}`` (a
                   brace-depth counter, so nested braces such as ``\boxed{\frac{1}{2}}`` work)
``hashes``         the text after the last ``####``, to the end of its line (GSM8K)
``the_answer_is``  the text after the last "The answer is" (case-insensitive, optional "final"
                   and colon), to the end of its line, with an escaped dollar ``\$``, ``$``,
                   ``\(\)``, ``**``, a trailing period and a wrapping ``(X)`` stripped
``last_number``    the last number: signed integer, decimal, fraction ``a/b``, thousands
                   separators (``1,234``), optional ``%``

Comparison (:func:`answers_match`) normalises both sides (:func:`normalise`), then tries, in
order: numbers (|a - b| <= 1e-6 max(1, |b|)), string equality, and symbolic equivalence with
math-verify (sympy) under a timeout.

Threads: math-verify bounds its work with ``signal.alarm``, which only the main thread may set.
Called from another thread, :func:`answers_match` skips the symbolic check (numbers and strings
are still compared), so a thread-pool scorer never crashes or hangs; it can only under-reward
answers that need algebra to be recognised.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache

# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------

ANSWER_TAG = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.IGNORECASE | re.DOTALL)
BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
THE_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\b[ \t]*:?", re.IGNORECASE)
NUMBER = re.compile(
    r"(?:(?<![\w)\]}])[-+−])?"  # a sign only where it cannot be a binary minus ("5-3" -> 3)
    r"(?:\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))"  # integer part, with or without thousands commas
    r"(?:\.\d+)?"  # decimals
    r"(?:\s*/\s*\d+)?"  # a fraction's denominator
    r"(?:\s*\\?%)?"  # percent
)
PAREN_CHOICE = re.compile(r"\(([^()]*)\)")


def _closing_braces(text: str) -> dict[int, int]:
    r"""Map each ``{`` index to the index of its closing ``}`` (unclosed ones are absent).

    One pass with a stack (a brace-depth counter that remembers where each level opened);
    an escaped character (``\{``, ``\}``, ``\\``) is skipped so that it does not count.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            stack.append(i)
        elif char == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def extract_answer_tag(text: str) -> str | None:
    """Content of the last complete ``<answer>...</answer>`` pair (None if none or empty)."""
    matches = ANSWER_TAG.findall(text)
    return (matches[-1].strip() or None) if matches else None


def extract_boxed(text: str) -> str | None:
    r"""Content of the last complete, non-empty ``\boxed{...}`` or ``\fbox{...}``.

    Boxes are scanned from the last one backwards; an unclosed box (a truncated completion) or
    an empty one is passed over, so the last box that closes wins.
    """
    matches = list(BOX_OPEN.finditer(text))
    pairs = _closing_braces(text) if matches else {}
    for match in reversed(matches):
        end = pairs.get(match.end() - 1)
        if end is not None and text[match.end() : end].strip():
            return text[match.end() : end].strip()
    return None


def extract_hashes(text: str) -> str | None:
    """Text after the last ``####`` marker, to the end of its line (None if none or empty)."""
    position = text.rfind("####")
    if position < 0:
        return None
    return text[position + 4 :].split("\n", 1)[0].strip() or None


def extract_the_answer_is(text: str) -> str | None:
    r"""Text after the last "The answer is" to the end of the line, cleaned.

    Strips an escaped dollar sign ``\$`` (a currency sign: ``\$1,000`` -> ``1,000``; removed
    whole, before the math delimiter ``$``, which would otherwise leave a stray backslash),
    ``$``, ``\(``, ``\)``, ``\[``, ``\]``, markdown bold ``**``, a trailing period and a
    wrapping ``(X)`` (a multiple-choice letter such as ``(B)``).
    """
    markers = list(THE_ANSWER_IS.finditer(text))
    if not markers:
        return None
    answer = text[markers[-1].end() :].split("\n", 1)[0]
    for token in ("\\$", "$", "\\(", "\\)", "\\[", "\\]", "**"):
        answer = answer.replace(token, "")
    answer = answer.strip().rstrip(".").strip()
    choice = PAREN_CHOICE.fullmatch(answer)
    if choice is not None:
        answer = choice.group(1).strip()
    return answer or None


def extract_last_number(text: str) -> str | None:
    """The last number in the text (signed int, decimal, fraction, thousands commas, percent)."""
    matches = NUMBER.findall(text)
    return matches[-1].strip() if matches else None


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "answer_tag": extract_answer_tag,
    "boxed": extract_boxed,
    "hashes": extract_hashes,
    "the_answer_is": extract_the_answer_is,
    "last_number": extract_last_number,
}
"""Extraction rule name -> function ``text -> answer | None``."""

DEFAULT_ORDER: tuple[str, ...] = ("answer_tag", "boxed", "hashes", "the_answer_is", "last_number")
"""The order in which :func:`extract_answer` tries the rules (docs/methods/evaluation.md)."""


def extract_answer(text: str, order: Sequence[str] = DEFAULT_ORDER) -> str | None:
    """The answer of a completion: the result of the first rule in ``order`` that finds one.

    Args:
        text: The completion.
        order: Names of :data:`EXTRACTORS`, tried left to right.

    Returns:
        The raw extracted answer (not normalised), or None when no rule matches.

    Raises:
        ValueError: An unknown rule name (the message lists the known ones).
    """
    unknown = [name for name in order if name not in EXTRACTORS]
    if unknown:
        raise ValueError(
            f"unknown extraction rule(s) {unknown}; known: {', '.join(EXTRACTORS)} "
            "(set `order` to a tuple of these names)"
        )
    for name in order:
        answer = EXTRACTORS[name](text)
        if answer is not None:
            return answer
    return None


# --------------------------------------------------------------------------------------------
# Normalisation and numbers
# --------------------------------------------------------------------------------------------

UNITS: tuple[str, ...] = (
    "mm", "cm", "km", "m", "meter", "metre", "mile", "inch", "inches", "ft", "foot", "feet",
    "yard", "mg", "g", "kg", "gram", "kilogram", "lb", "lbs", "pound", "ounce", "oz", "ml", "mL",
    "liter", "litre", "s", "sec", "second", "min", "minute", "h", "hr", "hrs", "hour", "day",
    "week", "month", "year", "mph", "dollar", "cent", "degree", "unit",
)  # fmt: skip
"""Units :func:`normalise` drops after a number (each also plural, and with ``^2``/``^3``)."""

_UNIT = "|".join(sorted((re.escape(u) for u in UNITS), key=len, reverse=True))
TRAILING_UNIT = re.compile(rf"(?<=[\d}}])\s*(?:{_UNIT})s?(?:\^\{{?[23]\}}?|[²³])?\s*$")
TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
ASSIGNMENT = re.compile(r"[A-Za-z]\s*=\s*(?=\S)")
SPACES = re.compile(r"\s+")
_REMOVED = ("\\$", "$", "\\(", "\\)", "\\[", "\\]", "\\!", "\\,", "\\;", "\\:")


def _unwrap_box(s: str) -> str:
    r"""``\boxed{X}`` (the whole string) -> ``X``."""
    match = BOX_OPEN.match(s)
    if match is not None and _closing_braces(s).get(match.end() - 1) == len(s) - 1:
        return s[match.end() : -1]
    return s


def _normalise_once(s: str) -> str:
    s = _unwrap_box(s.strip())
    s = TEXT_COMMAND.sub(r"\1", s)
    for token in _REMOVED:
        s = s.replace(token, "")
    s = LEFT_RIGHT.sub("", s)
    s = DEGREES.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\%", "%")
    s = s.replace("−", "-")
    s = THOUSANDS.sub("", s)
    s = s.strip().rstrip(".").strip()
    s = TRAILING_UNIT.sub("", s)
    s = ASSIGNMENT.sub("", s, count=1) if ASSIGNMENT.match(s) else s
    return SPACES.sub(_space, s.strip())


def _space(match: re.Match[str]) -> str:
    r"""Whitespace run -> one space between two letters ("\pi r", "New York"), else nothing."""
    text, start, end = match.string, match.start(), match.end()
    between_letters = start > 0 and end < len(text) and text[start - 1].isalpha()
    return " " if between_letters and text[end].isalpha() else ""


def normalise(answer: str | float) -> str:
    r"""Canonical string form of an answer, for comparison and voting.

    Steps (repeated until nothing changes, so ``normalise`` is idempotent): strip whitespace;
    unwrap a whole-string ``\boxed{}``; ``\text{X}`` (and ``\mathrm``, ``\mbox``, ...) -> ``X``;
    drop ``$``, ``\(\)``, ``\[\]``, ``\left``/``\right``, thin spaces (``\,`` ...), ``^\circ``
    and ``°``; ``\dfrac``/``\tfrac`` -> ``\frac``; ``\%`` -> ``%``; thousands commas
    (``1,234`` -> ``1234``); a trailing period; one trailing unit of :data:`UNITS` after a number
    (``12 cm`` -> ``12``); a single-letter assignment prefix (``x = 3`` -> ``3``); whitespace,
    except one space between two letters (``\pi r``). Case is kept (LaTeX is case-sensitive).
    """
    s = str(answer)
    for _ in range(8):
        new = _normalise_once(s)
        if new == s:
            break
        s = new
    return s


PLAIN = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
SLASH = re.compile(r"([-+]?[\d.]+)/([-+]?[\d.]+)")
FRAC = re.compile(r"([-+]?)\\frac(?:\{([^{}]+)\}\{([^{}]+)\}|(\d)(\d))")


def _ratio(numerator: str, denominator: str) -> float | None:
    top, bottom = _plain(numerator), _plain(denominator)
    if top is None or bottom is None or bottom == 0:
        return None
    return top / bottom


def _plain(s: str) -> float | None:
    if PLAIN.fullmatch(s) is None:
        return None
    value = float(s)
    return value if math.isfinite(value) else None


def parse_number(s: str | float) -> float | None:
    r"""The value of a numeric answer, or None when it is not a plain number.

    Accepts (after :func:`normalise`): integers, decimals (``-3.5``, ``.5``, ``1e3``),
    fractions ``a/b``, ``\frac{a}{b}`` / ``\frac12`` (optionally signed), and a trailing ``%``,
    which divides by 100 (``50%`` -> 0.5). Division by zero and non-finite values give None.
    """
    s = normalise(s)
    if s.endswith("%"):
        value = parse_number(s[:-1])
        return None if value is None else value / 100
    if (value := _plain(s)) is not None:
        return value
    if (slash := SLASH.fullmatch(s)) is not None:
        return _ratio(slash.group(1), slash.group(2))
    if (frac := FRAC.fullmatch(s)) is not None:
        sign, a, b, a1, b1 = frac.groups()
        value = _ratio(a or a1, b or b1)
        return None if value is None else (-value if sign == "-" else value)
    return None


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def _numbers(s: str) -> list[float]:
    """Values a normalised answer may stand for: ``50%`` is both 0.5 and 50."""
    values = [parse_number(s)]
    if s.endswith("%"):
        values.append(parse_number(s[:-1]))
    return [v for v in values if v is not None]


@lru_cache(maxsize=4096)
def _symbolic_equal(predicted: str, reference: str, seconds: int) -> bool:
    """math-verify equivalence of two normalised answers (main thread only: it sets SIGALRM)."""
    import math_verify  # lazy: sympy takes a while to import and is only needed here

    gold = math_verify.parse(f"${reference}$", parsing_timeout=seconds)
    pred = math_verify.parse(f"${predicted}$", parsing_timeout=seconds)
    if not gold or not pred:
        return False
    return bool(math_verify.verify(gold, pred, timeout_seconds=seconds))


def answers_match(
    predicted: str | float | None,
    reference: str | float | None,
    *,
    symbolic: bool = True,
    timeout: float = 2.0,
) -> bool:
    """Whether a predicted answer equals the reference.

    After :func:`normalise` on both sides, the first test that applies decides:

    1. numbers: |a - b| <= 1e-6 max(1, |b|), with b the reference (a percentage also matches
       its bare number: ``50%`` matches ``50`` and ``0.5``);
    2. equal strings;
    3. symbolic equivalence with math-verify (sympy), each parse/compare bounded by ``timeout``
       seconds (rounded up to whole seconds: it uses ``signal.alarm``). Skipped when
       ``symbolic`` is False or when called outside the main thread (see the module docstring).

    Args:
        predicted: The extracted answer (None never matches).
        reference: The reference answer (None never matches).
        symbolic: Try the symbolic check.
        timeout: Seconds allowed to each math-verify parse and comparison (> 0).

    Raises:
        ValueError: ``timeout`` <= 0.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if predicted is None or reference is None:
        return False
    pred, ref = normalise(predicted), normalise(reference)
    if not pred or not ref:
        return False
    pred_values, ref_values = _numbers(pred), _numbers(ref)
    if pred_values and ref_values:
        return any(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a in pred_values for b in ref_values)
    if pred == ref:
        return True
    if not symbolic or threading.current_thread() is not threading.main_thread():
        return False
    return _symbolic_equal(pred, ref, max(1, math.ceil(timeout)))


def math_reward(
    completion: str,
    answer: str | float | None = None,
    *,
    order: Sequence[str] = DEFAULT_ORDER,
    symbolic: bool = True,
) -> float | None:
    """1.0 if the answer extracted from ``completion`` matches ``answer``, else 0.0.

    A completion with no extractable answer scores 0.0, not None: RL must see it as a failure
    (None would drop the sample and hide unanswered completions from the policy). Only an
    example without a reference answer is unscorable (None).

    Args:
        completion: The model's reply.
        answer: The example's reference answer.
        order: Extraction rules, as in :func:`extract_answer`.
        symbolic: Allow the symbolic check of :func:`answers_match`.
    """
    if answer is None or not str(answer).strip():
        return None
    predicted = extract_answer(completion, order)
    return float(answers_match(predicted, answer, symbolic=symbolic))


# --------------------------------------------------------------------------------------------
# Majority vote
# --------------------------------------------------------------------------------------------


def majority_vote(
    answers: Sequence[str | float | None],
    scores: Sequence[float] | None = None,
    *,
    symbolic: bool = False,
) -> str | None:
    """The most common answer (self-consistency), as normalised text.

    Answers are normalised and None / empty ones dropped; equivalent answers (by
    :func:`answers_match`, e.g. ``0.5`` and ``1/2``) are one vote, counted for the class of the
    first answer they match. The class with the most votes wins; ties go to the highest summed
    score when ``scores`` is given, then to the earliest first occurrence.

    Args:
        answers: Extracted answers, one per sample.
        scores: Optional score per sample (e.g. a reward model's), aligned with ``answers``.
        symbolic: Also merge classes by symbolic equivalence (slower).

    Returns:
        The normalised first occurrence of the winning class, or None without any answer.

    Raises:
        ValueError: ``scores`` of another length than ``answers``.
    """
    if scores is not None and len(scores) != len(answers):
        raise ValueError(f"{len(answers)} answers but {len(scores)} scores")
    classes: list[list] = []  # [representative, votes, summed score], in first-seen order
    for i, answer in enumerate(answers):
        text = None if answer is None else normalise(answer)
        if not text:
            continue
        score = 0.0 if scores is None else float(scores[i])
        for entry in classes:
            if answers_match(text, entry[0], symbolic=symbolic):
                entry[1] += 1
                entry[2] += score
                break
        else:
            classes.append([text, 1, score])
    if not classes:
        return None
    # max() keeps the first of equal keys, i.e. the earliest first occurrence.
    return max(classes, key=lambda entry: (entry[1], entry[2]))[0]
