"""Tools and environments for tool use and multi-turn RL.

Modules:

- :mod:`rlhfkit.envs.tools`: tools built from plain Python functions (their JSON schema comes
  from the type hints and the docstring) and the registry that runs them, isolated in a child
  process with a timeout.
- :mod:`rlhfkit.envs.calls`: tool-call formats (how a model writes calls in its reply: Hermes
  JSON or Python-call syntax), parsing them without raising, rendering them and checking
  arguments against a tool's schema.
- :mod:`rlhfkit.envs.base`: the ``Environment`` protocol and ``ToolEnv``, the environment that
  runs a model's tool calls turn by turn.
- :mod:`rlhfkit.envs.builtin`: built-in environments (a calculator, guess-the-number).
"""
