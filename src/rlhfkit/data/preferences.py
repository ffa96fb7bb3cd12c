"""Preference data construction: typed examples -> ranked groups (docs/data_formats.md).

Every preference format becomes a :class:`RankedGroup`: one prompt with K >= 2 completions in
preference order (best first) and a non-increasing score per completion. A pair is a group with
K = 2. The conversions are pure (no tokenizer) and seeded through an explicit
``random.Random``:

===================  =================================================================
source               conversion
===================  =================================================================
``preference``       :func:`preference_to_group`: K = 2, scores ``[1, 0]`` or
                     ``[margin, 0]``, margin kept
``ratings``          :func:`ratings_to_pairs` (``RATINGS_PAIR_MODES``) or
                     :func:`ratings_to_group` (all completions, by rating)
``rankings``         :func:`ranking_to_pairs` (``RANKING_PAIR_MODES``) or
                     :func:`ranking_to_group` (scores K-1, ..., 0)
``likert``           :func:`likert_to_pair`: binarised by side, ties dropped
two conversations    :func:`final_turn_pair`: the preference on the final turn
===================  =================================================================

:func:`to_groups` dispatches a list of mixed examples by type. Groups made from one example
all carry ``meta["group_id"]`` so that a recipe can weight the C pairs of one prompt by 1/C
each (InstructGPT); ``meta["order"]`` holds the original completion indices, best first.
:func:`final_turn_pair`, :func:`unpaired_from_pairs` and :func:`class_ratio` (pair-level
records) live in :mod:`rlhfkit.data.preference_records` and are re-exported here.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.data.messages import Message

# Re-exported: the pair-level conversions are part of this module's API.
from rlhfkit.data.preference_records import class_ratio as class_ratio
from rlhfkit.data.preference_records import final_turn_pair as final_turn_pair
from rlhfkit.data.preference_records import unpaired_from_pairs as unpaired_from_pairs
from rlhfkit.data.schemas import LikertExample, PreferenceExample, RankingExample, RatingsExample


@dataclass
class RankedGroup:
    """One prompt with K >= 2 completions in preference order (best first).

    Attributes:
        prompt: Messages before the completions.
        completions: K completions, best first.
        scores: K non-increasing scores; equal neighbours are ties. Their differences are
            rating differences where the source had ratings.
        margin: The pair margin for K == 2 when the data gave one (a rating difference, a
            Likert distance from the midpoint, or the ``preference`` row's ``margin``).
        meta: The example's ``meta`` plus ``group_id`` and ``order`` where set.
        location: Where the source row came from.
    """

    prompt: list[Message]
    completions: list[list[Message]]
    scores: list[float]
    margin: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    location: str = ""

    def __post_init__(self) -> None:
        k = len(self.completions)
        if k < 2 or len(self.scores) != k:
            raise ValueError(
                f"a group needs K >= 2 completions and K scores, got {k} and {len(self.scores)}"
            )
        if any(a < b for a, b in itertools.pairwise(self.scores)):
            raise ValueError(f"scores must be non-increasing (best first), got {self.scores}")


# ---------------------------------------------------------------------------------------------
# Ratings


IndexPairs = list[tuple[int, int]]


def _best(ratings: Sequence[float], rng: random.Random) -> int:
    """Index of the highest rating; ties broken by ``rng``."""
    top = max(ratings)
    return rng.choice([i for i, r in enumerate(ratings) if r == top])


def _best_vs_random(ratings: Sequence[float], rng: random.Random) -> IndexPairs:
    chosen = _best(ratings, rng)
    lower = [i for i, r in enumerate(ratings) if r < ratings[chosen]]
    return [(chosen, rng.choice(lower))]


def _best_vs_worst(ratings: Sequence[float], rng: random.Random) -> IndexPairs:
    chosen = _best(ratings, rng)
    bottom = min(ratings)
    return [(chosen, rng.choice([i for i, r in enumerate(ratings) if r == bottom]))]


def _all_rating_pairs(ratings: Sequence[float], rng: random.Random) -> IndexPairs:
    pairs = itertools.combinations(range(len(ratings)), 2)
    return [
        (i, j) if ratings[i] > ratings[j] else (j, i) for i, j in pairs if ratings[i] != ratings[j]
    ]


RATINGS_PAIR_MODES: dict[str, Callable[[Sequence[float], random.Random], IndexPairs]] = {
    "best_vs_random": _best_vs_random,
    "best_vs_worst": _best_vs_worst,
    "all_pairs": _all_rating_pairs,
}
"""Mode -> (ratings, rng) -> (chosen, rejected) index pairs; only called if ratings differ.

- ``best_vs_random`` (UltraFeedback, default): chosen = highest rating (seeded tie-break),
  rejected = uniform among the completions rated strictly lower.
- ``best_vs_worst``: chosen as above, rejected = lowest rating (seeded tie-break).
- ``all_pairs``: every pair with different ratings, higher first (C(K, 2) minus the ties).
"""


def _group(
    example: RatingsExample | RankingExample | LikertExample,
    order: list[int],
    scores: list[float],
    margin: float | None = None,
) -> RankedGroup:
    """The group of ``example.completions[i] for i in order``, recording the order in meta."""
    return RankedGroup(
        prompt=example.prompt,
        completions=[example.completions[i] for i in order],
        scores=scores,
        margin=margin,
        meta={**example.meta, "group_id": example.location, "order": order},
        location=example.location,
    )


def ratings_to_pairs(
    example: RatingsExample, *, mode: str = "best_vs_random", rng: random.Random
) -> list[RankedGroup]:
    """Turn K rated completions into pairs (K = 2 groups) by a ``RATINGS_PAIR_MODES`` row.

    Each pair's margin and score gap are the rating difference r_c - r_r > 0 (Llama 2 margin).

    Args:
        example: The rated completions.
        mode: A key of ``RATINGS_PAIR_MODES``.
        rng: Source of the tie-breaks and the random rejected completion.

    Returns:
        The pairs; ``[]`` if all ratings tie (no preference to learn).

    Raises:
        ValueError: An unknown mode.
    """
    pick = _lookup(RATINGS_PAIR_MODES, mode, "ratings pair mode")
    ratings = example.ratings
    if min(ratings) == max(ratings):
        return []
    return [
        _group(example, [c, r], [ratings[c], ratings[r]], ratings[c] - ratings[r])
        for c, r in pick(ratings, rng)
    ]


def ratings_to_group(example: RatingsExample) -> RankedGroup | None:
    """All completions ordered by rating, highest first (stable: ties keep their input order).

    Tied completions keep equal scores, so a loss can skip or down-weight them.

    Args:
        example: The rated completions.

    Returns:
        The group with ``scores`` = the sorted ratings, or None if all ratings tie.
    """
    ratings = example.ratings
    if min(ratings) == max(ratings):
        return None
    order = sorted(range(len(ratings)), key=lambda i: -ratings[i])
    return _group(example, order, [ratings[i] for i in order])


# ---------------------------------------------------------------------------------------------
# Rankings


def _adjacent(k: int) -> IndexPairs:
    return [(p, p + 1) for p in range(k - 1)]


def _all_positions(k: int) -> IndexPairs:
    return list(itertools.combinations(range(k), 2))


RANKING_PAIR_MODES: dict[str, Callable[[int], IndexPairs]] = {
    "all_pairs": _all_positions,
    "adjacent": _adjacent,
}
"""Mode -> K -> (better, worse) rank positions: ``all_pairs`` gives C(K, 2) pairs (InstructGPT,
InstructGPT), ``adjacent`` the K - 1 neighbours (1st vs 2nd, 2nd vs 3rd, ...)."""


def ranking_to_group(example: RankingExample) -> RankedGroup:
    """Completions in ranking order, best first, with scores K-1, K-2, ..., 0.

    Args:
        example: The ranked completions (``ranking`` lists indices best first).

    Returns:
        The group; ``meta["order"]`` is the ranking.
    """
    k = len(example.ranking)
    return _group(example, list(example.ranking), [float(k - 1 - p) for p in range(k)])


def ranking_to_pairs(example: RankingExample, *, mode: str = "all_pairs") -> list[RankedGroup]:
    """Turn a ranking into pairs (K = 2 groups) by a ``RANKING_PAIR_MODES`` row.

    Rankings carry no strength, so the pairs have no margin; their scores are the positions'
    group scores (K-1-p).

    Args:
        example: The ranked completions.
        mode: A key of ``RANKING_PAIR_MODES``.

    Returns:
        The pairs, better completion first.

    Raises:
        ValueError: An unknown mode.
    """
    k, ranking = len(example.ranking), example.ranking
    positions = _lookup(RANKING_PAIR_MODES, mode, "ranking pair mode")(k)
    return [
        _group(example, [ranking[p], ranking[q]], [float(k - 1 - p), float(k - 1 - q)])
        for p, q in positions
    ]


# ---------------------------------------------------------------------------------------------
# Pairs and Likert


def preference_to_group(example: PreferenceExample) -> RankedGroup:
    """A pair as a K = 2 group with the row's margin kept.

    Scores are ``[margin, 0]`` if the row gave a margin > 0, else ``[1, 0]``.

    Args:
        example: The preference pair.

    Returns:
        The group ``[chosen, rejected]``.
    """
    positive = example.margin is not None and example.margin > 0
    return RankedGroup(
        prompt=example.prompt,
        completions=[example.chosen, example.rejected],
        scores=[example.margin if positive else 1.0, 0.0],
        margin=example.margin,
        meta=dict(example.meta),
        location=example.location,
    )


def likert_midpoint(scale: int) -> float:
    """The Likert scale's midpoint (scale + 1) / 2: 3 on the 5-point scale, 4.5 on the 8-point."""
    return (scale + 1) / 2


def likert_prob_a(example: LikertExample) -> float:
    """P(A preferred) for evaluation: 1 if A is better, 0.5 for a tie, 0 if B is better.

    Args:
        example: The Likert comparison (rating s below the midpoint favours A).

    Returns:
        1.0, 0.5 or 0.0.
    """
    mid = likert_midpoint(example.scale)
    return 1.0 if example.likert < mid else 0.5 if example.likert == mid else 0.0


def likert_to_pair(example: LikertExample, *, margin: bool = False) -> RankedGroup | None:
    """Binarise a Likert comparison by side; ties are dropped.

    Side: s < m favours A, s > m favours B, s = m is a tie, with midpoint m = (scale + 1) / 2
    (5-point: 3, the only tie; 8-point: 4.5, never a tie). The optional margin is |s - m|
    (5-point: 1 or 2; 8-point: 0.5 ... 3.5).

    Args:
        example: The Likert comparison.
        margin: Keep |s - m| as the pair's margin and top score (else scores ``[1, 0]``).

    Returns:
        The pair, preferred completion first, or None for a tie.
    """
    prob_a = likert_prob_a(example)
    if prob_a == 0.5:
        return None
    order = [0, 1] if prob_a == 1.0 else [1, 0]
    distance = abs(example.likert - likert_midpoint(example.scale))
    return _group(example, order, [distance if margin else 1.0, 0.0], distance if margin else None)


# ---------------------------------------------------------------------------------------------
# Dispatch


@dataclass(frozen=True)
class _Options:
    rng: random.Random
    ratings_mode: str
    ranking_mode: str
    likert_margin: bool


def _listed(group: RankedGroup | None) -> list[RankedGroup]:
    return [] if group is None else [group]


Converter = Callable[[Any, _Options], list[RankedGroup]]

_CONVERTERS: dict[type, dict[str, Converter]] = {
    PreferenceExample: {
        "pairs": lambda ex, opt: [preference_to_group(ex)],
        "groups": lambda ex, opt: [preference_to_group(ex)],
    },
    RatingsExample: {
        "pairs": lambda ex, opt: ratings_to_pairs(ex, mode=opt.ratings_mode, rng=opt.rng),
        "groups": lambda ex, opt: _listed(ratings_to_group(ex)),
    },
    RankingExample: {
        "pairs": lambda ex, opt: ranking_to_pairs(ex, mode=opt.ranking_mode),
        "groups": lambda ex, opt: [ranking_to_group(ex)],
    },
    LikertExample: {
        "pairs": lambda ex, opt: _listed(likert_to_pair(ex, margin=opt.likert_margin)),
        "groups": lambda ex, opt: _listed(likert_to_pair(ex, margin=opt.likert_margin)),
    },
}
"""Example type -> pairing -> converter(example, options) -> groups ([] = skipped as a tie)."""

PAIRINGS = ("pairs", "groups")
"""``pairs``: K = 2 groups (BT, DPO); ``groups``: whole ranked groups (all pairs, Plackett-Luce)."""


def _lookup(table: dict[str, Any], key: str, what: str) -> Any:
    if key not in table:
        raise ValueError(f"unknown {what} {key!r}; choose one of {', '.join(table)}")
    return table[key]


def to_groups(
    examples: Sequence[Any],
    *,
    pairing: str,
    rng: random.Random,
    ratings_mode: str = "best_vs_random",
    ranking_mode: str = "all_pairs",
    likert_margin: bool = False,
) -> tuple[list[RankedGroup], dict[str, int]]:
    """Turn preference examples of any supported type into ranked groups.

    Supported types: PreferenceExample, RatingsExample, RankingExample, LikertExample (a table
    keyed by type). Every group gets ``meta["group_id"]`` = its example's location (or
    ``"<example i>"`` without one), shared by all groups of one example.

    Args:
        examples: Typed examples, e.g. ``validate_rows(...).examples``.
        pairing: ``"pairs"`` (K = 2 groups through the per-type pair modes) or ``"groups"``
            (full ranked groups: ratings by :func:`ratings_to_group`, rankings by
            :func:`ranking_to_group`; pairs and Likert rows stay K = 2).
        rng: Source of the ratings tie-breaks and random rejected completions.
        ratings_mode: A ``RATINGS_PAIR_MODES`` key, used with ``pairing="pairs"``.
        ranking_mode: A ``RANKING_PAIR_MODES`` key, used with ``pairing="pairs"``.
        likert_margin: Keep the Likert distance from the midpoint as the margin.

    Returns:
        The groups in example order, and counts for the log: ``examples``, ``groups`` and
        ``skipped_ties`` (examples that gave no group: all ratings equal, Likert ties).

    Raises:
        ValueError: An unknown pairing or mode.
        TypeError: An example of an unsupported type.
    """
    _lookup(dict.fromkeys(PAIRINGS), pairing, "pairing")
    _lookup(RATINGS_PAIR_MODES, ratings_mode, "ratings pair mode")
    _lookup(RANKING_PAIR_MODES, ranking_mode, "ranking pair mode")
    options = _Options(rng, ratings_mode, ranking_mode, likert_margin)
    groups: list[RankedGroup] = []
    skipped = 0
    for i, example in enumerate(examples):
        table = _CONVERTERS.get(type(example))
        if table is None:
            names = ", ".join(kind.__name__ for kind in _CONVERTERS)
            raise TypeError(
                f"cannot make preference groups from {type(example).__name__}; "
                f"expected one of {names}"
            )
        made = table[pairing](example, options)
        for group in made:
            group.meta["group_id"] = example.location or f"<example {i}>"
        skipped += not made
        groups.extend(made)
    return groups, {"examples": len(examples), "groups": len(groups), "skipped_ties": skipped}
