"""Tools from functions and the registry that runs them (rlhfkit.envs.tools)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import time
from pathlib import Path
from typing import Literal

import pytest

from rlhfkit.envs.calls import ToolCall
from rlhfkit.envs.tools import Tool, ToolRegistry, ToolResult, parse_docstring
from rlhfkit.errors import ConfigError


def search(
    query: str,
    limit: int,
    scale: float = 1.0,
    exact: bool = False,
    tags: list[str] | None = None,
    weights: dict[str, float] | None = None,
    order: Literal["asc", "desc"] = "asc",
    grid: list[list[int]] | None = None,
) -> list[str]:
    """Search the notes.

    Finds notes whose text matches
    the query.

    Args:
        query: Text to look for.
        limit: Most results
            to return.
        scale (float): Score multiplier.
        exact: Match whole words only.
        tags: Only notes with one of these tags.
        weights: Weight per field.
        order: Sort order.

    Returns:
        The matching note ids.
    """
    return []


SEARCH_PARAMETERS = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "description": "Text to look for."},
        "limit": {"type": "integer", "description": "Most results to return."},
        "scale": {"type": "number", "description": "Score multiplier."},
        "exact": {"type": "boolean", "description": "Match whole words only."},
        "tags": {
            "type": ["array", "null"],
            "items": {"type": "string"},
            "description": "Only notes with one of these tags.",
        },
        "weights": {
            "type": ["object", "null"],
            "additionalProperties": {"type": "number"},
            "description": "Weight per field.",
        },
        "order": {"type": "string", "enum": ["asc", "desc"], "description": "Sort order."},
        "grid": {
            "type": ["array", "null"],
            "items": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "required": ["query", "limit"],
    "additionalProperties": False,
}


def test_schema_from_function():
    tool = Tool.from_function(search)
    assert tool.name == "search"
    assert tool.description == "Search the notes.\n\nFinds notes whose text matches the query."
    assert tool.parameters == SEARCH_PARAMETERS
    assert tool.schema() == {
        "type": "function",
        "function": {
            "name": "search",
            "description": tool.description,
            "parameters": SEARCH_PARAMETERS,
        },
    }


def test_schema_literal_and_optional_variants():
    def f(mode: Literal[1, 2] | None, raw: list, table: dict) -> str:
        return ""

    properties = Tool.from_function(f, name="g").parameters["properties"]
    assert properties == {
        "mode": {"type": ["integer", "null"], "enum": [1, 2, None]},
        "raw": {"type": "array"},
        "table": {"type": "object"},
    }


def test_from_function_name_and_no_docstring():
    def plain(x: int) -> int:
        return x

    tool = Tool.from_function(plain, name="double-it")
    assert (tool.name, tool.description) == ("double-it", "")
    assert tool.parameters["properties"] == {"x": {"type": "integer"}}


def test_docstring_args_with_other_sections():
    description, args = parse_docstring(
        """Summary.

        Args:
            a (int): First
                and more.
            b: Second.

        Raises:
            ValueError: Not an argument.
        """
    )
    assert description == "Summary."
    assert args == {"a": "First and more.", "b": "Second."}


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ("set[int]", "parameter 'bad' of tool 'f': unsupported annotation set"),
        ("int | str", "parameter 'bad' of tool 'f': unsupported annotation"),
        ("dict[int, str]", "parameter 'bad' of tool 'f': unsupported annotation"),
        ("Path", "parameter 'bad' of tool 'f': unsupported annotation Path"),
    ],
)
def test_unsupported_annotation_names_the_parameter(annotation: str, message: str):
    namespace: dict = {"Path": Path}
    exec(f"def f(ok: int, bad: {annotation}) -> str:\n    return ''", namespace)
    with pytest.raises(TypeError, match=message.replace("|", r"\|").replace("[", r"\[")):
        Tool.from_function(namespace["f"])


def test_missing_annotation_and_star_args_rejected():
    def missing(x: int, y) -> str:
        return ""

    def star(x: int, *rest: int) -> str:
        return ""

    def kwargs(**options: int) -> str:
        return ""

    with pytest.raises(TypeError, match="parameter 'y' of tool 'missing' has no type annotation"):
        Tool.from_function(missing)
    with pytest.raises(TypeError, match=r"parameter 'rest'.*args"):
        Tool.from_function(star)
    with pytest.raises(TypeError, match="parameter 'options'"):
        Tool.from_function(kwargs)
    with pytest.raises(ValueError, match="tool name"):
        Tool.from_function(lambda: "")


# --- the registry ----------------------------------------------------------------------------


def divide(a: float, b: float) -> float:
    """Divide a by b.

    Args:
        a: The dividend.
        b: The divisor.
    """
    return a / b


def echo(text: str) -> str:
    """Return the text."""
    return text


def listing(n: int) -> dict[str, object]:
    """A dict result."""
    return {"items": list(range(n)), "when": Path("/tmp")}


def test_registry_basics():
    registry = ToolRegistry([divide, echo])
    assert len(registry) == 2
    assert registry.names == ["divide", "echo"]
    assert "divide" in registry and "nope" not in registry
    assert registry["echo"].name == "echo"
    assert [tool.name for tool in registry] == ["divide", "echo"]
    assert [s["function"]["name"] for s in registry.schemas()] == ["divide", "echo"]
    with pytest.raises(ValueError, match="already registered"):
        registry.add(echo)
    with pytest.raises(ConfigError, match="isolation"):
        ToolRegistry(isolation="thread")  # type: ignore[arg-type]


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_successful_calls(isolation: str):
    registry = ToolRegistry([divide, echo, listing], isolation=isolation)  # type: ignore[arg-type]
    result = registry.call(ToolCall("divide", {"a": 7, "b": 2}))
    assert (result.content, result.ok, result.error, result.truncated) == ("3.5", True, None, False)
    assert result.seconds >= 0
    assert registry.call(ToolCall("echo", {"text": "hi"})).content == "hi"
    listed = registry.call(ToolCall("listing", {"n": 3}))
    assert listed.content == '{"items": [0, 1, 2], "when": "/tmp"}'


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_failed_calls(isolation: str):
    registry = ToolRegistry([divide, echo], isolation=isolation)  # type: ignore[arg-type]
    assert registry.call(ToolCall("nope", {})) == ToolResult(
        "error: no tool named 'nope'; available: divide, echo", ok=False, error="unknown_tool"
    )
    bad = registry.call(ToolCall("divide", {"a": 1, "b": "2"}))
    assert bad == ToolResult(
        "error: bad arguments for 'divide': 'b' must be a number, got str",
        ok=False,
        error="bad_arguments",
    )
    missing = registry.call(ToolCall("divide", {"a": 1}))
    assert (missing.error, missing.content) == (
        "bad_arguments",
        "error: bad arguments for 'divide': missing required argument 'b'",
    )
    raised = registry.call(ToolCall("divide", {"a": 1, "b": 0}))
    assert (raised.ok, raised.error) == (False, "raised")
    assert raised.content == "error: ZeroDivisionError: division by zero"


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_output_truncation(isolation: str):
    registry = ToolRegistry([echo], isolation=isolation)  # type: ignore[arg-type]
    result = registry.call(ToolCall("echo", {"text": "x" * 5000}), max_chars=2000)
    assert result.ok and result.truncated
    assert result.content == "x" * 2000 + (
        "\n[... output truncated: 5000 characters, showing the first 2000]"
    )
    short = registry.call(ToolCall("echo", {"text": "x" * 2000}), max_chars=2000)
    assert not short.truncated and short.content == "x" * 2000


def test_return_value_that_cannot_be_shown():
    def loop() -> list:
        """Return a list that contains itself."""
        value: list = []
        value.append(value)
        return value

    result = ToolRegistry([loop]).call(ToolCall("loop", {}))
    assert (result.ok, result.error) == (False, "raised")
    assert result.content.startswith("error: the tool's return value cannot be shown as text")
    assert "Circular reference" in result.content


def test_unpicklable_return_value_is_shown_as_text():
    def handle() -> object:
        """Return a lock (not picklable): the child sends text, not the object."""
        import threading

        return threading.Lock()

    result = ToolRegistry([handle]).call(ToolCall("handle", {}))
    assert result.ok and "lock" in result.content


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (gone, or a zombie waiting for init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _assert_contained(tool, tmp_path: Path) -> None:
    registry = ToolRegistry([tool])
    start = time.monotonic()
    result = registry.call(ToolCall(tool.__name__, {}), timeout=0.5)
    elapsed = time.monotonic() - start
    assert elapsed < 3
    assert (result.ok, result.error) == (False, "timeout")
    assert result.content == "error: the tool did not finish within 0.5 s"
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    assert multiprocessing.active_children() == []


def test_sleeping_tool_times_out_and_is_killed(tmp_path: Path):
    def sleeper() -> str:
        """Sleep for a minute."""
        (tmp_path / "pid").write_text(str(os.getpid()))
        time.sleep(60)
        return "done"

    _assert_contained(sleeper, tmp_path)


def test_spinning_tool_times_out_and_is_killed(tmp_path: Path):
    def spinner() -> str:
        """Spin the CPU forever."""
        (tmp_path / "pid").write_text(str(os.getpid()))
        while True:
            pass

    _assert_contained(spinner, tmp_path)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_subprocesses_of_a_timed_out_tool_are_killed(tmp_path: Path):
    def spawner() -> str:
        """Start a subprocess and wait for it."""
        (tmp_path / "pid").write_text(str(os.getpid()))
        child = subprocess.Popen(["sleep", "60"])
        (tmp_path / "grandchild").write_text(str(child.pid))
        child.wait()
        return "done"

    _assert_contained(spawner, tmp_path)
    grandchild = int((tmp_path / "grandchild").read_text())
    deadline = time.monotonic() + 2
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _gone(grandchild)


def test_tool_that_kills_its_process():
    def crash() -> str:
        """Exit the interpreter without a result."""
        os._exit(3)

    result = ToolRegistry([crash]).call(ToolCall("crash", {}))
    assert (result.ok, result.error) == (False, "raised")
    assert result.content == "error: the tool's process ended without a result (exit code 3)"


def test_process_isolation_keeps_caller_state_and_inline_shares_it():
    calls: list[int] = []

    def record(x: int) -> int:
        """Remember x."""
        calls.append(x)
        return len(calls)

    assert ToolRegistry([record]).call(ToolCall("record", {"x": 1})).content == "1"
    assert calls == []  # the child's append died with it
    inline = ToolRegistry([record], isolation="inline")
    assert inline.call(ToolCall("record", {"x": 2})).content == "1"
    assert calls == [2]


def test_system_exit_in_a_tool_is_an_error():
    def leave() -> str:
        """Call sys.exit."""
        raise SystemExit(2)

    for isolation in ("process", "inline"):
        result = ToolRegistry([leave], isolation=isolation).call(ToolCall("leave", {}))  # type: ignore[arg-type]
        assert (result.error, result.content) == ("raised", "error: SystemExit: 2")
