"""Fixtures of the labelling-app tests (helpers live in feedback_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from feedback_helpers import Site, make_site


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path)
