"""Tiny random models and tokenizers built locally, for tests and examples (no download).

The tokenizer is a byte-level BPE trained in memory on a fixed corpus (deterministic), with the
ChatML special tokens and a ChatML chat template, so that tests exercise the same code paths as
a real instruction-tuned model. The model is a Llama-architecture ``LlamaForCausalLM`` with tied
embeddings, like the embedded SmolLM2.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlhfkit.data.templates import CHATML_TEMPLATE

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. user assistant system "
    "What is 2 + 3? The answer is 5. Write a haiku about the sea. Reverse the word cat: tac. "
    "Translate hello to French: bonjour. List three colours: red, green, blue. "
    "0 1 2 3 4 5 6 7 8 9 10 11 12 + - * / = ( ) . , ! ? : ; "
)


@lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Build a small byte-level BPE tokenizer with ChatML tokens and chat template.

    Args:
        vocab_size: Target vocabulary size (at least 260: 256 bytes + special tokens).

    Returns:
        A fast tokenizer with ``eos_token = "<|im_end|>"`` and ``pad_token = "<|endoftext|>"``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(vocab_size: int, **overrides: object) -> LlamaConfig:
    """Config of a 2-layer Llama with hidden size 64 (about 60k parameters + embeddings)."""
    values: dict[str, object] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "attn_implementation": "sdpa",
    }
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_model(
    vocab_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: object,
) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama causal LM (deterministic for a given seed).

    Args:
        vocab_size: Vocabulary size; defaults to that of :func:`tiny_tokenizer`.
        seed: Seed for the weight initialisation.
        dtype: Parameter dtype.
        **overrides: Extra ``LlamaConfig`` fields.
    """
    tokenizer = tiny_tokenizer()
    cfg = tiny_config(vocab_size or len(tokenizer), **overrides)
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.eos_token_id = tokenizer.eos_token_id
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.to(dtype)


def save_tiny_model(
    path: str | Path, model: LlamaForCausalLM | None = None, **options: object
) -> Path:
    """Save ``model`` (default: ``tiny_model(**options)``) with the tiny tokenizer.

    The directory loads in any command; returns ``path``.
    """
    chosen = model if model is not None else tiny_model(**options)  # type: ignore[arg-type]
    chosen.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return Path(path)
