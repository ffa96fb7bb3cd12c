"""Procedural reasoning tasks from reasoning-gym, loadable as ``load_rows("rgym:NAME")``.

A source spec names a reasoning-gym dataset and optional integer settings::

    rgym:chain_sum                                  (defaults)
    rgym:basic_arithmetic?size=500&heldout_size=50&seed=1

- ``size``: rows of the ``train`` split (default :data:`DEFAULT_SIZE`);
- ``heldout_size``: rows of the ``heldout`` split (default :data:`DEFAULT_HELDOUT_SIZE`);
- ``seed``: the train split is drawn from reasoning-gym seed ``seed`` and the heldout split from
  seed ``seed + HELDOUT_SEED_OFFSET`` (default 0). reasoning-gym seeds item ``i`` with
  ``seed + i``, so the offset keeps the two streams apart; on top of that the train split skips
  every question of the heldout split (of the same spec) and every repeated question, so the
  splits never share a prompt.

The dataset's configuration is otherwise its default, which is also what the verifier rebuilds
to score. Each row is a ``verifiable`` record::

    {"prompt": question + ANSWER_INSTRUCTION, "answer": entry answer,
     "verifier": "reasoning_gym", "task": "rgym:chain_sum",
     "rg_dataset": "chain_sum", "rg_entry": {"question", "answer", "metadata"}}

``rg_entry`` is the entry after a JSON round trip (tuples become lists), i.e. exactly what a
JSON-lines copy of the rows holds; the ``reasoning_gym`` verifier
(:func:`rlhfkit.rewards.verifiers.tasks.reasoning_gym_reward`) scores a completion with the
dataset's own ``score_answer`` on it. Datasets whose entries carry no reference answer (e.g.
``graph_color``, scored by a checker only) are refused: the ``verifiable`` schema needs one.

reasoning-gym comes with the ``rgym`` extra (``pip install 'rlhfkit[rgym]'``).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from rlhfkit.data.rows import Row
from rlhfkit.errors import ConfigError
from rlhfkit.extras import import_optional

PREFIX = "rgym:"
"""Source prefix of a reasoning-gym dataset spec."""

DEFAULT_SIZE = 1000
"""Rows of the train split when the spec gives no ``size``."""

DEFAULT_HELDOUT_SIZE = 100
"""Rows of the heldout split when the spec gives no ``heldout_size``."""

HELDOUT_SEED_OFFSET = 1_000_003
"""The heldout split's reasoning-gym seed is the spec's seed plus this."""

ANSWER_INSTRUCTION = "\n\nGive your final answer inside <answer></answer>."

SETTINGS = ("size", "heldout_size", "seed")
"""Settings a spec may give after ``?``."""

_FEATURE = "reasoning-gym tasks (rgym: sources and the reasoning_gym verifier)"


def parse_spec(spec: str) -> tuple[str, dict[str, int]]:
    """Split ``NAME?key=value&...`` into the dataset name and its settings (with defaults).

    Args:
        spec: The part of the source after ``rgym:``.

    Returns:
        ``(name, {"size", "heldout_size", "seed"})``.

    Raises:
        ValueError: An empty name, an unknown setting, or a value that is not an integer >= 0.
    """
    name, _, query = spec.partition("?")
    if not name:
        raise ConfigError(f"{PREFIX}{spec}: name a reasoning-gym dataset, e.g. rgym:chain_sum")
    settings = {"size": DEFAULT_SIZE, "heldout_size": DEFAULT_HELDOUT_SIZE, "seed": 0}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if key not in SETTINGS or not sep:
            raise ConfigError(
                f"{PREFIX}{spec}: unknown setting {item!r}; use key=value with keys "
                + ", ".join(SETTINGS)
            )
        if not value.isdigit():
            raise ConfigError(f"{PREFIX}{spec}: {key} must be an integer >= 0, got {value!r}")
        settings[key] = int(value)
    return name, settings


def create_dataset(name: str, size: int, seed: int) -> Any:
    """A reasoning-gym dataset with its default configuration.

    The rows of ``rgym:`` sources are generated from it, and the ``reasoning_gym`` verifier
    scores with the ``score_answer`` of one (:mod:`rlhfkit.rewards.verifiers.tasks`).
    reasoning-gym is imported here, on first use: it is slow to import and optional.

    Args:
        name: A reasoning-gym dataset name (e.g. ``"chain_sum"``).
        size: Number of items.
        seed: reasoning-gym seed.

    Returns:
        The dataset: item ``i`` is a dict with ``question``, ``answer`` and ``metadata``.

    Raises:
        ValueError: An unknown dataset name (the message lists the known ones).
        MissingExtraError: When reasoning-gym (the ``rgym`` extra) is not installed.
    """
    reasoning_gym = import_optional("reasoning_gym", "rgym", _FEATURE)
    factory = import_optional("reasoning_gym.factory", "rgym", _FEATURE)
    known = factory.DATASETS
    if name not in known:
        raise ConfigError(
            f"unknown reasoning-gym dataset {name!r}; known: {', '.join(sorted(known))}"
        )
    return reasoning_gym.create_dataset(name, size=size, seed=seed)


def to_row(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A reasoning-gym entry as a JSON-serialisable verifiable row.

    Raises:
        ValueError: The entry has no reference answer, or is not JSON-serialisable.
    """
    try:
        stored = json.loads(json.dumps(entry))
    except TypeError as err:
        raise ValueError(f"reasoning-gym dataset {name!r}: entry is not JSON: {err}") from err
    answer = stored.get("answer")
    if answer is None or not str(answer).strip():
        raise ValueError(
            f"reasoning-gym dataset {name!r} gives no reference answer (it is scored by a "
            "checker only), so it cannot make verifiable rows; pick another dataset"
        )
    return {
        "prompt": stored["question"] + ANSWER_INSTRUCTION,
        "answer": str(answer),
        "verifier": "reasoning_gym",
        "task": f"{PREFIX}{name}",
        "rg_dataset": name,
        "rg_entry": {key: stored.get(key) for key in ("question", "answer", "metadata")},
    }


def generate(
    name: str, n: int, *, seed: int, exclude: Collection[str] = ()
) -> list[dict[str, Any]]:
    """``n`` rows of distinct questions from reasoning-gym dataset ``name``.

    Items ``0, 1, 2, ...`` of ``create_dataset(name, size=2n + 100, seed=seed)`` are taken in
    order, skipping questions already taken or in ``exclude``.

    Args:
        name: A reasoning-gym dataset name (e.g. ``"chain_sum"``).
        n: Number of rows.
        seed: reasoning-gym seed; the same arguments always give the same rows.
        exclude: Questions that must not be used (e.g. the other split's).

    Returns:
        Rows as described in the module docstring.

    Raises:
        ValueError: An unknown dataset, one without reference answers, or fewer than ``n``
            distinct questions among the items drawn.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    dataset = create_dataset(name, 2 * n + 100, seed)
    seen = set(exclude)
    rows: list[dict[str, Any]] = []
    for index in range(len(dataset)):
        if len(rows) == n:
            break
        entry = dataset[index]
        if entry["question"] in seen:
            continue
        seen.add(entry["question"])
        rows.append(to_row(name, entry))
    if len(rows) < n:
        raise ValueError(
            f"reasoning-gym dataset {name!r} gave only {len(rows)} distinct questions of the "
            f"{n} requested; ask for fewer rows"
        )
    return rows


def split_rows(spec: str, split: str) -> list[dict[str, Any]]:
    """The rows of one split of ``rgym:SPEC`` (see the module docstring).

    Raises:
        ValueError: A malformed spec, an unknown dataset or split.
    """
    name, settings = parse_spec(spec)
    if split not in ("train", "heldout"):
        raise ConfigError(f"{PREFIX}{spec} has no split {split!r}; use 'train' or 'heldout'")
    heldout_seed = settings["seed"] + HELDOUT_SEED_OFFSET
    heldout = generate(name, settings["heldout_size"], seed=heldout_seed)
    if split == "heldout":
        return heldout
    exclude = {row["rg_entry"]["question"] for row in heldout}
    return generate(name, settings["size"], seed=settings["seed"], exclude=exclude)


def rgym_rows(spec: str, split: str) -> list[Row]:
    """Rows of ``rgym:SPEC``, located as ``rgym:SPEC[SPLIT]:row N`` (1-based).

    Args:
        spec: The source after ``rgym:``, e.g. ``"chain_sum?size=500&seed=1"``.
        split: ``"train"`` or ``"heldout"``.

    Raises:
        ValueError: A malformed spec, an unknown dataset or split.
    """
    prefix = f"{PREFIX}{spec}[{split}]"
    return [
        Row(data=data, location=f"{prefix}:row {i}")
        for i, data in enumerate(split_rows(spec, split), 1)
    ]
