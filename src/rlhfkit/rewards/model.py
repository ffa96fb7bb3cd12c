"""A trained reward model as a reward function (``rm:<checkpoint directory>``), or an ensemble.

The checkpoint is what ``rlhfkit rm train`` writes (a Hugging Face sequence-classification model
with one label). Each completion is rendered after its example's ``prompt`` with the reward
model's own chat template (the prompt cut from the left to ``max_len``), and scored in
length-sorted, token-budget batches (padding-free where the model allows; the completions of
one prompt as a prefix tree, so the prompt is computed once).

A training run places the reward model as it places its other frozen models (``place``): under
``--model.parallel fsdp2`` each rank stores its shard, and the run gathers the whole model around
the phase that scores (:meth:`rlhfkit.training.context.RunContext.gathered`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from rlhfkit.data.collate import supports_padding_free
from rlhfkit.data.templates import render_messages
from rlhfkit.models.heads import score_examples
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.models.precision import default_device, resolve_precision
from rlhfkit.ops.ensemble import ENSEMBLE_MODES, rm_ensemble


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
        rendered, where, prompts = [], [], []
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
                prompts.append(repr(prompt))
        scores = score_examples(
            self.model,
            rendered,
            packing=self.packing,
            pad_id=self.tokenizer.pad_token_id,
            max_tokens=self.max_tokens,
            prefix_keys=prompts,  # the samples of one prompt share its tokens
        )[:, 0].tolist()
        out: list[float | None] = [None] * len(completions)
        for i, s in zip(where, scores, strict=True):
            out[i] = s
        return out

    def __call__(self, completion: str, **fields: Any) -> float | None:
        """Reward of one completion (prefer :meth:`score_batch` for many)."""
        return self.score_batch([completion], [fields])[0]


ENSEMBLE_PREFIX = "rm-ensemble:"
"""``rm-ensemble:<mode>:<dir>,<dir>,...``; mode mean, min or uwo (``uwo=<lambda>``)."""


def parse_ensemble_spec(spec: str) -> tuple[str, float, list[str]]:
    """``rm-ensemble:<mode>:<dir>,<dir>,...`` as (mode, lambda, directories).

    Raises:
        ValueError: A malformed spec, an unknown mode, or fewer than two directories.
    """
    mode, sep, dirs = spec.removeprefix(ENSEMBLE_PREFIX).partition(":")
    name, _, lam_text = mode.partition("=")
    paths = [d for d in dirs.split(",") if d]
    try:
        lam = float(lam_text) if lam_text else 1.0
    except ValueError:
        lam = float("nan")
    if (
        not sep
        or name not in ENSEMBLE_MODES
        or len(paths) < 2
        or lam != lam
        or (lam_text and name != "uwo")
    ):
        raise ValueError(
            f"reward {spec!r}: expected rm-ensemble:<mean|min|uwo[=lambda]>:<dir>,<dir>[,...] "
            "(two or more reward models)"
        )
    return name, lam, paths


class RewardModelEnsemble:
    """K reward models scored together and combined (``rm-ensemble:<mode>:<dir>,<dir>,...``).

    Each member scores the batch (its own batched pass); the K scores of a completion are
    combined by :func:`rlhfkit.ops.ensemble.rm_ensemble`: the mean, the minimum (worst case), or
    the uncertainty-weighted mean - lambda * std. A completion any member cannot score gets None.

    Args:
        spec: The ensemble's spec.
        options: Settings of each member (see :class:`RewardModelScorer`).
    """

    def __init__(self, spec: str, **options: Any) -> None:
        self.mode, self.lam, paths = parse_ensemble_spec(spec)
        self.members = [RewardModelScorer(p, **options) for p in paths]

    @property
    def models(self) -> list[nn.Module]:
        """The members' networks (a run gathers them around scoring, like a single RM's)."""
        return [m.model for m in self.members]

    def score_batch(
        self, completions: Sequence[str], fields: Sequence[dict[str, Any]]
    ) -> list[float | None]:
        """The combined reward of every completion (None where a member could not score it)."""
        rows = [m.score_batch(completions, fields) for m in self.members]  # K x B
        out: list[float | None] = [None] * len(completions)
        scored = [i for i in range(len(completions)) if all(r[i] is not None for r in rows)]
        if scored:
            grid = torch.tensor([[r[i] for i in scored] for r in rows], dtype=torch.float64)
            combined = rm_ensemble(grid, self.mode, self.lam).tolist()
            for i, value in zip(scored, combined, strict=True):
                out[i] = value
        return out

    def __call__(self, completion: str, **fields: Any) -> float | None:
        """Reward of one completion (prefer :meth:`score_batch` for many)."""
        return self.score_batch([completion], [fields])[0]
