"""Tool-call formats: how a model writes tool calls in its reply, and checking their arguments.

A :class:`CallFormat` turns an assistant message into the text it says and the calls it makes
(:meth:`~CallFormat.parse`), writes the message that makes given calls
(:meth:`~CallFormat.render`, for SFT data and tests: ``parse(render(calls)).calls == calls``)
and writes the system prompt that teaches a model the format when its chat template defines no
tools (:meth:`~CallFormat.system_prompt`). The formats:

- ``hermes`` (:class:`HermesFormat`): ``<tool_call>`` blocks holding a JSON object
  ``{"name": ..., "arguments": {...}}``, as Hermes and Qwen models write them.
- ``python`` (:class:`PythonFormat`): the same blocks holding a Python call with keyword
  arguments, ``<tool_call>calculator(expression="12*3")</tool_call>``.

Design:

- **Parsing never raises.** A policy being trained writes anything. Each malformed call
  becomes one line of :attr:`ParsedMessage.errors`, written for the model to read (an
  environment can send it back as the call's result) and numbered by the call's position in
  the message; the well-formed calls around it are kept. An opening tag without a closing tag
  is a malformed call, and the text after it is not content.
- **Nothing the model writes is evaluated.** A Python call is parsed with ``ast.parse`` and each
  argument's value with ``ast.literal_eval``: only literals (strings, numbers, booleans,
  ``None``, lists, tuples, dicts) pass; names, calls, attribute access, positional arguments and
  ``**kwargs`` are malformed. Values must be JSON values (tuples become lists), so both formats
  give the same arguments.
- **Ids are not part of either format**: parsed calls have ``id=""`` and the environment
  numbers them; the round trip holds for calls without an id.
- :func:`validate_arguments` checks arguments against the JSON-Schema subset that
  :mod:`rlhfkit.envs.tools` writes, returning a one-line reason for the model rather than
  raising.
"""

from __future__ import annotations

import ast
import json
import keyword
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from rlhfkit.errors import ConfigError

OPEN_TAG = "<tool_call>"
"""Opening tag of a tool-call block (both formats)."""

CLOSE_TAG = "</tool_call>"
"""Closing tag of a tool-call block (both formats)."""


@dataclass(frozen=True)
class ToolCall:
    """One call of a tool by name with keyword arguments."""

    name: str
    arguments: dict[str, Any]
    id: str = ""
    """Identifier the environment gives the call (to match its result); no format writes it."""


@dataclass
class ParsedMessage:
    """An assistant message split into its text and its tool calls."""

    content: str
    """The message text outside tool-call blocks, stripped."""
    calls: list[ToolCall]
    """The well-formed calls, in order."""
    errors: list[str]
    """One line per malformed call, for the model to read (``tool call 2: invalid JSON ...``)."""


class CallFormat(Protocol):
    """How tool calls are written in an assistant message."""

    name: str

    def parse(self, text: str) -> ParsedMessage:
        """Split ``text`` into content, well-formed calls and errors; never raises."""
        ...

    def render(self, calls: Sequence[ToolCall]) -> str:
        """The assistant text that makes ``calls`` (``parse(render(calls)).calls == calls``)."""
        ...

    def system_prompt(self, tools: Sequence[dict[str, Any]]) -> str:
        """Instructions listing ``tools`` (OpenAI-style schemas) and how to call them."""
        ...


# --- blocks ----------------------------------------------------------------------------------


def _split_blocks(text: str) -> tuple[str, list[str | None]]:
    """Split ``text`` into the content outside tool-call blocks and the blocks' bodies.

    Args:
        text: An assistant message.

    Returns:
        (content, bodies): the text outside the blocks, stripped, and each block's body in
        order; ``None`` for a block without a closing tag, which runs to the end of the text.
    """
    outside: list[str] = []
    bodies: list[str | None] = []
    pos = 0
    while (start := text.find(OPEN_TAG, pos)) != -1:
        outside.append(text[pos:start])
        end = text.find(CLOSE_TAG, start + len(OPEN_TAG))
        if end == -1:
            bodies.append(None)
            pos = len(text)
            break
        bodies.append(text[start + len(OPEN_TAG) : end])
        pos = end + len(CLOSE_TAG)
    outside.append(text[pos:])
    return "".join(outside).strip(), bodies


def _parse_blocks(text: str, parse_body: Callable[[str], ToolCall | str]) -> ParsedMessage:
    """Parse every block of ``text`` with ``parse_body`` (a call, or the reason it is malformed)."""
    content, bodies = _split_blocks(text)
    calls: list[ToolCall] = []
    errors: list[str] = []
    for number, body in enumerate(bodies, start=1):
        if body is None:
            result: ToolCall | str = f"no closing {CLOSE_TAG} tag"
        elif not body.strip():
            result = "empty tool call"
        else:
            result = parse_body(body.strip())
        if isinstance(result, str):
            errors.append(f"tool call {number}: {result}")
        else:
            calls.append(result)
    return ParsedMessage(content=content, calls=calls, errors=errors)


def _block(body: str) -> str:
    """``body`` between the tags; ``</`` is escaped by the caller so a value cannot close it."""
    return f"{OPEN_TAG}\n{body}\n{CLOSE_TAG}"


def _tool_functions(tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``function`` part of OpenAI-style tool schemas (a bare function schema as is)."""
    return [tool.get("function", tool) for tool in tools]


# --- hermes ----------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _hermes_arguments(arguments: Any) -> dict[str, Any] | str:
    """The arguments of a Hermes call, or why they are malformed.

    A JSON string that decodes to an object is accepted (Qwen models sometimes write one).
    """
    if isinstance(arguments, str):
        try:
            decoded = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError):
            decoded = None
        if isinstance(decoded, dict):
            return decoded
        return '"arguments" must be a JSON object, got a string that is not one'
    if not isinstance(arguments, dict):
        return f'"arguments" must be a JSON object, got {_json_type(arguments)}'
    return arguments


def _hermes_call(body: str) -> ToolCall | str:
    """The call in a Hermes block's body, or why it is malformed."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg}: line {e.lineno} column {e.colno})"
    except RecursionError:
        return "invalid JSON (nested too deeply)"
    if not isinstance(obj, dict):
        shape = '{"name": ..., "arguments": {...}}'
        return f"expected a JSON object {shape}, got {_json_type(obj)}"
    if "name" not in obj:
        return 'missing "name"'
    name = obj["name"]
    if not isinstance(name, str) or not name:
        return f'"name" must be a non-empty string, got {_json_type(name)}'
    arguments = _hermes_arguments(obj.get("arguments", {}))
    if isinstance(arguments, str):
        return arguments
    return ToolCall(name=name, arguments=arguments)


_HERMES_PROMPT = """\
You can call tools to help you answer. The tools are described by these JSON schemas, one per \
line:
<tools>
{tools}
</tools>

To call a tool, write a <tool_call> block holding a JSON object with the tool's name and its \
arguments:
<tool_call>
{{"name": "tool_name", "arguments": {{"argument_name": "value"}}}}
</tool_call>
You may call several tools in one reply, one block per call. The result of each call will be \
sent back to you."""


class HermesFormat:
    """``<tool_call>`` blocks holding ``{"name": ..., "arguments": {...}}`` (Hermes, Qwen).

    A call without ``"arguments"`` has none (``{}``); other keys are ignored.
    """

    name = "hermes"

    def parse(self, text: str) -> ParsedMessage:
        """Split ``text`` into content, well-formed calls and errors; never raises.

        Args:
            text: An assistant message.

        Returns:
            The parsed message.
        """
        return _parse_blocks(text, _hermes_call)

    def render(self, calls: Sequence[ToolCall]) -> str:
        """The assistant text that makes ``calls``, one block each.

        Args:
            calls: Calls whose arguments are JSON-serialisable.

        Returns:
            The blocks, separated by newlines.
        """
        blocks = []
        for call in calls:
            body = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
            blocks.append(_block(body.replace("</", "<\\/")))  # "\/" is JSON for "/"
        return "\n".join(blocks)

    def system_prompt(self, tools: Sequence[dict[str, Any]]) -> str:
        """Instructions listing ``tools`` as JSON schemas and how to call them.

        Args:
            tools: OpenAI-style schemas ``{"type": "function", "function": {...}}``.

        Returns:
            The system prompt text.
        """
        lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        return _HERMES_PROMPT.format(tools=lines)


# --- python ----------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """A literal as a JSON value (tuples become lists).

    Raises:
        TypeError: A set, bytes, complex number or dict with a non-string key.
    """
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise TypeError("dict keys must be strings")
        return {key: _jsonable(item) for key, item in value.items()}
    raise TypeError(f"{type(value).__name__} values are not allowed")


_LITERALS = "strings, numbers, True/False/None, lists and dicts"


def _python_argument(node: ast.keyword, seen: dict[str, Any]) -> Any:
    """The value of one keyword argument.

    Raises:
        ValueError: Why the argument is malformed.
    """
    if node.arg is None:
        raise ValueError("**kwargs is not allowed; pass each argument as name=value")
    if node.arg in seen:
        raise ValueError(f"argument '{node.arg}' is given twice")
    try:
        value = ast.literal_eval(node.value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        reason = f"argument '{node.arg}' is not a literal value (use {_LITERALS})"
        raise ValueError(reason) from None
    try:
        return _jsonable(value)
    except TypeError as e:
        raise ValueError(f"argument '{node.arg}': {e} (use {_LITERALS})") from None


def _python_call(body: str) -> ToolCall | str:
    """The call in a Python block's body, or why it is malformed (nothing is evaluated)."""
    try:
        tree = ast.parse(body, mode="eval")
    except SyntaxError as e:
        return f"invalid Python syntax ({e.msg})"
    except (ValueError, MemoryError, RecursionError):
        return "invalid Python syntax"
    node = tree.body
    if not isinstance(node, ast.Call):
        return "expected a function call like tool_name(argument=value)"
    if not isinstance(node.func, ast.Name):
        return "the called function must be a plain tool name"
    if node.args:
        return "positional arguments are not allowed; pass each argument as name=value"
    arguments: dict[str, Any] = {}
    for kw in node.keywords:
        try:
            value = _python_argument(kw, arguments)
        except ValueError as e:
            return str(e)
        arguments[str(kw.arg)] = value
    return ToolCall(name=node.func.id, arguments=arguments)


def _identifier(name: str, what: str) -> str:
    """``name`` if it is a Python identifier (and no keyword).

    Raises:
        ValueError: It is not.
    """
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"{what} {name!r} cannot be written as a Python call")
    return name


_PYTHON_TYPES = {
    "string": "str",
    "integer": "int",
    "number": "float",
    "boolean": "bool",
    "array": "list",
    "object": "dict",
}


def _python_type(schema: dict[str, Any]) -> str:
    """A Python annotation for a property's JSON schema (``list[int] | None``)."""
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else list(types)
    enum = schema.get("enum")
    if enum is not None:
        names = [f"Literal[{', '.join(repr(v) for v in enum if v is not None)}]"]
    else:
        names = []
        for name in types:
            if name == "array" and isinstance(schema.get("items"), dict):
                names.append(f"list[{_python_type(schema['items'])}]")
            elif name == "object" and isinstance(schema.get("additionalProperties"), dict):
                names.append(f"dict[str, {_python_type(schema['additionalProperties'])}]")
            elif name != "null":
                names.append(_PYTHON_TYPES.get(name, "Any"))
    if "null" in types or (enum is not None and None in enum):
        names.append("None")
    return " | ".join(names) or "Any"


def _python_signature(function: dict[str, Any]) -> str:
    """One tool as a Python signature, its description and its arguments' descriptions."""
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties", {})
    required = set(parameters.get("required", []))
    params = [
        f"{arg}: {_python_type(schema)}" + ("" if arg in required else " = ...")
        for arg, schema in properties.items()
    ]
    lines = [f"{function['name']}({', '.join(params)})"]
    if function.get("description"):
        lines.append(f"    {function['description']}")
    for arg, schema in properties.items():
        if schema.get("description"):
            lines.append(f"    {arg}: {schema['description']}")
    return "\n".join(lines)


_PYTHON_PROMPT = """\
You can call tools to help you answer. The tools are Python functions (an argument shown with \
"= ..." may be left out):

{tools}

To call a tool, write a <tool_call> block holding one Python call that passes every argument \
by keyword, with literal values only ({literals}):
<tool_call>tool_name(argument_name="value")</tool_call>
You may call several tools in one reply, one block per call. The result of each call will be \
sent back to you."""


class PythonFormat:
    """``<tool_call>`` blocks holding a Python call with literal keyword arguments.

    Parsed with ``ast``, never evaluated. A tool whose name or argument names are not Python
    identifiers cannot be called in this format.
    """

    name = "python"

    def parse(self, text: str) -> ParsedMessage:
        """Split ``text`` into content, well-formed calls and errors; never raises.

        Args:
            text: An assistant message.

        Returns:
            The parsed message.
        """
        return _parse_blocks(text, _python_call)

    def render(self, calls: Sequence[ToolCall]) -> str:
        """The assistant text that makes ``calls``, one block each.

        Args:
            calls: Calls whose arguments are JSON values.

        Returns:
            The blocks, separated by newlines.

        Raises:
            ValueError: A tool or argument name that is not a Python identifier.
        """
        blocks = []
        for call in calls:
            args = ", ".join(
                f"{_identifier(k, 'argument name')}={v!r}" for k, v in call.arguments.items()
            )
            body = f"{_identifier(call.name, 'tool name')}({args})"
            blocks.append(_block(body.replace("</", "<\\x2f")))  # "\x2f" is "/" in a literal
        return "\n".join(blocks)

    def system_prompt(self, tools: Sequence[dict[str, Any]]) -> str:
        """Instructions listing ``tools`` as Python signatures and how to call them.

        Args:
            tools: OpenAI-style schemas ``{"type": "function", "function": {...}}``.

        Returns:
            The system prompt text.
        """
        listing = "\n\n".join(_python_signature(f) for f in _tool_functions(tools))
        return _PYTHON_PROMPT.format(tools=listing, literals=_LITERALS)


FORMATS: dict[str, CallFormat] = {"hermes": HermesFormat(), "python": PythonFormat()}
"""The tool-call formats by name."""


def get_format(name: str) -> CallFormat:
    """The tool-call format called ``name``.

    Args:
        name: A key of :data:`FORMATS`.

    Returns:
        The format.

    Raises:
        ConfigError: An unknown name.
    """
    try:
        return FORMATS[name]
    except KeyError:
        choices = ", ".join(FORMATS)
        raise ConfigError(f"unknown tool-call format {name!r}; choose one of: {choices}") from None


# --- argument validation ---------------------------------------------------------------------


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": _is_integer,
    "number": _is_number,
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}

_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "array": "a list",
    "object": "an object",
    "null": "null",
}


def _python_type_name(value: Any) -> str:
    """The Python type name of an argument's value, for messages (``None`` for None)."""
    return "None" if value is None else type(value).__name__


def _same(value: Any, option: Any) -> bool:
    """Equality for ``enum``, where a boolean never equals a number (``True != 1``)."""
    return isinstance(value, bool) == isinstance(option, bool) and value == option


def _check_type(value: Any, schema: dict[str, Any], where: str) -> str | None:
    """Why ``value`` does not have the schema's ``type`` and ``enum``, or None."""
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        # A type outside the subset (a hand-written schema's) is not checked.
        if not any(_TYPE_CHECKS.get(name, lambda v: True)(value) for name in names):
            expected = " or ".join(_TYPE_NAMES.get(name, name) for name in names)
            return f"'{where}' must be {expected}, got {_python_type_name(value)}"
    enum = schema.get("enum")
    if enum is not None and not any(_same(value, option) for option in enum):
        options = ", ".join(repr(option) for option in enum)
        return f"'{where}' must be one of {options}, got {value!r}"
    return None


def _check_value(value: Any, schema: dict[str, Any], where: str) -> str | None:
    """Why ``value`` (the argument or item at ``where``) does not match ``schema``, or None."""
    if reason := _check_type(value, schema, where):
        return reason
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            if reason := _check_value(item, schema["items"], f"{where}[{i}]"):
                return reason
    if isinstance(value, dict) and any(
        key in schema for key in ("properties", "required", "additionalProperties")
    ):
        return _check_object(value, schema, where)
    return None


def _check_object(value: dict[str, Any], schema: dict[str, Any], where: str) -> str | None:
    """Why the object ``value`` does not match ``schema``'s properties, or None."""
    properties = schema.get("properties", {})
    prefix = f"{where}." if where else ""
    for key in schema.get("required", []):
        if key not in value:
            return f"missing required argument '{prefix}{key}'"
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key not in properties and extra is False:
            expected = f"expected: {', '.join(properties)}" if properties else "it takes none"
            return f"unexpected argument '{prefix}{key}'; {expected}"
        sub = properties.get(key, extra if isinstance(extra, dict) else None)
        if sub is not None and (reason := _check_value(item, sub, f"{prefix}{key}")):
            return reason
    return None


def validate_arguments(arguments: dict[str, Any], parameters: dict[str, Any]) -> str | None:
    """Check a call's arguments against a tool's parameter schema.

    Supports the JSON-Schema subset :mod:`rlhfkit.envs.tools` writes: ``type`` (a name or a
    list of names: ``string``, ``integer``, ``number``, ``boolean``, ``array``, ``object``,
    ``null``), ``enum``, ``items``, ``properties``, ``required`` and ``additionalProperties``
    (``false`` or a schema), nested. A boolean is not an integer or a number; an integer is a
    number; a float with no fractional part is not an integer.

    Args:
        arguments: The call's arguments.
        parameters: The tool's ``parameters`` schema (an object schema).

    Returns:
        None when the arguments are valid, else a one-line reason naming the argument
        (``missing required argument 'x'``, ``'x' must be an integer, got str``).
    """
    if not isinstance(arguments, dict):
        return f"arguments must be an object, got {_python_type_name(arguments)}"
    return _check_object(arguments, parameters, "")
