"""Sampling settings shared by every rollout backend.

Every command that samples (``rl``, ``dpo online``, ``generate``, ``eval``, ``rs``, ``bon``,
``filter`` and the DPO evaluation) passes a :class:`SamplingConfig` to a
:class:`rlhfkit.rollout.sampler.Generator`; :class:`rlhfkit.rollout.sampler.HFGenerator` is the
always-available one (KV cache, any Hugging Face causal LM, CPU or GPU).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingConfig:
    """How to sample."""

    max_new_tokens: int = 128
    """Maximum tokens generated per completion."""
    temperature: float = 0.7
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 0
    """Sample among the k most likely tokens (0: no limit)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's (0: off)."""
    num_samples: int = 1
    """Completions per prompt."""
    stop: tuple[str, ...] = ()
    """Stop strings: a completion ends at the token that completes one (the rollout engine)."""
    seed: int = 0
    """Sampling seed."""
