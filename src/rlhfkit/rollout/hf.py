"""Sampling chat completions with a Hugging Face model (always available, CPU or GPU).

Prompts are rendered with the tokenizer's chat template (generation prompt appended), left-padded
into one batch and decoded with ``model.generate`` (KV cache; stops when every sequence has
emitted EOS or reached ``max_new_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


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


@torch.no_grad()
def sample_chat(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    sampling: SamplingConfig,
    *,
    batch_size: int = 16,
) -> list[list[str]]:
    """Sample ``num_samples`` assistant replies for each conversation.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer (with a chat template).
        conversations: Message lists ending with a user turn.
        sampling: Sampling settings.
        batch_size: Prompts per generate call.

    Returns:
        For each conversation, its completions (special tokens removed, stripped).
    """
    greedy = sampling.temperature <= 0
    if greedy and sampling.num_samples > 1:
        raise ValueError(
            "greedy decoding (temperature 0) gives identical samples: set sampling.num_samples 1 "
            "or a temperature > 0"
        )
    was_training = model.training
    model.eval()
    generator_state = torch.get_rng_state()
    torch.manual_seed(sampling.seed)
    options: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "do_sample": not greedy,
        "num_return_sequences": sampling.num_samples,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if not greedy:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    results: list[list[str]] = []
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            texts = [
                tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                for c in chunk
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(
                model.device
            )
            out = model.generate(**enc, **options)  # (len(chunk) * num_samples, P + T)
            decoded = tokenizer.batch_decode(
                out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for i in range(len(chunk)):
                results.append(
                    [
                        d.strip()
                        for d in decoded[i * sampling.num_samples : (i + 1) * sampling.num_samples]
                    ]
                )
    finally:
        tokenizer.padding_side = padding_side
        torch.set_rng_state(generator_state)
        model.train(was_training)
    return results
