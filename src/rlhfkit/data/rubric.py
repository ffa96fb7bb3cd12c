r"""Rubrics: weighted criteria that grade an open-ended reply (rubric rewards).

A rubric is a list of criteria, each ``{title, description, weight}`` and optionally a
``check``::

    criteria:                      # the rubric for every prompt
      - title: Correct answer
        description: The final answer equals the reference answer.
        weight: essential          # or a number: essential 5, important 3, optional 1
        check: correct             # optional: a deterministic rule instead of a judge
      - title: Refuses
        description: The reply declines to answer or apologises instead of answering.
        weight: pitfall            # pitfall -1, severe_pitfall -2, or a negative number
        check: "regex:(?i)\\b(sorry|I cannot)\\b"
    tasks:                         # optional: rubrics for the rows of one ``task``
      thank_you_note:
        - {title: ..., description: ..., weight: 3}

Positive weights reward a criterion that is met; negative weights (pitfalls) penalise a
problem that occurred. A bare list of criteria is accepted too. A data row may carry its own
rubric in a ``rubric`` field (a list of criteria), which takes precedence over the file's.
``check`` names a rule of :mod:`rlhfkit.rewards.rubric` (for example ``correct``,
``max_words:40``, ``regex:<pattern>``, ``verifier:<name>``); a criterion without one is judged
by a model. How scores are aggregated is in :func:`rlhfkit.rewards.rubric.rubric_score`.

``rows`` names no file: every example must then carry its own rubric (for example the
checklists ``rlhfkit cai rubric`` writes). Shipped rubrics are named by ``builtin:<name>``
(``data/rubrics/<name>.yaml``):
``builtin:instructions`` grades replies to the built-in instruction task with deterministic
rules only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.data.rows import DataError
from rlhfkit.errors import MissingFileError

SHIPPED = Path(__file__).parent / "rubrics"
"""Where shipped rubrics live (``<name>.yaml``, named ``builtin:<name>``)."""
WEIGHTS = {"essential": 5.0, "important": 3.0, "optional": 1.0, "pitfall": -1.0,
           "severe_pitfall": -2.0}  # fmt: skip
"""The named weights (the book's Essential / Important / Optional / Pitfall levels)."""
ROWS = "rows"
"""The rubric spec under which every example must carry its own ``rubric`` field."""
FIELDS = ("title", "description", "weight", "check")
"""The fields a criterion may have (``check`` optional)."""


@dataclass(frozen=True)
class Criterion:
    """One rubric item.

    Attributes:
        title: A short name.
        description: What is checked, in a sentence (the judge's question).
        weight: Positive for a quality to reward, negative for a pitfall to penalise.
        check: A deterministic rule's name, or None (a judge decides).
    """

    title: str
    description: str
    weight: float
    check: str | None = None

    @property
    def pitfall(self) -> bool:
        """Whether the criterion is a problem (score 1 = it occurred)."""
        return self.weight < 0


@dataclass(frozen=True)
class Rubric:
    """A non-empty list of criteria with at least one positive weight."""

    criteria: tuple[Criterion, ...]
    source: str = ""

    @property
    def weights(self) -> list[float]:
        """The criteria's weights, in order."""
        return [c.weight for c in self.criteria]


@dataclass(frozen=True)
class RubricSet:
    """The rubrics of a file: one for every prompt and/or one per task type.

    Attributes:
        default: The rubric for prompts with no task rubric (None: every prompt needs one).
        tasks: Rubrics by the rows' ``task`` field.
        source: The file, for messages.
    """

    default: Rubric | None
    tasks: Mapping[str, Rubric] = field(default_factory=dict)
    source: str = ""

    @property
    def needs_judge(self) -> bool:
        """Whether a criterion of the file's rubrics has no check (a judge must decide it)."""
        rubrics = [r for r in (self.default, *self.tasks.values()) if r is not None]
        return any(c.check is None for r in rubrics for c in r.criteria)

    def for_example(self, fields: Mapping[str, Any], where: str = "example") -> Rubric:
        """The rubric of one example: its own ``rubric`` field, its task's, or the default.

        Raises:
            DataError: The example's own rubric is malformed, or no rubric applies.
        """
        own = fields.get("rubric")
        if own is not None:
            return parse_rubric(own, f"{where}.rubric")
        task = fields.get("task")
        rubric = self.tasks.get(task, self.default) if isinstance(task, str) else self.default
        if rubric is None:
            reason = f"no rubric for {where} (task {task!r}) and no default 'criteria'"
            raise DataError(self.source, "tasks", reason)
        return rubric


def _weight(raw: Any, source: str, where: str) -> float:
    if isinstance(raw, str) and raw.strip().lower() in WEIGHTS:
        return WEIGHTS[raw.strip().lower()]
    if (
        isinstance(raw, bool)
        or not isinstance(raw, int | float)
        or not math.isfinite(raw)
        or not raw
    ):
        names = ", ".join(WEIGHTS)
        raise DataError(source, where, f"expected a non-zero number or one of {names}; got {raw!r}")
    return float(raw)


def _criterion(raw: Any, source: str, where: str) -> Criterion:
    if not isinstance(raw, dict):
        raise DataError(source, where, "expected a mapping with title, description and weight")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise DataError(source, f"{where}.{unknown[0]}",
                        f"unknown field; a criterion has {', '.join(FIELDS)}")  # fmt: skip
    text = {}
    for name in ("title", "description"):
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            raise DataError(source, f"{where}.{name}", "expected a non-empty string")
        text[name] = " ".join(value.split())
    check = raw.get("check")
    if check is not None and (not isinstance(check, str) or not check.strip()):
        raise DataError(source, f"{where}.check", "expected a rule name such as 'correct'")
    weight = _weight(raw.get("weight"), source, f"{where}.weight")
    return Criterion(text["title"], text["description"], weight, check.strip() if check else None)


def parse_rubric(data: Any, source: str) -> Rubric:
    """One rubric from a list of criteria (or ``{"criteria": [...]}``).

    Raises:
        DataError: Naming the criterion and field that is wrong, or a rubric whose weights are
            all pitfalls (it could never score above 0).
    """
    if isinstance(data, dict) and set(data) == {"criteria"}:
        data = data["criteria"]
    if not isinstance(data, list) or not data:
        raise DataError(source, "criteria", "expected a non-empty list of criteria")
    criteria = tuple(_criterion(raw, source, f"criteria[{i}]") for i, raw in enumerate(data))
    if not any(c.weight > 0 for c in criteria):
        raise DataError(source, "criteria", "needs at least one criterion with a positive weight")
    return Rubric(criteria, source)


def parse_rubric_set(data: Any, source: str) -> RubricSet:
    """A rubric file's content: ``{criteria, tasks}`` (either may be absent) or a bare list.

    Raises:
        DataError: Naming the file, the task, the criterion and the field that is wrong.
    """
    if isinstance(data, list):
        return RubricSet(parse_rubric(data, source), {}, source)
    if not isinstance(data, dict):
        raise DataError(source, None, "expected a mapping with 'criteria' and/or 'tasks'")
    extra = sorted(set(data) - {"criteria", "tasks"})
    if extra:
        raise DataError(source, extra[0], "unknown field; a rubric file has 'criteria', 'tasks'")
    default = parse_rubric(data["criteria"], source) if "criteria" in data else None
    tasks_raw = data.get("tasks") or {}
    if not isinstance(tasks_raw, dict):
        raise DataError(source, "tasks", "expected a mapping from task name to criteria")
    tasks = {
        str(name): parse_rubric(items, f"{source}: tasks.{name}")
        for name, items in tasks_raw.items()
    }
    if default is None and not tasks:
        raise DataError(source, "criteria", "the file has neither 'criteria' nor 'tasks'")
    return RubricSet(default, tasks, source)


def load_rubrics(spec: str) -> RubricSet:
    """The rubrics ``spec`` names: ``builtin:<name>``, a .yaml/.yml/.json file, or ``rows``.

    ``rows`` names no file: every example carries its own ``rubric``.

    Raises:
        MissingFileError: The file does not exist.
        DataError: It cannot be parsed, or a criterion is malformed.
    """
    if spec == ROWS:
        return RubricSet(None, {}, ROWS)
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        path = SHIPPED / f"{name}.yaml"
        if not path.is_file():
            shipped = ", ".join(f"builtin:{p.stem}" for p in sorted(SHIPPED.glob("*.yaml")))
            raise MissingFileError(f"rubric {spec}: no such built-in rubric (shipped: {shipped})")
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise MissingFileError(f"rubric {spec}: no such file")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise DataError(spec, None, f"cannot be parsed ({err})") from err
    return parse_rubric_set(data, spec)
