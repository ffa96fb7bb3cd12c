r"""Code reward: run the completion's program against tests in a sandbox (RLHF book ch. 7).

The program is the last fenced block of the completion tagged ``python`` (or ``py``/``python3``),
else its last fenced block of any language, else the whole completion. Each test runs in its own
sandboxed process (:func:`rlhfkit.rewards.verifiers.sandbox.run_python`: no network, a temporary
working directory, CPU/memory/file/process limits) with a per-test timeout, under a global
timeout for the whole example. A test is one of:

- an assert statement (a string), run after the program; it passes when the process exits 0;
- ``{"input": str, "output": str}``: the program reads ``input`` on stdin and passes when its
  stdout equals ``output`` after normalisation, ``norm(s) = "\n".join(l.rstrip() for l in
  s.strip().splitlines())`` (trailing spaces and surrounding blank lines do not count);
- with ``entry`` (a function name), ``{"input": [args...], "output": value}``: the test calls
  ``entry(*args)`` after the program and passes when the result equals ``output`` (tuples are
  compared as lists, as JSON stores them).

The reward is, with ``passed`` of ``total`` tests passing::

    all_pass: r = 1[passed == total]      (the default)
    partial:  r = passed / total

A timeout, crash, syntax error or wrong output fails that test; tests left when the global
timeout runs out fail. With ``all_pass`` the remaining tests are skipped after the first
failure (the reward is already 0). No tests (``tests`` empty or missing) gives None.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any

from rlhfkit.rewards.verifiers.sandbox import DEFAULT_LIMITS, SandboxLimits, run_python

MODES = ("all_pass", "partial")
"""The ways to turn test results into a reward."""

FENCE = re.compile(r"```[ \t]*([\w+.#-]*)[^\n]*\n(.*?)```", re.DOTALL)
"""A fenced code block: its language tag and its body."""

PYTHON_TAGS = frozenset({"python", "py", "python3"})
"""Language tags that mark a fenced block as Python."""


def extract_program(completion: str) -> str:
    """The program in ``completion``.

    The last fenced block tagged Python, else the last fenced block, else the whole text.
    """
    blocks = FENCE.findall(completion)
    python = [body for tag, body in blocks if tag.lower() in PYTHON_TAGS]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return completion


def normalise_output(text: str) -> str:
    r"""``"\n".join(line.rstrip() for line in text.strip().splitlines())``."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


_CALL_HARNESS = """

def _rlhfkit_plain(value):
    if isinstance(value, (tuple, list)):
        return [_rlhfkit_plain(v) for v in value]
    if isinstance(value, dict):
        return {{k: _rlhfkit_plain(v) for k, v in value.items()}}
    return value


assert _rlhfkit_plain({entry}(*{args!r})) == _rlhfkit_plain({expected!r})
"""


def _case(program: str, test: Any, entry: str | None, index: int) -> tuple[str, str, str | None]:
    """(source, stdin, expected stdout or None) of one test.

    Raises:
        ValueError: A test that is neither a string nor an input/output mapping.
    """
    if isinstance(test, str):
        return program + "\n\n" + test + "\n", "", None
    if isinstance(test, dict) and "input" in test and "output" in test:
        if entry is not None:
            args = test["input"] if isinstance(test["input"], list) else [test["input"]]
            harness = _CALL_HARNESS.format(entry=entry, args=args, expected=test["output"])
            return program + "\n" + harness, "", None
        return program, str(test["input"]), str(test["output"])
    raise ValueError(
        f"code test {index}: expected an assert statement (str) or a mapping with 'input' and "
        f"'output', got {type(test).__name__}"
    )


def _as_tests(tests: Any) -> list[Any]:
    """``tests`` as a list (a JSON string is decoded, as datasets often store it)."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError:
            tests = [tests]  # a single assert statement
        if isinstance(tests, dict | str):
            tests = [tests]
    if not isinstance(tests, Sequence):
        raise ValueError(f"code tests: expected a list of tests, got {type(tests).__name__}")
    return list(tests)


def code_reward(
    completion: str,
    tests: Any = None,
    *,
    mode: str = "all_pass",
    timeout: float = 5.0,
    global_timeout: float = 60.0,
    entry: str | None = None,
) -> float | None:
    """Fraction (``partial``) or all-or-nothing (``all_pass``) of tests the program passes.

    ``all_pass``: r = 1[passed == total]; ``partial``: r = passed / total.

    Args:
        completion: The model's reply; the program is extracted with :func:`extract_program`.
        tests: Assert statements and/or ``{"input", "output"}`` cases (a list, or its JSON).
        mode: ``"all_pass"`` (default) or ``"partial"``.
        timeout: Wall-clock seconds per test (the CPU limit is ``ceil(timeout) + 1``).
        global_timeout: Wall-clock seconds for all the tests of the example together.
        entry: Name of the function that input/output cases call (call-based tests); None:
            input/output cases are stdin/stdout.

    Returns:
        The reward in [0, 1], or None when there are no tests.

    Raises:
        ValueError: An unknown ``mode``, a non-positive timeout or a malformed test.
    """
    if mode not in MODES:
        raise ValueError(f"code_reward: unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if timeout <= 0 or global_timeout <= 0:
        raise ValueError("code_reward: timeout and global_timeout must be positive")
    if entry is not None and not entry.isidentifier():
        raise ValueError(f"code_reward: entry must be a function name, got {entry!r}")
    if tests is None:
        return None
    cases = _as_tests(tests)
    if not cases:
        return None
    program = extract_program(completion)
    prepared = [_case(program, test, entry, i) for i, test in enumerate(cases)]
    deadline = time.monotonic() + global_timeout
    passed = 0
    for source, stdin, expected in prepared:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        cap = max(DEFAULT_LIMITS.output_bytes, 2 * len((expected or "").encode()) + 4096)
        limits = SandboxLimits(timeout=min(timeout, remaining), output_bytes=cap)
        result = run_python(source, stdin=stdin, limits=limits)
        ok = result.status == "ok" and (
            expected is None
            or (
                not result.truncated
                and normalise_output(result.stdout) == normalise_output(expected)
            )
        )
        passed += ok
        if not ok and mode == "all_pass":
            break
    if mode == "all_pass":
        return float(passed == len(prepared))
    return passed / len(prepared)
