"""KL(pi_theta || pi_ref) estimated on completions sampled from the policy.

Completions are sampled from the policy with plain ancestral sampling (temperature 1, no top-k or
top-p truncation) by the KV-cache sampler every command uses
(:func:`rlhfkit.rollout.sampler.chat_generator`), so they are samples of pi_theta; the sampled
token ids (the end-of-turn token included when it was sampled) are scored token by token by both
models. Per sequence, k1 = sum_t Delta_t and k3 = sum_t (expm1(-Delta_t) + Delta_t), with
Delta_t = log pi_theta - log pi_ref (docs/methods/policy.md). Both are unbiased for the sequence
KL; k3 is never negative but heavy-tailed once the policy has moved far (a sampled token that
pi_ref likes e^10 times more than pi_theta contributes e^10), so k1 is the figure to read at
large KL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from rlhfkit.data.collate import pad_batch
from rlhfkit.data.templates import render_prompt
from rlhfkit.models.forward import label_logprobs
from rlhfkit.ops.kl import kl_k1, kl_k3
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.sampler import chat_generator
from rlhfkit.types import TokenizedExample


@torch.no_grad()
def token_logprobs(
    model: nn.Module, examples: Sequence[TokenizedExample], *, pad_id: int, batch_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of every labelled token of ``examples`` and the example each belongs to.

    Shapes:
        returns (N,) fp32 log-probs and (N,) example indices, N = labelled tokens.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    values, owners = [], []
    for start in range(0, len(examples), batch_size):
        batch = pad_batch(examples[start : start + batch_size], pad_id=pad_id)
        logprobs, rows = label_logprobs(model, {k: v.to(device) for k, v in batch.items()})
        values.append(logprobs.float().cpu())
        owners.append(rows.cpu() + start)
    model.train(was_training)
    return torch.cat(values), torch.cat(owners)


@torch.no_grad()
def sample_sequences(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 16,
) -> list[TokenizedExample]:
    """One ancestral sample (T = 1, untruncated) per prompt, as prompt + sampled ids.

    The completion ends at the first end-of-sequence id (kept) or after ``max_new_tokens``. The
    prompts are sampled ``batch_size`` at a time, each chunk with the seed ``seed`` + the index
    of its first prompt.

    Returns:
        One example per prompt; ``loss_mask`` marks the sampled tokens.
    """
    generator = chat_generator(model, tokenizer)
    sampling = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=seed
    )
    out: list[TokenizedExample] = []
    for start in range(0, len(prompts), batch_size):
        ids = [render_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        # a stream per chunk: equal prompts in two chunks get different samples
        rollout = generator.generate(ids, replace(sampling, seed=seed + start))
        for prompt, completion in zip(ids, rollout.completion_ids, strict=True):
            out.append(
                TokenizedExample(
                    prompt + completion, [False] * len(prompt) + [True] * len(completion)
                )
            )
    return out


def sequence_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, owners: torch.Tensor, count: int
) -> dict[str, torch.Tensor]:
    """Per-sequence k1 and k3 sums from aligned token log-probs.

    Shapes:
        logprobs, ref_logprobs, owners: (N,); returns ``k1``, ``k3`` of shape (count,).
    """
    k1 = torch.zeros(count, dtype=torch.float64).index_add(
        0, owners, kl_k1(logprobs, ref_logprobs).double()
    )
    k3 = torch.zeros(count, dtype=torch.float64).index_add(
        0, owners, kl_k3(logprobs, ref_logprobs).double()
    )
    return {"k1": k1, "k3": k3}


def sampled_kl(
    policy: nn.Module,
    reference: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    seed: int = 0,
) -> dict[str, float]:
    """Mean sequence KL(pi_theta || pi_ref) over one ancestral sample per prompt.

    Args:
        policy: The model being trained.
        reference: A context manager yielding the reference model (entered only to score).
        tokenizer: Their tokenizer.
        prompts: Message lists ending with a user turn.
        max_new_tokens: Sample length limit.
        seed: Sampling seed.

    Returns:
        ``k1`` and ``k3`` (means over sequences of the summed estimators, nats),
        ``k1_per_token`` and ``samples``.
    """
    examples = [
        e
        for e in sample_sequences(
            policy, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed
        )
        if any(e.loss_mask)
    ]
    if not examples:
        return {"k1": float("nan"), "k3": float("nan"), "k1_per_token": float("nan"), "samples": 0}
    pad_id = tokenizer.pad_token_id
    logprobs, owners = token_logprobs(policy, examples, pad_id=pad_id)
    with reference as ref_model:
        ref_logprobs, ref_owners = token_logprobs(ref_model, examples, pad_id=pad_id)
    if not torch.equal(owners, ref_owners):
        raise RuntimeError("policy and reference scored different tokens")
    kl = sequence_kl(logprobs, ref_logprobs, owners, len(examples))
    return {
        "k1": float(kl["k1"].mean()),
        "k3": float(kl["k3"].mean()),
        "k1_per_token": float(kl["k1"].sum()) / max(len(logprobs), 1),
        "samples": len(examples),
    }
