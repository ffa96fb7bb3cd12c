"""Shared records passed between layers, and the glossary of names.

Glossary (docs/methods/index.md): B sequences, G samples per prompt, P prompt length, T completion
length, L = P + T, V vocabulary. ``mask`` always means "this token counts in the loss".
``logprobs[b, t] = log pi(y_t | x, y_<t)`` lives in completion space (B, T).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

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


STEP_LABELS = (-1, 0, 1)
"""Process-reward step labels (Lightman 2023): bad, neutral, good."""


@dataclass
class StepExample:
    """One rendered process-reward example (docs/methods/reward_models.md).

    Only the last token of each step carries a label; every other token is unlabelled.

    Attributes:
        input_ids: Token ids of the whole rendered conversation, length L.
        step_positions: For each kept step, the index into ``input_ids`` of its last token;
            strictly increasing.
        step_labels: The label of each kept step, in :data:`STEP_LABELS`; same length as
            ``step_positions``.
        source: Where the example came from (``file:row``), for error messages.
    """

    input_ids: list[int]
    step_positions: list[int]
    step_labels: list[int]
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or "example"
        if len(self.step_positions) != len(self.step_labels):
            raise ValueError(
                f"{where}: step_positions ({len(self.step_positions)}) and step_labels "
                f"({len(self.step_labels)}) differ in length"
            )
        bounds = [-1, *self.step_positions, len(self.input_ids)]
        if any(a >= b for a, b in pairwise(bounds)):
            raise ValueError(
                f"{where}: step_positions {self.step_positions} must be strictly increasing "
                f"indices into input_ids (length {len(self.input_ids)})"
            )
        if any(label not in STEP_LABELS for label in self.step_labels):
            raise ValueError(f"{where}: step_labels {self.step_labels} must be -1, 0 or 1")

    @property
    def num_steps(self) -> int:
        """Number of labelled steps."""
        return len(self.step_positions)

    def token_labels(self, ignore_index: int = -100) -> list[int]:
        """Per-token labels, length L: the step label at each step's last token, else ignored.

        Args:
            ignore_index: The value of unlabelled tokens.
        """
        labels = [ignore_index] * len(self.input_ids)
        for position, label in zip(self.step_positions, self.step_labels, strict=True):
            labels[position] = label
        return labels


FinishReason = str
"""Why a completion ended: ``"eos"`` (end-of-sequence id), ``"stop"`` (a stop id or stop string)
or ``"length"`` (``max_new_tokens`` reached)."""


@dataclass
class Rollout:
    """Completions sampled for a batch of prompts (one row per completion, B = P * G).

    Attributes:
        prompt_index: For each completion, the index of its prompt (its group).
        prompt_ids: For each completion, the prompt's token ids.
        completion_ids: The sampled ids, ending with the stop or end-of-sequence id that ended it.
        logprobs: log pi_sampler of each sampled id: the log-softmax of the logits divided by
            the temperature (1 for greedy), before any top-k / top-p / min-p truncation.
        finish_reasons: One :data:`FinishReason` per completion.
        entropies: Entropy (nats) of the tempered sampling distribution at each sampled
            position, before truncation; empty when the backend does not report it.
        masks: For a multi-turn rollout, per completion token whether the policy sampled it
            (True) or it came from the environment: a tool's output, an observation, the chat
            template's turn markers (False, no loss). Empty: every completion token is the
            policy's. Positions outside the mask hold log-prob and entropy 0.
    """

    prompt_index: list[int]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[FinishReason]
    entropies: list[list[float]] = field(default_factory=list)
    masks: list[list[bool]] = field(default_factory=list)

    @classmethod
    def grouped(
        cls,
        prompts: Sequence[Sequence[int]],
        g: int,
        completion_ids: list[list[int]],
        logprobs: list[list[float]],
        finish_reasons: list[FinishReason],
        entropies: list[list[float]] | None = None,
    ) -> Rollout:
        """``g`` completions of each prompt, in prompt order (completion i is of prompt i // g)."""
        n = len(prompts) * g
        return cls(
            prompt_index=[i // g for i in range(n)],
            prompt_ids=[list(prompts[i // g]) for i in range(n)],
            completion_ids=completion_ids,
            logprobs=logprobs,
            finish_reasons=finish_reasons,
            entropies=entropies or [],
        )

    def __len__(self) -> int:
        return len(self.completion_ids)

    def select(self, rows: Sequence[int], prompt_index: Sequence[int]) -> Rollout:
        """The given rows, in that order, with new group indices ``prompt_index``."""

        def take(values: list) -> list:
            return [values[i] for i in rows] if values else []

        return Rollout(
            list(prompt_index), take(self.prompt_ids), take(self.completion_ids),
            take(self.logprobs), take(self.finish_reasons), take(self.entropies),
            take(self.masks),
        )  # fmt: skip

    @classmethod
    def concat(cls, parts: Sequence[Rollout], prompt_index: Sequence[int]) -> Rollout:
        """Rollouts one after another, with new group indices ``prompt_index``.

        Masks are kept when any part has them (rows of a part without masks: all True).
        """

        def cat(attr: str) -> list:
            return [x for part in parts for x in getattr(part, attr)]

        masks = []
        if any(part.masks for part in parts):
            for part in parts:
                masks += part.masks or [[True] * len(c) for c in part.completion_ids]
        return cls(
            list(prompt_index), cat("prompt_ids"), cat("completion_ids"), cat("logprobs"),
            cat("finish_reasons"), cat("entropies"), masks,
        )  # fmt: skip
