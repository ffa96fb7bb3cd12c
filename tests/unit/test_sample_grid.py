"""``sample_grid``: how prompts are cut into generator calls, and what each call is seeded with."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rlhfkit.data.prompts import PromptRow
from rlhfkit.eval import run as eval_run
from rlhfkit.rollout.hf import SamplingConfig


class Recorder:
    """A generator that records each call's prompts and seed; completion = [prompt id, sample]."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], int]] = []

    def generate(self, prompts, sampling):
        self.calls.append(([p[0] for p in prompts], sampling.seed))
        n = sampling.num_samples
        ids = [[p[0], j] for p in prompts for j in range(n)]
        return SimpleNamespace(completion_ids=ids, finish_reasons=["eos"] * len(ids))


class Tokenizer:
    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(map(str, r)) for r in rows]


@pytest.mark.parametrize(
    ("num_samples", "chunk", "sizes"),
    [
        (4, 32, [10]),  # 40 rows: one call
        (128, 32, [4, 4, 2]),  # 512 // 128 = 4 prompts per call
        (1024, 32, [1] * 10),  # more rows than the cap: still one prompt per call
        (64, 3, [3, 3, 3, 1]),  # the chunk binds first
    ],
)
def test_calls_hold_at_most_max_rows(num_samples, chunk, sizes):
    prompts = [PromptRow([100 + i], {}) for i in range(10)]
    gen = Recorder()
    sampling = SamplingConfig(num_samples=num_samples, seed=7)
    grid = eval_run.sample_grid(gen, Tokenizer(), prompts, sampling, chunk=chunk)
    assert [len(p) for p, _ in gen.calls] == sizes
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    assert [seed for _, seed in gen.calls] == [7 + s for s in starts]  # seed + first prompt index
    assert len(grid.texts) == 10 and all(len(row) == num_samples for row in grid.texts)
    assert grid.texts[9][num_samples - 1] == f"109 {num_samples - 1}"  # rows stay in order
