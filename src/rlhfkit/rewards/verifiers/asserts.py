"""Assert tests, split so that their expected values never reach the program's process.

An assert such as ``assert abs(area(2.0) - 12.566) < 1e-3`` is split in the parent
(:func:`plan_assert_test`) into *probes*, the smallest parts that need the program
(``area(2.0)``), which the child evaluates and returns as plain data
(:mod:`rlhfkit.rewards.verifiers.harness`), and a *skeleton* the parent evaluates on those
values (``abs(_p0 - 12.566) < 1e-3``): the comparison, the expected value and the tolerance
stay in the parent. The split, from the top of the assert's expression down:

- a part that uses no name of the program is the test's own (judge side);
- comparisons, ``and``/``or``/``not``, arithmetic, conditional expressions, displays,
  f-strings and calls of *judge-side* functions are split into their operands;
- anything else that uses the program (a call of its function, an attribute or item of its
  value, a comprehension, a lambda) is a probe. A call of a judge-side function whose
  arguments all depend on the program (``len(stack)``, ``list(map(f, xs))``) is one probe
  too, since nothing of the test would be exposed by it.

Judge-side names are Python's builtins (except introspective ones such as ``getattr`` or
``eval``), standard-library modules used as ``module.attribute``, and names the test snippet
binds at its top level: standard-library imports, functions that only use judge-side names,
and variables assigned from judge-side expressions that no probe or statement of the program
side reads (``expected = [1, 2]`` stays in the parent; ``data = [3, 1]`` passed to the program
is sent). A builtin's name means the builtin even where the program defines one of that name
(in the child's test code too).

``def check(candidate): <asserts>`` followed by ``check(entry)`` (the HumanEval layout) is
inlined, so its asserts are split too. Other statements run in the child, in order, in the
test's own namespace; every comparison in the test code the child runs (an assert nested in a
loop, a comparison in a probe or a helper) is made on plain data, and so is an assert's truth
(see :mod:`~rlhfkit.rewards.verifiers.harness` for what that does not protect against).

The skeletons are evaluated by :func:`rlhfkit.rewards.verifiers.judge.judge`; a probe that
raised fails its assert only if the skeleton reads it (``f(1) or g(1)``).
"""

from __future__ import annotations

import ast
import builtins
import copy
import sys
from dataclasses import dataclass, field
from typing import Any

STDLIB = frozenset(sys.stdlib_module_names)
"""Standard-library module names: ``math.isclose`` in a test is the real one."""

_INTROSPECTIVE = {"getattr", "setattr", "delattr", "hasattr", "vars", "dir", "globals", "locals"}
_INTROSPECTIVE |= {"eval", "exec", "compile", "id", "hash", "callable", "iter", "next", "open"}
_INTROSPECTIVE |= {"input", "print", "breakpoint", "help", "memoryview", "super", "object"}
JUDGE_BUILTINS = frozenset(n for n in dir(builtins) if not n.startswith("_")) - _INTROSPECTIVE
"""Builtins a test's skeleton may call in the parent or judge (not the program's)."""

PROBE = "_rlhfkit_p"
"""Prefix of the placeholders that stand for probe values in a skeleton."""

_FUNCTION_ARGS = {"map": (0, None), "filter": (0, None), "sorted": (None, "key")}
_FUNCTION_ARGS |= {"min": (None, "key"), "max": (None, "key")}
_SPLIT = (ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.IfExp, ast.Tuple, ast.List)
_SPLIT += (ast.Set, ast.Dict, ast.Starred, ast.JoinedStr, ast.FormattedValue)


@dataclass
class Plan:
    """What the child runs for one assert test, and how the parent judges it."""

    steps: list[list[str]] = field(default_factory=list)
    """``["exec", statement]`` and ``["eval", probe]``, in order."""
    checks: list[ast.expr] = field(default_factory=list)
    """One skeleton per top-level assert."""
    probes: dict[str, int] = field(default_factory=dict)
    """Placeholder -> index of the step that evaluates it."""
    preamble: list[ast.stmt] = field(default_factory=list)
    """Judge-side statements of the snippet (imports, helpers, expected values), in order."""


def _bound_inside(node: ast.AST) -> set[str]:
    """Names bound by comprehensions and lambdas within ``node``."""
    names: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.comprehension):
            names |= {n.id for n in ast.walk(sub.target) if isinstance(n, ast.Name)}
        elif isinstance(sub, ast.arguments):
            every = sub.posonlyargs + sub.args + sub.kwonlyargs + [sub.vararg, sub.kwarg]
            names |= {a.arg for a in every if a is not None}
    return names


def _depends(
    node: ast.AST,
    judge: frozenset[str],
    bound: set[str] | None = None,
    ours: frozenset[str] = frozenset(),
) -> bool:
    """True when ``node`` uses a name of the program (not judge-side, not bound inside it).

    ``ours``: names the test binds in the child (a ``queue = [...]`` is not the module).
    """
    bound = _bound_inside(node) if bound is None else bound
    if isinstance(node, ast.Name):
        return node.id not in judge and node.id not in bound
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in STDLIB
        and node.value.id not in bound | ours
    ):
        return False  # math.isclose: the real one
    return any(_depends(child, judge, bound, ours) for child in ast.iter_child_nodes(node))


class _Splitter:
    """Splits assert expressions into skeletons and probes (numbered across one test)."""

    def __init__(self, judge: frozenset[str], ours: frozenset[str]) -> None:
        self.judge, self.ours = judge, ours
        self.probes: list[ast.expr] = []

    def depends(self, node: ast.AST) -> bool:
        return _depends(node, self.judge, ours=self.ours)

    def split(self, node: ast.expr) -> ast.expr:
        return self._visit(node)[0]

    def _probe(self, node: ast.expr) -> ast.expr:
        self.probes.append(node)
        return ast.Name(id=f"{PROBE}{len(self.probes) - 1}", ctx=ast.Load())

    def _visit(self, node: ast.expr) -> tuple[ast.expr, bool]:
        """(the node for the skeleton, whether it keeps a judge-side part)."""
        if not self.depends(node):
            return node, True
        is_call = isinstance(node, ast.Call) and not self.depends(node.func)
        if is_call and self._passes_a_function(node):
            return self._probe(node), False
        if not (is_call or isinstance(node, _SPLIT)):
            return self._probe(node), False
        start = len(self.probes)
        new, kept = self._visit_operands(node)
        if is_call and not kept:  # len(stack): nothing of the test to keep out of the child
            del self.probes[start:]
            return self._probe(node), False
        return new, kept

    def _visit_operands(self, node: ast.expr) -> tuple[ast.expr, bool]:
        """``node`` with each operand split (a call's function stays as it is)."""
        new, kept = copy.copy(node), False

        def visit(item: Any) -> Any:
            nonlocal kept
            if isinstance(item, ast.keyword):
                return ast.keyword(arg=item.arg, value=visit(item.value))
            if not isinstance(item, ast.expr):
                return item  # an operator, a None key of a dict display, ...
            child, leaf = self._visit(item)
            kept |= leaf
            return child

        for name, value in ast.iter_fields(node):
            if name != "func":
                setattr(
                    new,
                    name,
                    [visit(v) for v in value] if isinstance(value, list) else visit(value),
                )
        return new, kept

    def _passes_a_function(self, call: ast.Call) -> bool:
        """True for ``map(f, xs)``, ``sorted(xs, key=f)``...: a program function as argument."""
        if not isinstance(call.func, ast.Name) or call.func.id not in _FUNCTION_ARGS:
            return False
        position, keyword = _FUNCTION_ARGS[call.func.id]
        args = [call.args[position]] if position is not None and len(call.args) > position else []
        args += [k.value for k in call.keywords if k.arg == keyword]
        return any(self.depends(a) for a in args)


class _ChildCode(ast.NodeTransformer):
    """Test code the child runs (statements and probes), made to judge plain data only.

    ``a == b`` (any comparison) -> ``helper(('Eq',), (a, b))``, made on plain data (an object
    that fakes equality fails), and an assert's truth is taken on plain data (``helper(
    ('bool',), (x,))``).
    """

    def __init__(self, helper: str) -> None:
        self.helper = helper

    def call(self, ops: tuple[str, ...], operands: list[ast.expr]) -> ast.expr:
        return ast.Call(
            func=ast.Name(id=self.helper, ctx=ast.Load()),
            args=[ast.Constant(ops), ast.Tuple(elts=operands, ctx=ast.Load())],
            keywords=[],
        )

    def visit_Compare(self, node: ast.Compare) -> ast.expr:
        self.generic_visit(node)
        ops = tuple(type(op).__name__ for op in node.ops)
        return self.call(ops, [node.left, *node.comparators])

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        return ast.Assert(test=self.truth(node.test), msg=None)

    def truth(self, node: ast.expr) -> ast.expr:
        """An assert's test with its truth taken on plain data."""
        if isinstance(node, ast.BoolOp):
            return ast.BoolOp(op=node.op, values=[self.truth(v) for v in node.values])
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ast.UnaryOp(op=node.op, operand=self.truth(node.operand))
        if isinstance(node, ast.Compare):
            return self.visit(node)
        return self.call(("bool",), [self.visit(node)])


def _inline_checks(body: list[ast.stmt]) -> list[ast.stmt]:
    """``def check(candidate): ...`` + ``check(f)`` -> the body of check, with ``f``."""
    defs = {}
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef) and not stmt.decorator_list:
            a = stmt.args
            if len(a.args) == 1 and not (a.posonlyargs or a.kwonlyargs or a.vararg or a.kwarg):
                scope = [n for s in stmt.body for n in _walk_scope(s)]
                banned = (ast.Return, ast.Yield, ast.YieldFrom, ast.Global, ast.Nonlocal)
                param = a.args[0].arg
                stored = any(
                    isinstance(n, ast.Name) and n.id == param and not isinstance(n.ctx, ast.Load)
                    for n in scope
                )
                if not stored and not any(isinstance(n, banned) for n in scope):
                    defs[stmt.name] = stmt
    out, inlined = [], set()
    for stmt in body:
        call = stmt.value if isinstance(stmt, ast.Expr) else None
        if (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Name)
            and call.func.id in defs
            and len(call.args) == 1
            and not call.keywords
            and isinstance(call.args[0], ast.Name | ast.Attribute)
        ):
            fn, arg = defs[call.func.id], call.args[0]
            out += [_Rename(fn.args.args[0].arg, arg).visit(copy.deepcopy(s)) for s in fn.body]
            inlined.add(fn.name)
        else:
            out.append(stmt)
    loads = {n.id for s in out for n in ast.walk(s) if isinstance(n, ast.Name)}
    return [s for s in out if not (isinstance(s, ast.FunctionDef) and s.name in inlined - loads)]


def _walk_scope(node: ast.AST) -> list[ast.AST]:
    """Nodes of ``node`` outside nested functions, lambdas and classes."""
    out, todo = [], [node]
    while todo:
        current = todo.pop()
        out.append(current)
        if current is node or not isinstance(
            current, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef
        ):
            todo.extend(ast.iter_child_nodes(current))
    return out


class _Rename(ast.NodeTransformer):
    """Replaces loads of one name with an expression."""

    def __init__(self, name: str, value: ast.expr) -> None:
        self.name, self.value = name, value

    def visit_Name(self, node: ast.Name) -> ast.expr:
        if node.id == self.name and isinstance(node.ctx, ast.Load):
            return copy.deepcopy(self.value)
        return node


def stored_names(stmt: ast.stmt) -> set[str]:
    """Names a statement binds at its top level (not in functions or classes it defines)."""
    if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {stmt.name}
    if isinstance(stmt, ast.Import | ast.ImportFrom):
        return {(a.asname or a.name).split(".")[0] for a in stmt.names}
    return {
        n.id
        for n in _walk_scope(stmt)
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)
    }


def _stdlib_import(stmt: ast.stmt) -> bool:
    """``import math``, ``from math import isclose``: a standard-library import (no ``*``)."""
    if isinstance(stmt, ast.Import):
        roots = [a.name for a in stmt.names]
    elif isinstance(stmt, ast.ImportFrom):
        roots = [stmt.module or ""] if stmt.level == 0 else [""]
    else:
        return False
    star = any(a.name == "*" for a in stmt.names)
    return not star and all(r.split(".")[0] in STDLIB for r in roots)


def _pure_helper(stmt: ast.stmt, judge: frozenset[str]) -> bool:
    """A function of the test that uses judge-side names only and calls no parameter."""
    if not isinstance(stmt, ast.FunctionDef) or stmt.decorator_list:
        return False
    params = {a.arg for a in ast.walk(stmt.args) if isinstance(a, ast.arg)}
    calls = {
        n.func.id
        for n in ast.walk(stmt)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    local = {
        n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)
    }
    inner = frozenset(judge | {stmt.name} | params | local | _bound_inside(stmt))
    return not calls & params and not any(_depends(s, inner) for s in stmt.body)


def _judge_kind(stmt: ast.stmt, judge: frozenset[str]) -> str | None:
    """The kind of a judge-side statement ("import", "helper", "value"), else None."""
    if _stdlib_import(stmt):
        return "import"
    if _pure_helper(stmt, judge):
        return "helper"
    if (
        isinstance(stmt, ast.Assign)
        and len(stmt.targets) == 1
        and isinstance(stmt.targets[0], ast.Name)
        and not _depends(stmt.value, judge)
    ):
        return "value"
    return None


def _judge_statements(body: list[ast.stmt], ordinary: set[int]) -> dict[int, str]:
    """Statement index -> "import", "helper" or "value" for the judge-side ones.

    Statements in ``ordinary`` (values the program side reads) and names bound more than once
    are not judge-side.
    """
    counts: dict[str, int] = {}
    for stmt in body:
        for name in stored_names(stmt):
            counts[name] = counts.get(name, 0) + 1
    judge, kinds = JUDGE_BUILTINS, {}
    for i, stmt in enumerate(body):
        names = stored_names(stmt)
        if i in ordinary or any(counts[n] > 1 for n in names):
            continue
        kind = _judge_kind(stmt, judge)
        if kind is not None:
            kinds[i], judge = kind, judge | names
    return kinds


def _names(nodes: list[ast.AST]) -> set[str]:
    return {n.id for node in nodes for n in ast.walk(node) if isinstance(n, ast.Name)}


def _build(body: list[ast.stmt], kinds: dict[int, str], helper: str) -> tuple[Plan, set[str]]:
    """The plan for the given judge-side statements, and the names the child's code reads."""
    ordinary = [s for i, s in enumerate(body) if i not in kinds and not isinstance(s, ast.Assert)]
    ours = frozenset().union(*(stored_names(s) for s in ordinary))
    splitter = _Splitter(JUDGE_BUILTINS.union(*(stored_names(body[i]) for i in kinds)), ours)
    split = {}  # statement index -> (skeleton, its probes' numbers)
    for i, stmt in enumerate(body):
        if isinstance(stmt, ast.Assert):
            start = len(splitter.probes)
            split[i] = (splitter.split(stmt.test), range(start, len(splitter.probes)))
    reads = _names(ordinary + splitter.probes)
    sent = {i for i, kind in kinds.items() if kind == "import"}
    while helpers := {  # the test's helpers that child code calls go too, with what they read
        i
        for i, kind in kinds.items()
        if kind == "helper" and i not in sent and stored_names(body[i]) & reads
    }:
        sent |= helpers
        reads |= _names([body[i] for i in helpers])
    plan = Plan(preamble=[body[i] for i in sorted(kinds)])

    def child_code(node: ast.AST) -> str:
        return ast.unparse(_ChildCode(helper).visit(copy.deepcopy(node)))

    for i, stmt in enumerate(body):
        if i in split:
            skeleton, numbers = split[i]
            plan.checks.append(skeleton)
            for k in numbers:
                plan.probes[f"{PROBE}{k}"] = len(plan.steps)
                plan.steps.append(["eval", child_code(splitter.probes[k])])
        elif i not in kinds or i in sent:
            plan.steps.append(["exec", child_code(stmt)])
    return plan, reads


def plan_assert_test(snippet: str, helper: str) -> Plan:
    """Split a test snippet into the child's steps and the parent's checks.

    Args:
        snippet: Python statements; each top-level ``assert`` is a check.
        helper: Name under which the child's harness provides its plain-data comparison.

    Raises:
        SyntaxError: The snippet does not parse.
    """
    body = _inline_checks(ast.parse(snippet).body)
    ordinary: set[int] = set()
    while True:
        kinds = _judge_statements(body, ordinary)
        plan, reads = _build(body, kinds, helper)
        leaked = {
            i for i, kind in kinds.items() if kind == "value" and stored_names(body[i]) & reads
        }
        if not leaked:
            return plan
        ordinary |= leaked
