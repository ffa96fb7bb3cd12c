"""Shared records passed between layers, and the glossary of names.

Glossary (DESIGN.md section 3): B sequences, G samples per prompt, P prompt length, T completion
length, L = P + T, V vocabulary. ``mask`` always means "this token counts in the loss".
``logprobs[b, t] = log pi(y_t | x, y_<t)`` lives in completion space (B, T).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LossOutput:
    """What every loss function returns.

    Attributes:
        loss: Scalar tensor to differentiate (fp32).
        metrics: Detached scalars for logging (tensors or floats).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class TokenizedExample:
    """One rendered training example.

    Attributes:
        input_ids: Token ids of the whole rendered conversation, length L.
        loss_mask: Per-token flags, length L; True where the token is a *label* that counts in
            the loss (assistant content plus its end-of-turn token).
        source: Where the example came from (``file:row``), for error messages.
    """

    input_ids: list[int]
    loss_mask: list[bool]
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(
                f"{self.source or 'example'}: input_ids ({len(self.input_ids)}) and loss_mask "
                f"({len(self.loss_mask)}) differ in length"
            )

    @property
    def num_loss_tokens(self) -> int:
        """Number of tokens that count in the loss."""
        return sum(self.loss_mask)
