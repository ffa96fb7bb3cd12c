"""Character traits: the contrastive prompts that elicit a trait and a deterministic scorer of it.

A trait file (YAML or JSON) holds::

    name: enthusiasm
    description: ...
    positive: <system prompt that elicits the trait>
    negative: <system prompt that suppresses it>
    constitution: <the character, described in the first person>   # optional
    questions: [<question>, ...]      # or a file next to it (questions.yaml)
    heldout: 10                        # the last N questions are held out
    markers: ["!", "amazing", ...]     # counted in a response: the trait scorer
    negative_markers: [...]            # optional: counted against it

``builtin:<name>`` (or just the name) loads a shipped trait: enthusiasm, formality,
sycophancy. The scorer counts each marker's case-insensitive occurrences in a response (single
words as whole words), minus those of the negative markers: a transparent, reproducible proxy of
how strongly the response shows the trait.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.data.rows import DataError
from rlhfkit.errors import MissingFileError

SHIPPED = Path(__file__).parent / "traits"
BUILTIN = ("enthusiasm", "formality", "sycophancy")


@dataclass(frozen=True)
class Trait:
    """A trait's contrastive system prompts, its questions and its marker scorer."""

    name: str
    description: str
    positive: str
    negative: str
    questions: tuple[str, ...]
    heldout: int
    markers: tuple[str, ...]
    negative_markers: tuple[str, ...] = ()
    constitution: str = ""
    source: str = ""

    @property
    def train_questions(self) -> tuple[str, ...]:
        """The questions the vector is extracted from."""
        return self.questions[: len(self.questions) - self.heldout]

    @property
    def heldout_questions(self) -> tuple[str, ...]:
        """The last ``heldout`` questions, kept for evaluation."""
        return self.questions[len(self.questions) - self.heldout :]

    def score(self, text: str) -> float:
        """Marker occurrences in ``text`` minus negative-marker occurrences (case-insensitive)."""
        return float(_count(self.markers, text) - _count(self.negative_markers, text))

    def messages(self, question: str, side: str | None) -> list[dict[str, str]]:
        """The chat prompt: a side's system prompt (positive, negative or none) and the question."""
        system = {"positive": self.positive, "negative": self.negative}.get(side or "")
        user = [{"role": "user", "content": question}]
        return [{"role": "system", "content": system}, *user] if system else user


def _count(markers: tuple[str, ...], text: str) -> int:
    lowered = text.lower()
    total = 0
    for marker in markers:
        m = marker.lower()
        if re.fullmatch(r"\w+", m):
            total += len(re.findall(rf"\b{re.escape(m)}\b", lowered))
        else:
            total += lowered.count(m)
    return total


def _strings(value: Any, source: str, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise DataError(source, name, "must be a list of non-empty strings")
    return tuple(value)


def _read(path: Path, source: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        raise DataError(source, None, f"cannot be parsed ({err})") from err


def load_trait(spec: str) -> Trait:
    """The trait ``spec`` names: ``builtin:<name>``, a shipped name, or a .yaml/.json file.

    Raises:
        MissingFileError: No such file (or shipped trait).
        DataError: The file cannot be parsed, or a field is missing or malformed (named).
    """
    name = spec.removeprefix("builtin:")
    path = SHIPPED / f"{name}.yaml" if name in BUILTIN else Path(spec).expanduser()
    if not path.is_file():
        shipped = ", ".join(BUILTIN)
        raise MissingFileError(f"--trait: {spec}: no such file (shipped traits: {shipped})")
    data = _read(path, str(path))
    source = str(path)
    if not isinstance(data, dict):
        raise DataError(source, None, "a trait file holds a mapping of fields")
    for key in ("name", "positive", "negative"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise DataError(source, key, "is required (a non-empty string)")
    questions = data.get("questions")
    if isinstance(questions, str):  # a file next to the trait file
        qpath = path.parent / questions
        if not qpath.is_file():
            raise DataError(source, "questions", f"no such file: {qpath}")
        questions = _read(qpath, str(qpath))
    questions = _strings(questions, source, "questions")
    heldout = data.get("heldout", 0)
    if not isinstance(heldout, int) or not 0 <= heldout <= len(questions) - 2:
        raise DataError(source, "heldout", f"must be an int in 0..{len(questions) - 2}")
    negative = data.get("negative_markers") or []
    return Trait(
        name=data["name"], description=str(data.get("description", "")),
        positive=data["positive"].strip(), negative=data["negative"].strip(),
        questions=questions, heldout=heldout,
        markers=_strings(data.get("markers"), source, "markers"),
        negative_markers=_strings(negative, source, "negative_markers") if negative else (),
        constitution=str(data.get("constitution") or data["positive"]).strip(),
        source=spec,
    )  # fmt: skip
