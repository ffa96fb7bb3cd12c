"""Chunked fused log-probs (ops.logprobs) against the full-logits reference and closed forms.

The reference is computed in fp64 from full logits with ``torch.log_softmax`` (an independent
implementation of the same formula); the op under test runs in fp32 or bf16 with a recomputing
custom backward and must agree in values and in gradients for any upstream gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.ops.logprobs import (
    chunk_logprobs,
    chunk_logprobs_grad,
    linear_entropy,
    linear_logprobs,
    logits_logprobs,
    naive_linear_logprobs,
)

N, H, V = 13, 16, 37


def make_inputs(seed: int, n: int = N, h: int = H, v: int = V, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (scale / math.sqrt(h))
    targets = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)
    return hidden, weight, targets, upstream


def reference(hidden64, weight64, targets, upstream64, temperature=1.0):
    """fp64 full-logits log-probs and their gradients w.r.t. hidden and weight."""
    h = hidden64.detach().clone().requires_grad_(True)
    w = weight64.detach().clone().requires_grad_(True)
    logits = (h @ w.T) / temperature
    lp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    gh, gw = torch.autograd.grad(lp, (h, w), grad_outputs=upstream64)
    return lp.detach(), gh, gw


def run_op(hidden, weight, targets, upstream, **kwargs):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    lp = linear_logprobs(h, w, targets, **kwargs)
    gh, gw = torch.autograd.grad(lp, (h, w), grad_outputs=upstream.to(lp.dtype))
    return lp.detach(), gh, gw


@pytest.mark.parametrize("chunk_rows", [1, 2, 5, N, N + 7, None])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
@pytest.mark.parametrize("store_bytes", [0, 1 << 28], ids=["recompute", "keep-softmax"])
def test_chunked_equals_full_logits_fp32(chunk_rows, temperature, store_bytes):
    hidden, weight, targets, upstream = make_inputs(seed=1, scale=3.0)
    ref_lp, ref_gh, ref_gw = reference(hidden, weight, targets, upstream, temperature)
    lp, gh, gw = run_op(
        hidden.float(), weight.float(), targets, upstream.float(),
        temperature=temperature, chunk_rows=chunk_rows, store_bytes=store_bytes,
    )  # fmt: skip
    assert lp.dtype == torch.float32 and gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh.double(), ref_gh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw.double(), ref_gw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_rows", [1, 4, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_naive_fp32(chunk_rows, temperature):
    """Same inputs and dtype: the fused op and ``naive_linear_logprobs`` agree to fp32 rounding."""
    hidden, weight, targets, upstream = (t.float() if t.is_floating_point() else t
                                         for t in make_inputs(seed=2, scale=2.0))  # fmt: skip
    lp, gh, gw = run_op(hidden, weight, targets, upstream,
                        temperature=temperature, chunk_rows=chunk_rows)  # fmt: skip
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    naive = naive_linear_logprobs(h, w, targets, temperature=temperature)
    nh, nw = torch.autograd.grad(naive, (h, w), grad_outputs=upstream)
    torch.testing.assert_close(lp, naive.detach(), atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(gh, nh, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(gw, nw, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("which", ["hidden", "weight"])
@pytest.mark.parametrize("store_bytes", [0, 1 << 28], ids=["recompute", "keep-softmax"])
def test_gradient_for_only_one_input(which, store_bytes):
    """The backward handles needs_input_grad for each input separately."""
    hidden, weight, targets, upstream = make_inputs(seed=3)
    _, ref_gh, ref_gw = reference(hidden, weight, targets, upstream)
    h = hidden.float().requires_grad_(which == "hidden")
    w = weight.float().requires_grad_(which == "weight")
    lp = linear_logprobs(h, w, targets, chunk_rows=3, store_bytes=store_bytes)
    (lp * upstream.float()).sum().backward()
    if which == "hidden":
        assert w.grad is None
        torch.testing.assert_close(h.grad.double(), ref_gh, atol=1e-5, rtol=1e-5)
    else:
        assert h.grad is None
        torch.testing.assert_close(w.grad.double(), ref_gw, atol=1e-5, rtol=1e-5)


def test_bf16_inputs_match_fp32_reference_loosely():
    hidden, weight, targets, upstream = make_inputs(seed=4, n=24, h=32, v=50, scale=2.0)
    # The reference sees the same (bf16-representable) inputs, so only the arithmetic differs.
    hidden_bf, weight_bf = hidden.bfloat16(), weight.bfloat16()
    ref_lp, ref_gh, ref_gw = reference(hidden_bf.double(), weight_bf.double(), targets, upstream)
    lp, gh, gw = run_op(hidden_bf, weight_bf, targets, upstream, chunk_rows=5)
    assert lp.dtype == torch.float32  # log-softmax output always fp32
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    torch.testing.assert_close(lp.double(), ref_lp, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(gh.double(), ref_gh, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(gw.double(), ref_gw, atol=3e-2, rtol=3e-2)
    # Sanity of the tolerance: a wrong target is far outside it.
    wrong = linear_logprobs(hidden_bf, weight_bf, (targets + 1) % 50)
    assert (wrong.double() - ref_lp).abs().max() > 0.1


def test_fp64_inputs_match_reference():
    """fp64 inputs take the full-logits path; the log-softmax itself runs in fp32 (documented
    output dtype), so the agreement is at fp32 precision, not fp64."""
    hidden, weight, targets, upstream = make_inputs(seed=5)
    ref_lp, ref_gh, ref_gw = reference(hidden, weight, targets, upstream, 0.8)
    lp, gh, gw = run_op(hidden, weight, targets, upstream, temperature=0.8, chunk_rows=2)
    assert gh.dtype == torch.float64 and gw.dtype == torch.float64
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(gh, ref_gh, atol=1e-6, rtol=0)
    torch.testing.assert_close(gw, ref_gw, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32-chunked"])
def test_hand_2x2_closed_form(dtype):
    """W = I (V = H = 2), so z_i = h_i / tau.

    Row 0: h = (1, 0), target 0, tau = 1. log p = z_0 - log(e^{z_0} + e^{z_1})
        = 1 - log(e + 1) = -log(1 + e^{-1}) = -0.313261687518...
    Row 1: h = (0, 2), target 0. log p = 0 - log(1 + e^2) = -2.126928011042...
    With tau = 2: row 0 z = (0.5, 0): log p = -log(1 + e^{-0.5}) = -0.474076984...;
    row 1 z = (0, 1): log p = -log(1 + e) = -1.313261687518...

    Gradient (tau = 1, upstream 1): d log p_0 / d z = onehot(0) - softmax(z). Row 0:
    softmax = (s, 1 - s) with s = 1/(1 + e^{-1}), so dz = (1 - s, -(1 - s)); with W = I the
    hidden gradient is dz itself. Row 1: s' = 1/(1 + e^2), dz = (1 - s', -(1 - s')).
    dW = sum_i dz_i h_i^T: column 0 gets row 0's dz (h_00 = 1), column 1 gets 2 x row 1's dz.
    """
    hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=dtype, requires_grad=True)
    weight = torch.eye(2, dtype=dtype, requires_grad=True)
    targets = torch.tensor([0, 0])
    lp = linear_logprobs(hidden, weight, targets, chunk_rows=1)
    expected = [-math.log(1 + math.exp(-1)), -math.log(1 + math.exp(2))]
    atol = 1e-6  # the unit-test tolerance; the log-softmax runs in fp32 for any input
    torch.testing.assert_close(lp.double(), torch.tensor(expected, dtype=torch.float64),
                               atol=atol, rtol=0)  # fmt: skip
    lp.sum().backward()
    a = 1 - 1 / (1 + math.exp(-1))  # 1 - s
    b = 1 - 1 / (1 + math.exp(2))  # 1 - s'
    grad_h = torch.tensor([[a, -a], [b, -b]], dtype=torch.float64)
    grad_w = torch.tensor([[a, 2 * b], [-a, -2 * b]], dtype=torch.float64)
    torch.testing.assert_close(hidden.grad.double(), grad_h, atol=atol, rtol=0)
    torch.testing.assert_close(weight.grad.double(), grad_w, atol=atol, rtol=0)

    lp2 = linear_logprobs(hidden.detach(), weight.detach(), targets, temperature=2.0)
    expected2 = [-math.log(1 + math.exp(-0.5)), -math.log(1 + math.e)]
    torch.testing.assert_close(lp2.double(), torch.tensor(expected2, dtype=torch.float64),
                               atol=atol, rtol=0)  # fmt: skip


def test_logits_logprobs_fp32_any_shape():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, V, generator=gen, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (2, 3), generator=gen)
    expected = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    expected = expected.gather(-1, targets[..., None]).squeeze(-1)
    out = logits_logprobs(logits.bfloat16(), targets)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=6e-2, rtol=0)
    torch.testing.assert_close(logits_logprobs(logits.float(), targets).double(), expected,
                               atol=1e-5, rtol=0)  # fmt: skip


def exact_entropy(hidden64, weight64, temperature=1.0):
    p = torch.softmax(hidden64 @ weight64.T / temperature, dim=-1)
    return -(p * torch.log(p)).sum(-1)


def test_entropy_uniform_is_log_v():
    hidden = torch.randn(5, H)
    weight = torch.zeros(V, H)  # every logit 0: uniform over V
    ent = linear_entropy(hidden, weight, chunk_rows=2)
    torch.testing.assert_close(ent, torch.full((5,), math.log(V)), atol=1e-6, rtol=0)


def test_entropy_hand_two_classes():
    """z = (0, log 3): p = (1/4, 3/4), H = (1/4) log 4 + (3/4) log(4/3) = 0.562335144618..."""
    hidden = torch.tensor([[1.0]], dtype=torch.float64)
    weight = torch.tensor([[0.0], [math.log(3)]], dtype=torch.float64)
    expected = 0.25 * math.log(4) + 0.75 * math.log(4 / 3)
    assert linear_entropy(hidden, weight).item() == pytest.approx(expected, abs=1e-6)
    # A confident distribution has (almost) zero entropy, not NaN.
    peaked = linear_entropy(hidden, torch.tensor([[0.0], [200.0]], dtype=torch.float64))
    assert peaked.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 3, None])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_entropy_equals_exact(chunk_rows, temperature):
    hidden, weight, _, _ = make_inputs(seed=7, scale=3.0)
    ent = linear_entropy(hidden.float(), weight.float(), temperature=temperature,
                         chunk_rows=chunk_rows)  # fmt: skip
    assert ent.dtype == torch.float32 and not ent.requires_grad
    torch.testing.assert_close(ent.double(), exact_entropy(hidden, weight, temperature),
                               atol=1e-5, rtol=0)  # fmt: skip


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    v=st.integers(2, 12),
    chunk=st.integers(1, 12),
    temperature=st.sampled_from([0.3, 1.0, 2.5]),
    seed=st.integers(0, 2**16),
)
def test_property_chunking_never_changes_the_result(n, v, chunk, temperature, seed):
    """Log-probs and gradients do not depend on the chunk size; log-probs are <= 0."""
    hidden, weight, targets, upstream = make_inputs(seed, n=n, h=4, v=v, scale=2.0)
    ref_lp, ref_gh, ref_gw = reference(hidden, weight, targets, upstream, temperature)
    lp, gh, gw = run_op(hidden.float(), weight.float(), targets, upstream.float(),
                        temperature=temperature, chunk_rows=chunk)  # fmt: skip
    assert (lp <= 0).all()
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
    # fp32 gradient error scales with the largest gradient (sharp softmax at temperature 0.3).
    for got, ref in ((gh, ref_gh), (gw, ref_gw)):
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(got.double(), ref, atol=1e-5 * scale, rtol=1e-5)


def test_kept_softmax_survives_a_second_backward():
    """retain_graph: the kept softmax is not modified in place by the first backward."""
    hidden, weight, targets, upstream = (t.float() if t.is_floating_point() else t
                                         for t in make_inputs(seed=5))  # fmt: skip
    h = hidden.clone().requires_grad_(True)
    lp = linear_logprobs(h, weight, targets, chunk_rows=3)
    first = torch.autograd.grad(lp, h, grad_outputs=upstream, retain_graph=True)[0]
    second = torch.autograd.grad(lp, h, grad_outputs=upstream)[0]
    torch.testing.assert_close(first, second, atol=0, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunk_gradient_is_the_derivative_of_the_chunk_value(temperature):
    """D = (onehot - softmax) / tau equals autograd's derivative of the value (fp64)."""
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(6, V, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, V, (6,), generator=gen)
    upstream = torch.randn(6, generator=gen, dtype=torch.float64)
    value = chunk_logprobs(logits, targets, temperature)
    (expected,) = torch.autograd.grad(value, logits, grad_outputs=upstream)
    value2, d = chunk_logprobs_grad(logits.detach(), targets, temperature, torch.float64)
    torch.testing.assert_close(value2, value.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(d * upstream[:, None], expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("store_bytes", [0, 1 << 28], ids=["recompute", "keep"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_compiled_chunks_equal_reference_fp32(store_bytes, temperature, compiled_kernels):
    """The compiled twins (forced on a small vocabulary) against the fp64 reference."""
    hidden, weight, targets, upstream = make_inputs(seed=5, scale=3.0)
    ref_lp, ref_gh, ref_gw = reference(hidden, weight, targets, upstream, temperature)
    lp, gh, gw = run_op(
        hidden.float(), weight.float(), targets, upstream.float(), temperature=temperature,
        chunk_rows=5, store_bytes=store_bytes, compile=True,
    )  # fmt: skip
    torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh.double(), ref_gh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw.double(), ref_gw, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        nograd = linear_logprobs(hidden.float(), weight.float(), targets,
                                 temperature=temperature, chunk_rows=5, compile=True)  # fmt: skip
    torch.testing.assert_close(nograd.double(), ref_lp, atol=1e-5, rtol=1e-5)


def test_compiled_and_eager_chunks_agree_in_bf16(compiled_kernels):
    hidden, weight, targets, upstream = make_inputs(seed=6, scale=3.0)
    bf = hidden.bfloat16(), weight.bfloat16(), targets, upstream.float()
    eager = run_op(*bf, chunk_rows=4, compile=False)
    fused = run_op(*bf, chunk_rows=4, compile=True)
    for a, b in zip(eager, fused, strict=True):
        torch.testing.assert_close(b.float(), a.float(), atol=2e-2, rtol=2e-2)
