"""Packed (padding-free) forward == padded forward == one-at-a-time forwards.

Same summed token cross-entropy, same parameter gradients and, per document, the same logits
(no attention across documents). See rlhfkit.data.collate's module docstring for how
transformers builds the block-diagonal mask from per-document position ids.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.data.collate import (
    block_causal_mask,
    packed_batch,
    pad_batch,
    supports_padding_free,
)
from rlhfkit.data.templates import render_messages
from rlhfkit.models.tiny import tiny_model, tiny_tokenizer

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "The answer is 5."},
    ],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Reverse the word cat"},
        {"role": "assistant", "content": "tac"},
    ],
    [
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
        {"role": "user", "content": "List three colours"},
        {"role": "assistant", "content": "red, green, blue"},
    ],
    [
        {"role": "user", "content": "Translate hello to French"},
        {"role": "assistant", "content": "bonjour!"},
    ],
]

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.fixture(scope="module")
def examples():
    tok = tiny_tokenizer()
    modes = ["final_turn", "final_turn", "all_assistant_turns", "final_turn"]
    out = [render_messages(tok, c, mask_mode=m) for c, m in zip(CONVERSATIONS, modes, strict=True)]
    assert len({len(e.input_ids) for e in out}) == len(out)  # different lengths
    return out


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Shifted cross-entropy of each labelled token, in row-major (= document) order."""
    labels = labels[:, 1:].flatten()
    losses = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels, ignore_index=-100, reduction="none"
    )
    return losses[labels != -100]


def loss_and_grads(model, loss: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), list(torch.autograd.grad(loss, params))


def packed_forward(model, examples, **extra):
    batch = packed_batch(examples)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **extra).logits
    return batch, logits


def single_logits(model, example) -> torch.Tensor:
    return model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]


def assert_close_lists(a, b, atol):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def make_model(dtype: torch.dtype, attn: str):
    model = tiny_model(dtype=dtype, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_packed_equals_padded_equals_single(examples, dtype, attn, side):
    if (side, dtype, attn) == ("left", torch.float64, "eager"):
        pytest.skip(
            "transformers' eager attention takes the softmax in fp32: the fp64 mask minimum "
            "becomes -inf, fully masked (left-pad) rows give NaN that leaks through later layers"
        )
    model = make_model(dtype, attn)
    assert supports_padding_free(model)
    # transformers' eager attention takes its softmax in fp32, so fp64 eager is fp32-accurate.
    atol = 1e-6 if (attn, dtype) == ("eager", torch.float64) else TOLERANCE[dtype]

    batch, logits = packed_forward(model, examples, use_cache=False)
    packed_tokens = token_ce(logits, batch["labels"])
    packed_loss, packed_grads = loss_and_grads(model, packed_tokens.sum())

    padded = pad_batch(examples, pad_id=tiny_tokenizer().pad_token_id, side=side)
    logits = model(
        input_ids=padded["input_ids"],
        attention_mask=padded["attention_mask"],
        position_ids=padded["position_ids"],
        use_cache=False,
    ).logits
    padded_tokens = token_ce(logits, padded["labels"])
    padded_loss, padded_grads = loss_and_grads(model, padded_tokens.sum())

    single_tokens = torch.cat(
        [
            token_ce(single_logits(model, e)[None], pad_batch([e], pad_id=0)["labels"])
            for e in examples
        ]
    )
    single_loss, single_grads = loss_and_grads(model, single_tokens.sum())

    assert packed_tokens.numel() == sum(e.num_loss_tokens for e in examples)
    for other in (padded_tokens, single_tokens):
        torch.testing.assert_close(packed_tokens.detach(), other.detach(), atol=atol, rtol=0)
    # The sum (about 244) also gets an rtol: one fp32 ulp there is 1.5e-5.
    for other in (padded_loss, single_loss):
        torch.testing.assert_close(packed_loss, other, atol=atol, rtol=1e-6)
    assert_close_lists(packed_grads, padded_grads, atol)
    assert_close_lists(packed_grads, single_grads, atol)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_unpacked(examples, attn):
    model = make_model(torch.float32, attn)
    with torch.no_grad():
        batch, logits = packed_forward(model, examples, use_cache=False)
        cu = batch["cu_seqlens"].tolist()
        for d, example in enumerate(examples):
            torch.testing.assert_close(
                logits[0, cu[d] : cu[d + 1]], single_logits(model, example), atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_explicit_block_mask_works_with_cache(examples, attn):
    """block_causal_mask gives the packed result even when use_cache keeps its default (True)."""
    model = make_model(torch.float32, attn)
    with torch.no_grad():
        batch = packed_batch(examples)
        reference = packed_forward(model, examples, use_cache=False)[1]
        mask = block_causal_mask(batch["seq_lens"], dtype=None if attn == "sdpa" else torch.float32)
        _, logits = packed_forward(model, examples, attention_mask=mask)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_cross_document_attention_is_detected(examples):
    """Negative controls: the comparison above fails when documents can see each other."""
    model = make_model(torch.float32, "sdpa")
    with torch.no_grad():
        batch, reference = packed_forward(model, examples, use_cache=False)
        start = batch["cu_seqlens"][1].item()  # second document onwards can leak
        # 1. Positions that do not restart: no documents are detected.
        n = batch["input_ids"].shape[1]
        leak = model(
            input_ids=batch["input_ids"], position_ids=torch.arange(n)[None], use_cache=False
        ).logits
        assert (leak[0, start:] - reference[0, start:]).abs().max() > 1e-3
        # 2. transformers 5.24 finding: with use_cache left at the config default (True) a
        # DynamicCache is created, packed-sequence detection is skipped, and documents attend to
        # each other. Callers must pass use_cache=False (or an explicit block_causal_mask).
        _, cached = packed_forward(model, examples)
        assert (cached[0, start:] - reference[0, start:]).abs().max() > 1e-3
