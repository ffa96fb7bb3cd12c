"""Supervised fine-tuning loss (docs/methods/sft.md).

The SFT objective is the negative log-likelihood of the labelled (assistant) tokens:

    L = -(1/N) sum_{i,t} m_it log pi(y_it | x_i, y_i,<t)

where N is the *global* number of loss tokens of the optimiser batch (``token_mean``, the
default) or another aggregation's normaliser.
"""

from __future__ import annotations

import torch

from rlhfkit.ops.masking import Aggregation, aggregate, masked_sum
from rlhfkit.types import LossOutput


def sft_loss(
    *,
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    normaliser: float | torch.Tensor,
    agg: Aggregation | None = None,
) -> LossOutput:
    """Negative log-likelihood of the masked tokens, aggregated with a global normaliser.

    Args:
        logprobs: fp32 log-probabilities of the label tokens.
        mask: True where the token is a label that counts.
        normaliser: Global normaliser (total loss tokens for ``token_mean``).
        agg: Aggregation mode; ``token_mean`` by default.

    Returns:
        LossOutput with ``loss`` and detached metrics ``nll_sum`` and ``tokens``.

    Shapes:
        logprobs, mask: (B, T) (or (N,) for flattened label tokens); loss scalar.
    """
    agg = agg or Aggregation("token_mean")
    if logprobs.dim() == 1:
        logprobs, mask = logprobs[None], mask[None]  # (1, N)
    nll = -logprobs.float()  # (B, T)
    loss = aggregate(nll, mask, agg, normaliser)
    metrics = {
        "nll_sum": masked_sum(nll, mask).detach(),
        "tokens": mask.sum().detach().float(),
    }
    return LossOutput(loss=loss, metrics=metrics)
