"""Rubric rewards: the aggregation's closed form, the file format's errors, rules, judge and
implicit scoring, checklists and labels."""

from __future__ import annotations

import random

import pytest

from rlhfkit.data.rows import DataError
from rlhfkit.data.rubric import Criterion, Rubric, RubricSet, load_rubrics, parse_rubric_set
from rlhfkit.errors import MissingFileError
from rlhfkit.rewards.base import load_reward_fn, score_completions
from rlhfkit.rewards.rubric import (
    RubricReward,
    generate_checklists,
    parse_checklist,
    parse_yes_no,
    rubric_preferences,
    rubric_score,
    rule,
)
from rlhfkit.rewards.rubric import rubric_problem as reward_problem

REFERENCE = "The opposite of 'before' is 'after'.\nAnswer: after"
FIELDS = {"prompt": "What is the opposite of 'before'?", "reference": REFERENCE,
          "task": "antonyms"}  # fmt: skip


def test_rubric_score_closed_forms() -> None:
    assert rubric_score([5, 3, 1], [1, 1, 1]) == 1.0  # every quality, no pitfall
    assert rubric_score([5, 3, 1, -2], [1, 1, 1, 0]) == 1.0
    assert rubric_score([5, 3, 1, -2], [0, 0, 0, 0]) == 0.0
    assert rubric_score([5, 3, 1, -2], [1, 0, 1, 1], clamp=False) == pytest.approx(4 / 9)
    assert rubric_score([5, 3, 1, -2], [1, 0, 1, 1]) == pytest.approx(0.444444, abs=1e-6)
    assert rubric_score([1, -2], [0, 1], clamp=False) == -2.0
    assert rubric_score([1, -2], [0, 1]) == 0.0
    assert rubric_score([4, 4], [0.5, 0.25]) == pytest.approx(0.375)


@pytest.mark.parametrize(
    ("weights", "scores", "message"),
    [([1, 2], [1], "weights"), ([1], [1.5], "[0, 1]"), ([-1, -2], [0, 1], "positive")],
)
def test_rubric_score_errors(weights: list, scores: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rubric_score(weights, scores)


def test_scores_always_lie_in_unit_interval() -> None:
    rng = random.Random(0)
    for _ in range(200):
        weights = [rng.choice([5, 3, 1, -1, -2]) for _ in range(rng.randint(1, 8))] + [1]
        scores = [rng.random() for _ in weights]
        assert 0.0 <= rubric_score(weights, scores) <= 1.0


def test_named_weights_and_tasks() -> None:
    rubrics = parse_rubric_set({
        "criteria": [{"title": "T", "description": "D", "weight": "essential"},
                     {"title": "P", "description": "bad", "weight": "severe_pitfall"}],
        "tasks": {"antonyms": [
            {"title": "A", "description": "x", "weight": 2, "check": "nonempty"}]},
    }, "r.yaml")  # fmt: skip
    assert rubrics.default is not None and rubrics.default.weights == [5.0, -2.0]
    assert rubrics.default.criteria[1].pitfall
    assert rubrics.for_example({"task": "antonyms"}).criteria[0].title == "A"
    assert rubrics.for_example({"task": "other"}) is rubrics.default
    own = rubrics.for_example({"rubric": [{"title": "O", "description": "own", "weight": 1}]})
    assert own.criteria[0].title == "O"


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ([{"title": "T", "description": "D"}], "criteria[0].weight"),
        ([{"title": "T", "description": "D", "weight": 0}], "criteria[0].weight"),
        ([{"title": "", "description": "D", "weight": 1}], "criteria[0].title"),
        ([{"title": "T", "description": "D", "weight": 1, "colour": 1}], "criteria[0].colour"),
        ([{"title": "T", "description": "D", "weight": -1}], "criteria"),
        ({"criteria": [], "extra": 1}, "extra"),
        ({}, "criteria"),
    ],
)
def test_malformed_rubrics_name_the_field(data: object, where: str) -> None:
    with pytest.raises(DataError) as err:
        parse_rubric_set(data, "r.yaml")
    assert err.value.location.startswith("r.yaml") and where in str(err.value)


def test_shipped_and_missing_rubrics() -> None:
    assert load_rubrics("builtin:instructions").default is not None
    assert load_rubrics("rows").default is None
    with pytest.raises(MissingFileError, match="builtin:instructions"):
        load_rubrics("builtin:nope")
    with pytest.raises(MissingFileError, match="no such file"):
        load_rubrics("no/such/rubric.yaml")
    with pytest.raises(DataError, match="no rubric"):
        load_rubrics("rows").for_example({"prompt": "p"})


def test_rules() -> None:
    assert rule("correct")(REFERENCE, FIELDS)
    assert not rule("correct")("Answer: before", FIELDS)
    assert rule("mentions_answer")("It is after, I think.", FIELDS)
    assert not rule("mentions_answer")("It is afterwards.", FIELDS)
    assert rule("max_words:3")("one two three", {}) and not rule("max_words:2")("a b c", {})
    assert rule("regex:(?i)sorry")("SORRY", {}) and not rule("contains:xyz")("abc", {})
    assert rule("repeats")("I like it very much. I like it very much.", {})
    assert not rule("repeats")("One two three four. Five six seven eight.", {})
    assert rule("verifier:math")("So \\boxed{4}.", {"answer": "4"})
    assert not rule("verifier:math")("So \\boxed{5}.", {"answer": "4"})
    for bad in ("nope", "max_words:x", "regex:(", "verifier:nope"):
        with pytest.raises(ValueError, match="rubric check"):
            rule(bad)


def test_builtin_rubric_reward_grades_replies() -> None:
    reward = load_reward_fn("rubric:builtin:instructions")
    replies = [REFERENCE, "Sorry, I cannot help with that.", "after", "",
               "The opposite is after.\nAnswer: after\nAnswer: after"]  # fmt: skip
    scores = score_completions(reward, replies, [FIELDS] * len(replies))
    assert scores[0] == 1.0  # the reference meets every criterion
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores[1] < scores[2] < scores[4] < scores[0]
    with pytest.raises(ValueError, match="reference"):
        reward("after", prompt="p")


class Grader:
    """A stub judge: YES when the criterion's title occurs in the reply, ratings of 7."""

    def __init__(self, answer: str | None = None) -> None:
        self.batches: list[list] = []
        self.answer = answer

    def complete(self, batch, *, max_tokens, temperature=0.0):
        self.batches.append(batch)
        out = []
        for chat in batch:
            text = chat[1]["content"]
            if self.answer is not None:
                out.append(self.answer)
                continue
            reply = text.split("[Reply of the assistant]\n")[1].split("\n[End")[0]
            title = text.rsplit("Criterion: ", 1)[-1].rsplit("Problem: ", 1)[-1].split(":")[0]
            out.append(f"Fine. [[{'YES' if title.lower() in reply.lower() else 'NO'}]]")
        return out


def _judged() -> RubricSet:
    return RubricSet(Rubric((
        Criterion("polite", "Says please.", 3.0),
        Criterion("short", "At most five words.", 1.0, "max_words:5"),
        Criterion("rude", "Insults the user.", -2.0),
    )))  # fmt: skip


def test_explicit_judge_scores_each_criterion_in_one_batch() -> None:
    judge = Grader()
    reward = RubricReward(_judged(), judge)
    scores = reward.score_batch(["polite reply", "rude and polite", "a b c d e f g"],
                                [{"prompt": "hi"}] * 3)  # fmt: skip
    assert len(judge.batches) == 1 and len(judge.batches[0]) == 6  # two judged criteria x 3
    assert scores == [1.0, pytest.approx((3 + 1 - 2) / 4), 0.0]
    assert reward.scored == 3 and reward.unparseable == 0


def test_unparseable_judge_answers_skip_the_reply() -> None:
    reward = RubricReward(_judged(), Grader("I am not sure."))
    assert reward.score_batch(["x"], [{"prompt": "hi"}]) == [None]
    assert reward.unparseable == 1
    assert parse_yes_no("no... wait [[ yes ]]") == 1.0 and parse_yes_no("[[NO]]") == 0.0


def test_implicit_scoring_is_one_rating_per_reply() -> None:
    judge = Grader("Good overall. [[7]]")
    reward = RubricReward(_judged(), judge, mode="implicit")
    assert reward.score_batch(["a", "b"], [{"prompt": "p"}] * 2) == [pytest.approx(6 / 9)] * 2
    assert len(judge.batches[0]) == 2 and "[Rubric]" in judge.batches[0][0][1]["content"]


def test_a_rubric_that_needs_a_judge_says_so(tmp_path) -> None:
    with pytest.raises(ValueError, match="need a judge"):
        RubricReward(_judged())
    with pytest.raises(ValueError, match="need a judge"):
        RubricReward(load_rubrics("builtin:instructions"), mode="implicit")
    judged = tmp_path / "judged.yaml"
    judged.write_text("- {title: Kind, description: Is kind., weight: 3}\n")
    assert "needs a judge" in reward_problem(f"rubric:{judged}")
    assert reward_problem(f"rubric:{judged}|judge:some-model") is None
    assert "no such file" in reward_problem("rubric:tests/none.yaml")
    assert reward_problem("rubric:builtin:instructions") is None
    assert "no such built-in" in reward_problem("rubric:builtin:nope")


def test_rubric_spec_errors() -> None:
    for spec in ("rubric:", "rubric:builtin:instructions|fast", "rubric:x|implicit|explicit"):
        with pytest.raises(ValueError, match="expected rubric"):
            load_reward_fn(spec)


def test_checklists_are_parsed_from_the_model() -> None:
    text = ("Here is the checklist:\n- [5] Correct: The sum is right.\n2. [3] Brief: One line.\n"
            "* [-2] Rambles: Goes off topic.\n- [0] Zero: ignored\nnot an item")  # fmt: skip
    items = parse_checklist(text)
    assert [(c.title, c.weight) for c in items] == [("Correct", 5), ("Brief", 3), ("Rambles", -2)]
    rubrics = generate_checklists(Grader(text), ["What is 2 + 2?"])
    assert rubrics[0] is not None and len(rubrics[0].criteria) == 3
    assert generate_checklists(Grader("- [-1] Bad: only pitfalls"), ["q"]) == [None]


def test_rubric_preferences_label_pairs() -> None:
    reward = load_reward_fn("rubric:builtin:instructions")
    labels = rubric_preferences(reward, [FIELDS] * 3, [REFERENCE, "Sorry.", REFERENCE],
                                ["Sorry.", REFERENCE, REFERENCE])  # fmt: skip
    assert labels == [1.0, 0.0, 0.5]


def test_spec_options_are_checked_before_loading() -> None:
    assert "expected rubric" in reward_problem("rubric:builtin:instructions|bogus")
    assert "needs a judge" in reward_problem("rubric:builtin:instructions|implicit")
    assert reward_problem("rubric:builtin:instructions|implicit|judge:x") is None
