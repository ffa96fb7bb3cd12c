"""Optional dependencies: which extra provides each, and the error raised when one is missing.

``pip install rlhfkit`` installs what training needs. Features beyond training come with extras
(``pip install 'rlhfkit[app]'``, or ``'rlhfkit[all]'`` for every one of them):

- ``app``: fastapi, uvicorn, jinja2, python-multipart, markdown-it-py; the labelling web app
  (``rlhfkit label serve``, :mod:`rlhfkit.feedback.app`). Creating and exporting labelling tasks
  (``rlhfkit label task``, ``label export``, the pipeline's human mode) needs none of them.
- ``plot``: matplotlib; the HTML report (:mod:`rlhfkit.eval.report`, the pipeline's
  ``report.html``).
- ``rgym``: reasoning-gym; ``rgym:`` sources and the ``reasoning_gym`` verifier.

The LLM judge needs no extra: its OpenAI-compatible client is the standard library's
``urllib``, and a local judge model runs on the training dependencies.

Optional modules are imported on first use, in the module that needs them, through
:func:`import_optional`, so that importing the training code needs no extra; a missing one raises
:class:`MissingExtraError`, whose message gives the install command. The web app's own modules
(:mod:`rlhfkit.feedback.app` and the request handling it uses) import FastAPI at their top: only
``label serve`` imports them, after :func:`require_extra` has checked the ``app`` extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS: dict[str, tuple[str, ...]] = {
    "app": ("fastapi", "uvicorn", "jinja2", "python_multipart", "markdown_it"),
    "plot": ("matplotlib",),
    "rgym": ("reasoning_gym",),
}
"""Extra -> the top-level modules it provides."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def install_hint(extra: str) -> str:
    """The command that installs ``extra``, e.g. ``pip install 'rlhfkit[app]'``."""
    return f"pip install 'rlhfkit[{extra}]'"


def import_optional(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``, which the optional ``extra`` provides.

    Args:
        module: The module to import (a top-level module of :data:`EXTRAS` or a submodule of one,
            e.g. ``"matplotlib.figure"``).
        extra: The extra that installs it (a key of :data:`EXTRAS`).
        feature: What needs it, for the error message (``"the HTML report"``).

    Returns:
        The module.

    Raises:
        MissingExtraError: When the import fails; the message gives the install command and
            the original error is chained as its cause.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.partition(".")[0]
        raise MissingExtraError(
            f"the optional package {top!r}, needed for {feature}, could not be imported ({err}); "
            f"install it with: {install_hint(extra)}",
            name=module,
        ) from err


def require_extra(extra: str, feature: str) -> None:
    """Check that every module of ``extra`` imports (see :func:`import_optional`).

    Args:
        extra: A key of :data:`EXTRAS`.
        feature: What needs it, for the error message.

    Raises:
        MissingExtraError: At the first module of the extra that does not import.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    for module in EXTRAS[extra]:
        import_optional(module, extra, feature)
