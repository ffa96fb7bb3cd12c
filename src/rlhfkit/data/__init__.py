"""rlhfkit.data: dataset sources, typed schemas and validation, templates, collation, tasks.

The public names of ``sources`` and ``schemas`` are re-exported here; import ``templates`` and
``collate`` from their modules.
"""

from rlhfkit.data.schemas import (
    SCHEMAS,
    Example,
    PreferenceExample,
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
    "PreferenceExample",
    "RankingExample",
    "RatingsExample",
    "Row",
    "SFTExample",
    "UnpairedExample",
    "ValidationResult",
    "VerifiableExample",
    "load_examples",
    "load_rows",
    "validate_rows",
]
