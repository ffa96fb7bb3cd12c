"""rlhfkit.data: dataset sources, typed schemas and validation, templates, collation, tasks.

The public names of ``sources``, ``schemas`` and ``preferences`` are re-exported here; import
``templates`` and ``collate`` from their modules.
"""

from rlhfkit.data.preferences import (
    RankedGroup,
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
)
from rlhfkit.data.schemas import (
    SCHEMAS,
    Example,
    LikertExample,
    PreferenceExample,
    ProcessExample,
    RankingExample,
    RatingsExample,
    SFTExample,
    UnpairedExample,
    ValidationResult,
    VerifiableExample,
    load_examples,
    validate_rows,
)
from rlhfkit.data.sources import DataError, Row, load_rows

__all__ = [
    "SCHEMAS",
    "DataError",
    "Example",
    "LikertExample",
    "PreferenceExample",
    "ProcessExample",
    "RankedGroup",
    "RankingExample",
    "RatingsExample",
    "Row",
    "SFTExample",
    "UnpairedExample",
    "ValidationResult",
    "VerifiableExample",
    "class_ratio",
    "final_turn_pair",
    "likert_prob_a",
    "likert_to_pair",
    "load_examples",
    "load_rows",
    "preference_to_group",
    "ranking_to_group",
    "ranking_to_pairs",
    "ratings_to_group",
    "ratings_to_pairs",
    "to_groups",
    "unpaired_from_pairs",
    "validate_rows",
]
