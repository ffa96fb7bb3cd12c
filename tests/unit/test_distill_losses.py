"""Distillation losses against hand-computed values and exact properties.

Teacher P = [0.5, 0.5], student Q = [0.9, 0.1]:
- forward KL(P || Q) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.510826 (= CE 1.203973 - H 0.693147);
- reverse KL(Q || P) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) = 0.368064;
- JSD_0.5: M = [0.7, 0.3], 0.5 KL(P || M) + 0.5 KL(Q || M) = 0.101749;
- JSD_0.25: M = 0.25 P + 0.75 Q = [0.8, 0.2], 0.25 KL(P || M) + 0.75 KL(Q || M) = 0.083303.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.losses.distill import (
    DistillLoss,
    _jsd_value_and_grad,
    distill_divergence,
    distill_divergence_sum,
    forward_kl,
    generalized_jsd,
    jsd_chunk,
    jsd_chunk_compiled,
    reverse_kl,
    sampled_reverse_kl,
    top_k_buckets,
)

TEACHER = torch.tensor([0.5, 0.5]).log()
STUDENT = torch.tensor([0.9, 0.1]).log()


def test_hand_computed_values():
    assert forward_kl(STUDENT, TEACHER).item() == pytest.approx(0.510826, abs=1e-6)
    cross_entropy = -(TEACHER.exp() * STUDENT).sum().item()
    entropy = -(TEACHER.exp() * TEACHER).sum().item()
    assert (cross_entropy, entropy) == pytest.approx((1.203973, 0.693147), abs=1e-6)
    assert reverse_kl(STUDENT, TEACHER).item() == pytest.approx(0.368064, abs=1e-6)
    assert generalized_jsd(STUDENT, TEACHER, 0.5).item() == pytest.approx(0.101749, abs=1e-6)
    assert generalized_jsd(STUDENT, TEACHER, 0.25).item() == pytest.approx(0.083303, abs=1e-6)


def _random_logits(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(("beta", "kl"), [(0.0, forward_kl), (1.0, reverse_kl)])
def test_beta_ends_are_the_two_kls_in_value_and_gradient(beta, kl):
    teacher = torch.log_softmax(_random_logits(5, 11, seed=1), -1)
    logits = _random_logits(5, 11, seed=2).requires_grad_()
    a = DistillLoss(beta=beta)(logits, teacher.exp().log())
    (ga,) = torch.autograd.grad(a.sum(), logits)
    b = kl(torch.log_softmax(logits, -1), teacher)
    (gb,) = torch.autograd.grad(b.sum(), logits)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)


def test_jsd_tends_to_the_kls_at_the_ends():
    """JSD_beta / beta -> KL(P || Q) as beta -> 0, JSD_beta / (1 - beta) -> KL(Q || P) as beta
    -> 1: the two ends continue the interior (up to scale)."""
    teacher = torch.log_softmax(_random_logits(4, 7, seed=3), -1)
    student = torch.log_softmax(_random_logits(4, 7, seed=4), -1)
    eps = 1e-6
    near0 = generalized_jsd(student, teacher, eps) / eps
    near1 = generalized_jsd(student, teacher, 1 - eps) / eps
    torch.testing.assert_close(near0, forward_kl(student, teacher), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(near1, reverse_kl(student, teacher), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [None, 3])
def test_zero_with_zero_gradient_when_student_is_teacher(beta, top_k):
    logits = _random_logits(6, 13, seed=5)
    student = logits.clone().requires_grad_()
    loss = DistillLoss(beta=beta, top_k=top_k, temperature=1.5).from_logits(student, logits)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert loss.abs().max().item() < 1e-6
    assert grad.abs().max().item() < 1e-6


def test_jsd_at_one_half_is_symmetric():
    a = torch.log_softmax(_random_logits(8, 9, seed=6), -1)
    b = torch.log_softmax(_random_logits(8, 9, seed=7), -1)
    torch.testing.assert_close(generalized_jsd(a, b, 0.5), generalized_jsd(b, a, 0.5))
    assert not torch.allclose(generalized_jsd(a, b, 0.3), generalized_jsd(b, a, 0.3))


def test_top_k_buckets_sum_to_one_and_k_equal_v_is_the_full_divergence():
    student = torch.log_softmax(_random_logits(5, 10, seed=8), -1)
    teacher = torch.log_softmax(_random_logits(5, 10, seed=9), -1)
    s, t = top_k_buckets(student, teacher, 4)
    assert s.shape == t.shape == (5, 5)
    torch.testing.assert_close(s.exp().sum(-1), torch.ones(5, dtype=s.dtype))
    torch.testing.assert_close(t.exp().sum(-1), torch.ones(5, dtype=t.dtype))
    # the student's top 4 ids, in order, then the tail
    ids = student.topk(4, -1).indices
    torch.testing.assert_close(s[:, :4], student.gather(-1, ids))
    logits = _random_logits(5, 10, seed=10).requires_grad_()
    teacher_logits = _random_logits(5, 10, seed=11)
    for beta in (0.0, 0.5, 1.0):
        full = DistillLoss(beta=beta)(logits, teacher_logits)
        (g_full,) = torch.autograd.grad(full.sum(), logits)
        all_ids = DistillLoss(beta=beta, top_k=10)(logits, teacher_logits)
        (g_all,) = torch.autograd.grad(all_ids.sum(), logits)
        torch.testing.assert_close(all_ids, full, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g_all, g_full, atol=1e-6, rtol=1e-5)
    # fewer buckets merge mass: the divergence can only shrink (data processing inequality)
    fewer = DistillLoss(beta=0.0, top_k=3)(logits, teacher_logits)
    assert bool((fewer <= DistillLoss(beta=0.0)(logits, teacher_logits) + 1e-6).all())


def test_temperature_scales_logits_and_the_divergence_by_tau_squared():
    student, teacher = _random_logits(3, 6, seed=12), _random_logits(3, 6, seed=13)
    hot = DistillLoss(beta=0.4, temperature=2.0).from_logits(student, teacher)
    plain = DistillLoss(beta=0.4)(student / 2.0, teacher / 2.0)
    torch.testing.assert_close(hot, 4.0 * plain)


def test_sampled_token_estimator_matches_the_exact_reverse_kl():
    """Mean of log q(a) - log p(a) over 10,000 samples a ~ q: within 2% of KL(q || p)."""
    student = torch.log_softmax(_random_logits(1, 20, seed=14)[0] * 1.5, -1)
    teacher = torch.log_softmax(_random_logits(1, 20, seed=15)[0] * 1.5, -1)
    exact = reverse_kl(student, teacher).item()
    gen = torch.Generator().manual_seed(16)
    samples = torch.multinomial(student.exp(), 10_000, replacement=True, generator=gen)
    estimate = sampled_reverse_kl(student[samples], teacher[samples]).mean().item()
    assert abs(estimate - exact) < 0.02 * exact, (estimate, exact)


@pytest.mark.parametrize(("top_k", "beta"), [(None, 0.0), (None, 0.3), (None, 1.0), (4, 0.3)])
def test_fused_chunked_head_equals_the_plain_computation(top_k, beta):
    """From hidden states and heads, chunk by chunk: the same values and student gradients as
    autograd on full logits (the closed-form gradient over the whole vocabulary, autograd with
    top-k); the teacher gets no gradient; teacher and student may differ in width."""
    gen = torch.Generator().manual_seed(17)
    hidden = torch.randn(10, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(10, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    t_weight = torch.randn(12, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = DistillLoss(beta=beta, temperature=1.7, top_k=top_k)
    fused = distill_divergence(hidden, weight, t_hidden, t_weight, loss, chunk_rows=3)
    grads = torch.autograd.grad(fused.sum(), (hidden, weight), retain_graph=True)
    plain = loss.from_logits(hidden @ weight.T, t_hidden @ t_weight.T)
    expected = torch.autograd.grad(plain.sum(), (hidden, weight))
    torch.testing.assert_close(fused, plain.float(), atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    fused.sum().backward()
    assert t_hidden.grad is None and t_weight.grad is None


@pytest.mark.parametrize(("top_k", "beta"), [(None, 0.0), (None, 0.3), (None, 1.0), (4, 0.3)])
def test_the_summed_divergence_has_the_sum_of_the_per_position_values_and_gradients(top_k, beta):
    """The training path (gradient computed in the forward pass, scaled in the backward) gives
    the same sum, per-position values and student gradients as the per-position path, for any
    upstream scale; the teacher gets no gradient."""
    gen = torch.Generator().manual_seed(18)
    hidden = torch.randn(10, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(12, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    t_hidden = torch.randn(10, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    t_weight = torch.randn(12, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    loss = DistillLoss(beta=beta, temperature=1.7, top_k=top_k)
    total, per = distill_divergence_sum(hidden, weight, t_hidden, t_weight, loss, chunk_rows=3)
    grads = torch.autograd.grad(total * 0.37, (hidden, weight), retain_graph=True)
    per_position = distill_divergence(hidden, weight, t_hidden, t_weight, loss, chunk_rows=4)
    expected = torch.autograd.grad(per_position.sum() * 0.37, (hidden, weight))
    torch.testing.assert_close(per, per_position.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(total, per_position.sum(), atol=1e-6, rtol=1e-6)
    assert not per.requires_grad
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    total.backward()
    assert t_hidden.grad is None and t_weight.grad is None


def test_value_and_gradient_in_one_pass_equal_the_divergence_and_its_autograd_gradient():
    """From logits, in one go: JSD_beta(z / tau) and its gradient in z / tau (the closed form
    Q (r - <Q, r>)), against generalized_jsd of the log-softmax and autograd through it."""
    logits = _random_logits(2, 7, seed=19)
    for beta in (0.0, 0.25, 0.5, 1.0):
        for tau in (1.0, 2.0):
            scaled = (logits[0] / tau).requires_grad_()
            teacher = torch.log_softmax(logits[1] / tau, -1)
            expected = generalized_jsd(torch.log_softmax(scaled, -1), teacher, beta)
            (expected_grad,) = torch.autograd.grad(expected, scaled)
            # shifting the logits changes nothing: only the softmax is used
            value, grad = _jsd_value_and_grad(logits[0] + 3.0, logits[1], beta, temperature=tau)
            torch.testing.assert_close(value, expected.detach())
            torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_compiled_chunk_equals_its_eager_twin(beta, compiled_kernels):
    """torch.compile's fused chunk gives the eager values and gradients (fp32, a few rows of a
    small vocabulary, temperature 1.5, bf16 gradients as in training)."""
    gen = torch.Generator().manual_seed(20)
    student, teacher = torch.randn(2, 5, 37, generator=gen)
    for rows in (5, 3):  # one compilation serves both row counts
        args = (student[:rows], teacher[:rows], beta, 1.5, torch.bfloat16)
        value, grad = jsd_chunk_compiled(*args)
        eager_value, eager_grad = jsd_chunk(*args)
        torch.testing.assert_close(value, eager_value, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad.float(), eager_grad.float(), atol=1e-2, rtol=1e-2)
        assert grad.dtype == torch.bfloat16


def test_a_failed_compilation_falls_back_to_eager(monkeypatch, caplog):
    from rlhfkit.ops import compiled as compiled_module

    def broken(fn, **_):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler")

        return call

    monkeypatch.setattr(compiled_module.torch, "compile", broken)
    twin = compiled_module.compiled(jsd_chunk)
    args = (STUDENT[None], TEACHER[None], 0.5, 1.0, torch.float32)
    with caplog.at_level("WARNING"):
        value, _ = twin(*args)
        twin(*args)
    torch.testing.assert_close(value, jsd_chunk(*args)[0])
    assert sum("running it eagerly" in r.message for r in caplog.records) == 1


def test_beta_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="beta must be in"):
        generalized_jsd(STUDENT, TEACHER, 1.5)
    assert math.isfinite(generalized_jsd(STUDENT, TEACHER, 0.999).item())
