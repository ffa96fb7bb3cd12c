"""A trained reward model as a reward function (``rm:<checkpoint directory>``).

The checkpoint is what ``rlhfkit rm train`` writes (a Hugging Face sequence-classification model
with one label). Each completion is rendered after its example's ``prompt`` with the reward
model's own chat template (the prompt cut from the left to ``max_len``), and scored in
length-sorted, token-budget batches (padding-free where the model allows).

A training run places the reward model as it places its other frozen models (``place``): under
``--model.parallel fsdp2`` each rank stores its shard, and the run gathers the whole model around
the phase that scores (:meth:`rlhfkit.training.context.RunContext.gathered`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from rlhfkit.data.collate import supports_padding_free
from rlhfkit.data.templates import render_messages
from rlhfkit.models.heads import score_examples
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.models.precision import default_device, resolve_precision


class RewardModelScorer:
    """Scores (prompt, completion) with a sequence-classification reward model.

    Args:
        path: Checkpoint directory or hub id of the reward model.
        precision: Compute dtype name (``auto``, ``bf16``, ``fp32``, ``fp16``).
        max_len: Maximum tokens of prompt + completion (the prompt is cut from the left).
        max_tokens: Tokens per forward pass.
        trust_remote_code: Allow model code from the hub.
        attn_implementation: Attention kernel (``varlen_sdpa`` runs padding-free).
        place: Places the loaded model (a run's frozen-model placement: its device, or its
            FSDP2 shards); None puts it whole on the default device.
    """

    def __init__(
        self,
        path: str,
        *,
        precision: str = "auto",
        max_len: int = 1024,
        max_tokens: int = 8192,
        trust_remote_code: bool = False,
        attn_implementation: str = "varlen_sdpa",
        place: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        device = default_device()
        self.tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model = load_model(
            path,
            dtype=resolve_precision(precision, device).compute,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            task="score",
            pad_token_id=self.tokenizer.pad_token_id,
            device=device if place is None else "cpu",  # placed from the CPU, unit by unit
        ).eval()
        self.model = model if place is None else place(model)
        self.packing = supports_padding_free(self.model)
        self.max_len, self.max_tokens = max_len, max_tokens

    def score_batch(
        self, completions: Sequence[str], fields: Sequence[dict[str, Any]]
    ) -> list[float | None]:
        """Rewards of every completion; None where nothing scorable is left after rendering."""
        rendered, where = [], []
        for i, (completion, f) in enumerate(zip(completions, fields, strict=True)):
            prompt = f.get("prompt")
            if prompt is None:
                raise ValueError(f"completion {i}: the reward model needs the example's 'prompt'")
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            example = render_messages(
                self.tokenizer,
                [*messages, {"role": "assistant", "content": completion}],
                max_len=self.max_len,
                truncation="left_prompt",
                source=f"completion {i}",
            )
            if example is not None:
                rendered.append(example)
                where.append(i)
        scores = score_examples(
            self.model,
            rendered,
            packing=self.packing,
            pad_id=self.tokenizer.pad_token_id,
            max_tokens=self.max_tokens,
        )[:, 0].tolist()
        out: list[float | None] = [None] * len(completions)
        for i, s in zip(where, scores, strict=True):
            out[i] = s
        return out

    def __call__(self, completion: str, **fields: Any) -> float | None:
        """Reward of one completion (prefer :meth:`score_batch` for many)."""
        return self.score_batch([completion], [fields])[0]
