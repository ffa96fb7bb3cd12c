"""The sandbox (rewards/verifiers/sandbox.py), the code reward (rewards/verifiers/code.py) and
its harness (harness.py: the child's side; asserts.py: the split; judge.py: the parent's side).

Reward hacking is tested in test_code_verifier_adversarial.py.
"""

from __future__ import annotations

import dis
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlhfkit.rewards.verifiers import get_verifier
from rlhfkit.rewards.verifiers.asserts import plan_assert_test
from rlhfkit.rewards.verifiers.code import code_reward, extract_program, normalise_output
from rlhfkit.rewards.verifiers.harness import CHILD_SOURCE
from rlhfkit.rewards.verifiers.judge import decode, literal_source, read_records
from rlhfkit.rewards.verifiers.sandbox import SandboxLimits, _supervise, run_python
from rlhfkit.rewards.verifiers.sandbox_boot import BOOTSTRAP

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux sandbox")

FAST = SandboxLimits(timeout=2.0)

ADD = "```python\ndef add(a, b):\n    return a + b\n```"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def run(source: str, **kwargs):
    return run_python(textwrap.dedent(source), limits=kwargs.pop("limits", FAST), **kwargs)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def processes_in(directory: str) -> list[int]:
    """Live processes whose working directory is ``directory``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/cwd") == directory and alive(int(entry)):
                    found.append(int(entry))
            except OSError:
                continue
    return found


# --- the code reward ---------------------------------------------------------------------


def test_all_pass_is_one_and_registered():
    assert code_reward(ADD, ADD_TESTS) == 1.0
    assert get_verifier("code") is code_reward


def test_partial_two_of_four():
    tests = ["assert add(1, 2) == 3", "assert add(1, 1) == 3", "assert add(0, 0) == 0", "1/0"]
    assert code_reward(ADD, tests, mode="partial") == 0.5
    assert code_reward(ADD, tests) == 0.0  # all_pass


def test_syntax_error_fails():
    completion = "```python\ndef add(a, b)\n    return a + b\n```"
    assert code_reward(completion, ADD_TESTS) == 0.0
    assert code_reward(completion, ADD_TESTS, mode="partial") == 0.0


def test_infinite_loop_times_out_within_the_timeout():
    completion = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    start = time.monotonic()
    assert code_reward(completion, ["assert add(1, 2) == 3"], timeout=1.0) == 0.0
    assert time.monotonic() - start < 3.0


def test_global_timeout_fails_the_remaining_tests():
    completion = "```python\nimport time\ntime.sleep(0.6)\n```"
    start = time.monotonic()
    reward = code_reward(completion, ["pass"] * 10, mode="partial", global_timeout=1.0)
    assert time.monotonic() - start < 2.5
    assert reward is not None and reward < 0.5  # at most two of ten fit in one second


def test_stdin_stdout_cases():
    completion = "```python\nn = int(input())\nprint(n * 2)  \nprint()\n```"
    tests = [{"input": "2\n", "output": "4"}, {"input": "5", "output": "10\n"}]
    assert code_reward(completion, tests) == 1.0
    wrong = [{"input": "2\n", "output": "4"}, {"input": "5", "output": "11"}]
    assert code_reward(completion, wrong, mode="partial") == 0.5


def test_call_based_cases_with_entry():
    completion = "```python\ndef pair(a, b):\n    return (b, a)\n```"
    tests = [{"input": [1, 2], "output": [2, 1]}, {"input": ["x", "y"], "output": ["y", "x"]}]
    assert code_reward(completion, tests, entry="pair") == 1.0
    assert code_reward(completion, [{"input": [1, 2], "output": [1, 2]}], entry="pair") == 0.0
    with pytest.raises(ValueError, match="function name"):
        code_reward(completion, tests, entry="pair; import os")


def test_tests_as_json_and_missing():
    assert code_reward(ADD, '["assert add(1, 2) == 3"]') == 1.0
    assert code_reward(ADD, "assert add(1, 2) == 4") == 0.0  # one bare assert statement
    assert code_reward(ADD, []) is None
    assert code_reward(ADD, None) is None
    assert code_reward(ADD) is None


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="mode"):
        code_reward(ADD, ADD_TESTS, mode="best")
    with pytest.raises(ValueError, match="code test 1"):
        code_reward(ADD, ["assert True", 3])
    with pytest.raises(ValueError, match="positive"):
        code_reward(ADD, ADD_TESTS, timeout=0)


def test_extract_program():
    text = "intro\n```js\nlet x\n```\n```python\nA = 1\n```\n```py\nB = 2\n```\n```\nC = 3\n```"
    assert extract_program(text) == "B = 2\n"  # the last Python block wins over a later plain one
    assert extract_program("```js\nlet x\n```\nthen\n```\nC = 3\n```") == "C = 3\n"
    assert extract_program("print(1)") == "print(1)"
    assert extract_program("```Python3 title\nx = 1\n```") == "x = 1\n"


def test_normalise_output():
    assert normalise_output("\n 1 2  \n3\t\n\n") == "1 2\n3"
    assert normalise_output("a\r\nb") == "a\nb"


# --- the sandbox: ordinary runs ----------------------------------------------------------------


def test_ok_error_and_exit_status():
    result = run("print('hi')")
    assert (result.status, result.returncode, result.stdout, result.timed_out) == (
        "ok",
        0,
        "hi\n",
        False,
    )
    assert run("import sys; sys.exit(3)").returncode == 3
    failed = run("assert 1 == 2")
    assert failed.status == "error" and "AssertionError" in failed.stderr


def test_stdin_is_given_even_when_large():
    data = "x" * 300_000 + "\n"
    result = run("import sys; print(len(sys.stdin.read()))", stdin=data)
    assert result.stdout == "300001\n"


def test_output_is_capped():
    limits = SandboxLimits(timeout=2.0, output_bytes=1000)
    result = run_python("print('x' * 10**6)\nprint('done', flush=True)", limits=limits)
    assert result.status == "ok"
    assert result.truncated and len(result.stdout) == 1000
    assert not run("print('short')").truncated


def test_environment_is_cleared(monkeypatch):
    monkeypatch.setenv("RLHFKIT_SANDBOX_SECRET", "leak")
    result = run("import os; print(sorted(os.environ))")
    assert "RLHFKIT_SANDBOX_SECRET" not in result.stdout
    assert result.stdout.strip() == "['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR']"


def test_working_directory_is_fresh_and_removed():
    first = run("import os; print(os.getcwd()); print(sorted(os.listdir()))")
    second = run("import os; print(os.getcwd())")
    cwd, listing = first.stdout.splitlines()
    assert listing == "['main.py']"
    assert cwd != second.stdout.strip()
    assert not os.path.exists(cwd)


def test_standard_library_imports_work():
    result = run(
        """
        import asyncio, collections, dataclasses, decimal, fractions, functools, heapq, json
        import math, multiprocessing, re, sqlite3, statistics, tempfile, threading, typing
        print(asyncio.run(asyncio.sleep(0, "ok")))
        """
    )
    assert result.stdout == "ok\n", result.stderr


# --- the sandbox: containment ------------------------------------------------------------------


def test_infinite_loop_is_killed_at_the_wall_clock_timeout():
    result = run_python("while True:\n    pass", limits=SandboxLimits(timeout=1.0))
    assert result.status == "timeout" and result.timed_out
    assert 1.0 <= result.wall_s < 3.0


def test_cpu_limit_stops_a_busy_loop():
    result = run_python("while True:\n    pass", limits=SandboxLimits(timeout=10, cpu_seconds=1))
    assert result.status == "timeout" and result.timed_out
    assert result.returncode == -signal.SIGXCPU  # the CPU limit, not the 10 s wall clock


def test_memory_hog_is_contained():
    start = time.monotonic()
    result = run("x = bytearray(2 * 1024**3)\nprint('allocated')")
    assert result.status == "memory" and "allocated" not in result.stdout
    growing = run("xs = []\nwhile True:\n    xs.append(' ' * 2**20)")
    assert growing.status in ("memory", "killed")
    assert time.monotonic() - start < 5.0
    assert code_reward("```python\nx = bytearray(2 * 1024**3)\n```", ["pass"]) == 0.0


def test_fork_bomb_is_blocked_and_leaves_no_process():
    result = run(
        """
        import os, sys
        print(os.getcwd(), flush=True)
        while True:
            os.fork()
        """
    )
    assert result.status == "error" and "os.fork" in result.stderr
    assert result.wall_s < 2.0
    assert processes_in(result.stdout.strip()) == []


@pytest.mark.parametrize(
    "spawn",
    [
        "import subprocess\nwhile True:\n    subprocess.Popen(['sleep', '10'])",
        "import os\nos.system('sleep 10 &')",
        "import os\nos.posix_spawn('/bin/sleep', ['sleep', '10'], {})",
        "import os\nos.execv('/bin/sleep', ['sleep', '10'])",
        "import pty\npty.spawn('/bin/sh')",
        "import multiprocessing as mp\nmp.Process(target=print).start()",
        "import _posixsubprocess\n_posixsubprocess.fork_exec()",
        "import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess",
    ],
)
def test_process_creation_is_blocked(spawn):
    result = run(f"import os\nprint(os.getcwd(), flush=True)\n{spawn}")
    assert result.status == "error"
    assert "PermissionError: sandbox:" in result.stderr
    assert processes_in(result.stdout.strip()) == []


def test_stragglers_holding_the_pipes_are_killed():
    # Outside the sandbox: a child that exits at once, leaving a grandchild with its pipes.
    code = "import os, time\nif os.fork() == 0:\n    print(os.getpid(), flush=True)\n"
    code += "    time.sleep(30)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    start = time.monotonic()
    out, _, _, _, timed_out = _supervise(proc, b"", SandboxLimits(timeout=10))
    assert time.monotonic() - start < 3.0 and not timed_out
    grandchild = int(out.decode().split()[0])
    deadline = time.monotonic() + 2
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(grandchild)


def test_network_is_unreachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=1):  # works from here
            pass
        server.accept()[0].close()
        result = run(
            f"""
            import socket
            for address in [("127.0.0.1", {port}), ("localhost", {port}), ("example.com", 80)]:
                try:
                    socket.create_connection(address, timeout=1).close()
                    print("connected", address)
                except Exception as err:
                    print("refused", type(err).__name__)
            try:
                socket.getaddrinfo("localhost", 80)
                print("resolved")
            except Exception as err:
                print("refused", type(err).__name__)
            """
        )
        assert result.status == "ok", result.stderr
        assert result.stdout.splitlines() == ["refused PermissionError"] * 4
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing reached the listener


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace needs CAP_SYS_ADMIN")
def test_network_namespace_has_only_loopback_as_root():
    result = run("print(open('/proc/net/dev').read())")
    names = {line.split(":")[0].strip() for line in result.stdout.splitlines()[2:] if line}
    assert names == {"lo"}


@pytest.mark.parametrize(
    "attempt",
    [
        "open(TARGET, 'w').write('x')",
        "import pathlib\npathlib.Path(TARGET).write_text('x')",
        "import os\nos.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))",
        "import os\nos.chdir(os.path.dirname(TARGET))\nopen(os.path.basename(TARGET), 'a')",
        "import os\nos.mkdir(TARGET)",
        "import os\nopen('x', 'w').close()\nos.rename('x', TARGET)",
        "import os\nos.symlink(TARGET, 'link')\nopen('link', 'w')",
        "import os\nos.link(TARGET + '.keep', TARGET)",
        "import shutil\nopen('x', 'w').close()\nshutil.copy('x', TARGET)",
        "import sqlite3\nsqlite3.connect(TARGET).execute('create table t (x)')",
        "import os\nfd = os.open(os.path.dirname(TARGET), os.O_RDONLY)\n"
        "os.open(os.path.basename(TARGET), os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
        "import os\nos.remove(TARGET + '.keep')",
        "import os\nos.truncate(TARGET + '.keep', 0)",
        "import os\nos.chmod(TARGET + '.keep', 0o777)",
    ],
)
def test_writes_outside_the_working_directory_fail(tmp_path, attempt):
    target = tmp_path / "outside.txt"
    keep = tmp_path / "outside.txt.keep"
    keep.write_text("precious")
    keep.chmod(0o644)
    result = run(f"TARGET = {str(target)!r}\n{attempt}")
    assert result.status == "error"
    assert "PermissionError: sandbox:" in result.stderr, result.stderr
    assert not target.exists() and not target.is_symlink()
    assert keep.read_text() == "precious" and keep.stat().st_mode & 0o777 == 0o644


def test_writes_inside_the_working_directory_work():
    result = run(
        """
        import os, shutil, tempfile, sqlite3
        os.makedirs("a/b")
        with open("a/b/c.txt", "w") as f:
            f.write("hello")
        os.rename("a/b/c.txt", "a/d.txt")
        with tempfile.NamedTemporaryFile("w", delete=False) as f:
            f.write("tmp")
        sqlite3.connect("db.sqlite").execute("create table t (x)")
        open("/dev/null", "w").write("dropped")
        print(open("a/d.txt").read(), open(f.name).read())
        shutil.rmtree("a")
        """
    )
    assert result.status == "ok", result.stderr
    assert result.stdout == "hello tmp\n"


def test_file_size_limit():
    limits = SandboxLimits(timeout=2.0, file_bytes=2**20)
    result = run_python("open('big', 'wb').write(b'x' * 2**21)", limits=limits)
    assert result.status == "error" and "File too large" in result.stderr


@pytest.mark.parametrize(
    "escape",
    [
        "import ctypes\nctypes.CDLL(None)",
        "import sys\nsys.settrace(lambda *a: None)",
        "import gc\ngc.get_referrers(open)",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
        "import os\nos.kill(1, 0)",
        "import _xxsubinterpreters",
        # reach the hook's helpers through a traceback and rewrite their defaults
        "try:\n    open('/tmp/x', 'w')\nexcept PermissionError as e:\n    tb = e.__traceback__\n"
        "    while tb.tb_next:\n        tb = tb.tb_next\n"
        "    tb.tb_frame.f_locals['_inside'].__defaults__ = ()",
    ],
)
def test_escapes_are_refused(escape):
    result = run(escape)
    assert result.status == "error"
    assert "PermissionError: sandbox:" in result.stderr, result.stderr


def test_hook_functions_read_no_globals():
    # The hook's helpers must take every name from their own defaults: a global or a closure
    # cell could be swapped by the program (via builtins or a traceback frame's f_globals).
    module = compile(BOOTSTRAP, "<bootstrap>", "exec")
    names = {"_as_path", "_resolve", "_inside", "_foreign", "_check_open", "_hook"}
    found = {c.co_name: c for c in module.co_consts if hasattr(c, "co_code")}
    assert names <= set(found)
    for name in names:
        ops = {i.opname for i in dis.get_instructions(found[name])}
        assert not ops & {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLOSURE"}, name
        nested = [c for c in found[name].co_consts if hasattr(c, "co_code")]
        assert nested == [], name


# --- the harness: what the child sends, what the parent accepts ---------------------------------


def harness_run(program: str, steps: list[list[str]]):
    payload = {"steps": steps, "helper": "_h", "nonce": "n0nce"}
    return run_python(textwrap.dedent(program), limits=FAST, harness=(CHILD_SOURCE, payload))


def test_harness_values_round_trip_as_plain_data():
    values = [None, True, -3, 2**20000, 1.5, float("-inf"), -0.0, 1 + 2j, "é\n", b"\x00"]
    values += [range(1, 9, 2), [1, (2,)], {"k": {1, 2}}, frozenset({3}), (), set()]
    steps = [["eval", f"VALUES[{i}]"] for i in range(len(values))]
    steps += [["eval", "(x for x in [1, 2])"], ["eval", "object()"], ["exec", "1/0"]]
    steps += [["call", "len", "([1, 2],)"]]
    result = harness_run(f"VALUES = {literal_source(values)}", steps)
    records = read_records(result.channel, len(steps), "n0nce")
    assert records is not None, result.stderr
    decoded = [decode(value) for _, value in records[: len(values)]]
    assert decoded == values
    assert [type(v) for v in decoded] == [type(v) for v in values]
    assert list(decode(records[len(values)][1])) == [1, 2]  # a generator: its items
    assert records[len(values) + 1][0] is False  # not plain data
    assert records[-2:] == [(False, "ZeroDivisionError"), (True, 2)]


def test_records_are_accepted_only_whole():
    good = 'n ["program","ok"]\nn [0,"ok",1]\nn ["end",1]\n'
    assert read_records(good, 1, "n") == [(True, 1)]
    assert read_records(good, 2, "n") is None
    bad = [
        good.replace("n ", "m ", 1),  # another nonce
        good.replace('n ["end",1]\n', ""),  # cut short
        good + 'n [0,"ok",2]\n',  # an extra record
        good.replace("[0,", "[true,"),
        good.replace('"ok",1', '"fine",1'),
        'n ["program","error"]\nn [0,"ok",1]\nn ["end",1]\n',
    ]
    assert all(read_records(text, 1, "n") is None for text in bad)


def test_harness_file_is_gone_and_its_functions_are_protected():
    program = """
        import os, sys
        print(sorted(os.listdir()))
        run = sys._getframe(1).f_globals["_run"]
        try:
            run.__defaults__ = ()
        except PermissionError as err:
            print("refused", err)
        """
    result = harness_run(program, [["exec", "pass"]])
    assert result.stdout.splitlines()[0] == "['main.py']"
    assert "refused sandbox:" in result.stdout
    assert read_records(result.channel, 1, "n0nce") == [(True, None)]


def test_harness_functions_read_no_globals():
    module = compile(CHILD_SOURCE, "<harness>", "exec")
    found = {c.co_name: c for c in module.co_consts if hasattr(c, "co_code")}
    for name in ("_plain", "_dump", "_cmp", "_run"):
        codes = [found[name], *(c for c in found[name].co_consts if hasattr(c, "co_code"))]
        for code in codes:
            ops = {i.opname for i in dis.get_instructions(code)}
            assert not ops & {"LOAD_GLOBAL", "LOAD_NAME"}, (name, code.co_name)


def test_other_processes_and_kernel_memory_are_unreadable():
    result = run(
        """
        import os
        print(len(open("/proc/self/status").read()) > 0)
        parent = f"/proc/{os.getppid()}"
        paths = (parent + "/mem", parent + "/environ", "/proc/self/../1/cmdline", "/proc/kcore")
        for path in paths:
            try:
                open(path, "rb").read(1)
                print("read", path)
            except PermissionError:
                print("refused")
        os.chdir(parent)
        try:
            open("cmdline").read()
            print("read cmdline")
        except PermissionError:
            print("refused")
        """
    )
    assert result.stdout.split() == ["True"] + ["refused"] * 5, result.stderr


@pytest.mark.parametrize(
    "snippet",
    [
        "assert add(1, 2) == 31337",
        "assert abs(area(2.0) - 0.31337) < 1e-3",
        "import math\nassert math.isclose(f(1), 0.31337)",
        "expected = [31337]\nassert f([3]) == expected",
        "def close(a, b):\n    return abs(a - b) < 0.31337\nassert close(f(1), 31337)",
        "def check(candidate):\n    assert candidate(1) == 31337\n\ncheck(f)",
        "assert sorted(f(x), key=len) == ['31337']",
        "assert f(1) == 2 or g(2) == 31337",
        "assert len(stack) == 31337 and stack.top() is None",
    ],
)
def test_expected_values_stay_out_of_the_childs_steps(snippet):
    plan = plan_assert_test(snippet, "_h")
    assert plan.steps and plan.checks
    assert not any("31337" in text for step in plan.steps for text in step[1:]), plan.steps


def test_a_probe_that_raised_fails_only_the_checks_that_read_it():
    program = "```python\ndef f(x):\n    return x\ndef g(x):\n    raise ValueError(x)\n```"
    assert code_reward(program, ["assert f(1) or g(1)"]) == 1.0
    assert code_reward(program, ["assert g(1) or f(1)"]) == 0.0
    assert (
        code_reward(program, ["assert f(3) ** 2 == 9", "assert f(3) ** 2 == 8"], mode="partial")
        == 0.5
    )
