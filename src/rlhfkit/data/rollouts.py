"""Rollouts as training micro-batches.

Completion-space tensors (B rows, T completion tokens; the ``types`` glossary) hold what the
losses read: ``completion_ids``, ``completion_mask``, ``sampler_logprobs``, ``advantages`` and
``rows`` (each row's index in the rollout). A multi-turn rollout's ``completion_mask`` has holes
at the environment's tokens; the padded layout then adds ``completion_attention`` (every real
completion token, which the model attends to), and in a prefix tree the environment's tokens
are context without targets. The model input comes in one of two layouts:

- padded (:func:`rollout_micro_batches`): prompts left-padded, completions right-padded, rows
  of similar length together;
- prefix trees (:func:`rollout_tree_batches`): the G completions of a prompt are the branches
  of one packed document whose prompt is computed once (the prefix shared by every prompt of
  the micro-batch, a system prompt say, once for all), with no padding. The targets follow the
  row-major order of ``completion_mask``, so both layouts give the same (B, T) log-probs.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhfkit.data.groups import TokenizedGroup, tree_batch
from rlhfkit.types import TokenizedExample


def pad_rows(rows: list[list[Any]], value: float, left: bool, dtype: torch.dtype) -> torch.Tensor:
    """Rows padded to the longest, on the left or the right."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            cols = slice(width - len(r), width) if left else slice(0, len(r))
            out[i, cols] = torch.tensor(r, dtype=dtype)
    return out


def completion_mask(
    completion_ids: list[list[int]], masks: list[list[bool]] | None
) -> torch.Tensor:
    """(B, T) bool: True on the completion tokens that count, False on padding.

    Without ``masks`` every completion token counts; with them (a multi-turn rollout) only the
    policy's tokens do, so tool output inside a row is a hole in the mask.
    """
    if masks is None:
        masks = [[True] * len(c) for c in completion_ids]
    for i, (ids, mask) in enumerate(zip(completion_ids, masks, strict=True)):
        if len(ids) != len(mask):
            raise ValueError(f"row {i}: {len(ids)} completion ids but a mask of {len(mask)}")
    return pad_rows([[int(m) for m in mask] for mask in masks], 0, False, torch.long).bool()


def rollout_micro_batches(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    sampler_logprobs: list[list[float]],
    pad_id: int,
    max_tokens: int,
    masks: list[list[bool]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of whole sequences under a token budget.

    Prompts are left-padded and completions right-padded; ``rows`` gives each row's index in
    the rollout. Completion-space tensors are (B, T). ``masks`` (a multi-turn rollout's) gives
    the completion tokens that count; by default all of them do.
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
        mask = completion_mask(comps, [masks[i] for i in idx] if masks else None)
        attend = completion_mask(comps, None)
        out.append({
            "prompt_ids": pad_rows(prompts, pad_id, True, torch.long),
            "prompt_mask": pad_rows([[1] * len(p) for p in prompts], 0, True, torch.long),
            "completion_ids": pad_rows(comps, pad_id, False, torch.long),
            "completion_mask": mask,
            **({"completion_attention": attend} if masks else {}),
            "sampler_logprobs": pad_rows(
                [sampler_logprobs[i] for i in idx], 0.0, False, torch.float32
            ),
            "advantages": torch.zeros(mask.shape),  # set by the advantage stage
            "rows": torch.tensor(idx),
        })  # fmt: skip
    return out


def rollout_tree_batches(
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    sampler_logprobs: list[list[float]],
    rows: list[int],
    pad_id: int,
    max_tokens: int,
    masks: list[list[bool]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of prefix trees: one document per prompt, its completions as branches.

    Rows with the same prompt ids form a group (first-appearance order). Groups are packed in
    order under ``max_tokens`` tree tokens (prompt once plus every completion); a group larger
    than the budget is cut into several trees. Needs the ``varlen_sdpa`` attention.

    Args:
        prompt_ids: Prompt ids of every rollout row.
        completion_ids: Completion ids of every rollout row.
        sampler_logprobs: Sampler log-probs of every rollout row.
        rows: The rollout rows to batch.
        pad_id: Padding id of the completion-space tensors.
        max_tokens: Token budget of one micro-batch.
        masks: Completion tokens that count, of every rollout row (None: all of them).

    Returns:
        Micro-batches with the tree keys of :func:`rlhfkit.data.groups.tree_batch` plus the
        completion-space tensors; ``rows`` lists the rollout rows in order.
    """
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i in rows:
        by_prompt.setdefault(tuple(prompt_ids[i]), []).append(i)
    trees: list[list[int]] = []
    for members in by_prompt.values():
        current: list[int] = []
        for i in members:  # cut a group that alone exceeds the budget
            cost = len(prompt_ids[i]) + sum(len(completion_ids[j]) for j in [*current, i])
            if current and cost > max_tokens:
                trees.append(current)
                current = []
            current.append(i)
        trees.append(current)
    bins: list[list[list[int]]] = [[]]
    used = 0
    for tree in trees:
        cost = len(prompt_ids[tree[0]]) + sum(len(completion_ids[i]) for i in tree)
        if bins[-1] and used + cost > max_tokens:
            bins.append([])
            used = 0
        bins[-1].append(tree)
        used += cost
    return [
        _tree_micro_batch(b, prompt_ids, completion_ids, sampler_logprobs, pad_id, masks)
        for b in bins
    ]


def _tree_micro_batch(
    trees: list[list[int]],
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    sampler_logprobs: list[list[float]],
    pad_id: int,
    masks: list[list[bool]] | None,
) -> dict[str, torch.Tensor]:
    """One micro-batch of prefix trees with its completion-space tensors."""
    groups = [
        TokenizedGroup(
            [
                TokenizedExample(
                    prompt_ids[i] + completion_ids[i],
                    [False] * len(prompt_ids[i])
                    + (list(masks[i]) if masks else [True] * len(completion_ids[i])),
                )
                for i in tree
            ],
            [0.0] * len(tree),
        )
        for tree in trees
    ]
    packed = tree_batch(groups)
    idx = [i for tree in trees for i in tree]
    comps = [completion_ids[i] for i in idx]
    mask = completion_mask(comps, [masks[i] for i in idx] if masks else None)
    keep = ("input_ids", "position_ids", "seq_lens", "cu_seqlens", "tree_context", "tree_prefix",
            "tree_branches", "target_ids", "target_rows", "target_cols")  # fmt: skip
    return {
        **{k: packed[k] for k in keep},
        "completion_ids": pad_rows(comps, pad_id, False, torch.long),
        "completion_mask": mask,
        "sampler_logprobs": pad_rows([sampler_logprobs[i] for i in idx], 0.0, False, torch.float32),
        "advantages": torch.zeros(mask.shape),  # set by the advantage stage
        "rows": torch.tensor(idx),
    }
