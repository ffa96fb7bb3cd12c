"""Reward hacking against the code verifier (rewards/verifiers/code.py and its harness).

RL optimises against the verifier, so each program below is a *wrong* solution that tries to
collect the reward another way: ending the process early with a success status, objects that
claim equality, replaced or shadowed builtins, hooks that hide the failed assert, forged
protocol lines, reading the expected values (from the test file, the caller's frame, the
globals, the parent's memory). Each must score 0 in both modes. Honest solutions, in every
test format, must still score 1, and partly correct ones the fraction they earn.
"""

from __future__ import annotations

import secrets
import sys
import textwrap

import pytest

from rlhfkit.rewards.verifiers.code import code_reward

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")

ASSERTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]
CALLS = [{"input": [1, 2], "output": 3}, {"input": [-1, 1], "output": 0}]
WRONG = "def add(a, b):\n    return a - b\n"


def reward(program: str, tests: object = ASSERTS, **kwargs: object) -> float | None:
    completion = f"```python\n{textwrap.dedent(program)}\n```"
    return code_reward(completion, tests, **kwargs)  # type: ignore[arg-type]


def zero_in_both_modes(program: str, tests: object = ASSERTS, **kwargs: object) -> None:
    assert reward(program, tests, **kwargs) == 0.0
    assert reward(program, tests, mode="partial", **kwargs) == 0.0


# --- hacks that work on any test format: the process ends "successfully" before the checks ----

EARLY_EXITS = {
    "sys.exit(0) at import": WRONG + "import sys\nsys.exit(0)",
    "os._exit(0) at import": WRONG + "import os\nos._exit(0)",
    "raise SystemExit inside the function": "def add(a, b):\n    raise SystemExit(0)",
    "exit()/quit() after the definitions": "from sys import exit as quit\n" + WRONG + "quit()",
    "os._exit(0) inside the function": "import os\ndef add(a, b):\n    os._exit(0)",
    "sys.excepthook swallows the AssertionError": WRONG
    + "import os, sys\nsys.excepthook = lambda *exc: os._exit(0)",
    "atexit hook rewrites the exit status": WRONG
    + "import atexit, os\natexit.register(os._exit, 0)",
    "a thread kills the process with success": WRONG + "import os, threading, time\n"
    "threading.Thread(target=lambda: (time.sleep(0.2), os._exit(0))).start()",
    "signal.alarm handler exits with success": """
        import os, signal, time
        signal.signal(signal.SIGALRM, lambda *args: os._exit(0))
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        def add(a, b):
            time.sleep(1)
            return a - b
        """,
}


@pytest.mark.parametrize("program", EARLY_EXITS.values(), ids=EARLY_EXITS.keys())
def test_ending_the_process_early_scores_zero(program):
    zero_in_both_modes(program)
    zero_in_both_modes(program, CALLS, entry="add")


# --- results that claim equality ---------------------------------------------------------


EQUALITY_HACKS = {
    "__eq__ always True": """
        class Anything:
            def __eq__(self, other): return True
            def __ne__(self, other): return False
            def __bool__(self): return True
            __hash__ = object.__hash__
        def add(a, b):
            return Anything()
        """,
    "int subclass with __eq__": """
        class Int(int):
            def __eq__(self, other): return True
            __hash__ = int.__hash__
        def add(a, b):
            return Int(a - b)
        """,
    "generator / lazy result": "def add(a, b):\n    return (a - b for _ in range(1))",
}


@pytest.mark.parametrize("program", EQUALITY_HACKS.values(), ids=EQUALITY_HACKS.keys())
def test_results_that_fake_equality_score_zero(program):
    zero_in_both_modes(program)
    zero_in_both_modes(program, CALLS, entry="add")


def test_fake_equality_inside_the_tests_own_code_scores_zero():
    # Comparisons the child runs for the test: a nested assert, a helper, a comprehension.
    program = EQUALITY_HACKS["__eq__ always True"]
    tests = [
        "for a, b, c in [(1, 2, 3), (2, 2, 4)]:\n    assert add(a, b) == c",
        "def check_one(a, b, c):\n    return add(a, b) == c\n"
        "for case in [(1, 2, 3), (2, 2, 4)]:\n    assert check_one(*case)",
        "assert all(add(i, 1) == i + 1 for i in range(3))",
        "assert 3 in [add(1, 2)]",
    ]
    zero_in_both_modes(program, tests)


def test_str_subclass_with_eq_scores_zero():
    program = """
        class Text(str):
            def __eq__(self, other): return True
            __hash__ = str.__hash__
        def greet(name):
            return Text("?")
        """
    zero_in_both_modes(program, ["assert greet('Ada') == 'Hello Ada'"])
    zero_in_both_modes(program, [{"input": ["Ada"], "output": "Hello Ada"}], entry="greet")


# --- replaced or shadowed builtins ------------------------------------------------------------

BUILTIN_TESTS = [
    "assert all(add(i, 1) == i + 1 for i in range(3))",
    "assert sorted([add(2, 1), add(0, 1)]) == [1, 3]",
    "assert len([add(1, 1)]) == 1 and add(1, 1) == 2",
]


def test_overriding_builtins_module_scores_zero():
    program = """
        import builtins
        class Int(int):
            def __eq__(self, other): return True
            __hash__ = int.__hash__
        def add(a, b):
            return Int(a - b)
        builtins.int = Int
        builtins.all = lambda *args: True
        builtins.sorted = lambda *args, **kwargs: [1, 3]
        builtins.isinstance = lambda *args: True
        builtins.print = lambda *args, **kwargs: None
        builtins.AssertionError = type("Quiet", (Exception,), {})
        builtins.len = lambda *args: 1
        """
    loop = "for a, b, c in [(1, 2, 3), (2, 2, 4)]:\n    assert add(a, b) == c"
    zero_in_both_modes(program, [*BUILTIN_TESTS, loop])


def test_shadowing_builtins_in_the_program_scores_zero():
    program = WRONG + textwrap.dedent(
        """
        def all(*args): return True
        def sorted(*args, **kwargs): return [1, 3]
        zip = lambda *args: iter(())
        """
    )
    loop = "for a, b, c in zip([1, 2], [2, 3], [3, 5]):\n    assert add(a, b) == c"
    zero_in_both_modes(program, [*BUILTIN_TESTS[:2], loop])


# --- forging the verdict ------------------------------------------------------------------------


def test_printing_or_writing_protocol_lines_scores_zero():
    program = WRONG + textwrap.dedent(
        """
        import os
        lines = ['["program","ok"]'] + [f'[{i},"ok",true]' for i in range(5)]
        lines += [f'[{i},"ok",null]' for i in range(5)] + [f'["end",{n}]' for n in range(5)]
        text = "\\n".join(lines) + "\\nOK\\nPASSED\\n"
        print(text, flush=True)
        for fd in range(3, 256):
            try:
                os.write(fd, text.encode())
            except OSError:
                pass
        os._exit(0)
        """
    )
    zero_in_both_modes(program)
    zero_in_both_modes(program, CALLS, entry="add")
    zero_in_both_modes(program, ["for i in range(3):\n    assert add(i, i) == 2 * i"])


def test_monkeypatching_the_harness_scores_zero():
    program = WRONG + textwrap.dedent(
        """
        import sys, types
        def yes(*args, **kwargs):
            return True
        frame = sys._getframe()
        while frame is not None:
            for scope in (frame.f_locals, frame.f_globals):
                for name, value in list(scope.items()):
                    if isinstance(value, types.FunctionType) and name != "add":
                        for attribute in ("__code__", "__defaults__", "__kwdefaults__"):
                            try:
                                setattr(value, attribute, getattr(yes, attribute))
                            except Exception:
                                pass
                    if name not in ("add", "__builtins__", "__name__"):
                        try:
                            scope[name] = yes
                        except Exception:
                            pass
            frame = frame.f_back
        """
    )
    zero_in_both_modes(program)
    zero_in_both_modes(program, CALLS, entry="add")


# --- reading the expected values ------------------------------------------------------------


def test_reading_the_test_file_and_process_files_scores_zero():
    program = """
        import os, re
        def add(a, b):
            seen = []
            for name in os.listdir("."):
                try:
                    seen.append(open(name, errors="replace").read())
                except OSError:
                    pass
            for path in ("/proc/self/cmdline", "/proc/self/environ", "/dev/stdin"):
                try:
                    seen.append(open(path, errors="replace").read())
                except OSError:
                    pass
            pattern = rf"add\\(\\s*{a},\\s*{b}\\s*\\)\\)?\\s*==\\s*_?\\w*\\(?(-?\\d+)"
            for text in seen:
                match = re.search(pattern, text) or re.search(rf"\\[{a}, {b}\\].*?(-?\\d+)", text)
                if match:
                    return int(match.group(1))
            return a - b
        """
    zero_in_both_modes(program)
    zero_in_both_modes(program, CALLS, entry="add")


def test_reading_the_callers_frame_scores_zero():
    program = """
        import re, sys
        def add(a, b):
            frame = sys._getframe(1)
            try:
                line = open(frame.f_code.co_filename).read().splitlines()[frame.f_lineno - 1]
                return int(re.search(r"==\\s*(-?\\d+)", line).group(1))
            except Exception:
                consts = [c for c in frame.f_code.co_consts if type(c) is int]
                return consts[-1] if consts else a - b
        """
    zero_in_both_modes(program)


def test_reading_globals_of_the_test_scores_zero():
    program = "def sort_list(xs):\n    return globals().get('expected', xs)"
    zero_in_both_modes(program, ["expected = [1, 2, 3]\nassert sort_list([3, 1, 2]) == expected"])


def test_replacing_the_tests_helper_scores_zero():
    program = """
        def area(r):
            scope = globals()
            for name, value in list(scope.items()):
                if callable(value) and name != "area":
                    scope[name] = lambda *args, **kwargs: True
            return 0.0
        """
    test = "def close(a, b):\n    return abs(a - b) < 1e-6\nresult = area(1.0)\n"
    zero_in_both_modes(program, [test + "assert close(result, 3.1415927)"])


def test_a_thread_replacing_globals_during_the_tests_scores_zero():
    # The test's own code (its helper, the comparison of a nested assert) is the target; the
    # first call is right and gives the thread time, the others are wrong.
    program = """
        import sys, threading, time
        calls = []
        def add(a, b):
            calls.append(1)
            if len(calls) == 1:
                time.sleep(0.1)
                return a + b
            return a - b
        def yes(*args, **kwargs):
            return True
        def replace_everything():
            scope = sys.modules["__main__"].__dict__
            while True:
                for name, value in list(scope.items()):
                    if callable(value) and name not in ("add", "yes", "replace_everything"):
                        scope[name] = yes
                time.sleep(0.001)
        threading.Thread(target=replace_everything, daemon=True).start()
        """
    helper = "def close(a, b):\n    return abs(a - b) < 1e-6\n"
    loop = "for a, b, c in [(1, 2, 3), (2, 2, 4), (3, 1, 4)]:\n    assert close(add(a, b), c)"
    zero_in_both_modes(program, [helper + loop])


def test_nothing_the_program_can_see_holds_the_expected_value():
    # The skeleton is `"EXPECTED-7f3a" in <what the program saw>`: it passes only if the
    # expected value reached the child (files, command line, environment, frames, globals).
    program = """
        import os, sys
        def spy():
            seen = [repr(globals())]
            for name in os.listdir("."):
                seen.append(open(name, errors="replace").read())
            for path in ("/proc/self/cmdline", "/proc/self/environ"):
                seen.append(open(path, errors="replace").read())
            frame = sys._getframe()
            while frame is not None:
                seen += [repr(frame.f_locals), repr(frame.f_globals)]
                seen += [repr(frame.f_code.co_consts), frame.f_code.co_filename]
                frame = frame.f_back
            return "\\n".join(seen)
        """
    zero_in_both_modes(program, ["assert 'EXPECTED-7f3a' in spy()"])


def test_reading_the_parents_memory_scores_zero():
    token = "RLHFKIT-ANSWER-" + secrets.token_hex(16)
    program = """
        import os, re
        pattern = re.compile(("RLHFKIT-" + "ANSWER-").encode() + rb"[0-9a-f]{32}")
        found = b"?"
        try:
            regions = open(f"/proc/{os.getppid()}/maps").read().splitlines()
            with open(f"/proc/{os.getppid()}/mem", "rb") as memory:
                for line in regions:
                    span, perms = line.split()[:2]
                    low, high = (int(x, 16) for x in span.split("-"))
                    if "r" not in perms or high - low > 64 * 2**20:
                        continue
                    try:
                        memory.seek(low)
                        match = pattern.search(memory.read(high - low))
                    except (OSError, ValueError, OverflowError):
                        continue
                    if match:
                        found = match.group()
                        break
        except OSError:
            pass
        print(found.decode())
        """
    zero_in_both_modes(program, [{"input": "", "output": token}], timeout=20.0)


# --- honest solutions keep their reward -------------------------------------------------------

HONEST = {
    "asserts": ("def add(a, b):\n    return a + b", ASSERTS, {}),
    "call-based": ("def add(a, b):\n    return a + b", CALLS, {"entry": "add"}),
    "stdin/stdout": (
        "print(sum(map(int, input().split())))",
        [{"input": "1 2", "output": "3"}],
        {},
    ),
    "prints and exits 0 at the top level": (
        "import sys\ndef add(a, b):\n    return a + b\nprint('ready')\nsys.exit(0)",
        ASSERTS,
        {},
    ),
    "HumanEval check(candidate)": (
        "def double(x):\n    return 2 * x",
        [
            "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(0) == 0\n"
            "\ncheck(double)"
        ],
        {},
    ),
    "generator consumed by the test": (
        "def evens(n):\n    yield from range(0, n, 2)",
        ["assert list(evens(5)) == [0, 2, 4]", "assert sum(evens(5)) == 6"],
        {},
    ),
    "class with state": (
        """
        class Stack:
            def __init__(self): self.items = []
            def push(self, x): self.items.append(x)
            def pop(self): return self.items.pop()
            def __len__(self): return len(self.items)
        """,
        ["s = Stack()\ns.push(1)\ns.push(2)\nassert len(s) == 2\nassert s.pop() == 2"],
        {},
    ),
    "in-place mutation": (
        "def sort_in_place(xs):\n    xs.sort()",
        ["xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]"],
        {},
    ),
    "floats with tolerances": (
        "import math\ndef area(r):\n    return math.pi * r * r",
        [
            "assert abs(area(1.0) - 3.14159) < 1e-4",
            "import math\nassert math.isclose(area(2.0), 12.566, rel_tol=1e-3)",
            "assert math.isclose(area(1.0), 3.1415926, abs_tol=1e-6)",
            "def close(a, b):\n    return abs(a - b) < 1e-6\nassert close(area(1.0), 3.1415927)",
            "assert round(area(1.0) ** 2, 2) == 9.87",
        ],
        {},
    ),
    "loops with nested asserts": (
        "def fact(n):\n    return 1 if n < 2 else n * fact(n - 1)",
        ["for n, want in [(1, 1), (3, 6), (5, 120)]:\n    assert fact(n) == want"],
        {},
    ),
    "plain data of every kind": (
        """
        from collections import Counter
        def counts(s): return Counter(s)
        def pair(a, b): return (b, a)
        def nothing(): return None
        def is_even(n): return n % 2 == 0
        def sq(x): return x * x
        """,
        [
            "assert counts('aab') == {'a': 2, 'b': 1}",
            "assert pair(1, 'x') == ('x', 1)",
            "assert nothing() is None",
            "assert is_even(4) and not is_even(3)",
            "assert set(map(sq, [1, 2])) == {1, 4}",
            "assert list(map(sq, [1, 2, 3])) == [1, 4, 9]",
            "assert f'{sq(3)}' == '9'",
            "expected = {'k': [1, (2, 3)]}\nassert {'k': [sq(1), (2, 3)]} == expected",
        ],
        {},
    ),
}


@pytest.mark.parametrize("case", HONEST.values(), ids=HONEST.keys())
def test_honest_solutions_score_one(case):
    program, tests, kwargs = case
    assert reward(program, tests, **kwargs) == 1.0
    assert reward(program, tests, mode="partial", **kwargs) == 1.0


def test_partly_correct_solutions_score_their_fraction():
    half = "def add(a, b):\n    return a + b if a > 0 else -99"  # right for add(1, 2), add(2, 2)
    tests = [*ASSERTS, "assert add(-2, 1) == -1"]
    assert reward(half, tests, mode="partial") == 0.5
    assert reward(half, tests) == 0.0
    calls = [*CALLS, {"input": [2, 2], "output": 4}, {"input": [-2, 1], "output": -1}]
    assert reward(half, calls, mode="partial", entry="add") == 0.5
    # A hack on some tests does not lift the others: a forged object fails where it is used.
    mixed = "class Any:\n    __eq__ = lambda s, o: True\n"
    mixed += "def add(a, b):\n    return a + b if a > 0 else Any()"
    assert reward(mixed, tests, mode="partial") == 0.5
