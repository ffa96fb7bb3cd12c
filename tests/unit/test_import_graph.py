"""rlhfkit's modules import one another without cycles.

Every import statement counts: at module level, inside functions and under ``TYPE_CHECKING``.
A function-level import does not fail at import time, but a cycle through one still means two
modules each need the other, which is what the layering rules out. ``from X import Y`` depends
on the module ``X.Y`` when ``Y`` is a submodule, else on ``X``; importing a package depends on
its ``__init__``. So a submodule that imports a name from its package's ``__init__``, which in
turn imports that submodule, is a cycle too.
"""

from __future__ import annotations

import ast
from itertools import pairwise
from pathlib import Path

import rlhfkit

SRC = Path(rlhfkit.__file__).resolve().parent.parent
"""The directory holding the ``rlhfkit`` package."""


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package ``__init__``), for every module of rlhfkit."""
    out = {}
    for path in sorted((SRC / "rlhfkit").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = (path, is_package)
    return out


def _base(name: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The module an ``ImportFrom`` names (relative imports resolved against ``name``)."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if is_package else name.split(".")[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def _imports(name: str, path: Path, is_package: bool, modules: set[str]) -> dict[str, int]:
    """The rlhfkit modules ``name`` imports anywhere in its file -> first line of each."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(name, is_package, node)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        for target in targets:
            if target in modules and target != name:
                found.setdefault(target, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """Module -> {imported rlhfkit module: line of the first import of it}."""
    modules = _modules()
    return {
        name: _imports(name, path, is_package, set(modules))
        for name, (path, is_package) in modules.items()
    }


def _reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    """The modules ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each group of modules that import one another."""
    reach = {v: _reachable(graph, v) for v in graph}
    cycles: list[list[str]] = []
    covered: set[str] = set()
    for v in sorted(graph):
        if v in reach[v] and v not in covered:
            group = {w for w in reach[v] if v in reach[w]}
            covered |= group
            cycles.append(_cycle_in(graph, group))
    return cycles


def _cycle_in(graph: dict[str, dict[str, int]], group: set[str]) -> list[str]:
    """A shortest cycle through the group's first module (breadth-first, inside the group)."""
    start = min(group)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:  # v != start: the graph has no self-loops
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w in group and w not in parents:
                    parents[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def _describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]}) -> {b}" for a, b in pairwise(cycle)]
    return "\n  ".join(steps)


def test_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "rlhfkit.cli" in graph and "rlhfkit.data" in graph  # modules and packages
    # inside a function (run_report imports the report module when the stage runs)
    assert "rlhfkit.eval.report" in graph["rlhfkit.pipeline.run"]
    # `from rlhfkit.data.tasks import arithmetic` names the submodule, not the package
    assert "rlhfkit.data.tasks.arithmetic" in graph["rlhfkit.data.tasks"]
    # `from rlhfkit.rewards import load_reward_fn` names the package's __init__
    assert "rlhfkit.rewards" in graph["rlhfkit.eval.run"]


def test_find_cycles_reports_the_path() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among rlhfkit modules:\n" + "\n".join(
        f"- {' -> '.join(c)}\n  {_describe(graph, c)}" for c in cycles
    )
