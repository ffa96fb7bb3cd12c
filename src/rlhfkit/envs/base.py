"""The environment protocol, and tool-use tasks as environments.

An episode is a conversation between the policy and an environment::

    messages = env.reset(fields)          # the opening messages (system, user)
    while True:
        reply = <the policy's next assistant message>
        step = env.step(reply)            # StepResult(messages, reward, done, info)
        if step.done: break
        messages += [assistant(reply), *step.messages]

``step.messages`` are what the environment says back: ``tool`` messages with the results of the
calls the reply made, or a ``user`` message (a game's feedback). The episode's reward is the sum
of the step rewards; most tasks give one terminal reward. ``info`` holds per-step counters
(tool calls made, malformed calls, tool errors, ...), summed over the episode for the logs.

An environment is any object with ``reset``, ``step`` and the attributes ``tools`` (the tool
schemas the model is shown, possibly empty) and ``call_format`` (the name of the tool-call
format in :data:`rlhfkit.envs.calls.FORMATS`, or None without tools). One instance runs one
episode at a time; the rollout makes a fresh instance per episode (:func:`load_env` gives the
factory), so an environment may keep its episode's state in ``self``.

:class:`ToolEnv` is the environment of a task answered with the help of tools: a reply with tool
calls gets their results back as ``tool`` messages (a malformed call gets an error message
instead, never an exception); a reply without calls is the final answer, which
:meth:`ToolEnv.score` rewards and which ends the episode.

:func:`with_tools` puts the tools into a conversation: the call format's system prompt lists
them in the system message (any template), or, for a model whose chat template defines tools,
the template renders them. The same rendering serves RL rollouts and SFT on tool-use traces, so
a warm-started model sees the prompt it was trained on.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from rlhfkit.config import EnvConfig
from rlhfkit.envs.calls import ToolCall, get_format
from rlhfkit.envs.tools import Tool, ToolRegistry
from rlhfkit.errors import ConfigError
from rlhfkit.validation import did_you_mean

Message = dict[str, Any]


@dataclass
class StepResult:
    """What the environment answers to one assistant message.

    Attributes:
        messages: The environment's reply (``tool`` or ``user`` messages); empty when done.
        reward: This step's reward (an episode's reward is the sum over its steps).
        done: Whether the episode is over.
        info: Counters of this step, summed over the episode for the logs.
    """

    messages: list[Message] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    info: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """A multi-turn task: opening messages, then one step per assistant message."""

    tools: list[dict[str, Any]]
    """OpenAI-style schemas of the tools the model may call (empty: none)."""
    call_format: str | None
    """The tool-call format the model writes (a key of ``calls.FORMATS``), None without tools."""

    def reset(self, fields: dict[str, Any]) -> list[Message]:
        """Start an episode on a dataset row; returns the opening messages."""
        ...

    def step(self, message: str) -> StepResult:
        """The environment's answer to the model's message (its text, special tokens removed)."""
        ...


def template_defines_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders a ``tools`` list itself."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template


def with_tools(
    messages: Sequence[Message], tools: Sequence[dict], call_format: str | None, *, native: bool
) -> tuple[list[Message], list[dict] | None]:
    """The messages and the ``tools`` argument to render a tool-use conversation with.

    By default (``native`` False) the call format's system prompt (the tools and how to call
    them) is put first in the system message and no ``tools`` argument is passed: this works
    with any chat template, and it is how the built-in tool-use traces are written. With
    ``native`` the messages are unchanged and the tools go to ``apply_chat_template`` (for
    models whose template defines tools, see :func:`template_defines_tools`).

    Returns:
        ``(messages, tools_argument)``.
    """
    if not tools:
        return list(messages), None
    if native:
        return list(messages), list(tools)
    if call_format is None:
        raise ConfigError("an environment with tools must name its call_format")
    prompt = get_format(call_format).system_prompt(tools)
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{prompt}\n\n{out[0]['content']}"
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, None


class ToolEnv:
    """A task answered with tools: calls are executed, the reply without calls is scored.

    Subclasses give the tools (``TOOLS`` or the ``tools`` argument) and :meth:`score`; they may
    override :meth:`prompt` (the opening messages of a row; by default its ``prompt`` field as
    one user message, after an optional ``SYSTEM`` message).

    A row may carry the call it expects as ``tool_call`` (``{"name", "arguments"}``); each
    episode then counts whether its first valid call used the right tool and the right
    arguments (:meth:`same_arguments` compares them; exact equality by default).

    Args:
        tools: Functions or :class:`~rlhfkit.envs.tools.Tool` objects (default ``TOOLS``).
        call_format: The format the model writes its calls in (``hermes`` or ``python``).
        timeout: Seconds a tool may run before it is stopped.
        max_chars: Characters of a tool's output the model sees (longer output is cut).
        isolation: ``process`` runs each call in a forked process (a hung tool is killed);
            ``inline`` runs it in the rollout's thread (faster; for trusted, quick tools).
    """

    TOOLS: tuple[Callable[..., Any] | Tool, ...] = ()
    SYSTEM: str | None = None

    def __init__(
        self,
        tools: Iterable[Callable[..., Any] | Tool] | None = None,
        *,
        call_format: str = "hermes",
        timeout: float = 5.0,
        max_chars: int = 2000,
        isolation: str = "process",
    ) -> None:
        self.registry = ToolRegistry(self.TOOLS if tools is None else tools, isolation=isolation)
        self.tools = self.registry.schemas()
        self.call_format = call_format
        self.format = get_format(call_format)
        self.timeout, self.max_chars = timeout, max_chars
        self.fields: dict[str, Any] = {}
        self.first_call: ToolCall | None = None

    def prompt(self, fields: dict[str, Any]) -> list[Message]:
        """The opening messages of a row: ``SYSTEM`` (if set) and the row's ``prompt``."""
        prompt = fields.get("prompt")
        if isinstance(prompt, list):  # already messages (the prompt schemas' form)
            messages = [dict(m) for m in prompt]
        else:
            messages = [{"role": "user", "content": str(prompt)}]
        if self.SYSTEM and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": self.SYSTEM})
        return messages

    def reset(self, fields: dict[str, Any]) -> list[Message]:
        """Start an episode on ``fields`` (the row)."""
        self.fields, self.first_call = dict(fields), None
        return self.prompt(fields)

    def score(self, answer: str, fields: dict[str, Any]) -> float:
        """The reward of the final answer (the reply with no tool call)."""
        raise NotImplementedError

    def same_arguments(self, got: dict[str, Any], expected: dict[str, Any]) -> bool:
        """Whether a call's arguments are the ones the row expects."""
        return got == expected

    def step(self, message: str) -> StepResult:
        """Run the message's tool calls, or score it as the final answer."""
        parsed = self.format.parse(message)
        info = {"calls": float(len(parsed.calls) + len(parsed.errors)),
                "malformed_calls": float(len(parsed.errors))}  # fmt: skip
        if not parsed.calls and not parsed.errors:
            return StepResult([], self.score(parsed.content, self.fields), True,
                              {**info, "answered": 1.0})  # fmt: skip
        if parsed.calls and self.first_call is None:
            self.first_call = parsed.calls[0]
            info.update(self._call_checks(parsed.calls[0]))
        replies: list[Message] = []
        errors = 0.0
        for call in parsed.calls:
            result = self.registry.call(call, timeout=self.timeout, max_chars=self.max_chars)
            errors += not result.ok
            replies.append({"role": "tool", "name": call.name, "content": result.content})
        replies += [{"role": "tool", "content": f"error: {e}"} for e in parsed.errors]
        return StepResult(replies, 0.0, False, {**info, "tool_errors": errors})

    def _call_checks(self, call: ToolCall) -> dict[str, float]:
        """``right_tool`` / ``right_arguments`` of the episode's first call, when the row says."""
        expected = self.fields.get("tool_call")
        if not isinstance(expected, dict):
            return {}
        right_tool = call.name == expected.get("name")
        right_args = right_tool and self.same_arguments(
            call.arguments, dict(expected.get("arguments") or {})
        )
        return {"right_tool": float(right_tool), "right_arguments": float(right_args)}


BUILTIN_ENVS = {
    "calculator": "rlhfkit.envs.builtin:CalculatorEnv",
    "guess_number": "rlhfkit.envs.builtin:GuessNumberEnv",
}
"""Built-in environment names and the classes they stand for."""


def env_class(spec: str) -> type:
    """The environment class of ``spec``: a built-in name or ``module:Class``.

    Raises:
        ConfigError: An unknown name, a module that does not import, or a missing class.
    """
    target = BUILTIN_ENVS.get(spec, spec)
    if ":" not in target:
        raise ConfigError(
            f"--env.name: unknown environment {spec!r}{did_you_mean(spec, list(BUILTIN_ENVS))} "
            f"(use one of {', '.join(BUILTIN_ENVS)} or 'module:Class')"
        )
    module_name, _, name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"--env.name {spec!r}: cannot import {module_name!r} ({err})") from err
    cls = getattr(module, name, None)
    if not inspect.isclass(cls):
        raise ConfigError(f"--env.name {spec!r}: {module_name} has no class {name!r}")
    missing = [a for a in ("reset", "step") if not callable(getattr(cls, a, None))]
    if missing:
        raise ConfigError(f"--env.name {spec!r}: {name} has no {' or '.join(missing)} method")
    return cls


def load_env(spec: str, **options: Any) -> Callable[[], Environment]:
    """A factory of fresh environments of ``spec`` built with ``options``.

    One instance is built at once, so that bad options fail before any model is loaded.
    """
    cls = env_class(spec)
    try:
        cls(**options)
    except TypeError as err:
        raise ConfigError(f"--env.options do not fit {cls.__name__}: {err}") from err
    return lambda: cls(**options)


def env_factory(cfg: EnvConfig) -> Callable[[], Environment]:
    """A factory of fresh environments for an ``--env`` section.

    ``options`` (JSON) go to the environment's constructor; a tool environment
    (:class:`ToolEnv`) also gets the call format, the timeout and the output cap.

    Raises:
        ConfigError: No environment named, an unknown one, or options it does not take.
    """
    if cfg.name is None:
        raise ConfigError("--env.name: name an environment")
    options = json.loads(cfg.options)
    if issubclass(env_class(cfg.name), ToolEnv):
        options = {"call_format": cfg.call_format, "timeout": cfg.tool_timeout,
                   "max_chars": cfg.tool_max_chars, **options}  # fmt: skip
    return load_env(cfg.name, **options)
