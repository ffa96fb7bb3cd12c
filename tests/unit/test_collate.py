"""Padding, packing and bucketing (rlhfkit.data.collate)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.data.collate import (
    block_causal_mask,
    bucket_by_length,
    pack_examples,
    packed_batch,
    pad_batch,
    supports_padding_free,
)
from rlhfkit.types import TokenizedExample

X = -100


def ex(ids: list[int], mask: str) -> TokenizedExample:
    return TokenizedExample(input_ids=ids, loss_mask=[c == "1" for c in mask])


A = ex([11, 12, 13], "011")
B = ex([21, 22, 23, 24, 25], "00011")


def of_length(n: int) -> TokenizedExample:
    return TokenizedExample(input_ids=[7] * n, loss_mask=[False] * n)


def test_pad_batch_right():
    out = pad_batch([A, B], pad_id=0)
    assert out["input_ids"].tolist() == [[11, 12, 13, 0, 0], [21, 22, 23, 24, 25]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[X, 12, 13, X, X], [X, X, X, 24, 25]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 2, 2], [0, 1, 2, 3, 4]]
    assert all(t.dtype == torch.long for t in out.values())


def test_pad_batch_left_and_multiple():
    out = pad_batch([A, B], pad_id=0, side="left", pad_to_multiple_of=4)
    assert out["input_ids"].tolist() == [[0, 0, 0, 0, 0, 11, 12, 13], [0, 0, 0, 21, 22, 23, 24, 25]]
    assert out["attention_mask"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[X, X, X, X, X, X, 12, 13], [X, X, X, X, X, X, 24, 25]]
    assert out["position_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 1, 2], [0, 0, 0, 0, 1, 2, 3, 4]]
    with pytest.raises(ValueError):
        pad_batch([], pad_id=0)


def test_packed_batch_values():
    out = packed_batch([A, B, ex([31], "1")])
    assert set(out) == {"input_ids", "labels", "position_ids", "seq_lens", "cu_seqlens"}
    assert out["input_ids"].tolist() == [[11, 12, 13, 21, 22, 23, 24, 25, 31]]
    # -100 at every document start: that label would be predicted from the previous document.
    assert out["labels"].tolist() == [[X, 12, 13, X, X, X, 24, 25, X]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0]]
    assert out["seq_lens"].tolist() == [3, 5, 1]
    assert out["cu_seqlens"].tolist() == [0, 3, 8, 9]
    assert out["seq_lens"].dtype == out["cu_seqlens"].dtype == torch.int32


def test_block_causal_mask():
    mask = block_causal_mask(torch.tensor([2, 1, 2], dtype=torch.int32))
    expected = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].long().tolist() == expected
    additive = block_causal_mask(torch.tensor([2, 1, 2]), dtype=torch.float64)
    assert additive.dtype == torch.float64
    assert torch.equal(additive == 0, mask)
    assert (additive[~mask] == torch.finfo(torch.float64).min).all()


def test_pack_examples_hand_case():
    lengths = [3, 8, 5, 2, 12, 4]
    bins = pack_examples([of_length(n) for n in lengths], max_tokens=10)
    # Decreasing: 12 (alone, oversized), 8, 5, 4, 3, 2 -> first fit.
    assert bins == [[4], [1, 3], [2, 5], [0]]


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), max_size=60),
    max_tokens=st.integers(1, 64),
)
def test_pack_examples_properties(lengths, max_tokens):
    examples = [of_length(n) for n in lengths]
    bins = pack_examples(examples, max_tokens=max_tokens)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        assert b
        total = sum(lengths[i] for i in b)
        assert total <= max_tokens or len(b) == 1
    # First fit leaves at most one bin at most half full (two such bins would have merged).
    small = [sum(lengths[i] for i in b) for b in bins if sum(lengths[i] for i in b) <= max_tokens]
    assert sum(1 for t in small if t <= max_tokens // 2) <= 1
    assert pack_examples(examples, max_tokens=max_tokens) == bins  # deterministic


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 50), max_size=80),
    max_tokens=st.integers(1, 128),
    seed=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
)
def test_bucket_by_length_properties(lengths, max_tokens, seed):
    batches = bucket_by_length(lengths, max_tokens=max_tokens, shuffle_seed=seed)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert b
        assert len(b) * max(lengths[i] for i in b) <= max_tokens or len(b) == 1
    assert bucket_by_length(lengths, max_tokens=max_tokens, shuffle_seed=seed) == batches


def test_bucket_by_length_groups_similar_lengths():
    lengths = [50, 1, 49, 2, 48, 3]
    assert bucket_by_length(lengths, max_tokens=100) == [[1, 3, 5], [4, 2], [0]]
    shuffled = bucket_by_length(lengths, max_tokens=100, shuffle_seed=0)
    assert sorted(map(sorted, shuffled)) == [[0], [1, 3, 5], [2, 4]]


def test_supports_padding_free():
    assert supports_padding_free(
        SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    )
    assert supports_padding_free(SimpleNamespace(attn_implementation="flash_attention_2"))
    assert not supports_padding_free(
        SimpleNamespace(config=SimpleNamespace(_attn_implementation="flex_attention"))
    )
    assert not supports_padding_free(SimpleNamespace(config=SimpleNamespace()))
