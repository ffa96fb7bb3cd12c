"""Rollouts as training micro-batches.

Prompts are left-padded and completions right-padded, in completion space (B rows, T completion
tokens; the ``types`` glossary), and the rows are cut into micro-batches by a token budget.
"""

from __future__ import annotations

from typing import Any

import torch


def pad_rows(rows: list[list[Any]], value: float, left: bool, dtype: torch.dtype) -> torch.Tensor:
    """Rows padded to the longest, on the left or the right."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            cols = slice(width - len(r), width) if left else slice(0, len(r))
            out[i, cols] = torch.tensor(r, dtype=dtype)
    return out


def rollout_micro_batches(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    sampler_logps: list[list[float]],
    pad_id: int,
    max_tokens: int,
) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of whole sequences under a token budget.

    Prompts are left-padded and completions right-padded; ``rows`` gives each row's index in
    the rollout. Completion-space tensors are (B, T).
    """
    order = sorted(
        range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i])
    )
    batches, current, width = [], [], 0
    for i in order:
        length = len(prompt_ids[i]) + len(completion_ids[i])
        if current and max(width, length) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, length)
    if current:
        batches.append(current)
    out = []
    for idx in batches:
        prompts = [prompt_ids[i] for i in idx]
        comps = [completion_ids[i] for i in idx]
        mask = pad_rows([[1] * len(c) for c in comps], 0, False, torch.long).bool()
        out.append({
            "prompt_ids": pad_rows(prompts, pad_id, True, torch.long),
            "prompt_mask": pad_rows([[1] * len(p) for p in prompts], 0, True, torch.long),
            "completion_ids": pad_rows(comps, pad_id, False, torch.long),
            "completion_mask": mask,
            "sampler_logp": pad_rows([sampler_logps[i] for i in idx], 0.0, False, torch.float32),
            "advantages": torch.zeros(mask.shape),  # set by _set_advantages
            "rows": torch.tensor(idx),
        })  # fmt: skip
    return out
