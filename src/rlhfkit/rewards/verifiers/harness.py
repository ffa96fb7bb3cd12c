"""The code verifier's harness: what runs after the program in its process, and what comes back.

RL optimises against the verifier, so the program is an adversary, and the harness runs in the
program's own process: the program can exit early, replace builtins, patch the harness, hook
exceptions or write to any file descriptor. The design therefore never asks the child for a
verdict it could fake. The child only *computes values*; the parent (or a judge process that
runs no program code) compares them with the expected values, which never enter the
program's process (:mod:`rlhfkit.rewards.verifiers.judge`):

- The parent turns a test into **steps**: ``exec`` a statement of the test, ``eval`` a
  *probe* (the part of an assert that needs the program, e.g. ``add(1, 2)`` of ``assert
  add(1, 2) == 3``; :mod:`rlhfkit.rewards.verifiers.asserts` splits asserts), or ``call`` the
  entry function with arguments. Steps carry inputs, never expected values.
- The sandbox's bootstrap compiles :data:`CHILD_SOURCE` and the steps, and reads the run's
  random nonce and the channel's file descriptor, *before* the program runs; the file that
  carried them is deleted by then. ``run`` then executes the program (a top-level
  ``sys.exit(0)`` only ends the program; any other exception fails every test), then each
  step in the test's own globals, a dict the program is never given (its builtins are
  Python's as they were before the program ran, then the program's names), and writes one
  line per step to a pipe the parent opened: ``<nonce> [i, "ok", value]`` or ``<nonce> [i,
  "error", "ExceptionName"]``, between ``<nonce> ["program", "ok"]`` and ``<nonce> ["end",
  n]``. It leaves with ``os._exit`` (no ``atexit`` hooks, no threads, no excepthook).
- A value is converted to **plain data** in the child: ``None``, ``bool``, ``int``, ``float``,
  ``complex``, ``str``, ``bytes``, ``range`` and ``list``/``tuple``/``dict``/``set``/
  ``frozenset`` of plain data, by exact type (a subclass of ``int`` or ``str``, an object
  of the program's classes, anything with its own ``__eq__``: the step fails). Exceptions:
  ``collections.defaultdict``/``OrderedDict``/``Counter`` become plain dicts (read with
  ``dict.items``, which no subclass can override), and builtin iterators and generators
  are run to their end (at most :data:`MAX_ITEMS` items) and come back as an iterator
  over their items (so ``list(gen()) == [...]`` holds and ``gen() == [...]`` does not, as
  in plain Python). Values travel as tagged JSON that the parent decodes into builtin
  objects only.
- The parent accepts the lines only as a whole: the nonce on each, the program's line, exactly
  one record per step in order, the end line. Anything missing, extra or malformed fails
  the test; the exit status is never looked at.
- The harness's functions take every name they use from their default arguments (bound
  before the program runs), and the audit hook refuses rewriting them (their code or
  defaults), so replacing builtins or module globals does not reach them.

Forging the channel gains little: a forged ``eval`` or ``call`` record is still compared with
an expected value the program never saw. What the parent cannot check is the claim that an
``exec`` statement completed, and the asserts nested in one (a loop) are checked in the child
(each comparison on plain data, so objects faking equality or truth fail). A program written
against this harness could, by walking the interpreter's frames to the harness (to read the
nonce, or the test's namespace) and writing well-formed lines itself, pass a test made only of
such statements: in-process secrets cannot be hidden from code that runs in the same process.
Tests meant for RL should therefore be top-level asserts, call-based or stdin/stdout cases,
which that does not reach.
"""

from __future__ import annotations

MAX_ITEMS = 100_000
"""Most items taken from one iterator (or container) the program returns."""

MAX_DEPTH = 100
"""Deepest nesting of a returned value (deeper: the step fails)."""

CHILD_SOURCE = r"""
class _Iter:
    # The items an iterator (a generator, map, zip, ...) returned by the program produced.
    __slots__ = ("items",)

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return self.items.__iter__()


class _Names(dict):
    # The test's builtins: Python's, as they were before the program ran, then the program's
    # names (a name the program binds never hides a builtin from the test's code).
    __slots__ = ("then",)

    def __missing__(self, name):
        return self.then[name]


def _plain(value, depth=0, _self=None, _type=type, _Iter=_Iter, _iters=(), _dicts=(),
           _atoms=(bool, int, float, str, bytes, complex, range), _items=dict.items,
           _list=list, _tuple=tuple, _set=set, _frozenset=frozenset, _dict=dict, _len=len,
           _Error=ValueError, _max_depth=100, _max_items=100_000):
    # ``value`` as plain builtin data (exact types only); ValueError for anything else.
    kind = _type(value)
    if value is None:
        return value
    for atom in _atoms:
        if kind is atom:
            return value
    if depth >= _max_depth:
        raise _Error("value nested too deeply")
    if kind is _list or kind is _tuple or kind is _set or kind is _frozenset:
        out = []
        for item in value:
            out.append(_self(item, depth + 1))
        if kind is _list:
            return out
        return _tuple(out) if kind is _tuple else _set(out) if kind is _set else _frozenset(out)
    is_dict = kind is _dict
    for flavour in _dicts:
        is_dict = is_dict or kind is flavour
    if is_dict:
        out = {}
        for key, item in _items(value):
            out[_self(key, depth + 1)] = _self(item, depth + 1)
        return out
    for iterator in _iters:
        if kind is iterator:
            out = []
            for item in value:
                if _len(out) >= _max_items:
                    raise _Error("iterator too long")
                out.append(_self(item, depth + 1))
            return _Iter(out)
    raise _Error("not plain data")


def _dump(value, out, _self=None, _type=type, _Iter=_Iter, _int_repr=int.__repr__,
          _float_repr=float.__repr__, _bits=int.bit_length, _hex=hex, _finite=None,
          _string=None, _bytes_hex=bytes.hex, _items=dict.items, _list=list, _tuple=tuple,
          _set=set, _frozenset=frozenset, _dict=dict, _bool=bool, _int=int, _float=float,
          _str=str, _bytes=bytes, _complex=complex, _range=range):
    # Append the tagged JSON of the plain ``value`` to the list ``out``.
    kind = _type(value)
    if value is None:
        out.append("null")
    elif kind is _bool:
        out.append("true" if value else "false")
    elif kind is _int:
        if _bits(value) <= 13000:
            out.append(_int_repr(value))
        else:
            out.append('["N",' + _string(_hex(value)) + "]")
    elif kind is _float:
        if _finite(value):
            out.append(_float_repr(value))
        else:
            out.append('["F","' + _float_repr(value) + '"]')
    elif kind is _str:
        out.append(_string(value))
    elif kind is _bytes:
        out.append('["B",' + _string(_bytes_hex(value)) + "]")
    elif kind is _complex or kind is _range:
        if kind is _complex:
            out.append('["C"')
            parts = (value.real, value.imag)
        else:
            out.append('["R"')
            parts = (value.start, value.stop, value.step)
        for part in parts:
            out.append(",")
            _self(part, out)
        out.append("]")
    elif kind is _dict:
        out.append('["D"')
        for key, item in _items(value):
            out.append(",")
            _self(key, out)
            out.append(",")
            _self(item, out)
        out.append("]")
    else:
        if kind is _list:
            out.append('["L"')
        elif kind is _tuple:
            out.append('["T"')
        elif kind is _set:
            out.append('["S"')
        elif kind is _frozenset:
            out.append('["Z"')
        else:
            out.append('["I"')
            value = value.items
        for item in value:
            out.append(",")
            _self(item, out)
        out.append("]")


def _cmp(ops, operands, _plain=_plain, _len=len):
    # A comparison in a test run by the child: ``is`` by identity, the others on plain data;
    # ("bool",): truth on plain data.
    if ops == ("bool",):
        return not not _plain(operands[0])
    i = 0
    while i < _len(ops):
        op, left, right = ops[i], operands[i], operands[i + 1]
        if op == "Is":
            ok = left is right
        elif op == "IsNot":
            ok = left is not right
        else:
            left, right = _plain(left), _plain(right)
            if op == "Eq":
                ok = left == right
            elif op == "NotEq":
                ok = left != right
            elif op == "Lt":
                ok = left < right
            elif op == "LtE":
                ok = left <= right
            elif op == "Gt":
                ok = left > right
            elif op == "GtE":
                ok = left >= right
            elif op == "In":
                ok = left in right
            else:
                ok = left not in right
        if not ok:
            return False
        i += 1
    return True


def _run(code, namespace, _steps=(), _helper="", _nonce="", _fd=-1, _write=None, _exit=None,
         _flush=(), _args_builtins=None, _builtins=None, _Names=_Names, _string=None,
         _plain=_plain, _dump=_dump, _cmp=_cmp, _exec=exec, _eval=eval,
         _name=type.__dict__["__name__"].__get__, _type=type, _int=int,
         _repr=int.__repr__, _setitem=dict.__setitem__, _join="".join, _encode=str.encode,
         _enumerate=enumerate, _len=len, _SystemExit=SystemExit, _SyntaxError=SyntaxError,
         _BaseException=BaseException):
    # Run the program, then each step, one record per step on the channel; then _exit.

    def emit(text, _fd=_fd, _write=_write, _encode=_encode, _nonce=_nonce):
        data = _encode(_nonce + " " + text)
        while data:
            data = data[_write(_fd, data):]

    status = "ok"
    try:
        _exec(code, namespace)
    except _SystemExit as stop:  # sys.exit(0) ends the program, not the tests
        end = stop.code
        if not (end is None or end is False or (_type(end) is _int and end == 0)):
            status = "error"
    except _BaseException:
        status = "error"
    emit('["program","' + status + '"]\n')
    if status == "ok":
        names = _Names(_builtins)
        names.then = namespace
        scope = {"__builtins__": names}  # the test's own globals: the program never gets them
        for index, (kind, first, second) in _enumerate(_steps):
            _setitem(scope, _helper, _cmp)
            try:
                if first is None:
                    raise _SyntaxError("the step does not compile")
                if kind == "exec":
                    _exec(first, scope)
                    body = "null"
                elif kind == "eval":
                    value = _eval(first, scope)
                else:  # the entry function, looked up as in the program's own module
                    args = _eval(second, {"__builtins__": _args_builtins})
                    value = _eval(first, namespace)(*args)
                if kind != "exec":
                    out = []
                    _dump(_plain(value), out)
                    body = _join(out)
                line = "[" + _repr(index) + ',"ok",' + body + "]\n"
            except _BaseException as error:
                try:
                    why = _string(_name(_type(error)))
                except _BaseException:
                    why = '"error"'
                line = "[" + _repr(index) + ',"error",' + why + "]\n"
            emit(line)
        emit('["end",' + _repr(_len(_steps)) + "]\n")
    for flush in _flush:
        try:
            flush()
        except _BaseException:
            pass
    _exit(0 if status == "ok" else 1)


def _bind(fn, **values):
    # Set some of ``fn``'s default arguments by name.
    code = fn.__code__
    names = code.co_varnames[code.co_argcount - len(fn.__defaults__):code.co_argcount]
    fn.__defaults__ = tuple(values.get(n, d) for n, d in zip(names, fn.__defaults__))


def make(payload, fd):
    # Compile the steps (before the program runs) and bind the harness to its channel:
    # (run, the objects the audit hook must protect from being rewritten).
    import _json
    import builtins
    import collections
    import itertools
    import math
    import posix
    import sys
    import types

    samples = ([], (), "", b"", bytearray(), range(1), range(2**70), set(), frozenset(), {},
               {}.values(), {}.items())
    iters = {type(iter(s)) for s in samples}
    iters |= {types.GeneratorType, map, filter, zip, enumerate, reversed, type(reversed([]))}
    iters |= {v for v in vars(itertools).values() if isinstance(v, type)}
    dicts = (collections.defaultdict, collections.OrderedDict, collections.Counter)
    steps = []
    for step in payload["steps"]:
        kind, mode = step[0], "exec" if step[0] == "exec" else "eval"
        try:
            first = compile(step[1], "<test>", mode, dont_inherit=True)
            second = None
            if kind == "call":
                second = compile(step[2], "<args>", "eval", dont_inherit=True)
        except BaseException:
            first = second = None
        steps.append((kind, first, second))
    literal = ("float", "int", "complex", "iter", "set", "frozenset", "range")
    _bind(_plain, _self=_plain, _iters=tuple(iters), _dicts=dicts)
    string = _json.encode_basestring_ascii
    _bind(_dump, _self=_dump, _finite=math.isfinite, _string=string)
    _bind(_cmp, _plain=_plain)
    _bind(
        _run, _steps=tuple(steps), _helper=payload["helper"], _nonce=payload["nonce"], _fd=fd,
        _write=posix.write,
        _exit=posix._exit, _flush=tuple(s.flush for s in (sys.stdout, sys.stderr) if s),
        _args_builtins={n: getattr(builtins, n) for n in literal},
        _builtins=dict(vars(builtins)), _string=string,
        _plain=_plain, _dump=_dump, _cmp=_cmp,
    )
    return _run, (_Iter, _Names, _plain, _dump, _cmp, _run)
"""
"""The harness the bootstrap runs in the child (as text: ``rlhfkit`` is not importable there)."""
