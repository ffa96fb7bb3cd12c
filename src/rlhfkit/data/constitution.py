"""Constitutions: the written principles that guide AI critiques, revisions and preference labels.

A constitution is a YAML or JSON file with a list of principles (Bai et al. 2022,
"Constitutional AI: Harmlessness from AI Feedback")::

    principles:
      - name: honest                      # unique; names the principle in every output row
        critique: Find statements in the assistant's last reply that are false ...
        revision: Rewrite the reply so that every claim is true ...
        preference: Which reply is more truthful?    # optional: the judge's question

``critique`` asks a model to criticise a reply under the principle, ``revision`` asks it to
rewrite the reply in the light of that critique, and ``preference`` (optional) is the question
an AI judge answers when it compares two replies under the principle. A bare list of principles
is accepted too. ``default`` names the constitution shipped with rlhfkit
(``data/constitutions/default.yaml``: helpful, honest, harmless, respectful, concise, fair).

Each use draws one principle uniformly at random with a seeded generator
(:meth:`Constitution.draw`), as in the paper, so that a run is reproducible and every principle
is used about equally often.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.data.rows import DataError
from rlhfkit.errors import MissingFileError

DEFAULT = "default"
"""The name of the constitution shipped with rlhfkit."""
SHIPPED = Path(__file__).parent / "constitutions"
"""Where shipped constitutions live (``<name>.yaml``)."""
FIELDS = ("name", "critique", "revision", "preference")
"""The fields a principle may have (``preference`` optional)."""


@dataclass(frozen=True)
class Principle:
    """One principle of a constitution.

    Attributes:
        name: A short unique name, recorded with everything the principle produced.
        critique: The request for a critique of a reply under the principle.
        revision: The request to rewrite the reply in the light of the critique.
        preference: The question a judge answers when it compares two replies (None: the
            constitution's principle cannot label pairs).
    """

    name: str
    critique: str
    revision: str
    preference: str | None = None


@dataclass(frozen=True)
class Constitution:
    """An ordered, non-empty set of principles with unique names.

    Attributes:
        principles: The principles, in file order.
        source: Where they came from (a path, or ``default``), for messages.
    """

    principles: tuple[Principle, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.principles)

    def draw(self, seed: int, index: int) -> Principle:
        """The principle for use number ``index`` of a run seeded with ``seed``.

        Uniform over the principles, and a pure function of ``(seed, index)``: a resumed or
        re-run job draws the same principle for the same item.
        """
        rng = random.Random(f"{seed}:{index}")
        return self.principles[rng.randrange(len(self.principles))]

    def with_preference(self) -> Constitution:
        """Only the principles that have a preference question.

        Raises:
            DataError: When none has one.
        """
        kept = tuple(p for p in self.principles if p.preference)
        if not kept:
            raise DataError(self.source, "principles", "no principle has a 'preference' question")
        return Constitution(kept, self.source)


def _principle(raw: Any, index: int, source: str) -> Principle:
    """Check one principle entry; return it."""
    where = f"principles[{index}]"
    if not isinstance(raw, dict):
        raise DataError(source, where, f"expected a mapping with {', '.join(FIELDS[:3])}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise DataError(source, f"{where}.{unknown[0]}",
                        f"unknown field; a principle has {', '.join(FIELDS)}")  # fmt: skip
    values = {}
    for name in FIELDS:
        value = raw.get(name)
        if value is None and name == "preference":
            continue
        if not isinstance(value, str) or not value.strip():
            raise DataError(source, f"{where}.{name}", "expected a non-empty string")
        values[name] = " ".join(value.split())
    return Principle(**values)


def parse_constitution(data: Any, source: str) -> Constitution:
    """A constitution from parsed YAML/JSON: ``{"principles": [...]}`` or a bare list.

    Raises:
        DataError: Naming the file, the principle and the field that is wrong.
    """
    if isinstance(data, dict):
        extra = sorted(set(data) - {"principles"})
        if extra:
            raise DataError(source, extra[0], "unknown field; a constitution has 'principles'")
        data = data.get("principles")
    if not isinstance(data, list) or not data:
        raise DataError(source, "principles", "expected a non-empty list of principles")
    principles = tuple(_principle(raw, i, source) for i, raw in enumerate(data))
    seen: dict[str, int] = {}
    for i, principle in enumerate(principles):
        if principle.name in seen:
            raise DataError(source, f"principles[{i}].name",
                            f"{principle.name!r} is also principles[{seen[principle.name]}]"
                            "'s name; names must be unique")  # fmt: skip
        seen[principle.name] = i
    return Constitution(principles, source)


def load_constitution(spec: str = DEFAULT) -> Constitution:
    """The constitution ``spec`` names: ``default`` (shipped) or a .yaml/.yml/.json file.

    Raises:
        MissingFileError: The file does not exist.
        DataError: It cannot be parsed, or a principle is malformed.
    """
    path = SHIPPED / f"{spec}.yaml" if spec == DEFAULT else Path(spec).expanduser()
    if not path.is_file():
        raise MissingFileError(f"--constitution: {spec}: no such file")
    text = path.read_text(encoding="utf-8")
    source = DEFAULT if spec == DEFAULT else str(path)
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise DataError(source, None, f"cannot be parsed ({err})") from err
    return parse_constitution(data, source)
