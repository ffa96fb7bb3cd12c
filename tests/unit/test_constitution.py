"""Constitutions: the shipped one loads, malformed files fail clearly, principles are uniform."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from rlhfkit.data.constitution import (
    Constitution,
    Principle,
    load_constitution,
    parse_constitution,
)
from rlhfkit.data.rows import DataError
from rlhfkit.errors import MissingFileError


def test_the_default_constitution_loads_with_every_field():
    c = load_constitution()
    assert len(c) == 6 and c.source == "default"
    assert len({p.name for p in c.principles}) == len(c)
    assert all(p.critique and p.revision and p.preference for p in c.principles)
    assert c.with_preference() == c


def test_a_file_and_a_bare_list_are_accepted(tmp_path):
    rows = [{"name": "kind", "critique": "Is it  unkind?\n", "revision": "Make it kind."}]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(rows))
    c = load_constitution(str(path))
    assert c.principles == (Principle("kind", "Is it unkind?", "Make it kind."),)
    with pytest.raises(DataError, match="no principle has a 'preference' question"):
        c.with_preference()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"principles": []}, "principles.*non-empty list"),
        ({"rules": []}, "rules.*unknown field"),
        ([{"name": "a", "critique": "c"}], r"principles\[0\]\.revision.*non-empty string"),
        ([{"name": "a", "critique": "c", "revision": "  "}], r"principles\[0\]\.revision"),
        ([{"name": "a", "critique": "c", "revision": "r", "weight": 2}],
         r"principles\[0\]\.weight.*unknown field"),
        ([{"name": "a", "critique": "c", "revision": "r"},
          {"name": "a", "critique": "c", "revision": "r"}], r"principles\[1\]\.name.*unique"),
        (["just text"], r"principles\[0\].*mapping"),
    ],
)  # fmt: skip
def test_malformed_constitutions_name_the_principle_and_field(data, message):
    with pytest.raises(DataError, match=message) as err:
        parse_constitution(data, "mine.yaml")
    assert str(err.value).startswith("mine.yaml")


def test_missing_and_unparseable_files(tmp_path):
    with pytest.raises(MissingFileError, match="no such file"):
        load_constitution(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("principles: [unclosed\n")
    with pytest.raises(DataError, match="cannot be parsed"):
        load_constitution(str(bad))


def test_principles_are_drawn_uniformly_and_reproducibly():
    """Chi-square over 6,000 draws of 6 principles: below the 0.999 quantile (20.5, 5 df)."""
    c = Constitution(tuple(Principle(f"p{i}", "c", "r") for i in range(6)))
    draws = [c.draw(seed=3, index=i).name for i in range(6000)]
    counts = Counter(draws)
    chi2 = sum((counts[f"p{i}"] - 1000) ** 2 / 1000 for i in range(6))
    assert chi2 < 20.5, counts
    assert [c.draw(3, i).name for i in range(50)] == draws[:50]  # a pure function of (seed, i)
    assert [c.draw(4, i).name for i in range(50)] != draws[:50]
