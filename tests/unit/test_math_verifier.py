"""Math verifier: extraction, normalisation, numbers, comparison, reward, majority vote."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from rlhfkit.rewards.verifiers import get_verifier, verify
from rlhfkit.rewards.verifiers.math import (
    DEFAULT_ORDER,
    EXTRACTORS,
    answers_match,
    extract_answer,
    majority_vote,
    math_reward,
    normalise,
    parse_number,
)

# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

# The extraction rules' basic cases, then trickier ones.
EXTRACTION = [
    (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\frac{\sqrt{2}}{\left(3\right)}} done", r"\frac{\sqrt{2}}{\left(3\right)}"),
    (r"first \boxed{1}, then \boxed{2}", "2"),
    ("The total is 1,234", "1,234"),
    ("it drops to -7 degrees", "-7"),
    ("The answer is: 42.", "42"),
    ("<think>a 3</think><answer>17</answer>", "17"),
    ("", None),
    ("no digits here", None),
    ("<answer>1</answer> then <answer>2</answer>", "2"),
    ("<answer>5</answer> and some text after the tag, 99", "5"),
    ("<answer>unclosed 5", "5"),  # no complete pair: falls back to the last number
    ("<answer>a <answer>8</answer>", "8"),  # the innermost complete pair
    (r"\boxed{3} and later \boxed{\frac{1", "3"),  # unclosed last box: the last closed one
    (r"\boxed{\frac{1}{2}", "2"),  # no box closes: the last number
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not count
    (r"\fbox{x+1}", "x+1"),
    (r"\boxed {7}", "7"),
    (r"\boxed{} then 4", "4"),  # an empty box is no answer
    ("Natalia sold 48 clips.\n#### 72\nextra 5", "72"),
    ("#### $1,000", "$1,000"),
    ("the final ANSWER IS $\\frac{3}{4}$.", r"\frac{3}{4}"),
    ("The answer is \\(x^2\\)", "x^2"),
    ("The answer is (B).", "B"),
    ("The answer is **12**.", "12"),
    ("The answer is \\$1,000.", "1,000"),  # an escaped dollar goes whole, not as "\\1,000"
    ("The answer is $\\$1,000.00$.", "1,000.00"),
    ("The answer is 3. Wait, the answer is 5.", "5"),  # the last marker
    ("The answer is\n42", "42"),  # nothing on the marker's line: the last number
    ("The answers is 7", "7"),  # not the phrase: the last number
    ("Candidates 3, 4 and 5; final -3/4", "-3/4"),
    ("5-3 = 2, and 10 - 2", "2"),
    ("the rate grew 25%", "25%"),
    ("pi is about 3.14159.", "3.14159"),
    ("half is .5", ".5"),
    ("x = -12.5", "-12.5"),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_default_order_prefers_tag_then_box_then_hashes_then_phrase_then_number():
    assert DEFAULT_ORDER == ("answer_tag", "boxed", "hashes", "the_answer_is", "last_number")
    text = r"The answer is 4. \boxed{3} #### 2 <answer>1</answer> 9"
    assert extract_answer(text) == "1"
    assert extract_answer(text.replace("<answer>1</answer>", "")) == "3"
    assert extract_answer("The answer is 4. #### 2 then 9") == "2 then 9"  # to the line end
    assert extract_answer("The answer is 4. #### 2\nthen 9") == "2"
    assert extract_answer("The answer is 4\nthen 9") == "4"


def test_order_is_configurable():
    text = r"\boxed{3} <answer>1</answer> then 9"
    assert extract_answer(text, order=("boxed", "answer_tag")) == "3"
    assert extract_answer(text, order=("last_number",)) == "9"
    assert extract_answer("just 9", order=("boxed",)) is None
    assert extract_answer("just 9", order=()) is None


def test_unknown_rule_is_an_error_listing_the_known_ones():
    with pytest.raises(ValueError, match="answer_tag"):
        extract_answer("5", order=("boxed", "nope"))


def test_each_extractor_returns_none_on_empty_text():
    for name, fn in EXTRACTORS.items():
        assert fn("") is None, name


# ---------------------------------------------------------------------------------------------
# Normalisation and numbers
# ---------------------------------------------------------------------------------------------

NORMALISED = [
    ("  42  ", "42"),
    ("$42$", "42"),
    (r"\$5", "5"),
    ("12 cm", "12"),
    ("12cm", "12"),
    (r"12\text{ cm}", "12"),
    ("12 cm^2", "12"),
    ("5 hours.", "5"),
    ("3 dollars", "3"),
    ("$1,000", "1000"),
    ("1,234,567", "1234567"),
    ("1,2,3", "1,2,3"),  # not thousands separators
    (r"\left( 1, 2 \right)", "(1,2)"),
    (r"\rightarrow", r"\rightarrow"),  # only \left / \right themselves go
    (r"90^\circ", "90"),
    (r"90^{\circ}", "90"),
    ("90°", "90"),
    (r"\dfrac{1}{2}", r"\frac{1}{2}"),
    (r"\tfrac{1}{2}", r"\frac{1}{2}"),
    ("3.", "3"),
    (r"50\%", "50%"),
    (r"\boxed{5}", "5"),
    (r"\text{Paris}", "Paris"),
    ("x = 3", "3"),
    ("x + 1", "x+1"),
    (r"\pi r^2", r"\pi r^2"),  # a space between letters is kept
    ("New   York", "New York"),
    ("−4", "-4"),  # unicode minus
    (r"1\,000", "1000"),
    ("m", "m"),  # a unit alone is not dropped
]


@pytest.mark.parametrize(("raw", "expected"), NORMALISED)
def test_normalise(raw, expected):
    assert normalise(raw) == expected


@pytest.mark.parametrize("raw", [raw for raw, _ in NORMALISED])
def test_normalise_is_idempotent(raw):
    assert normalise(normalise(raw)) == normalise(raw)


NUMBERS = [
    ("42", 42.0),
    ("-7", -7.0),
    ("+3", 3.0),
    ("3.25", 3.25),
    (".5", 0.5),
    ("1e3", 1000.0),
    ("1,234", 1234.0),
    ("3/4", 0.75),
    ("-3/4", -0.75),
    (r"\frac{1}{2}", 0.5),
    (r"\dfrac{3}{4}", 0.75),
    (r"-\frac{1}{4}", -0.25),
    (r"\frac{-1}{4}", -0.25),
    (r"\frac12", 0.5),
    ("50%", 0.5),
    (r"12.5\%", 0.125),
    ("12 cm", 12.0),
    ("$1,000.50", 1000.5),
    ("1/0", None),
    (r"\frac{1}{0}", None),
    ("x", None),
    ("", None),
    (r"\sqrt{2}", None),
    ("1,2,3", None),
    ("inf", None),
    ("nan", None),
]


@pytest.mark.parametrize(("raw", "expected"), NUMBERS)
def test_parse_number(raw, expected):
    assert parse_number(raw) == expected


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------

MATCHING = [
    (r"\frac{1}{2}", "0.5"),
    ("0.5", "1/2"),
    ("1234", "1,234"),
    ("12 cm", "12"),
    ("$1,000", "1000"),
    ("3.0", "3"),
    ("0.333333", "1/3"),  # within 1e-6
    ("1000000.5", "1000000"),  # relative tolerance: 1e-6 * 1e6 = 1
    ("50%", "50"),  # a percentage matches its bare number...
    ("50%", "0.5"),  # ...and its fraction
    ("x = 3", "3"),
    ("x+1", "x + 1"),
    ("Paris", r"\text{Paris}"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),  # symbolic
    ("(x-1)(x+1)", "x^2-1"),  # symbolic
    (r"2\pi r", r"2 r \pi"),  # symbolic
]

NOT_MATCHING = [
    ("0.3333", "1/3"),
    ("3", "4"),
    ("-3", "3"),
    ("1000001.5", "1000000"),
    ("x+2", "x+1"),
    ("Paris", "London"),
    ("A", "B"),
    (None, "3"),
    ("3", None),
    ("", "3"),
    ("$", "$"),  # both empty after normalisation
]


@pytest.mark.parametrize(("predicted", "reference"), MATCHING)
def test_answers_match(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize(("predicted", "reference"), NOT_MATCHING)
def test_answers_do_not_match(predicted, reference):
    assert not answers_match(predicted, reference)


def test_symbolic_check_can_be_turned_off():
    assert answers_match(r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", symbolic=True)
    assert not answers_match(r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", symbolic=False)
    assert answers_match(r"\frac{1}{2}", "0.5", symbolic=False)  # numbers need no sympy


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout"):
        answers_match("1", "1", timeout=0)


def test_other_threads_fall_back_without_crashing():
    pairs = [
        (r"\frac{\sqrt{2}}{3}", r"\frac{2}{3\sqrt{2}}"),  # symbolic only: not tried off-main
        ("0.5", r"\frac{1}{2}"),  # numeric: still recognised
        ("x+1", "x + 1"),  # string: still recognised
    ]
    assert threading.current_thread() is threading.main_thread()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda pair: answers_match(*pair), pairs))
        rewards = list(pool.map(lambda t: math_reward(t, "0.5"), [r"\boxed{\frac12}", "7"]))
    assert results == [False, True, True]
    assert rewards == [1.0, 0.0]
    assert answers_match(*pairs[0])  # the same pair in the main thread


# ---------------------------------------------------------------------------------------------
# Reward
# ---------------------------------------------------------------------------------------------


def test_math_reward():
    assert math_reward(r"so the area is \boxed{\frac{1}{2}}", "0.5") == 1.0
    assert math_reward(r"so the area is \boxed{\frac{1}{3}}", "0.5") == 0.0
    assert math_reward("The answer is: 42.", "42") == 1.0
    assert math_reward("The answer is: 42.", 42) == 1.0  # a numeric reference field
    assert math_reward("<answer>1,234</answer>", "1234") == 1.0
    assert math_reward("#### 72", "72") == 1.0


@pytest.mark.parametrize(
    "text",
    [
        "The answer is \\$1,000.",
        "The answer is $1,000.",
        "The answer is \\$1,000.00",
        "The answer is: **\\$1,000**.",
        "The answer is $\\$1{,}000$.",
        "The answer is 1,000 dollars.",
        "The answer is \\$1,000 dollars.",
        "\\boxed{\\$1,000}",
    ],
)
@pytest.mark.parametrize("reference", ["1000", "1,000", "$1,000", "\\$1000", 1000])
def test_dollar_amounts_match_on_every_route(text, reference):
    assert math_reward(text, reference) == 1.0
    assert math_reward(text, "1001") == 0.0


def test_no_extraction_is_a_failure_not_a_skip():
    assert math_reward("I don't know.", "3") == 0.0
    assert math_reward("", "3") == 0.0


def test_missing_reference_is_unscorable():
    assert math_reward(r"\boxed{3}", None) is None
    assert math_reward(r"\boxed{3}", "  ") is None


def test_reward_options():
    text = r"\boxed{3} <answer>4</answer>"
    assert math_reward(text, "4") == 1.0
    assert math_reward(text, "3", order=("boxed",)) == 1.0
    assert math_reward(r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", symbolic=False) == 0.0


def test_registered_as_math_verifier():
    assert get_verifier("math") is math_reward
    assert verify(r"\boxed{5}", answer="5", task="arithmetic") == 1.0
    assert verify("6", verifier="math", answer="5") == 0.0


# ---------------------------------------------------------------------------------------------
# Majority vote
# ---------------------------------------------------------------------------------------------


def test_majority_vote_methods_cases():
    assert majority_vote([3, 5, 3, None]) == "3"
    assert majority_vote([5, 3]) == "5"  # tie: earliest first occurrence


def test_majority_vote_edge_cases():
    assert majority_vote([]) is None
    assert majority_vote([None, None, ""]) is None
    assert majority_vote(["7"]) == "7"
    assert majority_vote(["1", "2", "2", "1"]) == "1"  # tie at 2 votes: "1" came first


def test_majority_vote_merges_equivalent_answers():
    assert majority_vote(["1/3", "0.5", "1/2", r"\frac{1}{3}", r"\dfrac12"]) == "0.5"
    assert majority_vote(["$1,000", "1000", "999"]) == "1000"
    assert majority_vote(["12 cm", "13", "12"]) == "12"
    assert majority_vote(["x+1", "2", "x + 1"]) == "x+1"


def test_majority_vote_symbolic_merging_is_optional():
    answers = [r"\frac{\sqrt{2}}{2}", "7", r"\frac{1}{\sqrt{2}}", "7"]
    assert majority_vote(answers) == "7"  # 2 vs 1 + 1
    assert majority_vote(answers, symbolic=True) == r"\frac{\sqrt{2}}{2}"  # tie 2-2: earliest


def test_majority_vote_scores_break_ties_only():
    assert majority_vote(["1", "2"], scores=[0.1, 0.9]) == "2"
    assert majority_vote(["1", "2", "1"], scores=[0.1, 5.0, 0.1]) == "1"  # the mode still wins
    assert majority_vote(["1", "2", "2", "1"], scores=[1.0, 1.0, 1.0, 1.0]) == "1"
    assert majority_vote(["1", None, "2"], scores=[0.5, 9.0, 0.6]) == "2"  # None's score unused


def test_majority_vote_scores_must_align():
    with pytest.raises(ValueError, match="scores"):
        majority_vote(["1", "2"], scores=[1.0])
