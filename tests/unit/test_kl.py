"""KL estimators against exact categorical KL and closed-form point values."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.ops.kl import full_kl, kl_k1, kl_k2, kl_k3

P = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
Q = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def expectation(estimator, p: torch.Tensor, q: torch.Tensor) -> float:
    """E_{y~p}[k(y)] by exact enumeration."""
    return float((p * estimator(p.log(), q.log())).sum())


def test_estimators_match_exact_kl_by_enumeration() -> None:
    exact = float((P * (P / Q).log()).sum())
    assert exact == pytest.approx(0.0851228, abs=1e-7)
    assert expectation(kl_k1, P, Q) == pytest.approx(exact, abs=1e-12)
    assert expectation(kl_k3, P, Q) == pytest.approx(exact, abs=1e-12)
    assert expectation(kl_k2, P, Q) == pytest.approx(0.0800876, abs=1e-7)


def test_inverted_k3_convention_is_not_kl() -> None:
    """The book code's k3 (ratio pi_theta/pi_ref) estimates chi^2 - KL, not KL."""
    inverted = float((P * (torch.expm1(P.log() - Q.log()) - (P.log() - Q.log()))).sum())
    assert inverted == pytest.approx(0.0782105, abs=1e-7)
    assert abs(inverted - expectation(kl_k3, P, Q)) > 5e-3


@pytest.mark.parametrize(
    ("delta", "value"), [(1.0, math.exp(-1)), (-1.0, math.e - 2), (0.5, 0.106531)]
)
def test_k3_point_values(delta: float, value: float) -> None:
    out = kl_k3(torch.tensor(delta, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    assert float(out) == pytest.approx(value, abs=1e-6)


def test_k3_nonnegative_and_stable_in_fp32() -> None:
    grid = torch.linspace(-30, 30, 601)
    assert (kl_k3(grid, torch.zeros_like(grid)) >= 0).all()
    small = kl_k3(torch.tensor(1e-4), torch.tensor(0.0))
    assert float(small) == pytest.approx(4.9986e-9, rel=1e-3)
    naive = torch.exp(-torch.tensor(1e-4)) - 1 + torch.tensor(1e-4)
    assert abs(float(naive) - 4.9986e-9) > 1e-8  # the form expm1 avoids


def test_surrogate_gradients() -> None:
    """sum_y sg(p_y) k(y) differentiated through softmax logits."""
    expected = {
        kl_k1: [0.0, 0.0, 0.0],
        kl_k2: [0.175945, -0.098118, -0.077827],
        kl_k3: [0.2, -0.1, -0.1],
    }
    for estimator, grad in expected.items():
        logits = P.log().clone().requires_grad_(True)
        logprobs = torch.log_softmax(logits, -1)
        (P * estimator(logprobs, Q.log())).sum().backward()
        assert logits.grad.tolist() == pytest.approx(grad, abs=1e-6)


def test_full_vocabulary_kl_is_exact_and_zero_at_reference() -> None:
    out = full_kl(P.log()[None], Q.log()[None])
    assert float(out[0]) == pytest.approx(0.0851228, abs=1e-6)
    logits = torch.randn(2, 5, 11)
    assert torch.allclose(full_kl(logits, logits), torch.zeros(2, 5), atol=1e-6)


def test_linear_full_kl_matches_full_kl_and_its_gradient():
    from rlhfkit.ops.kl import linear_full_kl

    torch.manual_seed(0)
    h = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(11, 5, requires_grad=True)
    h_ref, w_ref = torch.randn(7, 5), torch.randn(11, 5)
    got = linear_full_kl(h, w, h_ref, w_ref, temperature=0.7, chunk_rows=3)
    expected = full_kl(h @ w.T / 0.7, h_ref @ w_ref.T / 0.7)
    torch.testing.assert_close(got, expected)
    (g_h, g_w) = torch.autograd.grad(got.sum(), (h, w))
    (e_h, e_w) = torch.autograd.grad(expected.sum(), (h, w))
    torch.testing.assert_close(g_h, e_h)
    torch.testing.assert_close(g_w, e_w)
    same = linear_full_kl(h_ref, w_ref, h_ref, w_ref)
    torch.testing.assert_close(same, torch.zeros(7), atol=1e-6, rtol=0)
