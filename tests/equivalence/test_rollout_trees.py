"""Prefix-tree rollout micro-batches give the padded layout's log-probs, values and gradients."""

from __future__ import annotations

import random

import torch

from rlhfkit.data.rollouts import rollout_micro_batches, rollout_tree_batches
from rlhfkit.models.forward import rollout_logprobs
from rlhfkit.models.heads import rollout_values
from rlhfkit.models.load import load_model


def _rollout(seed: int = 0) -> tuple[list[list[int]], list[list[int]], list[list[float]]]:
    rng = random.Random(seed)
    system = [rng.randrange(5, 300) for _ in range(6)]  # shared by every prompt: a context doc
    prompts, completions = [], []
    for _ in range(3):
        prompt = system + [rng.randrange(5, 300) for _ in range(rng.randint(2, 7))]
        for _ in range(4):
            prompts.append(prompt)
            completions.append([rng.randrange(5, 300) for _ in range(rng.randint(1, 9))])
    return prompts, completions, [[0.0] * len(c) for c in completions]


def _by_row(batches: list[dict], fn) -> dict[int, torch.Tensor]:
    out = {}
    for b in batches:
        values = fn(b)
        for r, i in enumerate(b["rows"].tolist()):
            out[i] = values[r][b["completion_mask"][r]]
    return out


def test_trees_and_padding_agree(tiny_model_dir):
    prompts, completions, logprobs = _rollout()
    rows = list(range(len(prompts)))
    model = load_model(str(tiny_model_dir), dtype=torch.float64)
    padded = rollout_micro_batches(prompts, completions, logprobs, 0, 10_000)
    trees = rollout_tree_batches(prompts, completions, logprobs, rows, 0, 10_000)
    small = rollout_tree_batches(prompts, completions, logprobs, rows, 0, 20)  # groups cut up
    assert len(trees) == 1 and len(small) > 3
    for a in (trees, small):
        assert sorted(i for b in a for i in b["rows"].tolist()) == rows
    results = []
    for batches in (padded, trees, small):
        model.zero_grad()
        got = _by_row(batches, lambda b: rollout_logprobs(model, b, temperature=0.7)[0])
        sum(v.sum() for v in got.values()).backward()
        results.append((got, [p.grad.clone() for p in model.parameters()]))
    for got, grads in results[1:]:
        for i in rows:
            torch.testing.assert_close(got[i], results[0][0][i])
        for a, b in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)  # summation order differs


def test_tree_values_equal_padded_values(tiny_model_dir):
    prompts, completions, logprobs = _rollout(1)
    critic = load_model(str(tiny_model_dir), dtype=torch.float64, task="score", pad_token_id=0)
    padded = rollout_micro_batches(prompts, completions, logprobs, 0, 10_000)
    trees = rollout_tree_batches(prompts, completions, logprobs, list(range(len(prompts))), 0, 50)
    with torch.no_grad():
        a = _by_row(padded, lambda b: rollout_values(critic, b))
        b = _by_row(trees, lambda b: rollout_values(critic, b))
    for i in a:
        torch.testing.assert_close(a[i], b[i])
