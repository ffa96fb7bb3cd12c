"""Fixtures of the recipe tests (the tiny model and chat data are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on the 2 shared cores two OpenMP threads spin against other
    processes and make these tests 10-80x slower (tests/conftest.py does this only under xdist).

    Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
