"""varlen_sdpa (per-document attention on packed rows) equals padded sdpa and single forwards."""

from __future__ import annotations

import pytest
import torch

import rlhfkit.models.attention  # noqa: F401  (registers varlen_sdpa)
from rlhfkit.data.collate import packed_batch, pad_batch, supports_padding_free
from rlhfkit.data.templates import render_messages
from rlhfkit.models.forward import _model_inputs, label_logprobs
from rlhfkit.models.tiny import tiny_model, tiny_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
    [
        {"role": "user", "content": "Reverse the word cat"},
        {"role": "assistant", "content": "tac, the word reversed."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "List three colours"},
        {"role": "assistant", "content": "red, green, blue"},
        {"role": "user", "content": "Translate hello to French"},
        {"role": "assistant", "content": "bonjour"},
    ],
]


@pytest.fixture(scope="module")
def examples():
    tok = tiny_tokenizer()
    return [render_messages(tok, c, mask_mode="all_assistant_turns") for c in CONVERSATIONS]


def grads(model, value):
    return torch.autograd.grad(value, [p for p in model.parameters()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_packed_varlen_equals_padded_sdpa(examples, dtype):
    atol = 1e-5 if dtype == torch.float32 else 1e-10
    varlen = tiny_model(dtype=dtype, attn_implementation="varlen_sdpa")
    sdpa = tiny_model(dtype=dtype, attn_implementation="sdpa")
    assert supports_padding_free(varlen)
    packed = packed_batch(examples)
    padded = pad_batch(examples, pad_id=tiny_tokenizer().pad_token_id)
    lp_packed, _rows_packed = label_logprobs(varlen, packed)
    lp_padded, _rows_padded = label_logprobs(sdpa, padded)
    assert lp_packed.numel() == sum(e.num_loss_tokens for e in examples)
    torch.testing.assert_close(lp_packed, lp_padded, atol=atol, rtol=0)
    g_packed = grads(varlen, lp_packed.sum())
    g_padded = grads(sdpa, lp_padded.sum())
    for a, b in zip(g_packed, g_padded, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_per_document_logits(examples):
    model = tiny_model(attn_implementation="varlen_sdpa")
    packed = packed_batch(examples)
    with torch.no_grad():
        logits = model(**_model_inputs(packed), use_cache=False).logits[0]
        cu = packed["cu_seqlens"].tolist()
        for d, ex in enumerate(examples):
            alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[cu[d] : cu[d + 1]], alone, atol=1e-5, rtol=0)
        # Negative control: declaring the row one document lets later documents see earlier ones.
        whole = dict(_model_inputs(packed))
        n = packed["input_ids"].shape[1]
        whole["cu_seq_lens_q"] = whole["cu_seq_lens_k"] = torch.tensor([0, n], dtype=torch.int32)
        leaked = model(**whole, use_cache=False).logits[0]
        assert (leaked[cu[1] :] - logits[cu[1] :]).abs().max() > 1e-3


def test_padded_batches_fall_back_to_sdpa(examples):
    varlen = tiny_model(attn_implementation="varlen_sdpa")
    sdpa = tiny_model(attn_implementation="sdpa")
    for side in ("left", "right"):
        padded = pad_batch(examples, pad_id=tiny_tokenizer().pad_token_id, side=side)
        with torch.no_grad():
            a = varlen(**_model_inputs(padded), use_cache=False).logits
            b = sdpa(**_model_inputs(padded), use_cache=False).logits
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def _assert_same_function(ours, theirs, inputs, gen, atol=1e-12):
    """Equal values, and equal gradients of a random weighting of the outputs (fp64)."""
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=0)
    weights = torch.randn(ours.shape, dtype=ours.dtype, generator=gen)
    g1 = torch.autograd.grad((ours * weights).sum(), inputs)
    g2 = torch.autograd.grad((theirs * weights).sum(), inputs)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("kind", ["causal", "context_causal", "tree"])
def test_doc_attention_equals_sdpa(groups, kind):
    """The explicit per-document kernel equals sdpa (fp64): values and gradients."""
    from rlhfkit.models.doc_attention import doc_attention

    gen = torch.Generator().manual_seed(7)
    lq, context = 9, (4 if kind != "causal" else 0)
    lk = lq + context
    q = torch.randn(1, 2 * groups, lq, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, lk, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, lk, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    mask = torch.ones(lq, lk, dtype=torch.bool).tril(context)
    if kind == "tree":
        mask[6:, context + 3 : context + 6] = False  # a second branch does not see the first
    ours = doc_attention(q, k, v, None if kind != "tree" else mask, 0.3, 0.0)
    theirs = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=0.3, enable_gqa=groups > 1
    )
    _assert_same_function(ours, theirs, (q, k, v), gen)


@pytest.mark.parametrize("masked", [False, True])
def test_decode_step_uses_the_explicit_kernel_and_equals_sdpa(masked):
    """A one-query-per-row step (generation) takes doc_attention with the batch's padding mask;
    it equals sdpa (fp64), including rows whose left padding is masked out."""
    from types import SimpleNamespace

    from rlhfkit.models.attention import _explicit_decode, varlen_sdpa_attention

    gen = torch.Generator().manual_seed(3)
    b, kv_heads, groups, keys = 4, 2, 3, 11
    q = torch.randn(b, kv_heads * groups, 1, 8, dtype=torch.float64, generator=gen)
    k = torch.randn(b, kv_heads, keys, 8, dtype=torch.float64, generator=gen)
    v = torch.randn(b, kv_heads, keys, 8, dtype=torch.float64, generator=gen)
    mask = torch.ones(b, 1, 1, keys, dtype=torch.bool)
    mask[1, ..., :4] = mask[3, ..., :7] = False  # left padding
    mask = mask if masked else None
    assert _explicit_decode(q, k, mask, {})
    module = SimpleNamespace(num_key_value_groups=groups, training=False, is_causal=True)
    ours, _ = varlen_sdpa_attention(module, q, k, v, mask, scaling=0.4)
    theirs = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=0.4, enable_gqa=True
    ).transpose(1, 2)  # (B, 1, H, D)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    assert not _explicit_decode(torch.cat([q, q], 2), k, mask, {})  # two queries: sdpa
    assert not _explicit_decode(q, k, None, {"softcap": 30.0})
    assert not _explicit_decode(q, k, None, {"s_aux": torch.zeros(6)})  # attention sinks
    assert _explicit_decode(q, k, None, {"sliding_window": 4096, "softcap": None})


def test_cached_decoding_equals_sdpa_model(monkeypatch):
    """Prefill a left-padded batch, then decode a step: varlen_sdpa's logits equal sdpa's, and
    its decode step ran the explicit kernel in every layer."""
    from transformers import DynamicCache

    import rlhfkit.models.attention as attention_module

    calls = []
    explicit = attention_module.doc_attention
    monkeypatch.setattr(
        attention_module, "doc_attention", lambda *a: calls.append(a[0].shape) or explicit(*a)
    )
    varlen = tiny_model(dtype=torch.float64, attn_implementation="varlen_sdpa")
    sdpa = tiny_model(dtype=torch.float64, attn_implementation="sdpa")
    ids = torch.tensor([[0, 0, 5, 17, 33], [9, 12, 60, 71, 3]])
    attention = (torch.arange(5) >= torch.tensor([[2], [0]])).long()
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    step = torch.tensor([[44], [8]])
    logits = []
    with torch.no_grad():
        for model in (varlen, sdpa):
            cache = DynamicCache()
            model(input_ids=ids, attention_mask=attention, position_ids=positions,
                  cache=cache, use_cache=True)  # fmt: skip
            out = model(
                input_ids=step, attention_mask=torch.cat([attention, torch.ones(2, 1).long()], 1),
                position_ids=positions[:, -1:] + 1, cache=cache, use_cache=True,
            )  # fmt: skip
            logits.append(out.logits)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-10, rtol=0)
    layers = varlen.config.num_hidden_layers
    assert len(calls) == layers and all(shape[0] == 2 and shape[2] == 1 for shape in calls)


def test_doc_attention_scales_and_masks_inside_the_product_exactly():
    """bf16, head size 64 (scale 1/8, a power of two): the fused product (baddbmm with the
    scale and a 0/-inf bias) gives the scaled-then-masked formula's values bit for bit."""
    from rlhfkit.models.doc_attention import doc_attention

    gen = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(1, heads, 21, 64, generator=gen).to(torch.bfloat16) for heads in (6, 2, 2)
    )
    mask = torch.ones(21, 21, dtype=torch.bool).tril()
    mask[12:, 4:9] = False
    scores = (q.reshape(1, 2, 63, 64) @ k.transpose(-1, -2)) * 0.125
    scores = scores.view(1, 2, 3, 21, 21).masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(torch.bfloat16)
    want = (weights.view(1, 2, 63, 21) @ v).view(1, 6, 21, 64)
    assert torch.equal(doc_attention(q, k, v, mask, 0.125, 0.0), want)


def _per_document(q, k, v, lengths, scale):
    """The naive twin of packed_attention: doc_attention on each document in turn."""
    from rlhfkit.models.doc_attention import doc_attention

    pieces = zip(*(t.split(lengths, dim=2) for t in (q, k, v)), strict=True)
    outs = [doc_attention(a, b, c, None, scale, 0.0) for a, b, c in pieces]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def _per_document_sdpa(q, k, v, lengths, scale):
    """Independent reference: torch's own causal sdpa on each document."""
    pieces = zip(*(t.split(lengths, dim=2) for t in (q, k, v)), strict=True)
    outs = [
        torch.nn.functional.scaled_dot_product_attention(
            a, b, c, is_causal=True, scale=scale, enable_gqa=True
        )
        for a, b, c in pieces
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


@pytest.mark.parametrize(
    "lengths",
    [[7], [5, 5, 5], [3, 11, 6, 1, 9, 9, 2], [30, 4, 4, 4, 4, 4, 4, 4, 4, 29],
     [120, 2, 3, 110, 1], [3, 0, 5, 0]],
)  # fmt: skip
def test_packed_attention_equals_per_document(lengths):
    """Documents batched by length (right-padded, causal) give each document's own attention:
    values and gradients equal torch's causal sdpa run one document at a time (fp64, 3 query
    heads per key-value head; one group or several; empty documents)."""
    from rlhfkit.models.doc_attention import group_plan, packed_attention

    gen = torch.Generator().manual_seed(11)
    n = sum(lengths)
    q, k, v = (
        torch.randn(1, h, n, 8, dtype=torch.float64, generator=gen, requires_grad=True)
        for h in (6, 2, 2)
    )
    if lengths[0] == 120:
        assert len(group_plan(tuple(lengths), torch.device("cpu")).shapes) > 1
    ours = packed_attention(q, k, v, lengths, 0.3)
    theirs = _per_document_sdpa(q, k, v, lengths, 0.3)
    assert ours.shape == (1, n, 6, 8) and ours.is_contiguous()
    _assert_same_function(ours, theirs, (q, k, v), gen)


def test_packed_attention_bf16_forward_equals_per_document():
    """bf16, SmolLM2's head layout: the batched forward gives the per-document values to bf16
    rounding (padded keys weigh exactly 0, but the probabilities-times-values product sums over
    the group's longest document, which a CPU kernel may block differently; on the AMD EPYC it
    was bit for bit), and so do its gradients."""
    from rlhfkit.models.doc_attention import group_plan, packed_attention

    lengths = [79, 70, 71, 67, 72, 79, 116, 93, 91, 76, 74, 87, 135, 90, 50, 67]
    assert 1 < len(group_plan(tuple(lengths), torch.device("cpu")).shapes) < len(lengths)
    gen = torch.Generator().manual_seed(5)
    n = sum(lengths)
    q, k, v = (
        torch.randn(1, h, n, 64, generator=gen).to(torch.bfloat16).requires_grad_()
        for h in (9, 3, 3)
    )
    ours = packed_attention(q, k, v, lengths, 0.125)
    theirs = _per_document(q, k, v, lengths, 0.125)
    torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-6, rtol=8e-3)
    weights = torch.randn(ours.shape, generator=gen).to(torch.bfloat16)
    g1 = torch.autograd.grad((ours * weights).sum(), (q, k, v))
    g2 = torch.autograd.grad((theirs * weights).sum(), (q, k, v))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.02)


def _partitions(items):
    """Every set partition of ``items``."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]
        yield [[first], *part]


@pytest.mark.parametrize("seed", range(6))
def test_length_groups_is_optimal(seed):
    """The dynamic programme finds the least cost over *every* set partition (brute force),
    covers each document once and respects the group size bound."""
    import random

    from rlhfkit.models.doc_attention import length_groups

    rng = random.Random(seed)
    lengths = tuple(rng.randint(1, 120) for _ in range(rng.randint(1, 7)))
    overhead, max_docs = rng.choice([0, 500, 9000, 10**6]), rng.choice([2, 3, 64])

    def cost(groups):
        return sum(overhead + len(g) * max(lengths[i] for i in g) ** 2 for g in groups)

    groups = length_groups(lengths, overhead, max_docs)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(len(g) <= max_docs for g in groups)
    feasible = [p for p in _partitions(list(range(len(lengths)))) if max(map(len, p)) <= max_docs]
    assert cost(groups) == min(cost(p) for p in feasible)


def test_group_plan_gathers_and_scatters_back():
    """gather puts each document's positions first in its padded slot (padding repeats the
    document's last position); back finds every position again."""
    from rlhfkit.models.doc_attention import group_plan

    lengths = (4, 1, 6, 3, 6)
    plan = group_plan(lengths, torch.device("cpu"))
    positions = torch.arange(sum(lengths))
    stacked = positions.index_select(0, plan.gather)
    assert stacked.numel() == sum(b * size for b, size in plan.shapes)
    assert torch.equal(stacked.index_select(0, plan.back), positions)
    starts = [0, 4, 5, 11, 14]
    offset = 0
    for b, size in plan.shapes:
        for row in stacked[offset : offset + b * size].view(b, size):
            doc = starts.index(int(row[0]))
            real = lengths[doc]
            assert row[:real].tolist() == list(range(row[0], row[0] + real))
            assert (row[real:] == row[0] + real - 1).all()
        offset += b * size


@pytest.mark.parametrize("path", ["plain", "masks", "context", "dropout"])
def test_varlen_batches_only_plain_causal_documents(monkeypatch, path):
    """Plain causal documents go through packed_attention; explicit masks, a shared context and
    dropout keep the per-document loop."""
    import rlhfkit.models.attention as attention

    calls = []
    monkeypatch.setattr(
        attention, "packed_attention", lambda *a: calls.append(a) or _per_document(*a)
    )
    module = torch.nn.Module()
    module.num_key_value_groups = 1
    module.training = True
    lengths = [3, 5, 4]
    q, k, v = (torch.randn(1, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    kwargs = {"cu_seq_lens_q": torch.tensor([0, 3, 8, 12])}
    if path == "masks":
        kwargs["doc_masks"] = [None, torch.ones(5, 5, dtype=torch.bool).tril(), None]
    if path == "context":
        kwargs["doc_context"] = 3
    out, _ = attention.varlen_sdpa_attention(
        module, q, k, v, None, dropout=0.5 if path == "dropout" else 0.0, **kwargs
    )
    assert out.shape == (1, 12, 2, 8)
    assert len(calls) == (1 if path == "plain" else 0)
    assert calls == [] or calls[0][3] == lengths


def test_biased_attention_backward_equals_autograd():
    """The hand-written backward equals autograd of the same forward (fp64; in bf16 it
    differentiates the rounded probabilities, so it agrees to rounding)."""
    from rlhfkit.models.doc_attention import _BiasedAttention, _causal_bias

    gen = torch.Generator().manual_seed(2)
    for dtype, atol in ((torch.float64, 1e-12), (torch.bfloat16, 0.05)):
        q, k, v = (
            torch.randn(4, n, 16, generator=gen).to(dtype).requires_grad_() for n in (18, 6, 6)
        )
        bias = _causal_bias(6, 6, 3, dtype, torch.device("cpu"))
        ours = _BiasedAttention.apply(q, k, v, bias, 0.25)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=0.25)
        probs = torch.softmax(scores, -1, dtype=torch.promote_types(dtype, torch.float32))
        theirs = probs.to(dtype) @ v
        assert torch.equal(ours, theirs)
        weights = torch.randn(ours.shape, generator=gen).to(dtype)
        g1 = torch.autograd.grad((ours * weights).sum(), (q, k, v))
        g2 = torch.autograd.grad((theirs * weights).sum(), (q, k, v))
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=0.02)


def test_packed_attention_plan_made_in_inference_mode_serves_training():
    """The cached indices and bias of a shape first met under inference_mode (a reference
    forward) are ordinary tensors: a training forward of the same shape can save them."""
    from rlhfkit.models.doc_attention import packed_attention

    lengths = [6, 2, 9, 3]
    q, k, v = (torch.randn(1, h, 20, 8, dtype=torch.float64) for h in (4, 2, 2))
    with torch.inference_mode():
        packed_attention(q, k, v, lengths, 0.5)
    q.requires_grad_()
    packed_attention(q, k, v, lengths, 0.5).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_biased_attention_computes_only_the_gradients_asked_for():
    """Frozen keys and values get no gradient (and the query's is unchanged); second
    derivatives are refused rather than silently wrong."""
    from rlhfkit.models.doc_attention import _BiasedAttention, _causal_bias

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 3, 8, dtype=torch.float64, generator=gen) for _ in range(2))
    bias = _causal_bias(3, 3, 2, torch.float64, torch.device("cpu"))
    (grad_q,) = torch.autograd.grad(_BiasedAttention.apply(q, k, v, bias, 0.5).sum(), (q,))
    k2, v2 = k.clone().requires_grad_(), v.clone().requires_grad_()
    full = torch.autograd.grad(_BiasedAttention.apply(q, k2, v2, bias, 0.5).sum(), (q, k2, v2))
    torch.testing.assert_close(grad_q, full[0], atol=0, rtol=0)
    out = _BiasedAttention.apply(q, k, v, bias, 0.5).sum()
    (g,) = torch.autograd.grad(out, (q,), create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
