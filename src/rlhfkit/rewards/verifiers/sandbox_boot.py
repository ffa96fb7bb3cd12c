"""The sandbox's child side: the bootstrap that runs before the program, and its configuration.

:data:`BOOTSTRAP` is the text the child interpreter runs (``python -I -S -B -c BOOTSTRAP
CONFIG``) before the program: it sets the resource limits, enters a new network namespace,
replaces ``_posixsubprocess`` by a stub, loads a harness if there is one and installs the audit
hook (layers 2 to 4 of :mod:`rlhfkit.rewards.verifiers.sandbox`, whose docstring lists what the
hook refuses and what it does not guarantee). It is text, not a module, because it runs in the
bare child interpreter, where ``rlhfkit`` is not importable. :func:`boot_config` builds its one
argument: the working directory, the limits and the events the hook refuses.
"""

from __future__ import annotations

import json

PROGRAM_NAME = "main.py"
"""File name of the program in the sandbox's working directory (shown in tracebacks)."""

HARNESS_NAME = ".harness.json"
"""File the bootstrap reads a harness from, and removes, before the program runs."""

BOOTSTRAP = r'''
import sys


def _as_path(path, base_fd, _type=type, _str=str, _bytes=bytes, _int=int, _OSError=OSError,
             _decode=bytes.decode, _readlink=__import__("posix").readlink):
    """(path, base) ready for _resolve, or None when the path cannot be checked."""
    if _type(path) is _bytes:
        path = _decode(path, "utf-8", "surrogateescape")
    elif _type(path) is _int:
        try:
            return _readlink("/proc/self/fd/" + _int.__repr__(path)), None
        except _OSError:
            return None
    elif _type(path) is not _str:
        return None
    if base_fd is None or (_type(base_fd) is _int and base_fd < 0):  # -1, AT_FDCWD: the cwd
        return path, None
    if _type(base_fd) is not _int:
        return None
    try:
        return path, _readlink("/proc/self/fd/" + _int.__repr__(base_fd))
    except _OSError:
        return None


def _resolve(path, base, _readlink=__import__("posix").readlink,
             _getcwd=__import__("posix").getcwd, _OSError=OSError, _Perm=PermissionError):
    """Absolute path of ``path`` (relative to ``base`` or the cwd), symbolic links followed."""
    if not path.startswith("/"):
        path = (_getcwd() if base is None else base) + "/" + path
    todo = path.split("/")
    todo.reverse()
    resolved = ""
    hops = 0
    while todo:
        name = todo.pop()
        if name == "" or name == ".":
            continue
        if name == "..":
            resolved = resolved[: resolved.rfind("/")] if resolved else ""
            continue
        candidate = resolved + "/" + name
        try:
            target = _readlink(candidate)
        except _OSError:  # not a link (or missing): a plain component
            resolved = candidate
            continue
        hops += 1
        if hops > 40:
            raise _Perm("sandbox: too many levels of symbolic links")
        if target.startswith("/"):
            resolved = ""
        more = target.split("/")
        more.reverse()
        todo.extend(more)
    return resolved or "/"


def _inside(path, base_fd, root, _as_path=_as_path, _resolve=_resolve):
    """True when ``path`` (opened relative to ``base_fd``) lies in the directory ``root``."""
    checked = _as_path(path, base_fd)
    if checked is None:
        return False
    if checked[0] in ("/dev/null", "/dev/stdout", "/dev/stderr"):
        return True
    where = _resolve(checked[0], checked[1])
    return where == root or where.startswith(root + "/")


def _foreign(path, _resolve=_resolve, _getpid=__import__("posix").getpid, _repr=int.__repr__):
    """True for another process's /proc entries (its memory, files, environment) and the
    kernel's memory: the parent holds the tests' expected values."""
    where = _resolve(path, None)
    if where.startswith("/proc/"):
        name = where[6:].split("/")[0]
        if name.isdigit():
            return name != _repr(_getpid())
        return name == "kcore"
    return where == "/dev/mem" or where == "/dev/kmem" or where == "/dev/port"


def _check_open(args, root, _type=type, _int=int, _str=str, _len=len, _inside=_inside,
                _Perm=PermissionError, _stat=__import__("posix").stat, _OSError=OSError,
                _item=tuple.__getitem__, _as_path=_as_path, _foreign=_foreign, _mask=0):
    """Refuse opening a path outside ``root`` for writing (or, with os.open, a directory), and
    reading another process's /proc entries."""
    if _len(args) < 3:
        raise _Perm("sandbox: unexpected open event")
    path, mode, flags = args[0], args[1], args[2]
    if _type(path) is _int:  # an already open descriptor: the kernel enforces its mode
        return
    writing = _type(flags) is _int and (flags & _mask) != 0
    if not writing and _type(mode) is _str:
        for c in "wax+":
            if c in mode:
                writing = True
    if writing:
        if mode is None and _type(path) is _str and not path.startswith("/"):
            for part in path.split("/"):
                if part == "..":  # os.open may be relative to a dir_fd the hook cannot see
                    raise _Perm("sandbox: '..' in a relative os.open path is not allowed")
        if not _inside(path, None, root):
            raise _Perm("sandbox: writing outside the working directory is not allowed")
        return
    checked = _as_path(path, None)
    if checked is not None and _foreign(checked[0]):
        raise _Perm("sandbox: reading another process's /proc entries is not allowed")
    if mode is None and _type(path) is _str and not _inside(path, None, root):
        try:  # os.open of a directory outside: its fd could serve as a dir_fd
            is_dir = (_item(_stat(path), 0) & 0o170000) == 0o040000
        except _OSError:
            return
        if is_dir:
            raise _Perm("sandbox: opening a directory outside the working directory")


def _hook(event, args, _root="", _blocked=frozenset(), _prefixes=(), _paths=(),
          _bad_imports=frozenset(), _stdlib=(), _ours=(), _getpid=__import__("posix").getpid,
          _type=type, _str=str, _int=int, _len=len, _check_open=_check_open, _inside=_inside,
          _Perm=PermissionError):
    """The audit hook: refuse the events listed in the module docstring of sandbox.py."""
    if event == "socket.__new__" and _len(args) > 1 and _type(args[1]) is _int:
        if args[1] == 1:  # AF_UNIX, for socketpair (asyncio); connect/bind/sendto stay refused
            return
    if event in _blocked or event.startswith(_prefixes):
        if (event == "os.kill" or event == "os.killpg") and _len(args) > 0:
            if _type(args[0]) is _int and args[0] == _getpid():
                return
        raise _Perm("sandbox: " + event + " is not allowed")
    if event == "open":
        _check_open(args, _root)
    elif event == "import":
        if _len(args) > 1:
            if _type(args[0]) is _str and args[0] in _bad_imports:
                raise _Perm("sandbox: importing " + args[0] + " is not allowed")
            if _type(args[1]) is _str and not args[1].startswith(_stdlib):
                if args[1].endswith(".so"):
                    raise _Perm("sandbox: native extensions outside the standard library")
    elif event == "object.__setattr__" or event == "object.__delattr__":
        if _len(args) > 0:
            for fn in _ours:
                if args[0] is fn:
                    raise _Perm("sandbox: changing the sandbox's own functions")
    else:
        for spec in _paths:
            if spec[0] == event:
                for path_at, fd_at in spec[1]:
                    path = args[path_at] if path_at < _len(args) else None
                    fd = args[fd_at] if fd_at is not None and fd_at < _len(args) else None
                    if _type(path) is _str and (path == ":memory:" or path == ""):
                        continue
                    if not _inside(path, fd, _root):
                        raise _Perm("sandbox: " + event + " outside the working directory")


def _boot():
    import json
    import posix
    import resource

    cfg = json.loads(sys.argv[1])
    for name, soft, hard in cfg["rlimits"]:
        which = getattr(resource, name)
        current = resource.getrlimit(which)[1]
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(which, (soft, hard))
    if cfg["netns"]:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare(0x40000000)  # CLONE_NEWNET; EPERM without CAP_SYS_ADMIN: hook only
        del libc

    def no_fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: creating processes is not allowed")

    stub = type(sys)("_posixsubprocess")
    stub.fork_exec = no_fork_exec
    sys.modules["_posixsubprocess"] = stub

    root = cfg["root"]
    with open(root + "/" + cfg["program"], encoding="utf-8") as f:
        source = f.read()
    run, protect = None, ()
    if cfg["harness"]:
        with open(root + "/" + cfg["harness"], encoding="utf-8") as f:
            spec = json.load(f)
        posix.unlink(root + "/" + cfg["harness"])
        scope = {"__builtins__": __builtins__, "__name__": "rlhfkit_harness"}
        exec(compile(spec["source"], "<harness>", "exec", dont_inherit=True), scope)
        run, protect = scope["make"](spec["payload"], cfg["channel"])
    mask = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    _check_open.__defaults__ = _check_open.__defaults__[:-1] + (mask,)
    _hook.__defaults__ = (
        root,
        frozenset(cfg["blocked"]),
        tuple(cfg["prefixes"]),
        tuple((event, tuple((p, d) for p, d in spec)) for event, spec in cfg["paths"]),
        frozenset(cfg["bad_imports"]),
        tuple(p + "/" for p in sys.path if p),
        (_hook, _check_open, _inside, _resolve, _as_path, _foreign) + tuple(protect),
    ) + _hook.__defaults__[7:]
    code = compile(source, cfg["program"], "exec")
    sys.addaudithook(_hook)
    main = type(sys)("__main__")
    main.__file__ = root + "/" + cfg["program"]
    main.__builtins__ = __builtins__
    sys.modules["__main__"] = main
    sys.argv = [cfg["program"]]
    return code, main.__dict__, run


_code, _namespace, _run = _boot()
del _boot, _hook, _check_open, _inside, _resolve, _as_path, _foreign
if _run is None:
    exec(_code, _namespace)
else:
    _run(_code, _namespace)  # the program, then the tests; it ends the process
'''

_BLOCKED_EVENTS = (
    # process creation and signalling other processes
    "os.fork",
    "os.forkpty",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.spawn",
    "os.startfile",
    "subprocess.Popen",
    "pty.spawn",
    "webbrowser.open",
    "os.kill",
    "os.killpg",
    # escaping or switching off the hook
    "gc.get_objects",
    "gc.get_referrers",
    "gc.get_referents",
    "sys._current_frames",
    "sys._current_exceptions",
    "sys.settrace",
    "sys.setprofile",
    "cpython.PyInterpreterState_New",
    "resource.setrlimit",
    "resource.prlimit",
    "sqlite3.enable_load_extension",
    "sqlite3.load_extension",
    # links could point into, or alias files of, the world outside the working directory
    "os.link",
    "os.symlink",
)
_BLOCKED_PREFIXES = ("socket.", "ctypes.")
_BAD_IMPORTS = ("_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels", "_ctypes")
# audit event -> ((index of a path argument, index of its dir_fd argument or None), ...)
_PATH_EVENTS = (
    ("os.mkdir", ((0, 2),)),
    ("os.remove", ((0, 1),)),
    ("os.rmdir", ((0, 1),)),
    ("os.rename", ((0, 2), (1, 3))),
    ("os.truncate", ((0, None),)),
    ("os.chmod", ((0, 2),)),
    ("os.chown", ((0, 3),)),
    ("os.utime", ((0, 3),)),
    ("os.setxattr", ((0, None),)),
    ("os.removexattr", ((0, None),)),
    ("sqlite3.connect", ((0, None),)),
)


def boot_config(
    root: str, rlimits: list[tuple[str, int, int]], network_namespace: bool, channel: int | None
) -> str:
    """The bootstrap's configuration (JSON, passed as its one argument).

    Args:
        root: The working directory (the program's file, and the harness's, are in it).
        rlimits: (resource name, soft, hard) triples to set.
        network_namespace: Try to enter a new, empty network namespace.
        channel: File descriptor of a harness's result channel; None: no harness.
    """
    return json.dumps(
        {
            "root": root,
            "program": PROGRAM_NAME,
            "harness": HARNESS_NAME if channel is not None else None,
            "channel": channel,
            "rlimits": rlimits,
            "netns": network_namespace,
            "blocked": _BLOCKED_EVENTS,
            "prefixes": _BLOCKED_PREFIXES,
            "bad_imports": _BAD_IMPORTS,
            "paths": _PATH_EVENTS,
        }
    )
