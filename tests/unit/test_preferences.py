"""Tests for rlhfkit.data.preferences: preference data construction."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhfkit.data import (
    DataError,
    LikertExample,
    PreferenceExample,
    RankedGroup,
    RankingExample,
    RatingsExample,
    Row,
    UnpairedExample,
    class_ratio,
    final_turn_pair,
    likert_prob_a,
    likert_to_pair,
    preference_to_group,
    ranking_to_group,
    ranking_to_pairs,
    ratings_to_group,
    ratings_to_pairs,
    to_groups,
    unpaired_from_pairs,
    validate_rows,
)


def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def s(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def replies(k: int) -> list[list[dict[str, str]]]:
    """Completion i is the single assistant message "y{i}"."""
    return [[a(f"y{i}")] for i in range(k)]


def rated(ratings: list[float], location: str = "mem:1") -> RatingsExample:
    return RatingsExample(
        [u("q")], replies(len(ratings)), ratings, meta={"task": "t"}, location=location
    )


def ranked(ranking: list[int]) -> RankingExample:
    return RankingExample([u("q")], replies(len(ranking)), ranking, location="mem:1")


def likert(value: int, scale: int) -> LikertExample:
    return LikertExample([u("q")], [[a("A")], [a("B")]], value, scale, location="mem:1")


def pair(chosen: str, rejected: str, margin: float | None = None) -> PreferenceExample:
    return PreferenceExample([u("q")], [a(chosen)], [a(rejected)], margin, location="mem:1")


def texts(group: RankedGroup) -> list[str]:
    return [completion[0]["content"] for completion in group.completions]


def picked(ratings: list[float], mode: str, seed: int) -> list[int]:
    """Original indices (chosen, rejected) of the single pair a mode picks."""
    (group,) = ratings_to_pairs(rated(ratings), mode=mode, rng=random.Random(seed))
    return group.meta["order"]


# --- ratings -> pairs ------------------------------------------------------------------------


def test_ratings_best_vs_random_over_many_seeds() -> None:
    """Ratings [5, 3, 3, 1] -> chosen 0 (the unique 5), rejected uniform over the
    strictly lower {1, 2, 3}; all three occur over 300 seeds (each has chance 1/3, so missing one
    has probability about 3 * (2/3)**300), and the margin is 5 - rating: 2, 2 or 4."""
    seen = Counter()
    for seed in range(300):
        (group,) = ratings_to_pairs(rated([5, 3, 3, 1]), rng=random.Random(seed))
        chosen, rejected = group.meta["order"]
        assert chosen == 0
        assert texts(group) == ["y0", f"y{rejected}"]
        assert group.margin == {1: 2.0, 2: 2.0, 3: 4.0}[rejected]
        assert group.scores == [5.0, [5, 3, 3, 1][rejected]]
        seen[rejected] += 1
    assert set(seen) == {1, 2, 3}
    assert min(seen.values()) > 60  # about 100 each; far from 0 under uniform sampling


def test_ratings_tie_break_for_chosen_is_seeded() -> None:
    """Ratings [4, 1, 4]: completions 0 and 2 tie for best; the seed picks one, both occur,
    and the same seed always gives the same pair."""
    assert {picked([4, 1, 4], "best_vs_random", i)[0] for i in range(100)} == {0, 2}
    # the other 4 is not strictly lower, so the rejected one is always the 1
    assert {picked([4, 1, 4], "best_vs_random", i)[1] for i in range(100)} == {1}
    runs = [picked([4, 1, 4, 2, 2], "best_vs_random", 7) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("mode", ["best_vs_random", "best_vs_worst", "all_pairs"])
def test_all_equal_ratings_give_no_pair(mode: str) -> None:
    assert ratings_to_pairs(rated([2, 2, 2]), mode=mode, rng=random.Random(0)) == []
    assert ratings_to_group(rated([2, 2, 2])) is None


def test_best_vs_worst() -> None:
    """[5, 3, 3, 1]: best 0, worst 3, margin 5 - 1 = 4. [5, 1, 1]: worst tie {1, 2}."""
    (group,) = ratings_to_pairs(rated([5, 3, 3, 1]), mode="best_vs_worst", rng=random.Random(0))
    assert (group.meta["order"], group.margin, group.scores) == ([0, 3], 4.0, [5.0, 1.0])
    assert {picked([5, 1, 1], "best_vs_worst", i)[1] for i in range(100)} == {1, 2}


def test_all_pairs_count_is_c_k_2_minus_ties_with_margins() -> None:
    """[5, 3, 3, 1]: C(4, 2) = 6 pairs minus the tie (1, 2) = 5, each better-first with
    margin = rating difference: (0,1) 2, (0,2) 2, (0,3) 4, (1,3) 2, (2,3) 2."""
    groups = ratings_to_pairs(rated([5, 3, 3, 1]), mode="all_pairs", rng=random.Random(0))
    got = {tuple(g.meta["order"]): g.margin for g in groups}
    assert got == {(0, 1): 2.0, (0, 2): 2.0, (0, 3): 4.0, (1, 3): 2.0, (2, 3): 2.0}
    assert {g.meta["group_id"] for g in groups} == {"mem:1"}
    assert all(g.meta["task"] == "t" and g.location == "mem:1" for g in groups)


def test_all_pairs_lower_rated_first_in_input_is_swapped() -> None:
    """[1, 4]: the pair is (1, 0) with margin 3."""
    (group,) = ratings_to_pairs(rated([1, 4]), mode="all_pairs", rng=random.Random(0))
    assert (group.meta["order"], group.margin, texts(group)) == ([1, 0], 3.0, ["y1", "y0"])


def test_all_pairs_weights_give_each_prompt_total_one() -> None:
    """InstructGPT: K = 9 distinct ratings give 36 pairs, K = 4 give 6; weighting each pair
    1/(pairs sharing its group_id) gives each prompt total weight 1 (36/36 and 6/6)."""
    examples = [rated(list(range(9)), "p9"), rated([4, 3, 2, 1], "p4")]
    groups, counts = to_groups(
        examples, pairing="pairs", rng=random.Random(0), ratings_mode="all_pairs"
    )
    sizes = Counter(g.meta["group_id"] for g in groups)
    assert sizes == {"p9": 36, "p4": 6}
    totals = Counter()
    for g in groups:
        totals[g.meta["group_id"]] += 1 / sizes[g.meta["group_id"]]
    assert totals["p9"] == pytest.approx(1.0, abs=1e-12)
    assert totals["p4"] == pytest.approx(1.0, abs=1e-12)
    assert counts == {"examples": 2, "groups": 42, "skipped_ties": 0}


def test_unknown_ratings_mode() -> None:
    with pytest.raises(ValueError, match="unknown ratings pair mode 'best'; choose one of"):
        ratings_to_pairs(rated([1, 2]), mode="best", rng=random.Random(0))


# --- ratings / rankings -> groups ------------------------------------------------------------


def test_ratings_to_group_orders_stably_and_keeps_ties() -> None:
    """[1, 5, 3, 5]: descending with ties in input order -> indices [1, 3, 2, 0], scores
    [5, 5, 3, 1] (the tie 5 = 5 is kept with equal scores)."""
    group = ratings_to_group(rated([1, 5, 3, 5]))
    assert group is not None
    assert (group.meta["order"], group.scores) == ([1, 3, 2, 0], [5.0, 5.0, 3.0, 1.0])
    assert texts(group) == ["y1", "y3", "y2", "y0"]
    assert group.margin is None


def test_ranking_to_group() -> None:
    """ranking [2, 0, 1] lists indices best first: completions y2, y0, y1, scores 2, 1, 0."""
    group = ranking_to_group(ranked([2, 0, 1]))
    assert texts(group) == ["y2", "y0", "y1"]
    assert group.scores == [2.0, 1.0, 0.0]
    assert group.meta["order"] == [2, 0, 1]


def test_ranking_to_pairs_modes() -> None:
    """ranking [3, 1, 0, 2] (best first): all_pairs = C(4, 2) = 6 pairs of positions
    (p < q) mapped to indices; adjacent = the 3 neighbours (3,1), (1,0), (0,2). No margin."""
    example = ranked([3, 1, 0, 2])
    all_pairs = [g.meta["order"] for g in ranking_to_pairs(example)]
    assert all_pairs == [[3, 1], [3, 0], [3, 2], [1, 0], [1, 2], [0, 2]]
    adjacent = ranking_to_pairs(example, mode="adjacent")
    assert [g.meta["order"] for g in adjacent] == [[3, 1], [1, 0], [0, 2]]
    assert [g.scores for g in adjacent] == [[3.0, 2.0], [2.0, 1.0], [1.0, 0.0]]
    assert all(g.margin is None for g in adjacent)
    with pytest.raises(ValueError, match="unknown ranking pair mode"):
        ranking_to_pairs(example, mode="neighbours")


# --- preference pairs ------------------------------------------------------------------------


def test_preference_to_group_scores_and_margin() -> None:
    """No margin -> scores [1, 0]; margin 2.5 -> [2.5, 0] with the margin kept; margin 0 keeps
    the row's order with scores [1, 0] (a zero score gap would read as a tie)."""
    plain = preference_to_group(pair("good", "bad"))
    assert (texts(plain), plain.scores, plain.margin) == (["good", "bad"], [1.0, 0.0], None)
    strong = preference_to_group(pair("good", "bad", 2.5))
    assert (strong.scores, strong.margin) == ([2.5, 0.0], 2.5)
    zero = preference_to_group(pair("good", "bad", 0.0))
    assert (zero.scores, zero.margin) == ([1.0, 0.0], 0.0)


def test_ranked_group_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="non-increasing"):
        RankedGroup([u("q")], replies(2), [0.0, 1.0])
    with pytest.raises(ValueError, match="K >= 2"):
        RankedGroup([u("q")], replies(1), [1.0])
    with pytest.raises(ValueError, match="K >= 2"):
        RankedGroup([u("q")], replies(3), [2.0, 1.0])


# --- Likert ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "winner", "distance"),
    [(1, "A", 2.0), (2, "A", 1.0), (4, "B", 1.0), (5, "B", 2.0)],
)
def test_likert_5_point_sides_and_margins(value: int, winner: str, distance: float) -> None:
    """5-point: 1-2 favour A, 4-5 favour B; margin |s - 3|."""
    group = likert_to_pair(likert(value, 5), margin=True)
    assert group is not None
    assert texts(group)[0] == winner
    assert (group.margin, group.scores) == (distance, [distance, 0.0])
    plain = likert_to_pair(likert(value, 5))
    assert plain is not None
    assert (texts(plain)[0], plain.margin, plain.scores) == (winner, None, [1.0, 0.0])


def test_likert_5_point_tie_is_dropped_and_counted() -> None:
    assert likert_to_pair(likert(3, 5)) is None
    assert likert_to_pair(likert(3, 5), margin=True) is None
    examples = [likert(3, 5), likert(1, 5), likert(3, 5)]
    groups, counts = to_groups(examples, pairing="pairs", rng=random.Random(0))
    assert len(groups) == 1
    assert counts == {"examples": 3, "groups": 1, "skipped_ties": 2}


@pytest.mark.parametrize(
    ("value", "winner", "distance"),
    [
        *[(1, "A", 3.5), (2, "A", 2.5), (3, "A", 1.5), (4, "A", 0.5)],
        *[(5, "B", 0.5), (6, "B", 1.5), (7, "B", 2.5), (8, "B", 3.5)],
    ],
)
def test_likert_8_point_has_no_tie(value: int, winner: str, distance: float) -> None:
    """8-point: 1..4 favour A (1 strongest), 5..8 favour B (8 strongest); midpoint 4.5, so
    margin |s - 4.5| and no value is a tie."""
    group = likert_to_pair(likert(value, 8), margin=True)
    assert group is not None
    assert texts(group) == ([winner, "B"] if winner == "A" else ["B", "A"])
    assert group.margin == distance


@pytest.mark.parametrize(
    ("value", "scale", "prob"),
    [(1, 5, 1.0), (2, 5, 1.0), (3, 5, 0.5), (4, 5, 0.0), (5, 5, 0.0), (4, 8, 1.0), (5, 8, 0.0)],
)
def test_likert_prob_a_keeps_ties_as_half(value: int, scale: int, prob: float) -> None:
    assert likert_prob_a(likert(value, scale)) == prob


# --- multi-turn ------------------------------------------------------------------------------


def test_multi_turn_preference_row_prompt_holds_earlier_turns() -> None:
    """The ``preference`` schema with an implicit prompt: the prompt is every earlier turn plus
    the final user message; chosen/rejected hold only the final assistant message."""
    shared = [s("sys"), u("q1"), a("r1"), u("q2"), a("r2"), u("q3")]
    data = {"chosen": [*shared, a("good")], "rejected": [*shared, a("bad")]}
    (example,) = validate_rows([Row(data, "mem:1")], "preference").examples
    assert example.prompt == shared
    assert (example.chosen, example.rejected) == ([a("good")], [a("bad")])


def test_final_turn_pair_follows_the_chosen_branch() -> None:
    """Earlier assistant turns differ (r1c vs r1r); the prompt takes the chosen branch's turns
    and the pair compares only the final replies to the shared final user message."""
    chosen = [u("q1"), a("r1c"), u("q2"), a("good")]
    rejected = [u("q1"), a("r1r"), u("q2"), a("bad")]
    example = final_turn_pair(chosen, rejected, "mem:5")
    assert example == PreferenceExample(
        [u("q1"), a("r1c"), u("q2")], [a("good")], [a("bad")], location="mem:5"
    )
    # the schema's implicit split needs shared earlier turns, so it refuses this row
    with pytest.raises(DataError):
        validate_rows([Row({"chosen": chosen, "rejected": rejected}, "mem:5")], "preference")


def test_final_turn_pair_keeps_tool_calls_in_the_reply() -> None:
    call = {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}
    tool = {"role": "tool", "content": "42"}
    example = final_turn_pair([u("q"), call, tool, a("42.")], [u("q"), a("No idea.")])
    assert (example.prompt, example.chosen, example.rejected) == (
        [u("q")],
        [call, tool, a("42.")],
        [a("No idea.")],
    )


@pytest.mark.parametrize(
    ("chosen", "rejected", "field", "reason"),
    [
        ([u("q"), a("x")], [u("p"), a("y")], "rejected[0]", "final user message differs"),
        ([u("q"), a("x")], [u("z"), a("w"), u("q"), a("x")], "rejected", "identical"),
        ([u("q"), a("x")], [u("q")], "rejected", "last message must be an 'assistant'"),
    ],
)
def test_final_turn_pair_errors(
    chosen: list[Any], rejected: list[Any], field: str, reason: str
) -> None:
    with pytest.raises(DataError) as info:
        final_turn_pair(chosen, rejected, "data.jsonl:3")
    assert (info.value.location, info.value.field) == ("data.jsonl:3", field)
    assert reason in info.value.reason


# --- unpaired --------------------------------------------------------------------------------


def test_unpaired_split_and_class_ratio() -> None:
    """Two pairs -> 4 records (x, y_c, True), (x, y_r, False), ...; ratio 2/4 = 0.5."""
    pairs = [pair("c1", "r1"), PreferenceExample([u("p")], [a("c2")], [a("r2")], meta={"k": 1})]
    records = unpaired_from_pairs(pairs)
    assert records == [
        UnpairedExample([u("q")], [a("c1")], True, location="mem:1"),
        UnpairedExample([u("q")], [a("r1")], False, location="mem:1"),
        UnpairedExample([u("p")], [a("c2")], True, meta={"k": 1}),
        UnpairedExample([u("p")], [a("r2")], False, meta={"k": 1}),
    ]
    assert class_ratio(records) == 0.5
    thumbs = [UnpairedExample([u("q")], [a("x")], label) for label in (True, True, False)]
    assert class_ratio(thumbs) == pytest.approx(2 / 3, abs=1e-12)  # 2 desirable of 3
    with pytest.raises(ValueError, match="at least one"):
        class_ratio([])


# --- to_groups -------------------------------------------------------------------------------


def test_to_groups_dispatches_by_type() -> None:
    """pairs: preference 1, ratings [3, 1, 2] best_vs_random 1, ranking K=3 all_pairs 3,
    Likert 4/5 1, all-equal ratings 0 (a tie) -> 6 groups, 1 skipped. groups: 1 + 1 (K = 3)
    + 1 (K = 3) + 1 + 0 -> 4 groups."""
    examples = [
        pair("good", "bad"),
        rated([3, 1, 2], "r"),
        ranked([1, 2, 0]),
        likert(4, 5),
        rated([1, 1], "tie"),
    ]
    groups, counts = to_groups(examples, pairing="pairs", rng=random.Random(0))
    assert [len(g.completions) for g in groups] == [2] * 6
    assert counts == {"examples": 5, "groups": 6, "skipped_ties": 1}
    assert texts(groups[-1]) == ["B", "A"]
    full, counts = to_groups(examples, pairing="groups", rng=random.Random(0))
    assert [len(g.completions) for g in full] == [2, 3, 3, 2]
    assert counts == {"examples": 5, "groups": 4, "skipped_ties": 1}


def test_to_groups_group_ids_are_unique_per_example() -> None:
    """Examples without a location get "<example i>" so their pairs are not pooled."""
    examples = [rated([3, 2, 1], ""), rated([3, 2, 1], ""), pair("x", "y")]
    groups, _ = to_groups(examples, pairing="pairs", rng=random.Random(0), ratings_mode="all_pairs")
    ids = Counter(g.meta["group_id"] for g in groups)
    assert ids == {"<example 0>": 3, "<example 1>": 3, "mem:1": 1}


def test_to_groups_errors() -> None:
    with pytest.raises(ValueError, match="unknown pairing 'triples'"):
        to_groups([], pairing="triples", rng=random.Random(0))
    with pytest.raises(ValueError, match="unknown ratings pair mode"):
        to_groups([], pairing="pairs", rng=random.Random(0), ratings_mode="worst")
    bad = UnpairedExample([u("q")], [a("x")], True)
    with pytest.raises(TypeError, match="cannot make preference groups from UnpairedExample"):
        to_groups([bad], pairing="pairs", rng=random.Random(0))


# --- Properties ------------------------------------------------------------------------------

small_ratings = st.lists(st.integers(0, 4).map(float), min_size=2, max_size=8)


@given(
    small_ratings, st.sampled_from(["best_vs_random", "best_vs_worst", "all_pairs"]), st.integers()
)
def test_pairs_always_prefer_the_higher_rating(ratings: list[float], mode: str, seed: int) -> None:
    groups = ratings_to_pairs(rated(ratings), mode=mode, rng=random.Random(seed))
    if len(set(ratings)) == 1:
        assert groups == []
        return
    for group in groups:
        c, r = group.meta["order"]
        assert ratings[c] > ratings[r]
        assert group.margin == ratings[c] - ratings[r]
        if mode != "all_pairs":
            assert ratings[c] == max(ratings)  # chosen's rating >= every rating
    if mode == "all_pairs":
        distinct = sum(x != y for x, y in itertools.combinations(ratings, 2))
        assert len(groups) == distinct
    else:
        assert len(groups) == 1


@given(small_ratings)
def test_rating_group_is_a_non_increasing_permutation(ratings: list[float]) -> None:
    group = ratings_to_group(rated(ratings))
    if len(set(ratings)) == 1:
        assert group is None
        return
    assert group is not None
    assert sorted(group.meta["order"]) == list(range(len(ratings)))
    assert group.scores == sorted(ratings, reverse=True)
    assert texts(group) == [f"y{i}" for i in group.meta["order"]]


@given(st.permutations(list(range(6))), st.integers(2, 6))
def test_ranking_group_scores_strictly_decrease(perm: list[int], k: int) -> None:
    ranking = [i for i in perm if i < k]
    group = ranking_to_group(ranked(ranking))
    assert texts(group) == [f"y{i}" for i in ranking]
    assert all(x - y == 1.0 for x, y in itertools.pairwise(group.scores))
    assert len(ranking_to_pairs(ranked(ranking))) == k * (k - 1) // 2


@given(st.sampled_from([5, 8]), st.data())
def test_mirrored_likert_swaps_the_winner(scale: int, data: st.DataObject) -> None:
    """Rating s and its mirror scale + 1 - s favour opposite sides with the same margin."""
    value = data.draw(st.integers(1, scale))
    group = likert_to_pair(likert(value, scale), margin=True)
    mirror = likert_to_pair(likert(scale + 1 - value, scale), margin=True)
    assert (
        likert_prob_a(likert(value, scale)) + likert_prob_a(likert(scale + 1 - value, scale)) == 1
    )
    if group is None:
        assert mirror is None
        assert (scale, value) == (5, 3)
        return
    assert mirror is not None
    assert texts(group) == texts(mirror)[::-1]
    assert group.margin == mirror.margin > 0


@given(st.lists(st.tuples(st.text(min_size=1), st.text(min_size=1)), min_size=1, max_size=6))
def test_unpaired_split_doubles_and_balances(pairs: list[tuple[str, str]]) -> None:
    examples = [PreferenceExample([u("q")], [a(c)], [a(r)]) for c, r in pairs]
    records = unpaired_from_pairs(examples)
    assert len(records) == 2 * len(examples)
    assert [r.completion for r in records[::2]] == [ex.chosen for ex in examples]
    assert [r.completion for r in records[1::2]] == [ex.rejected for ex in examples]
    assert class_ratio(records) == 0.5


@given(st.lists(small_ratings, min_size=0, max_size=5), st.integers())
def test_to_groups_counts_add_up(all_ratings: list[list[float]], seed: int) -> None:
    examples = [rated(r, f"mem:{i}") for i, r in enumerate(all_ratings)]
    groups, counts = to_groups(examples, pairing="groups", rng=random.Random(seed))
    assert counts["examples"] == len(examples)
    assert counts["groups"] == len(groups) == len(examples) - counts["skipped_ties"]
    assert counts["skipped_ties"] == sum(len(set(r)) == 1 for r in all_ratings)
