"""SFT loss: equals the manual shifted CE; prompt logits are inert.

Reference: ``F.cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100, reduction="sum")``
divided by the number of labels, an implementation independent of the code under test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.losses.sft import sft_loss
from rlhfkit.ops.masking import Aggregation

B, L, V = 3, 9, 11


def make_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, L), generator=gen)
    # Prompt tokens first (no labels), then assistant labels, then right padding.
    labels[0, :4] = -100
    labels[1, :2] = -100
    labels[1, 7:] = -100
    labels[2, :6] = -100
    return logits, labels


def shifted_logprobs(logits: torch.Tensor, labels: torch.Tensor):
    """log pi(label_{i+1} | positions <= i) and the loss mask, in (B, L-1)."""
    targets = labels[:, 1:]
    mask = targets != -100
    logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0)[..., None])
    return logprobs.squeeze(-1), mask


def manual_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = labels[:, 1:].flatten()
    total = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), targets, ignore_index=-100, reduction="sum"
    )
    return total / (targets != -100).sum()


def test_equals_manual_cross_entropy():
    logits, labels = make_batch()
    logprobs, mask = shifted_logprobs(logits, labels)
    out = sft_loss(logprobs=logprobs, mask=mask, normaliser=mask.sum())
    expected = manual_ce(logits, labels)
    assert mask.sum() == 5 + 5 + 3  # hand count: labels at columns 4-8, 2-6, 6-8
    torch.testing.assert_close(out.loss.double(), expected, atol=1e-6, rtol=0)
    assert float(out.metrics["tokens"]) == 13
    assert float(out.metrics["nll_sum"]) == pytest.approx(float(expected) * 13, abs=1e-5)
    assert not any(torch.is_tensor(v) and v.requires_grad for v in out.metrics.values())


def test_flat_label_vector_and_gradient():
    """The (N,) form (label_logprobs output) gives the same loss and gradient."""
    logits, labels = make_batch(seed=1)
    logits.requires_grad_(True)
    logprobs, mask = shifted_logprobs(logits, labels)
    flat = logprobs[mask]
    out = sft_loss(logprobs=flat, mask=torch.ones_like(flat, dtype=torch.bool), normaliser=13)
    (grad,) = torch.autograd.grad(out.loss, logits)
    ref_logits = logits.detach().clone().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(manual_ce(ref_logits, labels), ref_logits)
    torch.testing.assert_close(out.loss.double(), manual_ce(logits.detach(), labels), atol=1e-6,
                               rtol=0)  # fmt: skip
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)


def test_global_normaliser_is_used_as_given():
    """The loss is a micro-batch's share: it is divided by the global count, not its own."""
    logits, labels = make_batch(seed=2)
    logprobs, mask = shifted_logprobs(logits, labels)
    own = sft_loss(logprobs=logprobs, mask=mask, normaliser=13).loss
    shared = sft_loss(logprobs=logprobs, mask=mask, normaliser=52).loss
    torch.testing.assert_close(shared * 4, own)


def test_other_aggregation():
    """seq_mean_token_mean: the mean over rows of each row's mean NLL."""
    logits, labels = make_batch(seed=3)
    logprobs, mask = shifted_logprobs(logits, labels)
    out = sft_loss(logprobs=logprobs, mask=mask, normaliser=B,
                   agg=Aggregation("seq_mean_token_mean"))  # fmt: skip
    per_row = [F.cross_entropy(logits[b, :-1], labels[b, 1:], ignore_index=-100) for b in range(B)]
    torch.testing.assert_close(out.loss.double(), torch.stack(per_row).mean(), atol=1e-6, rtol=0)


def test_prompt_logit_perturbation_changes_nothing():
    """Pitfall 1: logits at positions that predict no label (prompt, padding) are inert."""
    logits, labels = make_batch(seed=4)
    logprobs, mask = shifted_logprobs(logits, labels)
    base = sft_loss(logprobs=logprobs, mask=mask, normaliser=mask.sum()).loss

    unlabelled = torch.ones(B, L, dtype=torch.bool)
    unlabelled[:, :-1] = ~mask  # position i predicts label i+1; the last position predicts none
    noise = torch.randn(B, L, V, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    perturbed = (logits + 50 * noise * unlabelled[..., None]).requires_grad_(True)
    logprobs2, _ = shifted_logprobs(perturbed, labels)
    out = sft_loss(logprobs=logprobs2, mask=mask, normaliser=mask.sum())
    torch.testing.assert_close(out.loss, base, atol=1e-12, rtol=0)
    (grad,) = torch.autograd.grad(out.loss, perturbed)
    assert (grad[unlabelled] == 0).all()
    assert (grad[~unlabelled].abs().sum(-1) > 0).all()

    # Control: perturbing a labelled position does change the loss.
    bumped = logits.clone()
    first = mask.nonzero()[0]
    bumped[first[0], first[1]] += 50 * noise[0, 0]
    changed = sft_loss(logprobs=shifted_logprobs(bumped, labels)[0], mask=mask,
                       normaliser=mask.sum()).loss  # fmt: skip
    assert (changed - base).abs() > 1e-3
