"""The reward-function protocol and how a reward is named on the command line.

A reward function scores one completion given the fields of the example it answers::

    def my_reward(completion: str, *, prompt, reference=None, **fields) -> float | None

It returns a float, or None to skip the completion (no reward for it). The function receives only
the example fields its signature names (all of them when it takes ``**fields``), so a plain
function such as ``rlhfkit.data.tasks.preferences:gold_score(completion, reference, task)`` is a
reward as it stands. Batched scorers (a reward model) also provide ``score_batch(completions,
fields)``, which :func:`score_completions` prefers.

A reward is named by ``module:function`` (an importable module, or a ``path/to/file.py``), by
``rm:<checkpoint directory>`` for a reward model trained with ``rlhfkit rm train``, by
``rm-ensemble:<mean|min|uwo[=lambda]>:<dir>,<dir>,...`` for an ensemble of them, or by
``verifier:<name>`` for a built-in verifier (``verifier:auto`` picks each example's own, see
:mod:`rlhfkit.rewards.verifiers`), or ``judge:<model>`` / ``judge:openai:<base_url>#<model>`` for
an LLM judge's 1-10 rating (:mod:`rlhfkit.rewards.judge`), or
``rubric:<file or builtin:<name>>[|judge:<model>][|implicit]`` for a rubric's weighted criteria
(:mod:`rlhfkit.rewards.rubric`).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from torch import nn

from rlhfkit.rewards.fields import accepted_fields
from rlhfkit.rewards.verifiers import get_verifier, verify


@runtime_checkable
class RewardFn(Protocol):
    """Scores one completion; None means "no reward for this one" (it is skipped)."""

    def __call__(self, completion: str, **fields: Any) -> float | None:
        """Reward of ``completion`` for the example whose fields are ``fields``."""
        ...


def _import_attribute(spec: str) -> Any:
    """``module:attr`` or ``path/file.py:attr`` to the attribute, with errors naming ``spec``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec!r}: expected 'module:function' or 'path/file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(f"reward {spec!r}: no file {path}")
        loader_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert loader_spec is not None and loader_spec.loader is not None
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise ValueError(f"reward {spec!r}: cannot import {module_name!r}: {err}") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"reward {spec!r}: {module_name!r} has no attribute {attr!r}") from None


def load_reward_fn(
    spec: str, *, place: Callable[[Any], Any] | None = None, **options: Any
) -> Callable[..., float | None]:
    """The reward named by ``spec``.

    Args:
        spec: ``module:function``, ``path/to/file.py:function``, ``rm:<directory>`` (a reward
            model checkpoint; ``options`` go to :class:`rlhfkit.rewards.model.RewardModelScorer`)
            ``verifier:<name>`` (``auto``: the verifier each example names), or ``judge:<model>``
            / ``judge:openai:<base_url>#<model>`` (an LLM judge's rating), or
            ``rubric:<file>[|judge:<model>][|implicit]`` (a rubric reward), or
            ``length:<budget>[:<per_word>]`` (a length penalty on the completion's words).
        place: How a reward model is placed: a training run's frozen-model placement, so that
            it is sharded like the run's reference (ignored for the other kinds).
        options: Settings of a reward-model scorer (ignored for functions).

    Raises:
        ValueError: When the spec is malformed or names nothing callable.
    """
    if spec.startswith("rm:"):
        from rlhfkit.rewards.model import RewardModelScorer

        return RewardModelScorer(spec[3:], place=place, **options)
    if spec.startswith("rm-ensemble:"):
        from rlhfkit.rewards.model import RewardModelEnsemble

        return RewardModelEnsemble(spec, place=place, **options)
    if spec.startswith("judge:"):
        from rlhfkit.rewards.judge import judge_reward

        return judge_reward(spec, **options)
    if spec.startswith("rubric:"):
        from rlhfkit.rewards.rubric import rubric_reward

        return rubric_reward(spec)
    if spec.startswith("verifier:"):
        name = spec.removeprefix("verifier:")
        return verify if name == "auto" else get_verifier(name)
    if spec.startswith("length:"):
        from rlhfkit.rewards.shaping import length_reward

        return length_reward(spec)
    fn = _import_attribute(spec)
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable")
    return fn


def reward_spec_problem(spec: str) -> str | None:
    """Why the reward ``spec`` cannot load, found without loading a model; None if it can.

    :func:`rlhfkit.validation.reward_problem`, plus a rubric's criteria and rules.
    """
    from rlhfkit.validation import reward_problem

    problem = reward_problem(spec)
    if problem is None and spec.startswith("rm-ensemble:"):
        from rlhfkit.rewards.model import parse_ensemble_spec

        try:
            parse_ensemble_spec(spec)
        except ValueError as err:
            return str(err)
    if problem is None and spec.startswith("rubric:"):
        from rlhfkit.rewards.rubric import rubric_problem

        return rubric_problem(spec)
    if problem is None and spec.startswith("length:"):
        from rlhfkit.rewards.shaping import parse_length_spec

        try:
            parse_length_spec(spec)
        except ValueError as err:
            return str(err)
    return problem


def rewards_problems(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``("rewards", why)`` for each of ``specs`` that cannot load (a config's ``problems``)."""
    return [("rewards", text) for text in map(reward_spec_problem, specs) if text]


def score_completions(
    fn: Callable[..., Any], completions: Sequence[str], fields: Sequence[dict[str, Any]]
) -> list[float | None]:
    """Rewards of ``completions[i]`` given ``fields[i]``; None where the function skipped one.

    Uses ``fn.score_batch`` when the scorer has it (one batched pass), else calls ``fn`` per
    completion with the fields it accepts.

    Raises:
        ValueError: When a reward is neither None nor a finite number (naming the completion).
    """
    if len(completions) != len(fields):
        raise ValueError(f"{len(completions)} completions but {len(fields)} field sets")
    batch = getattr(fn, "score_batch", None)
    if batch is not None:
        raw = list(batch(list(completions), list(fields)))
    else:
        raw = [fn(c, **accepted_fields(fn, f)) for c, f in zip(completions, fields, strict=True)]
    out: list[float | None] = []
    for i, value in enumerate(raw):
        if value is None:
            out.append(None)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"reward returned {value!r} for completion {i}; need a number or None"
            ) from None
        if not math.isfinite(number):
            raise ValueError(f"reward returned {number} for completion {i}; need a finite number")
        out.append(number)
    return out


def reward_models(fns: Sequence[Callable[..., Any]]) -> list[Any]:
    """The models held by ``fns`` (a reward model's network; functions hold none).

    A run gathers them with its own models around the phase that scores, where they are sharded.
    """
    out = [m for fn in fns if isinstance(m := getattr(fn, "model", None), nn.Module)]
    return out + [m for fn in fns for m in getattr(fn, "models", []) if isinstance(m, nn.Module)]
