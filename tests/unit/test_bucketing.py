"""Packed rows padded to a bucket (models.forward.bucketed): the real positions compute what
they compute unpadded, with and without per-document masks."""

from __future__ import annotations

import torch

from rlhfkit.models import forward
from rlhfkit.models.attention import VARLEN_SDPA
from rlhfkit.models.forward import _model_inputs, backbone_hidden, bucketed
from rlhfkit.models.tiny import tiny_model
from rlhfkit.ops.masking import prefix_tree_mask


def _packed(lengths: list[int]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    n = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {
        "input_ids": torch.randint(3, 300, (1, n), generator=gen),
        "position_ids": torch.cat([torch.arange(length) for length in lengths])[None],
        "seq_lens": torch.tensor(lengths, dtype=torch.int32),
        "cu_seqlens": cu,
    }


def test_bucketed_inputs_add_one_dummy_document():
    inputs = _model_inputs(_packed([20, 30, 7]))  # 57 tokens
    padded, n = bucketed(inputs)
    assert n == 57 and padded["input_ids"].shape == (1, 64)
    assert padded["cu_seq_lens_q"].tolist() == [0, 20, 50, 57, 64]
    assert padded["position_ids"][0, 57:].tolist() == list(range(7))
    assert torch.equal(padded["input_ids"][:, :57], inputs["input_ids"])
    again, m = bucketed(padded)  # a multiple of the bucket already: unchanged
    assert again is padded and m == 64


def test_padded_rows_give_the_unpadded_hidden_states(monkeypatch):
    model = tiny_model(seed=4).eval()
    model.set_attn_implementation(VARLEN_SDPA)
    inputs = _model_inputs(_packed([20, 30, 7]))
    with torch.no_grad():
        bucketed_out = backbone_hidden(model, **inputs)
        monkeypatch.setattr(forward, "PACK_BUCKET", 1)
        plain = backbone_hidden(model, **inputs)
    assert bucketed_out.shape == plain.shape == (1, 57, model.config.hidden_size)
    torch.testing.assert_close(bucketed_out, plain, atol=1e-5, rtol=1e-5)


def test_padded_rows_with_document_masks(monkeypatch):
    """Prefix-tree documents carry explicit masks; the dummy document gets a causal one."""
    model = tiny_model(seed=4).eval()
    model.set_attn_implementation(VARLEN_SDPA)
    inputs = _model_inputs(_packed([9, 12]))
    inputs["doc_masks"] = [prefix_tree_mask(3, [3, 3], torch.device("cpu")), None]
    assert bucketed(inputs)[0]["doc_masks"][-1] is None
    with torch.no_grad():
        bucketed_out = backbone_hidden(model, **inputs)
        monkeypatch.setattr(forward, "PACK_BUCKET", 1)
        plain = backbone_hidden(model, **inputs)
    torch.testing.assert_close(bucketed_out, plain, atol=1e-5, rtol=1e-5)
