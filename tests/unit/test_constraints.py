"""Instruction-following constraints: each checker, the reward and malformed constraints."""

from __future__ import annotations

import inspect

import pytest

from rlhfkit.rewards.verifiers import get_verifier, verify
from rlhfkit.rewards.verifiers.constraints import (
    CONSTRAINTS,
    check_constraint,
    constraints_reward,
    reply_text,
    validate_constraints,
)


def holds(response: str, type_: str, **params) -> bool:
    return check_constraint(response, {"type": type_, **params})


# ---- counts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("one two three", 3),
        ("  don't   stop - now ", 3),  # a lone dash is not a word; don't is one
        ("pi is 3.14", 3),
        ("line\nbreak\ttab", 3),
        ("", 0),
        ("... !!!", 0),
    ],
)
def test_word_count(text, words):
    assert holds(text, "word_count", n=words, relation="exactly")
    assert not holds(text, "word_count", n=words + 1, relation="exactly")
    assert holds(text, "word_count", n=words)  # at least (the default)
    assert not holds(text, "word_count", n=words + 1)
    assert holds(text, "word_count", n=words, relation="at most")
    if words:
        assert not holds(text, "word_count", n=words - 1, relation="at most")


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("Hello world. How are you? Fine!", 3),
        ("No final stop", 1),
        ("Pi is 3.14. Yes.", 2),  # a decimal point does not end a sentence
        ("Wait... what?!", 2),
        ("你好。我很好！", 2),  # CJK full stops need no space after them
        ("...", 0),
        ("", 0),
    ],
)
def test_sentence_count(text, sentences):
    assert holds(text, "sentence_count", n=sentences, relation="exactly")
    assert not holds(text, "sentence_count", n=sentences + 1, relation="exactly")


@pytest.mark.parametrize(
    ("text", "paragraphs"),
    [
        ("one\n\ntwo\n\nthree", 3),
        ("one\ntwo", 1),  # a single newline does not break a paragraph
        ("one\n  \t\ntwo", 2),  # a whitespace-only line is blank
        ("one\n***\ntwo *** three", 3),
        ("one\n\n\n\n***\n\ntwo", 2),  # empty pieces are not paragraphs
        ("\n\n", 0),
    ],
)
def test_paragraph_count(text, paragraphs):
    assert holds(text, "paragraph_count", n=paragraphs)  # exactly (the default)
    assert not holds(text, "paragraph_count", n=paragraphs + 1)


def test_keywords():
    text = "The River flows past the old stone bridge."
    assert holds(text, "keywords", keywords=["river", "STONE", "old stone"])
    assert not holds(text, "keywords", keywords=["river", "tree"])
    assert not holds("category", "keywords", keywords=["cat"])  # whole words only
    assert holds("cat-like", "keywords", keywords=["cat"])
    assert holds("Use C++ here", "keywords", keywords=["C++"])  # regex characters are literal


def test_forbidden_words():
    assert holds("A calm reply.", "forbidden_words", words=["angry", "rude"])
    assert not holds("An Angry reply.", "forbidden_words", words=["angry"])
    assert holds("Scattered thoughts", "forbidden_words", words=["cat"])


def test_keyword_frequency():
    text = "Cats, cats and more CATS. Not catsup."
    assert holds(text, "keyword_frequency", keyword="cats", n=3)
    assert not holds(text, "keyword_frequency", keyword="cats", n=4)
    assert holds(text, "keyword_frequency", keyword="cats", n=3, relation="exactly")
    assert not holds(text, "keyword_frequency", keyword="cats", n=2, relation="at most")
    assert holds("", "keyword_frequency", keyword="cats", n=0, relation="exactly")


def test_letter_frequency():
    assert holds("Banana", "letter_frequency", letter="a", n=3, relation="exactly")
    assert holds("Banana", "letter_frequency", letter="B", n=1, relation="exactly")
    assert not holds("Banana", "letter_frequency", letter="n", n=3)
    assert holds("Banana", "letter_frequency", letter="z", n=0, relation="at most")


def test_capital_word_frequency():
    text = "NASA and the ESA met in the U.S. on MONDAY, I think."
    assert holds(text, "capital_word_frequency", n=5, relation="exactly")  # NASA ESA U.S. MONDAY I
    assert not holds(text, "capital_word_frequency", n=6)
    assert holds("no capitals 123", "capital_word_frequency", n=0, relation="at most")


def test_bullet_count():
    text = "Intro\n* one\n- two\n  + three\n*not a bullet*\n1. numbered\n***\n---\n-\n"
    assert holds(text, "bullet_count", n=3)  # exactly (the default)
    assert not holds(text, "bullet_count", n=4)
    assert holds("no list", "bullet_count", n=0)


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("*one* and **two** and *three*", 3),
        ("* a bullet\n* another", 0),  # bullets are not highlights
        ("2*3*4 is arithmetic", 0),
        ("* spaced * out", 0),
        ("*** divider", 0),
        ("*not\nacross lines*", 0),
        ("**", 0),
    ],
)
def test_highlight_count(text, count):
    assert holds(text, "highlight_count", n=count, relation="exactly")


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("Dear [name], at [address] on [ date ].", 3),
        ("See [the docs](https://example.com).", 0),  # a markdown link
        ("[] and [  ]", 0),  # blank brackets
        ("[a][b]", 2),
    ],
)
def test_placeholder_count(text, count):
    assert holds(text, "placeholder_count", n=count, relation="exactly")
    assert holds(text, "placeholder_count", n=count)
    assert not holds(text, "placeholder_count", n=count + 1)


# ---- shapes and wording --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ('{"a": [1, 2]}', True),
        ("  [1, 2]\n", True),
        ('```json\n{"a": 1}\n```', True),
        ('```JSON\n{"a": 1}\n```', True),
        ('```\n{"a": 1}\n```', True),
        ("42", True),  # any JSON value
        ('Here it is: {"a": 1}', False),
        ('{"a": 1', False),
        ("```json\n{'a': 1}\n```", False),  # single quotes are not JSON
        ("", False),
    ],
)
def test_json_format(text, ok):
    assert holds(text, "json_format") is ok


def test_lowercase_uppercase():
    assert holds("all lower, 123!", "lowercase")
    assert not holds("One capital", "lowercase")
    assert holds("ALL UPPER, 123!", "uppercase")
    assert not holds("ALL UPPEr", "uppercase")
    for empty in ("", "123 !?"):  # no cased letter: neither
        assert not holds(empty, "lowercase")
        assert not holds(empty, "uppercase")


def test_starts_and_ends_with():
    text = "  Dear team, all is well. Is there anything else I can help with?\n"
    assert holds(text, "starts_with", phrase="Dear team")
    assert holds(text, "starts_with", phrase="dear TEAM")
    assert not holds(text, "starts_with", phrase="team")
    assert holds(text, "ends_with", phrase="Is there anything else I can help with?")
    assert not holds(text, "ends_with", phrase="Is there anything else I can help with")
    assert not holds("", "ends_with", phrase="end")


def test_title():
    assert holds("<<Ode to Joy>>\nThe poem.", "title")
    assert not holds("<<>> or << >>", "title")
    assert not holds("<<broken\ntitle>>", "title")
    assert not holds("No title here", "title")


def test_postscript():
    assert holds("Body.\n\nP.S. One more thing.", "postscript")
    assert holds("Body.\n  p. s. lower and spaced", "postscript")
    assert not holds("I wrote P.S. mid-line.", "postscript")
    assert holds("Body.\nP.P.S. later", "postscript", marker="P.P.S")
    assert not holds("Body.\nP.S. only", "postscript", marker="P.P.S")


def test_no_commas():
    assert holds("No commas here.", "no_commas")
    assert not holds("One, two.", "no_commas")
    assert not holds("一，二", "no_commas")  # fullwidth comma


def test_quotation():
    assert holds('"Wrapped."', "quotation")
    assert holds('  "Wrapped."\n', "quotation")
    assert holds("\u201cCurly.\u201d", "quotation")
    assert not holds('"', "quotation")
    assert not holds('"Open only', "quotation")
    assert not holds("'single'", "quotation")


def test_response_language():
    assert holds("Привет, как твои дела? OK", "response_language", language="ru")  # 4 of 5
    assert not holds("Привет, как дела? OK", "response_language", language="ru")  # 3 of 4 < 0.8
    assert not holds("Привет, how are you", "response_language", language="ru")  # 1 of 4
    assert holds("Привет, how are you", "response_language", language="ru", min_fraction=0.25)
    assert holds("这是中文 text", "response_language", language="zh")  # 4 of 5
    assert not holds("123", "response_language", language="en")  # no words
    assert holds("123", "response_language", language="en", min_fraction=0.0) is False


# ---- the reward ----------------------------------------------------------------------------

CONSTRAINT_SET = [
    {"type": "word_count", "n": 5, "relation": "at most"},
    {"type": "lowercase"},
    {"type": "keywords", "keywords": ["river"]},
    {"type": "no_commas"},
]


@pytest.mark.parametrize(
    ("completion", "fraction"),
    [
        ("the river is wide", 1.0),
        ("The river is wide", 0.75),
        ("The River, it is very wide", 0.25),  # only the keyword holds
        ("A Lake, large and very wide", 0.0),
    ],
)
def test_constraints_reward_modes(completion, fraction):
    assert constraints_reward(completion, CONSTRAINT_SET, mode="fraction") == fraction
    assert constraints_reward(completion, CONSTRAINT_SET) == float(fraction == 1.0)
    assert constraints_reward(completion, CONSTRAINT_SET, mode="all") == float(fraction == 1.0)


def test_only_the_reply_is_checked():
    constraints = [{"type": "lowercase"}, {"type": "starts_with", "phrase": "yes"}]
    assert constraints_reward("<think>Thinking, In Capitals.</think>\nyes indeed", constraints) == 1
    assert constraints_reward("<think>x</think><answer>yes indeed</answer>", constraints) == 1
    assert constraints_reward("<think>yes, cut off", constraints) == 0.0  # empty reply


@pytest.mark.parametrize(
    ("completion", "reply"),
    [
        ("<think>r</think> <answer>a</answer> ", "a"),
        ("<think>r</think>plain", "plain"),
        ("<answer>a</answer> and <answer>b</answer>", "<answer>a</answer> and <answer>b</answer>"),
        ("no tags", "no tags"),
    ],
)
def test_reply_text(completion, reply):
    assert reply_text(completion) == reply


def test_no_constraints_is_unscorable():
    assert constraints_reward("anything", []) is None
    assert constraints_reward("anything", [], mode="fraction") is None


@pytest.mark.parametrize(
    ("constraints", "message"),
    [
        ([{"type": "no_commas"}, {"type": "rhyme"}], r"constraint 1 \('rhyme'\): unknown"),
        ([{"n": 3}], r"constraint 0 \(None\): unknown constraint type"),
        (["no_commas"], "constraint 0: expected a dict"),
        ([{"type": ["no_commas"]}], r"constraint 0 \(\['no_commas'\]\): unknown"),
        ([{"type": "word_count"}], r"constraint 0 \('word_count'\).*missing.*'n'"),
        ([{"type": "word_count", "n": 3, "min": 1}], r"constraint 0 \('word_count'\).*'min'"),
        ([{"type": "no_commas", "n": 1}], r"constraint 0 \('no_commas'\)"),
        ([{"type": "word_count", "n": -1}], "n must be a non-negative integer"),
        ([{"type": "word_count", "n": "5"}], "n must be a non-negative integer"),
        ([{"type": "word_count", "n": True}], "n must be a non-negative integer"),
        ([{"type": "word_count", "n": 5, "relation": "less than"}], "relation must be one of"),
        ([{"type": "keywords", "keywords": "river"}], "keywords must be a non-empty list"),
        ([{"type": "keywords", "keywords": []}], "keywords must be a non-empty list"),
        ([{"type": "forbidden_words", "words": ["ok", ""]}], "each of words"),
        ([{"type": "letter_frequency", "letter": "ab", "n": 1}], "single letter"),
        ([{"type": "letter_frequency", "letter": "1", "n": 1}], "single letter"),
        ([{"type": "ends_with", "phrase": "  "}], "phrase must be a non-empty string"),
        ([{"type": "response_language", "language": "xx"}], "unknown language"),
        ([{"type": "response_language", "language": "en", "min_fraction": 2}], r"in \[0, 1\]"),
    ],
)
def test_malformed_constraints_raise(constraints, message):
    with pytest.raises(ValueError, match=message):
        constraints_reward("some reply", constraints)
    with pytest.raises(ValueError, match=message):
        validate_constraints(constraints)


def test_malformed_constraint_raises_even_after_a_failing_one():
    constraints = [{"type": "uppercase"}, {"type": "word_count", "n": -1}]
    with pytest.raises(ValueError, match=r"constraint 1 \('word_count'\)"):
        constraints_reward("lower", constraints)


def test_bad_arguments_to_the_reward():
    with pytest.raises(ValueError, match="unknown mode 'any'"):
        constraints_reward("x", CONSTRAINT_SET, mode="any")
    with pytest.raises(ValueError, match="must be a list"):
        constraints_reward("x", '[{"type": "no_commas"}]')  # type: ignore[arg-type]


def test_registry_checkers_take_the_response_then_keyword_parameters():
    assert len(CONSTRAINTS) == 21
    for name, checker in CONSTRAINTS.items():
        params = list(inspect.signature(checker).parameters.values())
        assert params[0].name == "response", name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:]), name


def test_registered_as_constraints():
    assert get_verifier("constraints") is constraints_reward
    row = {"constraints": [{"type": "no_commas"}], "answer": None}
    assert verify("fine", verifier="constraints", **row) == 1.0
    assert verify("fine, thanks", verifier="constraints", **row) == 0.0
