"""Verifiers: pure functions ``(completion, **fields) -> float | None`` (RLHF book ch. 7).

Each verifier checks a completion against the fields of the example it answers (``answer``,
``tests``, ``constraints``, ...) and returns a reward, or None when the completion cannot be
scored. They are rewards as they stand (``--rewards rlhfkit.rewards.verifiers.math:math_reward``)
and are also reachable by name:

- ``verifier:<name>`` on the command line names one verifier of :data:`VERIFIERS`;
- ``verifier:auto`` (:func:`verify`) dispatches each example to the verifier its ``verifier``
  field names (the ``verifiable`` schema's field), ``math`` when the row names none.

The registry maps names to ``module:function`` strings, imported on first use, so that a
verifier's optional dependencies (sympy through math-verify, reasoning-gym) load only when used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache
from typing import Any

from rlhfkit.rewards.fields import accepted_fields

VERIFIERS: dict[str, str] = {
    "math": "rlhfkit.rewards.verifiers.math:math_reward",
    "code": "rlhfkit.rewards.verifiers.code:code_reward",
    "format": "rlhfkit.rewards.verifiers.format:format_reward",
    "constraints": "rlhfkit.rewards.verifiers.constraints:constraints_reward",
    "language": "rlhfkit.rewards.verifiers.language:language_reward",
    "countdown": "rlhfkit.rewards.verifiers.tasks:countdown_reward",
    "strings": "rlhfkit.rewards.verifiers.tasks:string_reward",
    "reasoning_gym": "rlhfkit.rewards.verifiers.tasks:reasoning_gym_reward",
}
"""Verifier name -> ``module:function``."""

DEFAULT_VERIFIER = "math"
"""The verifier of an example that names none."""


@cache
def get_verifier(name: str) -> Callable[..., float | None]:
    """The verifier registered under ``name``.

    Raises:
        ValueError: An unknown name (the message lists the known ones).
    """
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; known: {', '.join(sorted(VERIFIERS))}")
    module, _, attr = VERIFIERS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def verify(completion: str, *, verifier: str | None = None, **fields: Any) -> float | None:
    """Score ``completion`` with the verifier the example names (``math`` by default).

    Args:
        completion: The model's reply.
        verifier: The example's ``verifier`` field, or None for :data:`DEFAULT_VERIFIER`.
        fields: The example's other fields (``answer``, ``tests``, ...); each verifier takes the
            ones its signature names.

    Returns:
        The verifier's reward, or None when it could not score the completion.
    """
    fn = get_verifier(verifier or DEFAULT_VERIFIER)
    return fn(completion, **accepted_fields(fn, fields))
