"""Script detection and the language-consistency reward."""

from __future__ import annotations

import itertools

import pytest

from rlhfkit.rewards.verifiers import get_verifier, verify
from rlhfkit.rewards.verifiers.language import (
    LANGUAGE_SCRIPTS,
    SCRIPT_RANGES,
    SCRIPTS,
    detect_script,
    language_reward,
    language_scripts,
    script_fraction,
    script_of,
    word_scripts,
)


def test_ranges_sorted_disjoint_and_named():
    for (first, last, _), (next_first, _, _) in itertools.pairwise(SCRIPT_RANGES):
        assert first <= last < next_first
    assert {script for _, _, script in SCRIPT_RANGES} == set(SCRIPTS)
    assert all(scripts <= set(SCRIPTS) for scripts in LANGUAGE_SCRIPTS.values())


@pytest.mark.parametrize(
    ("char", "script"),
    [
        ("a", "Latin"),
        ("Z", "Latin"),
        ("é", "Latin"),
        ("ß", "Latin"),
        ("ệ", "Latin"),  # Latin Extended Additional (Vietnamese)
        ("ａ", "Latin"),  # fullwidth
        ("ж", "Cyrillic"),
        ("Ё", "Cyrillic"),
        ("λ", "Greek"),
        ("ש", "Hebrew"),
        ("ع", "Arabic"),
        ("न", "Devanagari"),
        ("ก", "Thai"),
        ("한", "Hangul"),
        ("ㄱ", "Hangul"),  # compatibility jamo
        ("あ", "Hiragana"),
        ("カ", "Katakana"),
        ("ー", "Katakana"),  # prolonged sound mark
        ("ｶ", "Katakana"),  # halfwidth
        ("中", "Han"),
        ("々", "Han"),
        ("𠀀", "Han"),  # CJK Extension B, outside the BMP
        ("ა", "Other"),  # Georgian: a letter of no listed script
        ("5", None),
        ("٣", None),  # Arabic-Indic digit: not a letter
        (",", None),
        ("×", None),  # inside the Latin-1 range but not a letter
        ("\u093e", None),  # Devanagari vowel sign (a combining mark)
        (" ", None),
    ],
)
def test_script_of(char, script):
    assert script_of(char) == script


@pytest.mark.parametrize(
    ("text", "scripts"),
    [
        ("Hello world", ["Latin", "Latin"]),
        ("don't stop", ["Latin", "Latin"]),  # the apostrophe does not split a word
        ("state-of-the-art", ["Latin"]),
        ("42 3.14 + - ...", []),  # no letters, no words
        ("我认为 answer 是 42", ["Han", "Han", "Han", "Latin", "Han"]),  # Han: one word a char
        ("答案是x", ["Han", "Han", "Han", "Latin"]),  # a script change splits a piece
        ("abc中def", ["Latin", "Han", "Latin"]),
        ("私はカメラ", ["Han", "Hiragana", "Katakana", "Katakana", "Katakana"]),
        ("Привет, мир!", ["Cyrillic", "Cyrillic"]),
        ("नमस्ते दुनिया", ["Devanagari", "Devanagari"]),  # combining marks stay in the word
        ("สวัสดีครับ โลก", ["Thai", "Thai"]),  # Thai counts per run
        ("안녕하세요 세계", ["Hangul", "Hangul"]),
        ("Γειά σου", ["Greek", "Greek"]),
        ("שלום عالم", ["Hebrew", "Arabic"]),
        ("Tbilisi თბილისი", ["Latin", "Other"]),
        # LaTeX math, commands and markup tags are language-neutral.
        (r"so $x^2 + y$ is \frac <answer>", ["Latin", "Latin"]),
        (r"area \(\pi r^2\) and \[E = mc^2\] or $$\sum_i x_i$$ done", ["Latin"] * 4),
        # A command goes, its arguments stay (they may be text, as in \text{...}).
        (r"\text{hence} \frac{a}{b}", ["Latin", "Latin"]),
        ("costs $5 and $6 today", ["Latin", "Latin", "Latin"]),  # prices are not math
        ("", []),
    ],
)
def test_word_scripts(text, scripts):
    assert word_scripts(text) == scripts


@pytest.mark.parametrize(
    ("text", "script"),
    [
        ("The answer is 42", "Latin"),
        ("Ответ: 42, not 41", "Cyrillic"),  # one word each: the tie goes to the first
        ("Hello мир мир", "Cyrillic"),
        ("我认为 answer", "Han"),  # 3 Han words vs 1 Latin word
        ("ありがとう 中", "Hiragana"),
        ("123 + 456", None),
        ("", None),
        ("გამარჯობა", "Other"),
    ],
)
def test_detect_script(text, script):
    assert detect_script(text) == script


def test_detect_script_tie_goes_to_first_seen():
    assert detect_script("мир world") == "Cyrillic"
    assert detect_script("world мир") == "Latin"


@pytest.mark.parametrize(
    ("language", "scripts"),
    [
        ("en", {"Latin"}),
        ("FR", {"Latin"}),
        ("pt_BR", {"Latin"}),
        ("zh-CN", {"Han"}),
        ("ru", {"Cyrillic"}),
        ("ja", {"Han", "Hiragana", "Katakana"}),
        ("ko", {"Hangul"}),
        ("ar", {"Arabic"}),
        ("he", {"Hebrew"}),
        ("hi", {"Devanagari"}),
        ("el", {"Greek"}),
        ("th", {"Thai"}),
        ("cyrillic", {"Cyrillic"}),  # a script name
        (" Han ", {"Han"}),
    ],
)
def test_language_scripts(language, scripts):
    assert language_scripts(language) == scripts


def test_unknown_language():
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        language_scripts("klingon")
    with pytest.raises(ValueError, match="unknown language"):
        language_reward("hello", language="xx")


@pytest.mark.parametrize(
    ("completion", "language", "expected"),
    [
        # Only the think block counts; the answer (in English) is ignored.
        ("<think>Let me 想想 this</think>The answer", "en", 3 / 5),
        ("<think>Let me 想想 this</think>The answer", "zh", 2 / 5),
        ("<think>Нам нужно найти x. We add 2 and 2.</think><answer>4</answer>", "ru", 3 / 7),
        ("<think>Нам нужно найти x. We add 2 and 2.</think><answer>4</answer>", "en", 4 / 7),
        # No think block: the whole completion is the CoT (markup tags ignored).
        ("<answer>The answer is 4</answer>", "en", 1.0),
        ("Das ist richtig, 42!", "de", 1.0),  # scripts cannot tell German from English
        # Japanese: Han and Kana both count.
        ("<think>私はカメラ and pen</think>", "ja", 5 / 7),
        ("<think>私はカメラ and pen</think>", "zh", 1 / 7),
        # The opening tag was in the prompt.
        ("먼저 계산하면 then 4</think>4", "ko", 2 / 3),
        # LaTeX is neutral: only "so" and "是" are words.
        (r"<think>so $\frac{1}{2}$ 是 \alpha</think>", "zh", 1 / 2),
    ],
)
def test_language_reward(completion, language, expected):
    assert language_reward(completion, language=language) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "completion",
    [
        "<think>2 + 2 = 4</think>I am sure",  # the CoT has no words (the reply does)
        r"<think>$x^2$ \cdot 3</think>",
        "",
        "<think></think>",
    ],
)
def test_language_reward_none_without_words(completion):
    assert language_reward(completion, language="en") is None


def test_language_reward_default_is_english():
    assert language_reward("<think>one два</think>") == 0.5


def test_script_fraction_is_on_the_whole_text():
    assert script_fraction("<think>один</think> two three", "en") == pytest.approx(2 / 3)
    assert script_fraction("...", "en") is None


def test_registered_as_language():
    assert get_verifier("language") is language_reward
    row = {"language": "ru", "answer": "4"}
    assert verify("<think>Думаю think</think>4", verifier="language", **row) == 0.5
