"""Checks of option values that run before a command loads a model or writes anything.

Each config section reports its invalid values from a ``problems()`` method (a list of
``(field, what is wrong)`` pairs); :func:`validate` collects them over a whole command config
and raises one :class:`~rlhfkit.errors.ConfigError` naming every bad option. The path checks
here (a mistyped local model path, a run directory that cannot be created) only look at the
file system: whether a hub model exists is checked when it is loaded
(:mod:`rlhfkit.models.load`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

from rlhfkit.errors import ConfigError


def option_name(path: str) -> str:
    """The command-line spelling of a config field path.

    ``loop.batch_size`` -> ``--loop.batch-size`` (as ``--help`` lists it).
    """
    return "--" + path.replace("_", "-")


def config_problems(cfg: Any, prefix: str = "") -> list[str]:
    """Every problem that the ``problems()`` methods of ``cfg`` and its sections report.

    Each is ``"--section.field: what is wrong"``; a config's own ``problems()`` names fields
    of its sections by their path (``"loop.batch_size"``), or gives an empty field name for a
    message that names its options itself.
    """
    out: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += config_problems(value, f"{prefix}{f.name}.")
    check = getattr(cfg, "problems", None)
    if callable(check):
        out += [f"{option_name(prefix + name)}: {text}" if name else text for name, text in check()]
    return out


def validate(cfg: Any) -> None:
    """Check every option of ``cfg`` before anything is loaded or written.

    Raises:
        ConfigError: Listing every invalid option (not only the first).
    """
    problems = config_problems(cfg)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise ConfigError(f"{len(problems)} invalid options:\n{lines}")


def _looks_local(name: str) -> bool:
    """Whether a model name is meant as a local path rather than a hub id ``owner/name``."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        return True
    head = name.split("/", 1)[0]
    return "/" in name and Path(head).is_dir() and not in_hub_cache(name)


def in_hub_cache(name: str) -> bool:
    """Whether the Hugging Face cache holds model ``owner/name`` (its config.json)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an id the hub library rejects is not in its cache
        return False


def did_you_mean(word: str, choices: list[str]) -> str:
    """``; did you mean 'x'?`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def model_path_problem(name: str) -> str | None:
    """Why ``name`` cannot be a model: a local-looking path that is not a model directory.

    A name starting with '.', '/' or '~', with more than one '/', or whose first component is
    an existing directory, is a local path. Hub ids (``owner/name``) and the embedded model's
    names pass; whether a hub id exists is checked when the model is loaded.
    """
    if not name.strip():
        return "empty model name"
    if "/" not in name and not name.startswith((".", "~")):
        return None  # a bare name: the embedded model's, or left to the loader
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            return f"{name} holds no config.json: not a Hugging Face model directory"
        return None
    if path.exists():
        return f"{name} is a file; a model is a directory (with config.json)"
    if not _looks_local(name):
        return None
    parent = next((p for p in path.parents if p.is_dir()), Path("."))
    siblings = sorted(p.name for p in parent.iterdir() if p.is_dir())
    close = difflib.get_close_matches(path.parts[len(parent.parts)], siblings, n=1)
    if close:
        hint = f" (did you mean {parent / close[0]}?)"
    else:
        hint = f" ({parent} exists)" if parent != Path(".") else ""
    return f"no such directory: {name}{hint}"


def reward_problem(spec: str) -> str | None:
    """Why a reward spec cannot load, found without loading it; None if it looks loadable.

    ``rm:<directory>`` must be a model directory, ``path/file.py:function`` an existing file,
    ``module:function`` an importable module; judges and verifiers are checked when loaded.
    """
    if spec.startswith("rm:"):
        directory = spec.removeprefix("rm:")
        path = Path(directory).expanduser()
        if not path.is_dir():
            return f"reward {spec!r}: no such directory: {directory}"
        return model_path_problem(str(path) if "/" in directory else f"./{directory}")
    if spec.startswith("rm-ensemble:"):
        return _ensemble_problem(spec)
    if spec.startswith(("judge:", "verifier:", "length:")):  # checked by their parsers
        return None
    if spec.startswith("rubric:"):
        return _rubric_problem(spec)
    module, sep, attr = spec.rpartition(":")
    if not (sep and module and attr):
        return f"reward {spec!r}: expected 'module:function' or 'path/file.py:function'"
    if module.endswith(".py"):
        return None if Path(module).expanduser().is_file() else f"no such file: {module}"
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"reward {spec!r}: no module named {module!r}"


def _ensemble_problem(spec: str) -> str | None:
    """Why an ``rm-ensemble:`` reward cannot load: its mode or a member directory."""
    mode, sep, dirs = spec.removeprefix("rm-ensemble:").partition(":")
    if not sep or mode.partition("=")[0] not in ("mean", "min", "uwo"):
        return f"reward {spec!r}: expected rm-ensemble:<mean|min|uwo[=lambda]>:<dir>,<dir>[,...]"
    problems = (reward_problem(f"rm:{d}") for d in dirs.split(",") if d)
    return next((p for p in problems if p), None)


def _rubric_problem(spec: str) -> str | None:
    """Why a ``rubric:`` reward cannot load, from its file's existence alone.

    Its criteria and rules are checked by :func:`rlhfkit.rewards.rubric.rubric_problem`.
    """
    name = spec.removeprefix("rubric:").split("|")[0]
    if name == "rows":
        return None
    if name.startswith("builtin:"):
        path = Path(__file__).parent / "data" / "rubrics" / f"{name.removeprefix('builtin:')}.yaml"
        return None if path.is_file() else f"reward {spec!r}: no such built-in rubric: {name}"
    return None if Path(name).expanduser().is_file() else f"reward {spec!r}: no such file: {name}"


def run_dir_problem(run_dir: str) -> str | None:
    """Why ``run_dir`` cannot hold a run: a file in its place or above it, or no write access."""
    if not run_dir.strip():
        return "empty run directory"
    path = Path(run_dir).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"{run_dir} is a file, not a directory"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{run_dir} is not writable"
        return None
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"cannot create {run_dir}: {parent} is a file, not a directory"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"cannot create {run_dir}: {parent} is not writable"
            return None
    return None
