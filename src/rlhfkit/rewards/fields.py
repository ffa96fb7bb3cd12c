"""Which of an example's fields a reward function receives.

A reward function names the example fields it wants in its signature (``answer``, ``tests``,
``reference``, ...) or takes them all with ``**fields``; :func:`accepted_fields` picks them. Both
:func:`rlhfkit.rewards.base.score_completions` and the verifier dispatch
(:func:`rlhfkit.rewards.verifiers.verify`) call reward functions through it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def accepted_fields(fn: Callable[..., Any], fields: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``fields`` that ``fn`` takes as keyword arguments.

    The first parameter receives the completion, so it is never filled from ``fields``; a
    function with ``**kwargs`` receives every field except ``completion``, and a callable
    without an inspectable signature receives them all.

    Args:
        fn: The reward function.
        fields: The example's fields.

    Returns:
        The keyword arguments to call ``fn`` with, after the completion.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: pass everything
        return fields
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {k: v for k, v in fields.items() if k != "completion"}
    names = [n for n, p in params.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    return {k: fields[k] for k in names[1:] if k in fields}
