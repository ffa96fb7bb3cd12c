"""Compiled twins of pure tensor functions, with the eager function as the fallback.

Elementwise chains over large tensors (a (tokens x vocabulary) block of log-probabilities, say)
are bound by memory traffic in eager PyTorch: each operator reads and writes the whole block.
``torch.compile`` fuses such a chain into a few loops (on CPU, vectorised C++ that keeps a row
in cache), several times faster. :func:`compiled` wraps a pure function so that:

- it is compiled on first use with ``dynamic=True`` (one compilation serves every number of
  rows; Inductor keeps its cache on disk, so a machine pays the compile time once per shape
  family and set of constant arguments);
- when compilation fails (no C++ compiler, an unsupported platform), a warning is logged once
  and the eager function is used from then on: the results are the same up to floating-point
  reassociation, only slower.

The eager function stays importable under its own name: it is the reference the compiled
twin is tested against.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def compiled(fn: F) -> F:
    """``fn`` compiled on first call, falling back to ``fn`` itself if compilation fails."""
    state: dict[str, Any] = {}

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if state.get("failed"):
            return fn(*args, **kwargs)
        if "fn" not in state:
            state["fn"] = torch.compile(fn, dynamic=True)
        try:
            return state["fn"](*args, **kwargs)
        except Exception as err:  # any compiler failure: run eagerly instead
            state["failed"] = True
            log.warning("torch.compile of %s failed (%s); running it eagerly", fn.__name__,
                        str(err).splitlines()[0] if str(err) else type(err).__name__)  # fmt: skip
            return fn(*args, **kwargs)

    return call  # type: ignore[return-value]
