"""Reading the harness's records and judging them in the parent (the code verifier).

:func:`read_records` accepts a channel only as a whole (every line carrying the run's nonce,
one record per step, the end marker); :func:`decode` rebuilds a value from its tagged JSON
using builtin types only; :func:`judge` evaluates an assert test's skeletons on the decoded
values: in the parent when a skeleton uses only comparisons, boolean operators, number
arithmetic and a few builtins (nothing that runs code or takes unbounded time), else in a
judge process, sandboxed like the program but running only the test's code on plain data
(its source goes through stdin, never into a file another sandboxed program could read). The
wire format and what the child sends are described in
:mod:`rlhfkit.rewards.verifiers.harness`; the split of asserts in
:mod:`rlhfkit.rewards.verifiers.asserts`.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import json
import math
import operator
from typing import Any

from rlhfkit.rewards.verifiers.asserts import STDLIB, Plan, stored_names
from rlhfkit.rewards.verifiers.harness import MAX_DEPTH, MAX_ITEMS
from rlhfkit.rewards.verifiers.sandbox import SandboxLimits, run_python


def _pairs(items: list[Any]) -> dict[Any, Any]:
    if len(items) % 2:
        raise ValueError("a dict needs key, value pairs")
    return dict(zip(items[::2], items[1::2], strict=True))


def _range(items: list[Any]) -> range:
    if len(items) != 3 or any(type(i) is not int for i in items):
        raise ValueError("a range needs three ints")
    return range(*items)


def _complex(items: list[Any]) -> complex:
    if len(items) != 2 or any(type(i) is not float for i in items):
        raise ValueError("a complex needs two floats")
    return complex(*items)


def _text(rest: list[Any]) -> str:
    if len(rest) != 1 or type(rest[0]) is not str:
        raise ValueError("expected one string")
    return rest[0]


def _special_float(rest: list[Any]) -> float:
    if rest not in (["inf"], ["-inf"], ["nan"]):
        raise ValueError("not a special float")
    return float(rest[0])


_BUILT = {"L": list, "T": tuple, "S": set, "Z": frozenset, "I": iter, "D": _pairs, "R": _range}
_BUILT["C"] = _complex
"""Tag -> constructor from the decoded items."""
_RAW = {"B": lambda rest: bytes.fromhex(_text(rest)), "N": lambda rest: int(_text(rest), 16)}
_RAW["F"] = _special_float
"""Tag -> constructor from the raw JSON items."""


def _decode(tree: Any, depth: int) -> Any:
    """One value of a record, from its parsed JSON; ValueError/TypeError when malformed."""
    if tree is None or type(tree) in (bool, int, float, str):
        return tree
    if type(tree) is not list or not tree or type(tree[0]) is not str or depth > MAX_DEPTH + 2:
        raise ValueError("malformed value")
    tag, rest = tree[0], tree[1:]
    if len(rest) > MAX_ITEMS * 2:
        raise ValueError("value too long")
    if tag in _BUILT:
        return _BUILT[tag]([_decode(item, depth + 1) for item in rest])
    if tag in _RAW:
        return _RAW[tag](rest)
    raise ValueError(f"malformed value tagged {tag!r}")


def decode(tree: Any) -> Any:
    """A probe's value from its record's parsed JSON (builtin objects only).

    Raises:
        ValueError: A malformed value (the step then counts as failed).
    """
    try:
        return _decode(tree, 0)
    except (TypeError, RecursionError) as err:  # unhashable set members / dict keys, nesting
        raise ValueError(f"malformed value: {err}") from None


def read_records(channel: str, steps: int, nonce: str) -> list[tuple[bool, Any]] | None:
    """Per-step ``(ok, parsed JSON value)`` from the channel text, or None if incomplete.

    Every line must start with the run's ``nonce``; exactly ``["program", "ok"]``, one record
    per step in order and ``["end", steps]`` must be there; anything else (a missing, extra,
    repeated or malformed line) gives None.
    """
    lines = channel.split("\n")
    if len(lines) != steps + 3 or lines[-1] != "":
        return None
    prefix = nonce + " "
    if not nonce or not all(line.startswith(prefix) for line in lines[:-1]):
        return None
    try:
        parsed = [json.loads(line[len(prefix) :]) for line in lines[:-1]]
    except (ValueError, RecursionError):
        return None
    if parsed[0] != ["program", "ok"] or parsed[-1] != ["end", steps]:
        return None
    out = []
    for index, record in enumerate(parsed[1:-1]):
        if type(record) is not list or len(record) != 3 or type(record[0]) is not int:
            return None
        if record[0] != index or record[1] not in ("ok", "error"):
            return None
        out.append((record[1] == "ok", record[2]))
    return out


def _int_source(value: int) -> str:
    return f"({value!r})" if value.bit_length() <= 13000 else f"int({hex(value)!r}, 16)"


def _float_source(value: float) -> str:
    return f"({value!r})" if math.isfinite(value) else f"float({repr(value)!r})"


_LIST_ITERATOR = type(iter([]))
_ATOMS = {type(None): repr, bool: repr, str: repr, bytes: repr, range: repr, int: _int_source}
_ATOMS |= {float: _float_source}
_WRAPS = {
    list: ("[", "]", "[]"),
    tuple: ("(", ",)", "()"),
    set: ("{", "}", "set()"),
    frozenset: ("frozenset([", "])", "frozenset()"),
    _LIST_ITERATOR: ("iter([", "])", "iter([])"),
}
"""Type -> (opening, closing, empty) of its source."""


def literal_source(value: Any) -> str:
    """Python source that rebuilds the plain ``value`` with builtins only.

    Raises:
        TypeError: A value that is not plain data.
    """
    kind = type(value)
    if kind in _ATOMS:
        return _ATOMS[kind](value)
    if kind is complex:
        return f"complex({_float_source(value.real)}, {_float_source(value.imag)})"
    if kind is dict:
        items = (f"{literal_source(k)}: {literal_source(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if kind in _WRAPS:
        opening, closing, empty = _WRAPS[kind]
        parts = [literal_source(item) for item in value]
        return opening + ", ".join(parts) + closing if parts else empty
    raise TypeError(f"not plain data: {kind.__name__}")


class _Slow(Exception):
    """A skeleton the parent does not evaluate itself (the judge process does)."""


class _ProbeFailed(Exception):
    """A skeleton read the value of a probe that raised in the child."""


_FAILED = object()
_SLOW = object()
_OPS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Is, ast.IsNot)
_FUNCS = (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge)
_COMPARE = dict(zip(_OPS, (*_FUNCS, operator.is_, operator.is_not), strict=True))
_COMPARE |= {ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
_BINARY = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod)
_NUMERIC = (operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv)
_ARITHMETIC = dict(zip(_BINARY, (*_NUMERIC, operator.mod), strict=True))
_FAST = "abs all any bool bytes complex dict float frozenset int isinstance len list max min"
_FAST_NAMES = {n: getattr(builtins, n) for n in (_FAST + " set sorted str sum tuple").split()}
"""Builtins the parent calls itself on plain values (bounded work; no code of anyone's)."""
_FAST_KEYWORDS = {"isclose": {"rel_tol", "abs_tol"}, "sorted": {"reverse"}}


def _fast(node: ast.expr, env: dict[str, Any]) -> Any:
    """Evaluate a skeleton on plain data in the parent, or raise _Slow.

    Only comparisons, boolean operators, number arithmetic and a few builtins on plain
    values: nothing here runs code of the program or the test, or can take unbounded time.
    ``env`` maps placeholders (and the test's literal values) to values; _FAILED: the probe
    raised; _SLOW: a name only the judge process knows.
    """
    handler = _HANDLERS.get(type(node))
    if handler is None:
        raise _Slow
    return handler(node, env)


def _name(node: ast.Name, env: dict[str, Any]) -> Any:
    value = env.get(node.id, _FAST_NAMES.get(node.id, _SLOW))
    if value is _SLOW:
        raise _Slow
    if value is _FAILED:
        raise _ProbeFailed(node.id)
    return value


def _display(node: ast.Tuple | ast.List | ast.Set, env: dict[str, Any]) -> Any:
    if any(isinstance(e, ast.Starred) for e in node.elts):
        raise _Slow
    items = [_fast(e, env) for e in node.elts]
    return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](items)


def _dict(node: ast.Dict, env: dict[str, Any]) -> Any:
    if None in node.keys:
        raise _Slow
    return {_fast(k, env): _fast(v, env) for k, v in zip(node.keys, node.values, strict=True)}


def _bool_op(node: ast.BoolOp, env: dict[str, Any]) -> Any:
    for value in node.values:
        result = _fast(value, env)
        if bool(result) == isinstance(node.op, ast.Or):
            return result
    return result


def _unary(node: ast.UnaryOp, env: dict[str, Any]) -> Any:
    value = _fast(node.operand, env)
    if isinstance(node.op, ast.Not):
        return not value
    if isinstance(node.op, ast.USub | ast.UAdd) and type(value) in (int, float, bool):
        return -value if isinstance(node.op, ast.USub) else +value
    raise _Slow


def _compare(node: ast.Compare, env: dict[str, Any]) -> bool:
    left = _fast(node.left, env)
    for op, right_node in zip(node.ops, node.comparators, strict=True):
        right = _fast(right_node, env)
        if not _COMPARE[type(op)](left, right):
            return False
        left = right
    return True


def _arithmetic(node: ast.BinOp, env: dict[str, Any]) -> Any:
    if type(node.op) not in _ARITHMETIC:
        raise _Slow
    left, right = _fast(node.left, env), _fast(node.right, env)
    numbers = all(type(v) in (int, float, bool) for v in (left, right))
    small = all(type(v) is not int or v.bit_length() < 4096 for v in (left, right))
    if not (numbers and small):
        raise _Slow  # "ab" * n, [0] * n, big products: the judge process, under its limits
    return _ARITHMETIC[type(node.op)](left, right)


def _fast_call(node: ast.Call, env: dict[str, Any]) -> Any:
    """A call of a whitelisted builtin (or ``math.isclose``) in a skeleton."""
    func = node.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        if (func.value.id, func.attr) != ("math", "isclose") or func.value.id in env:
            raise _Slow
        fn, name = math.isclose, "isclose"
    elif isinstance(func, ast.Name) and func.id in _FAST_NAMES and func.id not in env:
        fn, name = _FAST_NAMES[func.id], func.id
    else:
        raise _Slow
    if any(isinstance(a, ast.Starred) for a in node.args):
        raise _Slow
    if any(k.arg not in _FAST_KEYWORDS.get(name, ()) for k in node.keywords):
        raise _Slow
    if name in ("int", "str", "sum", "bytes") and len(node.args) != 1:
        raise _Slow  # int(x, base), str(b, encoding), sum(xs, start), bytes(n): slow path
    args = [_fast(a, env) for a in node.args]
    if name == "bytes" and type(args[0]) is int:
        raise _Slow
    return fn(*args, **{k.arg: _fast(k.value, env) for k in node.keywords})


_HANDLERS: dict[type, Any] = {
    ast.Constant: lambda node, env: node.value,
    ast.Name: _name,
    ast.Tuple: _display,
    ast.List: _display,
    ast.Set: _display,
    ast.Dict: _dict,
    ast.BoolOp: _bool_op,
    ast.UnaryOp: _unary,
    ast.Compare: _compare,
    ast.BinOp: _arithmetic,
    ast.IfExp: lambda node, env: _fast(node.body if _fast(node.test, env) else node.orelse, env),
    ast.Call: _fast_call,
}


def _judge_source(plan: Plan, checks: list[ast.expr], values: dict[str, Any]) -> str:
    """The judge program: the snippet's judge-side statements, the values, the checks."""
    modules = sorted(
        {
            n.value.id
            for c in checks
            for n in ast.walk(c)
            if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name)
            and n.value.id in STDLIB
        }
    )
    lines = [f"try:\n    import {m}\nexcept Exception:\n    pass" for m in modules]
    lines += [ast.unparse(stmt) for stmt in plan.preamble]
    failed = sorted(name for name, value in values.items() if value is _FAILED)
    literals = ", ".join(
        f"{name!r}: {literal_source(value)}"
        for name, value in values.items()
        if value is not _FAILED
    )
    lines += [
        "class _ProbeFailed(Exception):\n    pass",
        f"class _Probes(dict):\n    def __missing__(self, key):\n"
        f"        if key in {failed!r}:\n            raise _ProbeFailed(key)\n"
        f"        raise KeyError(key)",
        f"_values = _Probes({{{literals}}})",
        f"_ok = all(eval(c, globals(), _values) for c in {[ast.unparse(c) for c in checks]!r})",
        'print("rlhfkit-judge:" + ("pass" if _ok else "fail"))',
    ]
    return "\n".join(lines) + "\n"


def _probe_values(
    plan: Plan, outcomes: list[tuple[bool, Any]], names: set[str] | None = None
) -> dict[str, Any]:
    """Placeholder -> decoded value (_FAILED: the probe raised), for ``names`` (None: all).

    Decoded afresh on each call: an iterator can be consumed once.
    """
    values = {}
    for name, step in plan.probes.items():
        if names is not None and name not in names:
            continue
        ok, tree = outcomes[step]
        try:
            values[name] = decode(tree) if ok else _FAILED
        except ValueError:
            values[name] = _FAILED
    return values


def _environment(plan: Plan, outcomes: list[tuple[bool, Any]]) -> dict[str, Any]:
    """The fast path's names: placeholders, the test's literal values, its other names.

    A name the test binds to anything but a literal maps to _SLOW (only the judge process has
    it).
    """
    env: dict[str, Any] = {}
    for stmt in plan.preamble:
        if isinstance(stmt, ast.Import) and all(a.asname is None for a in stmt.names):
            continue  # import math: the module the fast path's math.isclose comes from
        for name in stored_names(stmt):
            env[name] = _SLOW
        if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name):
            with contextlib.suppress(ValueError, TypeError, SyntaxError, RecursionError):
                env[stmt.targets[0].id] = ast.literal_eval(stmt.value)
    return env | _probe_values(plan, outcomes)


def judge(plan: Plan, outcomes: list[tuple[bool, Any]], timeout: float) -> bool:
    """True when every statement ran and every check of ``plan`` holds.

    Args:
        plan: The test's plan.
        outcomes: ``(ok, value)`` per step, from the child's records.
        timeout: Wall-clock seconds for the judge process (when one is needed).
    """
    if len(outcomes) != len(plan.steps):
        return False
    for (kind, _), (ok, _) in zip(plan.steps, outcomes, strict=True):
        if kind == "exec" and not ok:
            return False
    env = _environment(plan, outcomes)
    slow = []
    for check in plan.checks:
        try:
            if not _fast(check, env):
                return False
        except _Slow:
            slow.append(check)
        except Exception:  # a probe that raised, a TypeError of the test's own operation, ...
            return False
    if not slow:
        return True
    # Only the values the slow checks read; the fast path may have consumed an iterator.
    names = {n.id for c in slow for n in ast.walk(c) if isinstance(n, ast.Name)}
    values = _probe_values(plan, outcomes, names)
    source = "import sys\nexec(compile(sys.stdin.read(), 'judge', 'exec'))\n"
    result = run_python(
        source, stdin=_judge_source(plan, slow, values), limits=SandboxLimits(timeout=timeout)
    )
    return result.status == "ok" and result.stdout.rstrip().endswith("rlhfkit-judge:pass")
