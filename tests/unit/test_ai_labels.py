"""AI preference labels: both orders must agree, position bias is measured, soft labels are the
softmax of the verdict log-probabilities."""

from __future__ import annotations

import math

import pytest

from rlhfkit.data.constitution import load_constitution
from rlhfkit.rewards.ai_labels import label_pairs, principle_messages, soft_label


class Judge:
    """A stub judge answering ``verdict(reply shown as A, reply shown as B)``."""

    def __init__(self, verdict):
        self.verdict, self.batches = verdict, []

    def complete(self, batch, *, max_tokens, temperature=0.0):
        self.batches.append(batch)
        out = []
        for chat in batch:
            text = chat[1]["content"]
            a = text.split("[Reply of Assistant A]\n")[1].split("\n[End")[0]
            b = text.split("[Reply of Assistant B]\n")[1].split("\n[End")[0]
            out.append(f"Because. [[{self.verdict(a, b)}]]")
        return out


PROMPTS = [f"Question {i}?" for i in range(8)]
GOOD = [f"good answer {i}" for i in range(8)]
BAD = [f"bad answer {i}" for i in range(8)]


def test_a_judge_that_always_answers_a_labels_nothing():
    labels = label_pairs(Judge(lambda a, b: "A"), PROMPTS, GOOD, BAD, load_constitution())
    assert labels.preferred == [None] * 8
    metrics = labels.metrics()
    assert metrics["kept"] == 0 and metrics["consistency"] == 0 and metrics["position_bias"] == 1


def test_a_real_preference_keeps_its_labels_across_the_swap():
    prefers_good = Judge(lambda a, b: "A" if a.startswith("good") else "B")
    labels = label_pairs(prefers_good, PROMPTS, GOOD, BAD, load_constitution(), seed=2)
    assert labels.preferred == ["a"] * 8
    flipped = label_pairs(prefers_good, PROMPTS, BAD, GOOD, load_constitution(), seed=2)
    assert flipped.preferred == ["b"] * 8
    assert labels.metrics() == {"pairs": 8.0, "kept": 1.0, "consistency": 1.0,
                                "position_bias": 0.5, "unparseable": 0.0}  # fmt: skip
    assert len(prefers_good.batches[0]) == 16  # both orders of every pair in one batch


def test_each_pair_is_asked_its_drawn_principles_question():
    constitution = load_constitution()
    judge = Judge(lambda a, b: "A")
    labels = label_pairs(judge, PROMPTS, GOOD, BAD, constitution, seed=5, start=10)
    for i, principle in enumerate(labels.principles):
        assert principle == constitution.draw(5, 10 + i)
        assert f"Question: {principle.preference}" in judge.batches[0][i][1]["content"]
        assert f"Question: {principle.preference}" in judge.batches[0][8 + i][1]["content"]


def test_unparseable_answers_drop_the_pair():
    labels = label_pairs(Judge(lambda a, b: "maybe"), PROMPTS[:2], GOOD[:2], BAD[:2],
                         load_constitution())  # fmt: skip
    assert labels.preferred == [None, None] and labels.metrics()["unparseable"] == 4
    assert math.isnan(labels.metrics()["position_bias"])


def test_soft_labels_are_the_softmax_of_the_verdict_logprobs():
    la, lb = math.log(0.8), math.log(0.2)
    assert soft_label((la, lb), (lb, la)) == pytest.approx(0.8)  # both orders favour reply a
    assert soft_label((la, lb), (la, lb)) == pytest.approx(0.5)  # position only: no preference
    assert soft_label((0.0, -1.0), (-1.0, 0.0)) == pytest.approx(1 / (1 + math.exp(-1.0)))


def test_the_judge_chat_shows_both_replies_and_the_question():
    chat = principle_messages("Hi?", "one", "two", "Which is kinder?")
    text = chat[1]["content"]
    assert chat[0]["role"] == "system" and "[[A]] or [[B]]" in chat[0]["content"]
    assert text.index("one") < text.index("two") < text.index("Which is kinder?")
