"""Tool-call formats (rlhfkit.envs.calls): parsing without raising, rendering, argument checks."""

from __future__ import annotations

import json

import pytest

from rlhfkit.envs.calls import (
    FORMATS,
    HermesFormat,
    ParsedMessage,
    PythonFormat,
    ToolCall,
    get_format,
    validate_arguments,
)
from rlhfkit.errors import ConfigError

HERMES = HermesFormat()
PYTHON = PythonFormat()


def hermes_block(obj: object) -> str:
    body = obj if isinstance(obj, str) else json.dumps(obj)
    return f"<tool_call>\n{body}\n</tool_call>"


# --- hermes ----------------------------------------------------------------------------------


def test_hermes_one_call():
    text = hermes_block({"name": "calculator", "arguments": {"expression": "12*3"}})
    assert HERMES.parse(text) == ParsedMessage(
        content="", calls=[ToolCall("calculator", {"expression": "12*3"})], errors=[]
    )


def test_hermes_several_calls_and_content_outside_blocks():
    text = (
        "Let me compute both.\n"
        + hermes_block({"name": "add", "arguments": {"a": 1, "b": 2}})
        + "\nand then\n"
        + hermes_block({"name": "neg", "arguments": {"x": -1.5}})
        + "\n"
    )
    parsed = HERMES.parse(text)
    assert parsed.calls == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("neg", {"x": -1.5})]
    assert parsed.content == "Let me compute both.\n\nand then"
    assert parsed.errors == []


def test_hermes_no_calls_is_plain_content():
    assert HERMES.parse("  The answer is 42.\n") == ParsedMessage("The answer is 42.", [], [])


def test_hermes_missing_arguments_means_none():
    assert HERMES.parse(hermes_block({"name": "now"})).calls == [ToolCall("now", {})]


def test_hermes_arguments_as_json_string_accepted():
    text = hermes_block({"name": "f", "arguments": json.dumps({"x": 1})})
    assert HERMES.parse(text).calls == [ToolCall("f", {"x": 1})]


def test_hermes_malformed_calls_are_errors_and_good_calls_are_kept():
    text = "\n".join(
        [
            hermes_block('{"name": }'),
            hermes_block({"name": "ok", "arguments": {"x": 1}}),
            hermes_block({"arguments": {"x": 1}}),
            hermes_block({"name": 3, "arguments": {}}),
            hermes_block({"name": "f", "arguments": "not json"}),
            hermes_block({"name": "f", "arguments": [1, 2]}),
            hermes_block("[1, 2]"),
            "<tool_call></tool_call>",
        ]
    )
    parsed = HERMES.parse(text)
    assert parsed.calls == [ToolCall("ok", {"x": 1})]
    assert parsed.errors == [
        "tool call 1: invalid JSON (Expecting value: line 1 column 10)",
        'tool call 3: missing "name"',
        'tool call 4: "name" must be a non-empty string, got a number',
        'tool call 5: "arguments" must be a JSON object, got a string that is not one',
        'tool call 6: "arguments" must be a JSON object, got an array',
        'tool call 7: expected a JSON object {"name": ..., "arguments": {...}}, got an array',
        "tool call 8: empty tool call",
    ]
    assert parsed.content == ""


def test_hermes_unclosed_tag_is_an_error_and_not_content():
    text = (
        "Thinking.\n"
        + hermes_block({"name": "f", "arguments": {}})
        + '\n<tool_call>\n{"name": "g", "arguments": {}}\nmore text'
    )
    parsed = HERMES.parse(text)
    assert parsed.calls == [ToolCall("f", {})]
    assert parsed.errors == ["tool call 2: no closing </tool_call> tag"]
    assert parsed.content == "Thinking."


def test_hermes_round_trip():
    calls = [
        ToolCall("search", {"query": "naïve </tool_call> <b>", "limit": 3, "tags": ["a", None]}),
        ToolCall("now", {}),
        ToolCall("set", {"options": {"nested": {"x": [1.5, True, False]}}}),
    ]
    text = HERMES.render(calls)
    assert text.count("<tool_call>") == 3
    assert HERMES.parse(text) == ParsedMessage("", calls, [])


# --- python ----------------------------------------------------------------------------------


def test_python_literal_keyword_arguments():
    text = (
        'I will call it. <tool_call>calculator(expression="12*3")</tool_call>\n'
        "<tool_call>\nf(a=-1, b=2.5, c=None, d=True, e=[1, (2, 3)], g={'k': 'v'})\n</tool_call>"
    )
    parsed = PYTHON.parse(text)
    assert parsed.errors == []
    assert parsed.content == "I will call it."
    assert parsed.calls == [
        ToolCall("calculator", {"expression": "12*3"}),
        ToolCall("f", {"a": -1, "b": 2.5, "c": None, "d": True, "e": [1, [2, 3]], "g": {"k": "v"}}),
    ]


def test_python_no_arguments():
    assert PYTHON.parse("<tool_call>now()</tool_call>").calls == [ToolCall("now", {})]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("f(a=b)", "argument 'a' is not a literal value"),
        ("f(1)", "positional arguments are not allowed"),
        ("f(**d)", "**kwargs is not allowed"),
        ("f(*xs)", "positional arguments are not allowed"),
        ("f(a=g())", "argument 'a' is not a literal value"),
        ("f(a=os.sep)", "argument 'a' is not a literal value"),
        ("f(a=lambda: 1)", "argument 'a' is not a literal value"),
        ("f(a=1, a=2)", "argument 'a' is given twice"),
        ("f(a={1, 2})", "argument 'a': set values are not allowed"),
        ("f(a={1: 2})", "argument 'a': dict keys must be strings"),
        ("os.system(a='x')", "the called function must be a plain tool name"),
        ("42", "expected a function call"),
        ("f(a=", "invalid Python syntax"),
    ],
)
def test_python_malformed_calls(body: str, reason: str):
    parsed = PYTHON.parse(f"<tool_call>{body}</tool_call><tool_call>ok(x=1)</tool_call>")
    assert parsed.calls == [ToolCall("ok", {"x": 1})]
    assert len(parsed.errors) == 1
    assert parsed.errors[0].startswith(f"tool call 1: {reason}")


def test_python_nothing_is_evaluated(tmp_path):
    marker = tmp_path / "evaluated"
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    bodies = [f"f({touch})", f"f(a={touch})", f"f(**{{'a': {touch}}})", touch]
    parsed = PYTHON.parse("".join(f"<tool_call>{b}</tool_call>" for b in bodies))
    assert parsed.calls == []
    assert len(parsed.errors) == 4
    assert not marker.exists()


def test_python_round_trip():
    calls = [
        ToolCall("search", {"query": 'it\'s </tool_call> \\ "q"', "limit": 3}),
        ToolCall("now", {}),
        ToolCall("set", {"options": {"x": [1.5, True, None]}}),
    ]
    text = PYTHON.render(calls)
    assert PYTHON.parse(text) == ParsedMessage("", calls, [])


def test_python_render_rejects_non_identifier_names():
    with pytest.raises(ValueError, match="get-weather"):
        PYTHON.render([ToolCall("get-weather", {})])


# --- system prompts and the registry ---------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the notes.",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": "Text to look for."},
                    "tags": {"type": ["array", "null"], "items": {"type": "string"}},
                    "order": {"type": "string", "enum": ["asc", "desc"]},
                },
                "required": ["query"],
                "additionalProperties": False,
            },
        },
    }
]


def test_system_prompts_list_the_tools():
    hermes = HERMES.system_prompt(TOOLS)
    assert json.dumps(TOOLS[0]) in hermes
    assert "<tool_call>" in hermes
    python = PYTHON.system_prompt(TOOLS)
    signature = (
        "search(query: str, tags: list[str] | None = ..., order: Literal['asc', 'desc'] = ...)"
    )
    assert signature in python
    assert "Search the notes." in python
    assert "query: Text to look for." in python


def test_get_format():
    assert set(FORMATS) == {"hermes", "python"}
    assert get_format("hermes").name == "hermes"
    assert get_format("python").name == "python"
    with pytest.raises(ConfigError, match="hermes, python"):
        get_format("json")


# --- validate_arguments ----------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"},
        "scale": {"type": "number"},
        "flag": {"type": "boolean"},
        "name": {"type": ["string", "null"]},
        "order": {"type": "string", "enum": ["asc", "desc"]},
        "ids": {"type": "array", "items": {"type": "integer"}},
        "weights": {"type": "object", "additionalProperties": {"type": "number"}},
    },
    "required": ["count"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    "arguments",
    [
        {"count": 1},
        {"count": 1, "scale": 2},  # an int is a number
        {"count": 1, "scale": 2.5, "flag": False, "name": None, "order": "desc"},
        {"count": 0, "ids": [1, 2], "weights": {"a": 1, "b": 0.5}, "name": "x"},
    ],
)
def test_validate_arguments_accepts(arguments: dict):
    assert validate_arguments(arguments, SCHEMA) is None


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ({}, "missing required argument 'count'"),
        ({"count": 1, "extra": 2}, "unexpected argument 'extra'; expected: count, scale, flag"),
        ({"count": "3"}, "'count' must be an integer, got str"),
        ({"count": True}, "'count' must be an integer, got bool"),
        ({"count": 3.0}, "'count' must be an integer, got float"),
        ({"count": 1, "scale": False}, "'scale' must be a number, got bool"),
        ({"count": 1, "flag": 1}, "'flag' must be a boolean, got int"),
        ({"count": 1, "name": 5}, "'name' must be a string or null, got int"),
        ({"count": 1, "order": "up"}, "'order' must be one of 'asc', 'desc', got 'up'"),
        ({"count": 1, "ids": [1, "2"]}, "'ids[1]' must be an integer, got str"),
        ({"count": 1, "ids": (1, 2)}, "'ids' must be a list, got tuple"),
        ({"count": 1, "weights": {"a": "x"}}, "'weights.a' must be a number, got str"),
        ({"count": None}, "'count' must be an integer, got None"),
    ],
)
def test_validate_arguments_rejects(arguments: dict, reason: str):
    assert validate_arguments(arguments, SCHEMA).startswith(reason)


def test_validate_arguments_enum_does_not_confuse_bool_and_int():
    schema = {"type": "object", "properties": {"x": {"enum": [1, 2]}}}
    assert validate_arguments({"x": 1}, schema) is None
    assert validate_arguments({"x": True}, schema) == "'x' must be one of 1, 2, got True"


def test_validate_arguments_non_object():
    assert validate_arguments([1], SCHEMA) == "arguments must be an object, got list"  # type: ignore[arg-type]
    assert validate_arguments(
        {"x": 1}, {"type": "object", "properties": {}, "additionalProperties": False}
    ) == ("unexpected argument 'x'; it takes none")
