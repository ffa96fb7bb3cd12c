r"""Code reward: run the completion's program against tests in a sandbox (RLHF book ch. 7).

The program is the last fenced block of the completion tagged ``python`` (or ``py``/``python3``),
else its last fenced block of any language, else the whole completion. Each test runs in its own
sandboxed process (:func:`rlhfkit.rewards.verifiers.sandbox.run_python`: no network, a temporary
working directory, CPU/memory/file/process limits, no access to other processes' memory) with a
per-test timeout, under a global timeout for the whole example. A test is one of:

- a snippet of assert statements (a string), run after the program: each top-level assert
  is split into the parts that need the program, evaluated in the child and sent back as
  plain data, and the comparison with its expected values, made by the parent
  (:mod:`~rlhfkit.rewards.verifiers.asserts`); other statements run in the child and must
  complete;
- ``{"input": str, "output": str}``: the program reads ``input`` on stdin and passes when its
  stdout equals ``output`` after normalisation, ``norm(s) = "\n".join(l.rstrip() for l in
  s.strip().splitlines())`` (trailing spaces and surrounding blank lines do not count);
- with ``entry`` (a function name), ``{"input": [args...], "output": value}``: the child calls
  ``entry(*args)`` after the program and sends the result back as plain data; the parent
  passes the test when ``output == result`` (tuples compared as lists, as JSON stores them).

The program is treated as an adversary (RL optimises against this reward): expected values
never enter its process, a result counts only as plain builtin data (an object of the
program's own class, or a subclass of ``int``/``str``, fails, whatever its ``__eq__`` says),
and a test passes only when the harness reported every step of it over its private channel
(:mod:`~rlhfkit.rewards.verifiers.harness`), so exiting early with status 0 passes nothing;
the exit status is never looked at. A ``sys.exit(0)`` at the program's top level only ends
the program (the tests still run).

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
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.rewards.verifiers.asserts import Plan, plan_assert_test
from rlhfkit.rewards.verifiers.harness import CHILD_SOURCE
from rlhfkit.rewards.verifiers.judge import decode, judge, literal_source, read_records
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


@dataclass(frozen=True)
class _Case:
    """One prepared test."""

    stdin: str = ""
    stdout: str | None = None
    """Expected standard output (stdin/stdout tests); None for the other kinds."""
    steps: list[list[str]] = field(default_factory=list)
    """The harness's steps (call-based and assert tests)."""
    output: Any = None
    """Expected result of a call-based test."""
    plan: Plan | None = None
    """An assert test's plan."""
    broken: bool = False
    """An assert snippet that does not parse: it fails."""


def _case(test: Any, entry: str | None, helper: str, index: int) -> _Case:
    """One test, prepared.

    Raises:
        ValueError: A test that is neither a string nor an input/output mapping.
    """
    if isinstance(test, str):
        try:
            plan = plan_assert_test(test, helper)
        except (SyntaxError, ValueError, RecursionError):
            return _Case(broken=True)
        return _Case(steps=plan.steps, plan=plan)
    if isinstance(test, dict) and "input" in test and "output" in test:
        if entry is None:
            return _Case(stdin=str(test["input"]), stdout=str(test["output"]))
        args = test["input"] if isinstance(test["input"], list) else [test["input"]]
        try:
            source = literal_source(list(args))
        except TypeError as err:
            raise ValueError(f"code test {index}: arguments must be plain data ({err})") from None
        return _Case(steps=[["call", entry, source]], output=test["output"])
    raise ValueError(
        f"code test {index}: expected an assert statement (str) or a mapping with 'input' and "
        f"'output', got {type(test).__name__}"
    )


def _as_lists(value: Any) -> Any:
    """Tuples and lists as lists, recursively (dict values too), as JSON stores them."""
    if isinstance(value, tuple | list):
        return [_as_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_lists(v) for k, v in value.items()}
    return value


def _passes(case: _Case, program: str, helper: str, limits: SandboxLimits) -> bool:
    """Run one test; True when it passed."""
    if case.broken:
        return False
    if case.stdout is not None:
        result = run_python(program, stdin=case.stdin, limits=limits)
        return (
            result.status == "ok"
            and not result.truncated
            and normalise_output(result.stdout) == normalise_output(case.stdout)
        )
    nonce = secrets.token_hex(16)
    payload = {"steps": case.steps, "helper": helper, "nonce": nonce}
    result = run_python(program, limits=limits, harness=(CHILD_SOURCE, payload))
    outcomes = read_records(result.channel, len(case.steps), nonce)
    if outcomes is None:
        return False
    if case.plan is not None:
        return judge(case.plan, outcomes, limits.timeout)
    ok, value = outcomes[0]
    try:
        return ok and _as_lists(case.output) == _as_lists(decode(value))
    except ValueError:
        return False


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
    helper = f"_rlhfkit_{secrets.token_hex(8)}"
    prepared = [_case(test, entry, helper, i) for i, test in enumerate(cases)]
    deadline = time.monotonic() + global_timeout
    passed = 0
    for case in prepared:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        cap = max(DEFAULT_LIMITS.output_bytes, 2 * len((case.stdout or "").encode()) + 4096)
        limits = SandboxLimits(timeout=min(timeout, remaining), output_bytes=cap)
        ok = _passes(case, program, helper, limits)
        passed += ok
        if not ok and mode == "all_pass":
            break
    if mode == "all_pass":
        return float(passed == len(prepared))
    return passed / len(prepared)
