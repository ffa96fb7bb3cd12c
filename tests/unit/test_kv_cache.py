"""The in-place key/value cache against transformers' DynamicLayer, operation for operation."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from rlhfkit.rollout.kv_cache import PreallocatedCache, PreallocatedLayer


def _kv(rows: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, 3, n, 4, generator=gen), torch.randn(rows, 3, n, 5, generator=gen)


@pytest.mark.parametrize("capacity", [2, 7, 64])
def test_every_operation_matches_dynamic_layer(capacity):
    """Prefill, repeat, appends past the capacity (the buffers grow), row selection and crop
    leave the same keys and values as DynamicLayer."""
    gen = torch.Generator().manual_seed(0)
    ours, theirs = PreallocatedLayer(capacity), DynamicLayer()
    steps = [
        ("update", 3, 5), ("repeat", 2), ("update", 6, 1), ("update", 6, 1), ("select", [0, 2, 5]),
        ("update", 3, 1), ("crop", -2), ("update", 3, 4), ("select", [1]), ("update", 1, 1),
    ]  # fmt: skip
    for step in steps:
        if step[0] == "update":
            k, v = _kv(step[1], step[2], gen)
            got, want = ours.update(k, v), theirs.update(k, v)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        elif step[0] == "repeat":
            ours.batch_repeat_interleave(step[1]), theirs.batch_repeat_interleave(step[1])
        elif step[0] == "select":
            index = torch.tensor(step[1])
            ours.batch_select_indices(index), theirs.batch_select_indices(index)
        else:
            ours.crop(step[1]), theirs.crop(step[1])
        assert ours.get_seq_length() == theirs.get_seq_length()
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)


def test_appends_write_in_place_within_the_capacity():
    gen = torch.Generator().manual_seed(1)
    layer = PreallocatedLayer(10)
    layer.update(*_kv(2, 4, gen))
    buffer = layer._keys.data_ptr()
    for _ in range(6):
        keys, _ = layer.update(*_kv(2, 1, gen))
    assert layer._keys.data_ptr() == buffer and keys.data_ptr() == buffer  # no copy, no growth
    assert layer.get_seq_length() == 10
    layer.update(*_kv(2, 1, gen))
    assert layer._keys.shape[2] == 20  # doubled


def test_cache_makes_preallocated_layers():
    gen = torch.Generator().manual_seed(2)
    cache = PreallocatedCache(8)
    k, v = _kv(1, 3, gen)
    cache.update(k, v, 0), cache.update(k, v, 1)
    assert [type(layer) for layer in cache.layers] == [PreallocatedLayer] * 2
    assert cache.get_seq_length() == 3 and cache.layers[0]._keys.shape[2] == 8


def test_buffers_beyond_the_filled_part_are_zero_and_advance_counts_written_positions():
    """What the fused decode step relies on: whole buffers whose unwritten positions are 0
    (after allocation, growth and row selection), written in place, then counted by advance."""
    gen = torch.Generator().manual_seed(3)
    cache = PreallocatedCache(6)
    k, v = _kv(3, 4, gen)
    cache.update(k, v, 0)
    keys, values = cache.buffers()
    assert (
        keys[0].shape[2] == 6
        and (keys[0][:, :, 4:] == 0).all()
        and (values[0][:, :, 4:] == 0).all()
    )
    cache.batch_select_indices(torch.tensor([2, 0]))
    keys, values = cache.buffers()
    assert torch.equal(keys[0][:, :, :4], k[[2, 0]]) and (keys[0][:, :, 4:] == 0).all()
    for layer in cache.layers:  # grows (doubles) and keeps the zeros beyond the filled part
        layer.reserve(9)
    keys, values = cache.buffers()
    assert keys[0].shape[2] == 12 and (keys[0][:, :, 4:] == 0).all()
    new = torch.randn(2, 3, 4, generator=gen)
    keys[0][:, :, 4] = new
    cache.advance(1)
    assert cache.get_seq_length() == 5 and torch.equal(cache.layers[0].keys[:, :, 4], new)
