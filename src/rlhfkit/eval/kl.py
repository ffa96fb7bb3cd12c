"""KL(pi_theta || pi_ref) estimated on completions sampled from the policy.

Completions are sampled from the policy at temperature 1 (so they are samples of pi_theta),
rendered after their prompt with the chat template (the end-of-turn token included), and scored
token by token by both models. Per sequence, k1 = sum_t Delta_t and k3 = sum_t
(expm1(-Delta_t) + Delta_t), with Delta_t = log pi_theta - log pi_ref (METHODS.md section 5);
both are unbiased for the sequence KL, k3 is never negative. Re-rendering the decoded text can
differ from the sampled ids in rare tokenisation corner cases, and a reply cut at
``max_new_tokens`` gets an end-of-turn token it did not sample; both are small next to the
sampling noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rlhfkit.data.collate import pad_batch
from rlhfkit.data.templates import render_messages
from rlhfkit.models.forward import label_logprobs
from rlhfkit.ops.kl import kl_k1, kl_k3
from rlhfkit.rollout.hf import SamplingConfig, sample_chat
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
        logps, rows = label_logprobs(model, {k: v.to(device) for k, v in batch.items()})
        values.append(logps.float().cpu())
        owners.append(rows.cpu() + start)
    model.train(was_training)
    return torch.cat(values), torch.cat(owners)


def render_samples(
    tokenizer: Any, prompts: Sequence[list[dict[str, str]]], replies: Sequence[str], max_len: int
) -> list[TokenizedExample]:
    """Prompt + reply rendered for scoring (the prompt cut from the left); empty replies dropped."""
    out = []
    for i, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
        example = render_messages(
            tokenizer,
            [*prompt, {"role": "assistant", "content": reply}],
            max_len=max_len,
            truncation="left_prompt",
            source=f"sample {i}",
        )
        if example is not None:
            out.append(example)
    return out


def sequence_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, owners: torch.Tensor, count: int
) -> dict[str, torch.Tensor]:
    """Per-sequence k1 and k3 sums from aligned token log-probs.

    Shapes:
        logp, ref_logp, owners: (N,); returns ``k1``, ``k3`` of shape (count,).
    """
    k1 = torch.zeros(count, dtype=torch.float64).index_add(
        0, owners, kl_k1(logp, ref_logp).double()
    )
    k3 = torch.zeros(count, dtype=torch.float64).index_add(
        0, owners, kl_k3(logp, ref_logp).double()
    )
    return {"k1": k1, "k3": k3}


def sampled_kl(
    policy: nn.Module,
    reference: Any,
    tokenizer: Any,
    prompts: Sequence[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    max_len: int,
    seed: int = 0,
) -> dict[str, float]:
    """Mean sequence KL(pi_theta || pi_ref) over one T = 1 sample per prompt.

    Args:
        policy: The model being trained.
        reference: A context manager yielding the reference model (entered only to score).
        tokenizer: Their tokenizer.
        prompts: Message lists ending with a user turn.
        max_new_tokens: Sample length limit.
        max_len: Maximum rendered length (the prompt cut from the left).
        seed: Sampling seed.

    Returns:
        ``k1`` and ``k3`` (means over sequences of the summed estimators, nats),
        ``k1_per_token`` and ``samples``.
    """
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    replies = [r[0] for r in sample_chat(policy, tokenizer, list(prompts), sampling)]
    examples = render_samples(tokenizer, prompts, replies, max_len)
    if not examples:
        return {"k1": float("nan"), "k3": float("nan"), "k1_per_token": float("nan"), "samples": 0}
    pad_id = tokenizer.pad_token_id
    logp, owners = token_logprobs(policy, examples, pad_id=pad_id)
    with reference as ref_model:
        ref_logp, ref_owners = token_logprobs(ref_model, examples, pad_id=pad_id)
    if not torch.equal(owners, ref_owners):
        raise RuntimeError("policy and reference scored different tokens")
    kl = sequence_kl(logp, ref_logp, owners, len(examples))
    return {
        "k1": float(kl["k1"].mean()),
        "k3": float(kl["k3"].mean()),
        "k1_per_token": float(kl["k1"].sum()) / max(len(logp), 1),
        "samples": len(examples),
    }
