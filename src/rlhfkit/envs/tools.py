"""Tools built from plain Python functions, and the registry that runs a model's calls of them.

A :class:`Tool` is a function plus the JSON schema the model is shown.
:meth:`Tool.from_function` writes the schema from the function itself: the type hints give each
parameter's type, the Google-style docstring gives the tool's description (the text before the
first section) and each parameter's (its ``Args:`` entry), and a parameter without a default is
required. For ``def calculator(expression: str, precision: int = 6) -> str`` documented with
a summary line and an ``Args:`` entry per parameter, ``expression`` is a required string,
``precision`` an optional integer, and each carries its entry as its description.

Supported annotations: ``str``, ``int``, ``float``, ``bool``, ``list[X]``, ``dict[str, X]``,
``Literal[...]`` (an ``enum``) and ``X | None`` (``"type": [X, "null"]``), nested. Anything
else, a missing annotation, ``*args``/``**kwargs`` or a positional-only parameter raises
``TypeError`` naming the parameter: the model calls tools by keyword with JSON values, so a
schema must say exactly what it may send.

:meth:`ToolRegistry.call` runs one :class:`~rlhfkit.envs.calls.ToolCall` and never raises for
anything the model or the tool does: an unknown tool, arguments that do not match the schema
(:func:`~rlhfkit.envs.calls.validate_arguments`; the function is not called), an exception, a
return value that cannot be turned into text and a timeout all become a :class:`ToolResult`
with ``ok=False``, a machine-readable ``error`` and a ``content`` the model reads. The return
value is shown as text (a string as is, anything else as JSON, ``default=str``), cut to
``max_chars`` characters with a marker saying so.

Isolation (``ToolRegistry(isolation=...)``), a trade-off between safety and speed:

- ``"process"`` (the default): each call runs in a child forked from the calling process
  (``multiprocessing`` context ``fork``; the function, its closure and the arguments are
  inherited, nothing is pickled on the way in). The child starts a new session; on timeout the
  whole process group is killed (``SIGKILL``) and reaped, so a tool that hangs, sleeps, spins
  the CPU or starts subprocesses is really stopped, and a tool that crashes its interpreter or
  corrupts global state does not take the caller with it. The child turns the return value into
  the (already cut) text it sends back through a ``Pipe``, so any return value works and only
  ``max_chars`` characters cross. Costs: a fork per call (about a millisecond for a small
  process, more for a large one); changes a tool makes to its own module's state are lost with
  the child; and a child forked from a multi-threaded process (a tokenizer's or a data loader's
  threads) inherits locks other threads held at the fork: a tool that needs one of them hangs
  until the timeout. A tool must not use CUDA in the child. Fork is POSIX-only.
- ``"inline"``: the function runs in the calling thread. No fork, no timeout (``timeout`` is
  ignored), state changes persist; for cheap, trusted tools (a calculator on parsed input) and
  for speed. A hung tool hangs the caller.

Neither mode is a sandbox: the child has the caller's permissions, files and network. Run
model-written code with :mod:`rlhfkit.rewards.verifiers.sandbox`'s approach instead.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import multiprocessing
import os
import re
import signal
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

from rlhfkit.envs.calls import ToolCall, validate_arguments
from rlhfkit.errors import ConfigError

ErrorKind = Literal["unknown_tool", "bad_arguments", "raised", "timeout"]
"""Why a call failed (:attr:`ToolResult.error`)."""

Isolation = Literal["process", "inline"]
"""Where a tool runs: a forked child process, or the calling thread."""

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A tool name (the names chat APIs accept)."""

# --- schemas from annotations ----------------------------------------------------------------

_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _literal_schema(values: tuple[Any, ...]) -> dict[str, Any]:
    """The schema of ``Literal[values]``: an ``enum``, typed when its values share one type."""
    names = []
    for value in values:
        if value is not None and type(value) not in _SCALARS:
            raise TypeError(f"Literal values must be str, int, float, bool or None, got {value!r}")
        name = "null" if value is None else _SCALARS[type(value)]
        if name not in names:
            names.append(name)
    concrete = [name for name in names if name != "null"]
    schema: dict[str, Any] = {}
    if len(concrete) == 1:
        schema["type"] = names[0] if len(names) == 1 else [concrete[0], "null"]
    schema["enum"] = list(values)
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` that also accepts null (``X | None``)."""
    out = dict(schema)
    if "type" in out:
        kinds = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = kinds if "null" in kinds else [*kinds, "null"]
    if "enum" in out and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    return out


def annotation_schema(annotation: Any) -> dict[str, Any]:
    """The JSON schema of a parameter's type annotation.

    Args:
        annotation: A resolved annotation (``typing.get_type_hints``).

    Returns:
        A JSON schema (``{"type": "array", "items": {"type": "integer"}}``).

    Raises:
        TypeError: An annotation outside the supported set.
    """
    if isinstance(annotation, type) and annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return _literal_schema(args)
    if origin in (typing.Union, types.UnionType):
        others = [arg for arg in args if arg is not type(None)]
        if len(others) != 1 or len(others) == len(args):
            raise TypeError(f"unsupported annotation {annotation} (only X | None unions)")
        return _nullable(annotation_schema(others[0]))
    if annotation is list or origin is list:
        return {"type": "array", **({"items": annotation_schema(args[0])} if args else {})}
    if annotation is dict or origin is dict:
        if args and args[0] is not str:
            raise TypeError(f"unsupported annotation {annotation} (dict keys must be str)")
        return {
            "type": "object",
            **({"additionalProperties": annotation_schema(args[1])} if args else {}),
        }
    name = getattr(annotation, "__name__", None) or str(annotation)
    raise TypeError(f"unsupported annotation {name}")


# --- docstrings ------------------------------------------------------------------------------

_SECTION = re.compile(
    r"(Args|Arguments|Parameters|Params|Returns?|Yields?|Raises|Examples?|Notes?|Attributes|"
    r"Warnings?|See Also|Todo|References):\s*"
)
_ENTRY = re.compile(r"\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")
_ARGS_SECTIONS = ("Args", "Arguments", "Parameters", "Params")


def _sections(doc: str) -> tuple[list[str], dict[str, list[str]]]:
    """The lines before the first section header, and each section's lines by its name.

    A section runs until the next header or the next unindented line (which is dropped).
    """
    head: list[str] = []
    sections: dict[str, list[str]] = {}
    current: list[str] | None = head
    for line in inspect.cleandoc(doc).splitlines():
        if match := _SECTION.fullmatch(line):
            current = sections.setdefault(match.group(1), [])
        elif current is not head and line.strip() and not line[0].isspace():
            current = None
        elif current is not None:
            current.append(line)
    return head, sections


def _paragraphs(lines: list[str]) -> str:
    """Lines joined into paragraphs: one line each, separated by a blank line."""
    text = "\n".join(line.strip() for line in lines).strip()
    return "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip())


def _argument_docs(lines: list[str]) -> dict[str, str]:
    """Each argument's description in an ``Args:`` section (``name (type): text`` entries)."""
    entries: dict[str, list[str]] = {}
    indent: int | None = None
    name: str | None = None
    for line in lines:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        indent = width if indent is None else indent
        match = _ENTRY.fullmatch(line.strip()) if width <= indent else None
        if match:
            name = match.group(1)
            entries[name] = [match.group(2)]
        elif name is not None:
            entries[name].append(line.strip())
    return {key: " ".join(" ".join(parts).split()) for key, parts in entries.items()}


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """The description and the argument descriptions of a Google-style docstring.

    Args:
        doc: A docstring, or None.

    Returns:
        (the text before the first section, its paragraphs each on one line; {argument name:
        its ``Args:`` entry on one line}).
    """
    head, sections = _sections(doc or "")
    args: dict[str, str] = {}
    for section in _ARGS_SECTIONS:
        args.update(_argument_docs(sections.get(section, [])))
    return _paragraphs(head), args


# --- tools -----------------------------------------------------------------------------------


def _parameter_schema(
    param: inspect.Parameter, hints: dict[str, Any], docs: dict[str, str], where: str
) -> dict[str, Any]:
    """The schema of one parameter (``where`` names it in errors)."""
    if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
        raise TypeError(f"{where}: *args and **kwargs are not supported (name every argument)")
    if param.kind is param.POSITIONAL_ONLY:
        raise TypeError(f"{where} is positional-only; tools are called by keyword")
    if param.name not in hints:
        raise TypeError(f"{where} has no type annotation")
    try:
        schema = annotation_schema(hints[param.name])
    except TypeError as e:
        raise TypeError(f"{where}: {e}") from None
    if docs.get(param.name):
        schema["description"] = docs[param.name]
    return schema


def parameters_schema(fn: Callable[..., Any], docs: dict[str, str], name: str) -> dict[str, Any]:
    """The ``parameters`` object schema of a function.

    Args:
        fn: The function.
        docs: Descriptions of its parameters by name.
        name: The tool's name, for error messages.

    Returns:
        ``{"type": "object", "properties", "required", "additionalProperties": False}``.

    Raises:
        TypeError: A parameter that cannot be described (see the module docstring).
    """
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # an unresolvable forward reference, a non-function
        raise TypeError(f"tool {name!r}: cannot resolve the type hints ({e})") from e
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in inspect.signature(fn).parameters.values():
        where = f"parameter {param.name!r} of tool {name!r}"
        properties[param.name] = _parameter_schema(param, hints, docs, where)
        if param.default is param.empty:
            required.append(param.name)
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


@dataclass(frozen=True)
class Tool:
    """A function the model can call, with the schema it is shown."""

    name: str
    description: str
    parameters: dict[str, Any]
    """JSON schema of the arguments: ``{"type": "object", "properties", "required", ...}``."""
    fn: Callable[..., Any]

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None) -> Tool:
        """A tool from a function's signature, type hints and Google-style docstring.

        Args:
            fn: The function; the model calls it with keyword arguments.
            name: The tool's name (default: the function's ``__name__``).

        Returns:
            The tool.

        Raises:
            TypeError: A parameter without a supported annotation, ``*args`` or ``**kwargs``.
            ValueError: A name that is not 1-64 letters, digits, ``_`` or ``-`` (a lambda's).
        """
        tool_name = name if name is not None else getattr(fn, "__name__", "")
        if not _NAME.fullmatch(tool_name):
            raise ValueError(
                f"tool name {tool_name!r} must be 1-64 letters, digits, '_' or '-'; pass name="
            )
        description, docs = parse_docstring(inspect.getdoc(fn))
        return cls(tool_name, description, parameters_schema(fn, docs, tool_name), fn)

    def schema(self) -> dict[str, Any]:
        """The OpenAI-style schema ``{"type": "function", "function": {...}}`` (a copy)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": copy.deepcopy(self.parameters),
            },
        }


@dataclass
class ToolResult:
    """The outcome of one call."""

    content: str
    """What the model sees: the return value as text, or the error message."""
    ok: bool
    error: ErrorKind | None = None
    """None, or why the call failed: unknown_tool, bad_arguments, raised, timeout."""
    seconds: float = 0.0
    """Wall-clock seconds the tool ran (0 when it was not called)."""
    truncated: bool = False
    """True when ``content`` was cut to ``max_chars``."""


# --- running ---------------------------------------------------------------------------------

_Outcome = tuple[ErrorKind | None, str, bool]
"""(error kind or None, content, truncated)."""


def output_text(value: Any) -> str:
    """A return value as the model sees it: a string as is, anything else as JSON.

    Raises:
        ValueError: A value JSON cannot hold (a circular reference).
    """
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


def truncate(text: str, max_chars: int) -> tuple[str, bool]:
    """``text`` cut to ``max_chars`` characters plus a marker saying so, and whether it was cut."""
    if len(text) <= max_chars:
        return text, False
    marker = f"\n[... output truncated: {len(text)} characters, showing the first {max_chars}]"
    return text[:max_chars] + marker, True


def _describe(error: BaseException) -> str:
    """``ZeroDivisionError: division by zero`` (the type alone when the message is empty)."""
    try:
        message = str(error)
    except Exception:
        message = ""
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _invoke(fn: Callable[..., Any], arguments: dict[str, Any], max_chars: int) -> _Outcome:
    """Call ``fn`` and turn what happens into an outcome (in the caller or the child)."""
    try:
        value = fn(**arguments)
    except (Exception, SystemExit) as e:
        return ("raised", *truncate(f"error: {_describe(e)}", max_chars))
    try:
        text = output_text(value)
    except Exception as e:
        reason = f"error: the tool's return value cannot be shown as text ({_describe(e)})"
        return ("raised", *truncate(reason, max_chars))
    return (None, *truncate(text, max_chars))


def _child(
    fn: Callable[..., Any], arguments: dict[str, Any], max_chars: int, conn: Connection
) -> None:
    """The forked child: a new session (so its group can be killed), the call, the outcome."""
    with contextlib.suppress(OSError):
        os.setsid()
    try:
        outcome = _invoke(fn, arguments, max_chars)
    except BaseException as e:  # KeyboardInterrupt, GeneratorExit: still an outcome
        outcome = ("raised", f"error: {_describe(e)}", False)
    conn.send(outcome)
    conn.close()


def _stop(proc: multiprocessing.process.BaseProcess) -> None:
    """Kill the child's process group (stragglers included) and reap the child."""
    if proc.pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # no such group before the child's setsid
    proc.kill()
    proc.join()


def _receive(
    conn: Connection, proc: multiprocessing.process.BaseProcess, timeout: float
) -> _Outcome:
    """The child's outcome, or a timeout or crash outcome."""
    if not conn.poll(timeout):
        return "timeout", f"error: the tool did not finish within {float(timeout)} s", False
    try:
        return conn.recv()
    except (EOFError, OSError):  # the child died without sending (os._exit, a crash, OOM)
        proc.join(1.0)
        code = proc.exitcode
        return (
            "raised",
            f"error: the tool's process ended without a result (exit code {code})",
            False,
        )


def run_in_process(
    fn: Callable[..., Any], arguments: dict[str, Any], timeout: float, max_chars: int
) -> _Outcome:
    """Call ``fn`` in a forked child, killed (with its process group) after ``timeout`` seconds.

    Args:
        fn: The function.
        arguments: Its keyword arguments.
        timeout: Wall-clock seconds before the child is killed.
        max_chars: Characters of output kept (cut in the child).

    Returns:
        (error kind or None, content, truncated).
    """
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, arguments, max_chars, writer), daemon=False)
    try:
        proc.start()
        writer.close()  # the child holds the only write end: EOF if it dies
        return _receive(reader, proc, timeout)
    finally:
        writer.close()
        reader.close()
        _stop(proc)


class ToolRegistry:
    """The tools of an environment by name, and running calls of them.

    Args:
        tools: Tools, or functions made into tools with :meth:`Tool.from_function`.
        isolation: ``"process"`` (each call in a forked child with a timeout) or ``"inline"``
            (in the calling thread, no timeout); see the module docstring.

    Raises:
        ConfigError: An unknown ``isolation``.
    """

    def __init__(
        self, tools: Iterable[Tool | Callable[..., Any]] = (), *, isolation: Isolation = "process"
    ) -> None:
        if isolation not in typing.get_args(Isolation):
            raise ConfigError(f"unknown tool isolation {isolation!r}; choose process or inline")
        self.isolation = isolation
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool | Callable[..., Any]) -> Tool:
        """Register a tool (a function is made into one).

        Args:
            tool: A tool, or a function for :meth:`Tool.from_function`.

        Returns:
            The registered tool.

        Raises:
            ValueError: A tool of that name is already registered.
        """
        if not isinstance(tool, Tool):
            tool = Tool.from_function(tool)
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    @property
    def names(self) -> list[str]:
        """The tools' names, in the order they were added."""
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        """The tools' OpenAI-style schemas, in the order they were added."""
        return [tool.schema() for tool in self._tools.values()]

    def call(self, call: ToolCall, *, timeout: float = 5.0, max_chars: int = 2000) -> ToolResult:
        """Run one call; never raises for anything the model or the tool does.

        Args:
            call: The call (its ``id`` is not used).
            timeout: Seconds the tool may run (``process`` isolation only).
            max_chars: Characters of the tool's output (or error message) the model sees.

        Returns:
            The result; ``ok=False`` with ``error`` set on an unknown tool, bad arguments, an
            exception (or a return value that cannot be shown as text) or a timeout.

        Raises:
            ValueError: ``timeout`` <= 0 or ``max_chars`` < 1.
        """
        if timeout <= 0 or max_chars < 1:
            raise ValueError(f"need timeout > 0 and max_chars >= 1, got {timeout}, {max_chars}")
        tool = self._tools.get(call.name)
        if tool is None:
            available = ", ".join(self._tools) or "none"
            content = f"error: no tool named {call.name!r}; available: {available}"
            return ToolResult(content, ok=False, error="unknown_tool")
        reason = validate_arguments(call.arguments, tool.parameters)
        if reason is not None:
            content = f"error: bad arguments for {tool.name!r}: {reason}"
            return ToolResult(content, ok=False, error="bad_arguments")
        start = time.perf_counter()
        if self.isolation == "inline":
            error, content, truncated = _invoke(tool.fn, dict(call.arguments), max_chars)
        else:
            error, content, truncated = run_in_process(
                tool.fn, dict(call.arguments), timeout, max_chars
            )
        return ToolResult(
            content,
            ok=error is None,
            error=error,
            seconds=time.perf_counter() - start,
            truncated=truncated,
        )
