"""The documentation site (mkdocs.yml + docs/) builds cleanly and says only true things.

- The site builds with ``mkdocs build --strict`` and prints no warning (a few seconds: the API
  pages are rendered statically by mkdocstrings, nothing is imported).
- Every command-line option the pages mention (``--section.field``, ``--field``) is a field of
  the config dataclass of the command it is written for: the ``rlhfkit <command>`` at the start
  of its code line or inline code span, else the command named in the nearest heading above it,
  else the commands the page lists in its front matter (``commands: [...]``), else any command.
- Every internal link resolves: relative ``.md`` files exist and ``#anchors`` name a heading of
  the target page (or, on the API pages, an importable ``rlhfkit`` object).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import re
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
GENERIC_OPTIONS = {"help", "config", "debug"}
"""Accepted by every command (``rlhfkit.config.parse_cli``; ``--debug`` by ``rlhfkit.cli``)."""
PLACEHOLDERS = {"section.field"}
"""Written as the shape of an option, not as an option."""

OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9_-]*(?:\.[a-z0-9_-]+)*)")
COMMAND = re.compile(r"\brlhfkit\s+([a-z]+)(?:\s+([a-z]+))?")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _split_front_matter(text: str) -> tuple[dict[str, Any], list[str]]:
    """(front matter, body lines); the body keeps its line count so messages can cite lines."""
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
        meta = yaml.safe_load("\n".join(lines[1:end])) or {}
        return meta, [""] * (end + 1) + lines[end + 1 :]
    return {}, lines


@functools.cache
def _commands() -> dict[str, tuple[str, str, str, str]]:
    from rlhfkit.cli import COMMANDS

    return COMMANDS


def _fields(cls: type, prefix: str = "") -> set[str]:
    """Dotted option paths of a config dataclass (nested dataclasses resolved)."""
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = (
            typing.get_args(hint)
            if typing.get_origin(hint) in (typing.Union, types.UnionType)
            else ()
        )
        nested = [a for a in (hint, *args) if dataclasses.is_dataclass(a)]
        if nested:
            out |= _fields(nested[0], f"{prefix}{f.name}.")
        else:
            out.add(f"{prefix}{f.name}")
    return out


@functools.cache
def _options(command: str) -> frozenset[str]:
    module, cls_name, _, _ = _commands()[command]
    return frozenset(_fields(getattr(importlib.import_module(module), cls_name)))


def _named_commands(text: str) -> list[str]:
    """The rlhfkit commands named in ``text`` ("rm train" before "rm"), in order."""
    found = []
    for match in COMMAND.finditer(text):
        two = f"{match.group(1)} {match.group(2)}"
        if match.group(2) and two in _commands():
            found.append(two)
        elif match.group(1) in _commands():
            found.append(match.group(1))
    return found


def _joined_code_lines(lines: list[str]) -> list[tuple[int, str, bool]]:
    """(line number, text, in a fenced code block) with backslash continuations joined."""
    out: list[tuple[int, str, bool]] = []
    in_code, pending, start = False, "", 0
    for number, line in enumerate(lines, 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code and line.rstrip().endswith("\\"):
            pending, start = pending + line.rstrip()[:-1] + " ", start or number
            continue
        out.append((start or number, pending + line, in_code))
        pending, start = "", 0
    return out


def _mentions(page: Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """Every option the page mentions: (line, option, the commands it may belong to)."""
    meta, lines = _split_front_matter(page.read_text(encoding="utf-8"))
    page_commands = tuple(meta.get("commands", ()))
    unknown = [c for c in page_commands if c not in _commands()]
    assert not unknown, f"{page}: front matter names unknown commands {unknown}"
    heading_commands: tuple[str, ...] = ()
    found = []
    for number, line, in_code in _joined_code_lines(lines):
        heading = None if in_code else HEADING.match(line)
        if heading:
            heading_commands = tuple(_named_commands(heading.group(2)))
            continue
        context = heading_commands or page_commands
        if in_code:
            named = _named_commands(line)
            launcher = COMMAND.search(line) if named else None  # torchrun's own options first
            text = line[launcher.start() :] if launcher else line
            spans = [(text, tuple(named[:1]) or context)]
        else:
            spans = [
                (m.group(2), tuple(_named_commands(m.group(2))[:1]) or context)
                for m in INLINE_CODE.finditer(line)
            ]
            rest = INLINE_CODE.sub(" ", line)
            spans.append((rest, context))
        for text, commands in spans:
            for match in OPTION.finditer(text):
                found.append((number, match.group(1), commands))
    return found


def _option_ok(option: str, commands: tuple[str, ...]) -> bool:
    name = option.replace("-", "_")
    if name in GENERIC_OPTIONS or option in PLACEHOLDERS:
        return True
    if not commands and "." not in name:
        return True  # a bare flag outside any rlhfkit context (pip, mkdocs, torchrun, ...)
    return any(name in _options(c) for c in (commands or tuple(_commands())))


# -- (a) the site builds without a warning ------------------------------------------------------


def test_site_builds_strict_without_warnings(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about MkDocs 2
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    assert "ERROR" not in output, output
    assert (tmp_path / "site" / "methods" / "policy" / "index.html").is_file()
    # the API pages rendered the docstrings of their layer
    api = (tmp_path / "site" / "api" / "losses" / "index.html").read_text(encoding="utf-8")
    assert 'id="rlhfkit.losses.preference.dpo_loss"' in api


# -- (b) every documented option exists ----------------------------------------------------------


def test_pages_mention_options() -> None:
    """The scanner finds the options the pages are known to document (so (b) can fail)."""
    found = {(p.relative_to(DOCS).as_posix(), o) for p in PAGES for _, o, _ in _mentions(p)}
    assert ("methods/policy.md", "algo.kl-coef") in found
    assert ("methods/direct_alignment.md", "algo.loss") in found
    assert ("commands.md", "online.reward") in found


def test_option_check_rejects_unknown_options() -> None:
    assert _option_ok("algo.kl-coef", ("rl",))
    assert _option_ok("algo.kl_coef", ("rl",))
    assert not _option_ok("algo.kl-coef", ("dpo",))  # DPO's coefficient is beta
    assert not _option_ok("algo.no-such-option", ())
    assert not _option_ok("ks", ("rl",))  # a field of eval's config, not rl's


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_documented_options_exist(page: Path) -> None:
    bad = [
        f"{page.relative_to(ROOT)}:{line}: --{option} is not an option of "
        f"{' / '.join(commands) if commands else 'any command'}"
        for line, option, commands in _mentions(page)
        if not _option_ok(option, commands)
    ]
    assert not bad, "\n".join(bad)


def test_commands_page_covers_every_command() -> None:
    text = (DOCS / "commands.md").read_text(encoding="utf-8")
    missing = [c for c in _commands() if f"## `rlhfkit {c}`" not in text]
    assert not missing, f"docs/commands.md has no section for {missing}"


def test_method_reference_names_every_variant() -> None:
    """Every loss, estimator, objective, aggregation, KL estimator and preset has its entry."""
    from rlhfkit.losses.policy import OBJECTIVES
    from rlhfkit.losses.preference import PREFERENCE_LOSSES
    from rlhfkit.recipes import reward_model
    from rlhfkit.recipes.policy_gradient.presets import ESTIMATORS, KL_SOURCES, PG_PRESETS, PGPreset

    aggregations = typing.get_args(typing.get_type_hints(PGPreset)["aggregation"])
    expected = {
        "reward_models.md": typing.get_args(reward_model.LossName),
        "direct_alignment.md": tuple(PREFERENCE_LOSSES),
        "policy.md": (*ESTIMATORS, *OBJECTIVES, *aggregations, *KL_SOURCES, *PG_PRESETS),
    }
    missing = [
        f"docs/methods/{page}: `{name}`"
        for page, names in expected.items()
        for name in names
        if f"`{name}`" not in (DOCS / "methods" / page).read_text(encoding="utf-8")
    ]
    assert not missing, "not documented:\n" + "\n".join(missing)


# -- (c) every internal link resolves ------------------------------------------------------------


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading (its default slugify)."""
    from markdown.extensions.toc import slugify

    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = re.sub(r"\{[^}]*\}\s*$", "", text)  # attribute lists
    text = text.replace("`", "").replace("*", "")
    return slugify(text, "-")


@functools.cache
def _anchors(page: Path) -> frozenset[str]:
    _, lines = _split_front_matter(page.read_text(encoding="utf-8"))
    anchors = set()
    for _, line, in_code in _joined_code_lines(lines):
        heading = None if in_code else HEADING.match(line)
        if heading:
            anchors.add(_slug(heading.group(2)))
            anchors |= set(re.findall(r"\{#([\w.-]+)\}", heading.group(2)))
    return frozenset(anchors)


def _object_exists(dotted: str) -> bool:
    """``rlhfkit.a.b.name`` names an importable module or a module attribute."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def _links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link outside code."""
    _, lines = _split_front_matter(page.read_text(encoding="utf-8"))
    out = []
    for number, line, in_code in _joined_code_lines(lines):
        if not in_code:
            prose = INLINE_CODE.sub(" ", line)
            out += [(number, m.group(1)) for m in LINK.finditer(prose)]
    return out


def _link_problem(page: Path, target: str) -> str | None:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):
        return None  # http:, https:, mailto: ...
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} missing"
    if path and page.is_relative_to(DOCS) and not dest.is_relative_to(DOCS):
        return f"{target}: leaves docs/ (the site would not contain it)"
    if not anchor:
        return None
    if dest.suffix != ".md":
        return f"{target}: an anchor into a file that is not a page"
    if anchor in _anchors(dest):
        return None
    if dest.parent.name == "api" and anchor.startswith("rlhfkit.") and _object_exists(anchor):
        return None
    return f"{target}: no heading with the anchor #{anchor} in {dest.relative_to(ROOT)}"


@pytest.mark.parametrize(
    "page", [*PAGES, ROOT / "README.md"], ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_internal_links_resolve(page: Path) -> None:
    bad = [
        f"{page.relative_to(ROOT)}:{line}: {problem}"
        for line, target in _links(page)
        if (problem := _link_problem(page, target)) is not None
    ]
    assert not bad, "\n".join(bad)


def test_link_check_rejects_broken_links() -> None:
    policy = DOCS / "methods" / "policy.md"
    assert _link_problem(policy, "sampling.md#best-of-n") is None
    assert _link_problem(policy, "#kl-estimators") is None
    assert _link_problem(policy, "../api/ops.md#rlhfkit.ops.kl.kl_k3") is None
    assert _link_problem(policy, "sampling.md#no-such-heading") is not None
    assert _link_problem(policy, "no_such_page.md") is not None
    assert _link_problem(policy, "../api/ops.md#rlhfkit.ops.kl.no_such_function") is not None
