"""The headless browser of the report and labelling-app tests: Debian's chromium, no download.

``make test`` installs the package when it is missing; a missing browser fails a test (it never
skips). ``FLAGS`` keep Chromium off the network (background services, QUIC, sync) and runnable
as root in a container.
"""

from __future__ import annotations

import shutil

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
"""Executable names looked for, in order."""

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
"""Command-line flags of every launch (with ``--headless``)."""


def find_browser() -> str:
    """Path of the first browser of ``BROWSERS`` on PATH; fails the test when there is none."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        f"no headless browser found (looked for {', '.join(BROWSERS)}): `make test` installs "
        "Debian's chromium (apt-get install -y chromium); install it and rerun"
    )
