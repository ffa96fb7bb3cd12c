"""Fixtures of the recipe tests (the tiny model and chat data are in tests/conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

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


LETTER_A = '''
def letter_a(completion):
    """Share of the letter 'a' in the completion: a dense toy reward."""
    text = completion.strip()
    return sum(c == "a" for c in text) / max(len(text), 1)
'''


@pytest.fixture(scope="module")
def pg_task(tmp_path_factory) -> tuple[Path, Path]:
    """16 "Say a" prompts and a reward file with ``letter_a`` (for ``rlhfkit rl`` runs)."""
    root = tmp_path_factory.mktemp("pg-task")
    (root / "reward.py").write_text(LETTER_A)
    rows = [{"prompt": f"Say a {i}", "answer": "a"} for i in range(16)]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "prompts.jsonl", root / "reward.py"


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """24 arithmetic preference pairs (a right and a hedged wrong answer) for DPO runs."""
    rows = [
        {
            "prompt": f"What is {i} + {i}?",
            "chosen": f"It is {2 * i}.",
            "rejected": f"I think it might be {2 * i + 1}, or not.",
        }
        for i in range(24)
    ]
    path = tmp_path_factory.mktemp("dpo-pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """A fresh reference cache for the test (DPO's reference log-probs)."""
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_rm_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with a fresh scalar head: a (random) reward model checkpoint."""
    from rlhfkit.models.load import load_model
    from rlhfkit.models.tiny import tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-rm")
    torch.manual_seed(3)
    model = load_model(str(tiny_model_dir), task="score", pad_token_id=0)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
