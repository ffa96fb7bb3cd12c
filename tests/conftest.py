"""Shared fixtures: a tiny random model saved locally and small chat datasets (no download)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rlhfkit.models.tiny import tiny_model, tiny_tokenizer

# torch.compile is off for the suite (here and, through the environment, in the processes tests
# spawn): every compiled kernel (fused RMSNorm, the log-softmax and JSD chunks) is tested against
# its eager twin by the tests that take the ``compiled_kernels`` fixture; elsewhere compiling
# would add seconds per process and dtype and test nothing more.
os.environ["TORCH_COMPILE_DISABLE"] = "1"
import torch._dynamo

torch._dynamo.config.disable = True


@pytest.fixture
def compiled_kernels() -> Iterator[None]:
    """torch.compile on for this test (the suite runs with it off)."""
    with torch._dynamo.config.patch(disable=False):
        yield


if os.environ.get("PYTEST_XDIST_WORKER"):
    # One intra-op thread per xdist worker: two workers x two OpenMP threads on two cores make
    # the threads spin against each other and everything several times slower.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama + ChatML tokenizer saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model(seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_chat_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """n arithmetic conversations as SFT rows."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            row = {
                "messages": [
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"The answer is {a + b}."},
                ]
            }
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train.jsonl with 32 rows, heldout.jsonl with 8 rows)."""
    root = tmp_path_factory.mktemp("chat-data")
    return write_chat_jsonl(root / "train.jsonl", 32, 0), write_chat_jsonl(
        root / "heldout.jsonl", 8, 1
    )
