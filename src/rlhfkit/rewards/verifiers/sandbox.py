"""Run untrusted Python in a restricted child process (the code verifier's sandbox).

:func:`run_python` runs a program in a fresh interpreter (``sys.executable -I -S -B``: no
site-packages, no ``PYTHON*`` variables, no current directory on ``sys.path``) and returns what it
printed, how it ended and how long it took. The layers, each meant to hold if another fails:

1. **A throw-away working directory**, created for the run and removed afterwards; the child's
   environment is cleared (only ``PATH``, ``LANG``/``LC_ALL``, ``HOME`` and ``TMPDIR``, the last
   two pointing into that directory).
2. **Resource limits** (``setrlimit``, soft = hard except CPU): CPU seconds, address space (memory),
   size of written files, open files, processes, no core dumps. The wall-clock timeout is
   enforced by the parent, which kills the child's whole process group (the child starts a new
   session) on expiry and, in every case, once the child has exited (no stragglers).
3. **No network**: the child enters a new, empty network namespace (``unshare(CLONE_NEWNET)``;
   this needs ``CAP_SYS_ADMIN``, so it works as root and is skipped silently otherwise).
   The namespace and the limits are set up by the child's bootstrap rather than in a
   ``preexec_fn``, which is unsafe when the parent has threads (rewards may be scored in a pool).
4. **An audit hook** (PEP 578), installed by a small bootstrap before the program runs; audit
   hooks cannot be removed. It refuses (``PermissionError``) creating sockets other than Unix
   ones (``socket.socketpair``, which ``asyncio`` needs), connecting, binding, sending to an
   address and resolving names; process creation (``os.fork``/``forkpty``/``exec*``/
   ``posix_spawn``/``system``, ``subprocess.Popen``, ``pty.spawn``; ``_posixsubprocess`` is
   replaced by a stub because its ``fork_exec`` raises no event); signals to other processes;
   ``ctypes`` (so native code cannot switch the hook off); raising resource limits; tracing,
   ``gc`` referrer walks, other threads' frames, sub-interpreters, changing the hook's own
   functions (their code or defaults), and native extensions loaded from outside the standard
   library; and writes outside the working directory: opening a file for writing, creating,
   removing, renaming, truncating, changing the mode/owner/times/attributes of a path (symbolic
   links resolved), hard and symbolic links, SQLite databases, and opening directories outside
   it with ``os.open`` (so ``dir_fd`` cannot point outside). Reading files (the standard
   library included) is allowed, except other processes' ``/proc/<pid>`` entries (their
   memory, files, environment: the parent holds the tests' expected values) and the kernel's
   memory (``/proc/kcore``, ``/dev/mem``); ``/dev/null``, ``/dev/stdout`` and ``/dev/stderr``
   are writable. Names the hook needs are bound when it is defined (default arguments, not
   globals), so the program cannot swap them through ``builtins`` or a traceback's frames.

What this does NOT guarantee. Audit hooks run inside the process they guard, so they are
defence in depth, not a security boundary: a bug in CPython or an extension module, crafted
bytecode (``marshal`` and ``CodeType`` stay allowed because imports and ``asyncio`` need them)
or a race between the hook's path check and the system call (another thread swapping a path)
can get past them. Without ``CAP_SYS_ADMIN`` there is no network namespace and only the hook
blocks sockets; as root the child keeps root's privileges (``RLIMIT_NPROC`` does not apply to
root; whatever root can read, the program can read). ``RLIMIT_NPROC`` counts all tasks
(threads included) of the user, not only the sandbox's. Nothing here limits reading the file
system (expected outputs kept in a file the program can name are readable). For untrusted
code at scale (RL training on model-written programs), run the verifier inside a container or
VM with seccomp, no network, a read-only root file system and no copy of the dataset; this
module is the inner layer. Third-party packages are not importable in the child (``-S``: no
site-packages).

A *harness* (``run_python(..., harness=...)``) is loaded by the bootstrap before the program
and runs it, reporting through a private pipe (:attr:`SandboxResult.channel`); the code
verifier's is :mod:`rlhfkit.rewards.verifiers.harness`.

The child's side (the bootstrap that sets the limits and installs the hook, and the events it
refuses) is :mod:`rlhfkit.rewards.verifiers.sandbox_boot`; this module is the parent's: the
limits, starting and supervising the child (its pipes, the deadline, killing its process
group) and how the run ended.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from rlhfkit.rewards.verifiers.sandbox_boot import (
    BOOTSTRAP,
    HARNESS_NAME,
    PROGRAM_NAME,
    boot_config,
)


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run."""

    timeout: float = 5.0
    """Wall-clock seconds before the process group is killed."""
    cpu_seconds: int | None = None
    """RLIMIT_CPU (SIGXCPU, then SIGKILL one second later); None: ceil(timeout) + 1."""
    memory_bytes: int = 512 * 2**20
    """RLIMIT_AS: address space of the child (allocations beyond it raise MemoryError)."""
    file_bytes: int = 16 * 2**20
    """RLIMIT_FSIZE: largest file the child may write."""
    open_files: int = 64
    """RLIMIT_NOFILE: open file descriptors."""
    processes: int = 256
    """RLIMIT_NPROC: tasks of the child's user (all of them; root is exempt); a backstop."""
    output_bytes: int = 64 * 2**10
    """Bytes of stdout and of stderr kept (the rest is read and dropped; ``truncated``)."""
    network_namespace: bool = True
    """Try to enter a new, empty network namespace (needs CAP_SYS_ADMIN; skipped if denied)."""
    channel_bytes: int = 16 * 2**20
    """Bytes of a harness's result channel kept (the rest is dropped)."""


DEFAULT_LIMITS = SandboxLimits()
"""The limits :func:`run_python` uses when given none."""


@dataclass(frozen=True)
class SandboxResult:
    """How a sandboxed run ended.

    ``status`` is ``"ok"`` (exit status 0), ``"error"`` (non-zero exit status: an exception, a
    failed assert, a syntax error), ``"timeout"`` (wall clock or CPU limit), ``"memory"`` (a
    MemoryError reached the top) or ``"killed"`` (ended by another signal, e.g. a crash).
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    wall_s: float
    truncated: bool
    status: str
    channel: str = ""
    """What a harness wrote to its result channel (empty without a harness)."""


def _rlimits(limits: SandboxLimits) -> list[tuple[str, int, int]]:
    """(resource name, soft, hard) triples the bootstrap sets.

    Soft and hard are equal except for the CPU time: SIGXCPU at the soft limit (a "timeout"),
    SIGKILL one second later should the signal be caught.
    """
    cpu = limits.cpu_seconds if limits.cpu_seconds is not None else math.ceil(limits.timeout) + 1
    same = [
        ("RLIMIT_AS", int(limits.memory_bytes)),
        ("RLIMIT_FSIZE", int(limits.file_bytes)),
        ("RLIMIT_NOFILE", int(limits.open_files)),
        ("RLIMIT_NPROC", int(limits.processes)),
        ("RLIMIT_CORE", 0),
    ]
    return [("RLIMIT_CPU", int(cpu), int(cpu) + 1)] + [(name, v, v) for name, v in same]


def _exited(pid: int) -> bool:
    """True once the child has exited, without reaping it (its pid stays reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class _Pipes:
    """Feeds stdin and drains stdout/stderr (and a result channel) of a child.

    The first ``limits.output_bytes`` of stdout and of stderr are kept, and the first
    ``limits.channel_bytes`` of the channel.
    """

    def __init__(
        self, proc: subprocess.Popen, data: bytes, limits: SandboxLimits, channel: int | None
    ) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self.caps = {proc.stdout.fileno(): limits.output_bytes}
        self.caps[proc.stderr.fileno()] = limits.output_bytes
        if channel is not None:
            self.caps[channel] = limits.channel_bytes
        self.channel = channel
        self.truncated = False
        self.data = memoryview(data)
        self.out = {fd: bytearray() for fd in self.caps}
        self.sel = selectors.DefaultSelector()
        for fd in self.out:
            self.sel.register(fd, selectors.EVENT_READ)
        self.stdin = proc.stdin
        if data:
            os.set_blocking(proc.stdin.fileno(), False)
            self.sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        else:
            proc.stdin.close()

    def pump(self, timeout: float) -> int:
        """Move data for up to ``timeout`` seconds; the number of pipes that were ready."""
        ready = self.sel.select(timeout)
        for key, _ in ready:
            fd = key.fd
            if fd in self.out:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.sel.unregister(fd)
                    continue
                buf = self.out[fd]
                keep = max(0, self.caps[fd] - len(buf))
                buf += chunk[:keep]
                self.truncated |= len(chunk) > keep and fd != self.channel
            else:
                self._feed(fd)
        return len(ready)

    @property
    def open(self) -> bool:
        """True while some pipe is still open."""
        return bool(self.sel.get_map())

    def _feed(self, fd: int) -> None:
        try:
            sent = os.write(fd, self.data[:65536])
        except BlockingIOError:
            return
        except BrokenPipeError:  # the child stopped reading: drop the rest
            sent = len(self.data)
        self.data = self.data[sent:]
        if not self.data:
            self.sel.unregister(fd)
            self.stdin.close()

    def close(self) -> tuple[bytes, bytes, bytes]:
        """(stdout, stderr, channel) bytes kept."""
        self.sel.close()
        if not self.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.stdin.close()
        first, second, *channel = self.out.values()
        return bytes(first), bytes(second), bytes(channel[0]) if channel else b""


def _status(returncode: int, timed_out: bool, stderr: str) -> str:
    """The ``status`` of :class:`SandboxResult`."""
    if timed_out:
        return "timeout"
    if returncode == 0:
        return "ok"
    if returncode < 0:
        return "killed"
    lines = stderr.rstrip().splitlines()
    if lines and lines[-1].startswith("MemoryError"):
        return "memory"
    return "error"


def _supervise(
    proc: subprocess.Popen, data: bytes, limits: SandboxLimits, channel: int | None = None
) -> tuple[bytes, bytes, bytes, bool, bool]:
    """Run the I/O loop until the child ends or the deadline passes; kill its process group.

    Args:
        proc: The child.
        data: Its standard input.
        limits: The wall-clock timeout and the output caps.
        channel: Read end of a result channel to drain too, or None.

    Returns:
        (stdout bytes, stderr bytes, channel bytes, truncated, timed_out).
    """
    deadline = time.monotonic() + limits.timeout
    pipes = _Pipes(proc, data, limits, channel)
    timed_out = False
    try:
        while pipes.open:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            if not pipes.pump(min(remaining, 0.05)) and _exited(proc.pid):
                break  # ended, and whatever still holds its pipes writes nothing
        while not timed_out and not _exited(proc.pid):  # pipes closed; wait for the exit
            if time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(0.002)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group, stragglers included
        proc.wait()
        stdout, stderr, results = pipes.close()
    return stdout, stderr, results, pipes.truncated, timed_out


def run_python(
    source: str,
    *,
    stdin: str = "",
    limits: SandboxLimits = DEFAULT_LIMITS,
    harness: tuple[str, object] | None = None,
) -> SandboxResult:
    """Run the Python program ``source`` in a sandboxed child process.

    The program runs as ``__main__`` from ``main.py`` in a fresh temporary working directory
    (removed afterwards), under the limits and the audit hook described in the module docstring.

    Args:
        source: The program text.
        stdin: Text given to the program on standard input.
        limits: Time, memory, file, process and output limits.
        harness: ``(harness source, payload)``: the bootstrap execs the source and calls its
            ``make(payload, fd)`` before the program runs (the file that carried them is gone
            by then); ``make`` returns ``(run, objects to protect)`` and ``run(code,
            namespace)`` runs the program instead of the bootstrap, writing results to the
            pipe ``fd`` (:attr:`SandboxResult.channel`). See
            :mod:`rlhfkit.rewards.verifiers.harness`.

    Returns:
        The exit status, the (capped) output and how the run ended.
    """
    root = os.path.realpath(tempfile.mkdtemp(prefix="rlhfkit-sandbox-"))
    read_fd = write_fd = None
    try:
        with open(os.path.join(root, PROGRAM_NAME), "w", encoding="utf-8") as f:
            f.write(source)
        if harness is not None:
            with open(os.path.join(root, HARNESS_NAME), "w", encoding="utf-8") as f:
                json.dump({"source": harness[0], "payload": harness[1]}, f)
            read_fd, write_fd = os.pipe()
        env = {
            "PATH": "/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": root,
            "TMPDIR": root,
        }
        config = boot_config(root, _rlimits(limits), limits.network_namespace, write_fd)
        argv = [sys.executable, "-I", "-S", "-B", "-c", BOOTSTRAP, config]
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            cwd=root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            pass_fds=() if write_fd is None else (write_fd,),
        )
        if write_fd is not None:
            os.close(write_fd)  # the child holds the only write end: EOF when it is gone
            write_fd = None
        out, err, channel, truncated, timed_out = _supervise(
            proc, stdin.encode("utf-8"), limits, read_fd
        )
        wall_s = time.perf_counter() - start
    finally:
        for fd in (read_fd, write_fd):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(root, ignore_errors=True)
    returncode = proc.returncode
    if returncode == -signal.SIGXCPU:
        timed_out = True
    stderr = err.decode("utf-8", errors="replace")
    return SandboxResult(
        returncode=returncode,
        stdout=out.decode("utf-8", errors="replace"),
        stderr=stderr,
        timed_out=timed_out,
        wall_s=wall_s,
        truncated=truncated,
        status=_status(returncode, timed_out, stderr),
        channel=channel.decode("utf-8", errors="replace"),
    )
