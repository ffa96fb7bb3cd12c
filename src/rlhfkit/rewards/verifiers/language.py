r"""Language consistency: is the chain of thought written in the target language's script?

DeepSeek-R1 (2025, section 2.3.2) adds a language-consistency reward during RL to stop the
chain of thought from mixing languages: the proportion of its words in the target language.
This module approximates "in the language" by "in the language's script", which needs no model:

    r = #{words of the CoT whose letters are all in the target's scripts} / #{words of the CoT}

Scripts (:data:`SCRIPTS`) are recognised by Unicode code-point ranges (:data:`SCRIPT_RANGES`):
Latin, Greek, Cyrillic, Hebrew, Arabic, Devanagari, Thai, Hangul, Hiragana, Katakana and Han.
A letter (``str.isalpha``) outside them belongs to the script ``"Other"``; combining marks,
digits and punctuation belong to none.

Words (:func:`word_scripts`): the text is split at whitespace, and each piece again wherever the
script of its letters changes (``"答案是x"`` is ``答``, ``案``, ``是``, ``x``); characters without
a script inside a piece (``don't``, ``x^2``) do not split it. Han, Hiragana and Katakana are
written without spaces between words, so each of their characters counts as one word (as word
processors count East Asian text); Thai, also unspaced, counts one word per run. Pieces with no
letters (numbers, punctuation) are not words. Before splitting, LaTeX math (``$..$``, ``$$..$$``,
``\(..\)``, ``\[..\]``), LaTeX command names (``\frac``; their arguments stay, since they
may be text as in ``\text{hence}``) and markup tags (``<answer>``) are removed: they are
language-neutral.

The script test cannot tell languages sharing a script apart (English from French), and counts
a bare Latin variable (``x = 2`` outside math delimiters) as a Latin word.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter

from rlhfkit.rewards.verifiers.format import split_think

LATIN, GREEK, CYRILLIC, HEBREW, ARABIC = "Latin", "Greek", "Cyrillic", "Hebrew", "Arabic"
DEVANAGARI, THAI, HANGUL = "Devanagari", "Thai", "Hangul"
HIRAGANA, KATAKANA, HAN = "Hiragana", "Katakana", "Han"
OTHER = "Other"
"""The script of a letter outside :data:`SCRIPT_RANGES` (Georgian, Armenian, ...)."""

SCRIPTS = (
    LATIN,
    GREEK,
    CYRILLIC,
    HEBREW,
    ARABIC,
    DEVANAGARI,
    THAI,
    HANGUL,
    HIRAGANA,
    KATAKANA,
    HAN,
)
"""The scripts recognised by name."""

SCRIPT_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x0041, 0x005A, LATIN),  # Basic Latin A-Z
    (0x0061, 0x007A, LATIN),  # Basic Latin a-z
    (0x00AA, 0x00AA, LATIN),  # feminine ordinal indicator
    (0x00BA, 0x00BA, LATIN),  # masculine ordinal indicator
    (0x00C0, 0x02AF, LATIN),  # Latin-1 letters, Latin Extended-A/B, IPA extensions
    (0x0370, 0x03FF, GREEK),  # Greek and Coptic
    (0x0400, 0x052F, CYRILLIC),  # Cyrillic, Cyrillic Supplement
    (0x0590, 0x05FF, HEBREW),
    (0x0600, 0x06FF, ARABIC),
    (0x0750, 0x077F, ARABIC),  # Arabic Supplement
    (0x08A0, 0x08FF, ARABIC),  # Arabic Extended-A
    (0x0900, 0x097F, DEVANAGARI),
    (0x0E00, 0x0E7F, THAI),
    (0x1100, 0x11FF, HANGUL),  # Hangul Jamo
    (0x1C80, 0x1C8F, CYRILLIC),  # Cyrillic Extended-C
    (0x1E00, 0x1EFF, LATIN),  # Latin Extended Additional (Vietnamese)
    (0x1F00, 0x1FFF, GREEK),  # Greek Extended
    (0x2C60, 0x2C7F, LATIN),  # Latin Extended-C
    (0x2DE0, 0x2DFF, CYRILLIC),  # Cyrillic Extended-A
    (0x3005, 0x3007, HAN),  # iteration mark 々, closing mark 〆, ideographic zero
    (0x3040, 0x309F, HIRAGANA),
    (0x30A0, 0x30FF, KATAKANA),  # includes the prolonged sound mark ー
    (0x3130, 0x318F, HANGUL),  # Hangul Compatibility Jamo
    (0x31F0, 0x31FF, KATAKANA),  # Katakana Phonetic Extensions
    (0x3400, 0x4DBF, HAN),  # CJK Extension A
    (0x4E00, 0x9FFF, HAN),  # CJK Unified Ideographs
    (0xA640, 0xA69F, CYRILLIC),  # Cyrillic Extended-B
    (0xA720, 0xA7FF, LATIN),  # Latin Extended-D
    (0xA8E0, 0xA8FF, DEVANAGARI),  # Devanagari Extended
    (0xA960, 0xA97F, HANGUL),  # Hangul Jamo Extended-A
    (0xAC00, 0xD7FF, HANGUL),  # Hangul Syllables, Jamo Extended-B
    (0xF900, 0xFAFF, HAN),  # CJK Compatibility Ideographs
    (0xFB1D, 0xFB4F, HEBREW),  # Hebrew presentation forms
    (0xFB50, 0xFDFF, ARABIC),  # Arabic Presentation Forms-A
    (0xFE70, 0xFEFF, ARABIC),  # Arabic Presentation Forms-B
    (0xFF21, 0xFF3A, LATIN),  # fullwidth A-Z
    (0xFF41, 0xFF5A, LATIN),  # fullwidth a-z
    (0xFF66, 0xFF9F, KATAKANA),  # halfwidth katakana
    (0x20000, 0x2FA1F, HAN),  # CJK Extensions B-F, Compatibility Supplement
    (0x30000, 0x323AF, HAN),  # CJK Extensions G-H
)
"""Inclusive code-point ranges ``(first, last, script)``, sorted and disjoint."""

_STARTS = [first for first, _, _ in SCRIPT_RANGES]

PER_CHARACTER_SCRIPTS = frozenset({HAN, HIRAGANA, KATAKANA})
"""Scripts written without spaces whose every character counts as a word."""

_SCRIPT_LANGUAGES: dict[str, str] = {
    LATIN: (
        "en fr de es it pt nl sv da no nb nn is fi et lv lt pl cs sk sl hr bs ro hu sq tr az uz "
        "id ms tl vi ca eu gl ga cy mt af sw yo ha ig zu xh so la eo"
    ),
    CYRILLIC: "ru uk be bg mk sr kk ky tg mn",
    GREEK: "el",
    ARABIC: "ar fa ur ps ug",
    HEBREW: "he iw yi",
    DEVANAGARI: "hi mr ne sa",
    THAI: "th",
    HANGUL: "ko",
    HAN: "zh",
}
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    code: frozenset({script})
    for script, codes in _SCRIPT_LANGUAGES.items()
    for code in codes.split()
}
LANGUAGE_SCRIPTS["ja"] = frozenset({HAN, HIRAGANA, KATAKANA})
"""ISO 639-1 language code -> the scripts its words may use."""

_LATEX_MATH = re.compile(
    r"\$\$.*?\$\$"  # display math
    r"|\$(?=\S)[^$\n]*?(?<=\S)\$(?!\d)"  # inline math; not "$5 and $6" (prices)
    r"|\\\(.*?\\\)|\\\[.*?\\\]",
    re.DOTALL,
)
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_TAG = re.compile(r"</?[A-Za-z][\w-]*\s*/?>")


def script_of(char: str) -> str | None:
    """The script of one character: a name of :data:`SCRIPTS`, ``"Other"``, or None.

    None for anything that is not a letter (``str.isalpha`` false: digits, punctuation,
    spaces, combining marks); ``"Other"`` for a letter outside :data:`SCRIPT_RANGES`.
    """
    if not char.isalpha():
        return None
    point = ord(char)
    index = bisect.bisect_right(_STARTS, point) - 1
    if index >= 0:
        first, last, script = SCRIPT_RANGES[index]
        if first <= point <= last:
            return script
    return OTHER


def _strip_neutral(text: str) -> str:
    """``text`` without LaTeX math, LaTeX commands and markup tags (each becomes a space)."""
    for pattern in (_LATEX_MATH, _LATEX_COMMAND, _TAG):
        text = pattern.sub(" ", text)
    return text


def word_scripts(text: str) -> list[str]:
    """The script of each word of ``text``, in order (words as in the module docstring).

    Example: ``word_scripts("我认为 answer 是 42")`` is ``["Han", "Han", "Han", "Latin",
    "Han"]``.
    """
    scripts: list[str] = []
    for piece in _strip_neutral(text).split():
        previous = None
        for char in piece:
            script = script_of(char)
            if script is None:
                continue
            if script != previous or script in PER_CHARACTER_SCRIPTS:
                scripts.append(script)
            previous = script
    return scripts


def detect_script(text: str) -> str | None:
    """The dominant script of ``text``: the one most of its words are written in.

    Ties go to the script that appears first. Han, Hiragana and Katakana are separate scripts
    here (Japanese text is usually dominated by Hiragana).

    Returns:
        A name of :data:`SCRIPTS`, ``"Other"``, or None when ``text`` has no words.
    """
    counts = Counter(word_scripts(text))
    if not counts:
        return None
    return counts.most_common(1)[0][0]  # Counter keeps first-seen order among equal counts


def language_scripts(language: str) -> frozenset[str]:
    """The scripts of ``language``, an ISO 639-1 code or a script name.

    A region or script suffix of a code (``zh-CN``, ``pt_BR``) is ignored; script names (of
    :data:`SCRIPTS`) may be in any case.

    Raises:
        ValueError: A language that is neither (the message lists the known codes).
    """
    by_name = {name.lower(): name for name in SCRIPTS}
    key = language.strip().lower()
    if key in by_name:
        return frozenset({by_name[key]})
    code = re.split(r"[-_]", key, maxsplit=1)[0]
    if code in LANGUAGE_SCRIPTS:
        return LANGUAGE_SCRIPTS[code]
    raise ValueError(
        f"unknown language {language!r}: use an ISO 639-1 code "
        f"({', '.join(sorted(LANGUAGE_SCRIPTS))}) or a script ({', '.join(SCRIPTS)})"
    )


def script_fraction(text: str, language: str) -> float | None:
    """Share of the words of ``text`` written in the scripts of ``language``.

    Returns:
        ``#{words in the language's scripts} / #{words}``, or None when ``text`` has no words.

    Raises:
        ValueError: An unknown language (see :func:`language_scripts`).
    """
    targets = language_scripts(language)
    scripts = word_scripts(text)
    if not scripts:
        return None
    return sum(script in targets for script in scripts) / len(scripts)


def language_reward(completion: str, *, language: str = "en") -> float | None:
    """DeepSeek-R1's language-consistency reward: the share of CoT words in the target script.

    ``r = #{CoT words in the scripts of language} / #{CoT words}``, where the CoT is the text of
    the think block when the completion has one (see
    :func:`rlhfkit.rewards.verifiers.format.split_think`), else the whole completion.

    Args:
        completion: The model's reply.
        language: The target language, the example's ``language`` field when it has one: an ISO
            639-1 code or a script name (see :func:`language_scripts`).

    Returns:
        The share in ``[0, 1]``, or None when the CoT has no words.

    Raises:
        ValueError: An unknown language.
    """
    reasoning, _ = split_think(completion)
    return script_fraction(completion if reasoning is None else reasoning, language)
