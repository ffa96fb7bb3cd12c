"""DPO-family losses, part 1: DPO, cDPO, IPO, DPO-norm, SimPO, ORPO.

Expected values are derived by hand in each docstring (math.log / math.exp of the formula),
never produced by the code under test. fp64 throughout, atol 1e-6. softplus(x) = log(1 + e^x).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.losses.preference import (
    cdpo_loss,
    dpo_loss,
    dpo_norm_loss,
    ipo_loss,
    orpo_log_odds,
    orpo_loss,
    simpo_loss,
)
from rlhfkit.losses.sft import sft_loss
from rlhfkit.ops.masking import Aggregation

D = torch.float64
ATOL = 1e-6
logprobs = st.floats(-60, 0, allow_nan=False)
length = st.integers(1, 50)


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=D, requires_grad=grad)


def close(actual: torch.Tensor | float, expected: float, atol: float = ATOL) -> None:
    value = float(actual.detach()) if torch.is_tensor(actual) else float(actual)
    assert value == pytest.approx(expected, abs=atol)


def on_h(fn: Callable, h: torch.Tensor, **kw: object) -> torch.Tensor:
    """The loss of one pair with Δ_c = h, Δ_r = 0 (policy logp_c = h, all else 0)."""
    zero = torch.zeros(1, dtype=D)
    return fn(
        chosen_logprobs=h.reshape(1),
        rejected_logprobs=zero,
        ref_chosen_logprobs=zero,
        ref_rejected_logprobs=zero,
        **kw,
    ).loss


def grad_at(loss_of_h: Callable[[torch.Tensor], torch.Tensor], h: float) -> float:
    x = torch.tensor(h, dtype=D, requires_grad=True)
    return float(torch.autograd.grad(loss_of_h(x), x)[0])


def argmin_1d(loss_of_h: Callable[[torch.Tensor], torch.Tensor], lo: float, hi: float) -> float:
    """Bisection on the autograd derivative of a convex 1-D loss (needs g(lo) < 0 < g(hi))."""
    assert grad_at(loss_of_h, lo) < 0 < grad_at(loss_of_h, hi)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if grad_at(loss_of_h, mid) < 0 else (lo, mid)
    return (lo + hi) / 2


# --- DPO (7.1) ---------------------------------------------------------------------------


def test_dpo_policy_equals_reference_gives_log2_and_gradient_minus_beta_half():
    """h = 0: L = softplus(0) = log 2 = 0.693147; dL/dh = −β σ(0) = −β/2 = −0.05 (β 0.1)."""
    x = t(-7.0, -3.0, grad=True)
    out = dpo_loss(
        chosen_logprobs=x[:1],
        rejected_logprobs=x[1:],
        ref_chosen_logprobs=t(-7.0),
        ref_rejected_logprobs=t(-3.0),
    )
    close(out.loss, math.log(2))
    (g,) = torch.autograd.grad(out.loss, x)
    close(g[0], -0.05)
    close(g[1], 0.05)
    close(out.metrics["correct"], 0.5)  # reward tie counts one half


def test_dpo_worked_example():
    """(logp_c, ref_c, logp_r, ref_r) = (−10, −12, −15, −14), β 0.1.

    Δ_c = 2, Δ_r = −1, h = 3, βh = 0.3: L = log(1 + e^{−0.3}) = log(1.740818) = 0.554355;
    rewards βΔ = 0.2 / −0.1, margin 0.3, correct 1, not displaced (Δ_c > 0);
    dL/dh = −β σ(−0.3) = −0.1 / (1 + e^{0.3}) = −0.042556 = dL/dlogp_c = −dL/dlogp_r.
    """
    c, r = t(-10.0, grad=True), t(-15.0, grad=True)
    out = dpo_loss(
        chosen_logprobs=c,
        rejected_logprobs=r,
        ref_chosen_logprobs=t(-12.0),
        ref_rejected_logprobs=t(-14.0),
    )
    close(out.loss, 0.554355)
    out.loss.backward()
    close(c.grad, -0.042556)
    close(r.grad, 0.042556)
    m = out.metrics
    expected = {
        "pairs": 1, "chosen_rewards_sum": 0.2, "rejected_rewards_sum": -0.1, "margin_sum": 0.3,
        "correct": 1, "chosen_logprobs_sum": -10, "rejected_logprobs_sum": -15, "displaced": 0,
        "delta_chosen_sum": 2, "loss_sum": 0.554355,
    }  # fmt: skip
    for key, value in expected.items():
        close(m[key], value)
    assert not any(v.requires_grad for v in m.values())


def test_dpo_displacement_counts_pairs_where_both_likelihoods_fell():
    """Pairs (Δ_c, Δ_r) = (−1, −2), (1, −2), (−1, 2), (−3, −0.5): only the 1st and 4th have both
    Δ < 0, so displaced = 2; delta_chosen_sum = −1 + 1 − 1 − 3 = −4."""
    out = dpo_loss(
        chosen_logprobs=t(-1.0, 1.0, -1.0, -3.0),
        rejected_logprobs=t(-2.0, -2.0, 2.0, -0.5),
        ref_chosen_logprobs=torch.zeros(4, dtype=D),
        ref_rejected_logprobs=torch.zeros(4, dtype=D),
    )
    close(out.metrics["displaced"], 2)
    close(out.metrics["delta_chosen_sum"], -4)


@pytest.mark.parametrize("h", [-7.0, -0.4, 0.0, 1.3, 12.0])
def test_dpo_swap_identity(h):
    """softplus(−x) − softplus(x) = −x, so L(h) − L(−h) = −βh (β 0.1)."""
    close(on_h(dpo_loss, t(h)) - on_h(dpo_loss, t(-h)), -0.1 * h)


def test_dpo_population_optimum():
    """Label rate p: E[L] = p·softplus(−βh) + (1−p)·softplus(βh), stationary where σ(βh*) = p,
    i.e. h* = log(p/(1−p))/β = log 3 / 0.1 = 10.986123 (p 0.75, β 0.1). The expectation is
    built from two DPO calls (pair as labelled, and swapped)."""

    def expected_loss(h: torch.Tensor) -> torch.Tensor:
        return 0.75 * on_h(dpo_loss, h) + 0.25 * on_h(dpo_loss, -h)

    close(argmin_1d(expected_loss, 0.0, 50.0), 10.986123)


def test_dpo_normaliser_and_split_invariance():
    """L = Σ l_i / normaliser: two micro-batches with the global normaliser 4 add up to the full
    batch; their metric sums add up too. An empty batch with normaliser 0 gives 0, not NaN."""
    c, r, rc, rr = t(-3, -8, -1, -6), t(-4, -2, -9, -6), t(-3.5, -7, -2, -5), t(-4, -3, -8, -6)
    full = dpo_loss(
        chosen_logprobs=c, rejected_logprobs=r, ref_chosen_logprobs=rc, ref_rejected_logprobs=rr
    )
    parts = [
        dpo_loss(
            chosen_logprobs=c[s], rejected_logprobs=r[s], ref_chosen_logprobs=rc[s],
            ref_rejected_logprobs=rr[s], normaliser=4,
        )
        for s in (slice(0, 1), slice(1, 4))
    ]  # fmt: skip
    close(parts[0].loss + parts[1].loss, float(full.loss))
    for key, value in full.metrics.items():
        close(parts[0].metrics[key] + parts[1].metrics[key], float(value))
    empty = torch.zeros(0, dtype=D)
    out = dpo_loss(
        chosen_logprobs=empty,
        rejected_logprobs=empty,
        ref_chosen_logprobs=empty,
        ref_rejected_logprobs=empty,
    )
    close(out.loss, 0.0)


def test_dpo_loss_math_is_fp32_for_low_precision_inputs():
    x = torch.tensor([-3.0, -4.0], dtype=torch.bfloat16)
    out = dpo_loss(
        chosen_logprobs=x, rejected_logprobs=x, ref_chosen_logprobs=x, ref_rejected_logprobs=x
    )
    assert out.loss.dtype == torch.float32
    close(out.loss, math.log(2))


@settings(max_examples=40, deadline=None)
@given(logprobs, logprobs, logprobs, logprobs, st.floats(-100, 100), st.floats(0.01, 5))
def test_dpo_reference_shift_invariance(c, r, rc, rr, shift, beta):
    """h = Δ_c − Δ_r does not change when one constant is added to both reference log-probs."""
    kw = {"chosen_logprobs": t(c), "rejected_logprobs": t(r), "beta": beta}
    base = dpo_loss(**kw, ref_chosen_logprobs=t(rc), ref_rejected_logprobs=t(rr))
    moved = dpo_loss(**kw, ref_chosen_logprobs=t(rc + shift), ref_rejected_logprobs=t(rr + shift))
    close(moved.loss, float(base.loss))
    close(moved.metrics["margin_sum"], float(base.metrics["margin_sum"]))


# --- cDPO (7.2) --------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.floats(-80, 80), st.floats(0.01, 5))
def test_cdpo_eps_zero_is_dpo(h, beta):
    """ε = 0 leaves −log σ(βh) only, the DPO loss."""
    close(
        on_h(cdpo_loss, t(h), beta=beta, label_smoothing=0.0),
        float(on_h(dpo_loss, t(h), beta=beta)),
    )


def test_cdpo_finite_minimiser_and_minimum():
    """ε = β = 0.1: stationary where σ(βh) = 1 − ε, h* = log(0.9/0.1)/0.1 = log 9 / 0.1 =
    21.972246; there L = −0.9 log 0.9 − 0.1 log 0.1 = H_b(0.1) = 0.094824 + 0.230259 = 0.325083."""
    h_star = argmin_1d(lambda h: on_h(cdpo_loss, h), 0.0, 100.0)
    close(h_star, 21.972246)
    close(on_h(cdpo_loss, t(h_star)), 0.325083)


# --- IPO (7.3) ---------------------------------------------------------------------------


def test_ipo_minimum_at_half_over_beta_and_value_at_init():
    """β 0.1: L = (h − 5)²: L(0) = 25; L(5) = 0 with zero gradient; argmin 5."""
    close(on_h(ipo_loss, t(0.0)), 25.0)
    close(on_h(ipo_loss, t(5.0)), 0.0)
    close(grad_at(lambda h: on_h(ipo_loss, h), 5.0), 0.0)
    close(argmin_1d(lambda h: on_h(ipo_loss, h), -10.0, 30.0), 5.0)


def test_ipo_average_logprobs():
    """Δ_c = 10 over 2 tokens -> 5, Δ_r = −6 over 3 tokens -> −2: averaged h = 7, L = (7−5)² = 4;
    on sums h = 16, L = 11² = 121."""
    kw = {
        "chosen_logprobs": t(-10.0), "rejected_logprobs": t(-16.0), "ref_chosen_logprobs": t(-20.0),
        "ref_rejected_logprobs": t(-10.0), "chosen_tokens": t(2.0), "rejected_tokens": t(3.0),
    }  # fmt: skip
    close(ipo_loss(**kw, average_logprobs=True).loss, 4.0)
    close(ipo_loss(**kw).loss, 121.0)


# --- DPO-norm (7.4) ----------------------------------------------------------------------


def test_dpo_norm_closed_form():
    """β 2.0 (default): chosen −6 vs ref −9 over 3 tokens -> Δ/|y| = 1; rejected −8 vs ref −4
    over 4 tokens -> −1; h_avg = 2, L = softplus(−4) = log(1 + e^{−4}) = 0.018150; rewards 2, −2."""
    out = dpo_norm_loss(
        chosen_logprobs=t(-6.0), rejected_logprobs=t(-8.0), ref_chosen_logprobs=t(-9.0),
        ref_rejected_logprobs=t(-4.0), chosen_tokens=t(3.0), rejected_tokens=t(4.0),
    )  # fmt: skip
    close(out.loss, 0.018150)
    close(out.metrics["chosen_rewards_sum"], 2.0)
    close(out.metrics["rejected_rewards_sum"], -2.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_dpo_norm_token_duplication_invariance(seed, copies):
    """Repeating every token k times (same per-token logprobs) multiplies sums and lengths by k, so
    the per-token averages and the loss stay the same (plain DPO would change)."""
    gen = torch.Generator().manual_seed(seed)
    tok = [-torch.rand(n, generator=gen, dtype=D) * 3 for n in (3, 5, 4, 2)]  # c, r, ref_c, ref_r
    lengths = {"chosen_tokens": t(3.0), "rejected_tokens": t(5.0)}

    def loss(k: int, fn: Callable = dpo_norm_loss) -> float:
        sums = [k * x.sum().reshape(1) for x in tok]
        names = (
            "chosen_logprobs",
            "rejected_logprobs",
            "ref_chosen_logprobs",
            "ref_rejected_logprobs",
        )
        scaled = {key: k * v for key, v in lengths.items()}
        return float(fn(**dict(zip(names, sums, strict=True)), **scaled).loss)

    close(loss(copies), loss(1))


# --- SimPO (7.5) -------------------------------------------------------------------------


def test_simpo_closed_forms_and_absolute_gamma():
    """β 2, γ' 0.5: equal averages -> softplus(βγ') = log(1 + e) = 1.313262; avg_c − avg_r = 1
    -> softplus(−β(1 − 0.5)) = log(1 + e^{−1}) = 0.313262. The paper's absolute γ = βγ' = 1 in
    −log σ(β·d − γ) gives the same numbers. Reference-free: no reference needed."""
    for diff, expected in ((0.0, 1.313262), (1.0, 0.313262)):
        avg_c, avg_r = -2.0 + diff, -2.0
        out = simpo_loss(
            chosen_logprobs=t(4 * avg_c), rejected_logprobs=t(7 * avg_r),
            chosen_tokens=t(4.0), rejected_tokens=t(7.0),
        )  # fmt: skip
        close(out.loss, expected)
        absolute = -torch.nn.functional.logsigmoid(torch.tensor(2.0 * diff - 2.0 * 0.5, dtype=D))
        close(out.loss, float(absolute))
        close(out.metrics["displaced"], 0)
        close(out.metrics["delta_chosen_sum"], 0)


@settings(max_examples=30, deadline=None)
@given(logprobs, logprobs, length, length, st.integers(2, 9))
def test_simpo_length_invariance(c_avg, r_avg, n_c, n_r, k):
    """Only the averages enter: scaling a response's length and sum by k changes nothing."""

    def loss(kc: int, kr: int) -> float:
        return float(
            simpo_loss(
                chosen_logprobs=t(c_avg * n_c * kc), rejected_logprobs=t(r_avg * n_r * kr),
                chosen_tokens=t(n_c * kc), rejected_tokens=t(n_r * kr),
            ).loss
        )  # fmt: skip

    close(loss(k, 1), loss(1, 1))
    close(loss(1, k), loss(1, 1))


# --- ORPO (7.6) --------------------------------------------------------------------------


def test_orpo_log_odds_values():
    """log(p/(1−p)): p 0.5 -> 0; 0.8 -> log 4 = 1.386294; 0.2 -> −log 4; p = 1 − 1e-7 ->
    log((1 − 1e-7)/1e-7) = 16.118096 (finite); p = 1 is capped, so still finite."""
    p = t(0.5, 0.8, 0.2, 1 - 1e-7)
    got = orpo_log_odds(avg_logprobs=torch.log(p))
    for value, expected in zip(got, (0.0, 1.386294, -1.386294, 16.118096), strict=True):
        close(value, expected)
    assert torch.isfinite(orpo_log_odds(avg_logprobs=t(0.0))).all()


def test_orpo_closed_form():
    """Single-token completions (p_c, p_r) = (0.8, 0.2): log-odds ratio = 2 log 4 = log 16,
    L_OR = softplus(−log 16) = log(1 + 1/16) = log(17/16) = 0.060625; NLL = −log 0.8 = 0.223144;
    total (λ 0.1) = 0.223144 + 0.0060625 = 0.229206."""
    out = orpo_loss(
        chosen_logprobs=torch.log(t(0.8)), rejected_logprobs=torch.log(t(0.2)),
        chosen_tokens=t(1.0), rejected_tokens=t(1.0),
    )  # fmt: skip
    close(out.loss, 0.229206)
    close(out.metrics["odds_loss_sum"], 0.060625)
    close(out.metrics["nll_sum"], 0.223144)
    close(out.metrics["log_odds_ratio_sum"], math.log(16))


def test_orpo_finite_near_probability_one():
    """p_c → 1 and p_r = 1 exactly (capped): loss and gradients finite."""
    c, r = torch.log(t(1 - 1e-7)).requires_grad_(), t(0.0, grad=True)
    out = orpo_loss(
        chosen_logprobs=c, rejected_logprobs=r, chosen_tokens=t(1.0), rejected_tokens=t(1.0)
    )
    out.loss.backward()
    assert (
        torch.isfinite(out.loss) and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    )


def test_orpo_lambda_zero_is_sft_nll():
    """λ = 0 leaves −(1/N) Σ_i avg_i, the per-sequence token-mean NLL of the chosen responses
    (sft_loss with seq_mean_token_mean, normaliser N)."""
    gen = torch.Generator().manual_seed(0)
    tok_logprobs = -torch.rand(3, 5, generator=gen, dtype=D) * 2  # (B, T)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    sums = torch.where(mask, tok_logprobs, 0.0).sum(-1)  # (B,)
    out = orpo_loss(
        chosen_logprobs=sums, rejected_logprobs=sums - 1.0, chosen_tokens=mask.sum(-1),
        rejected_tokens=mask.sum(-1), lambda_=0.0,
    )  # fmt: skip
    sft = sft_loss(
        logprobs=tok_logprobs, mask=mask, normaliser=3, agg=Aggregation("seq_mean_token_mean")
    )
    close(out.loss, float(sft.loss))


@settings(max_examples=40, deadline=None)
@given(st.floats(-40, -1e-9), st.floats(-40, -1e-9))
def test_orpo_log_odds_matches_direct_formula_and_is_monotone(a, b):
    """log-odds = log p − log(1 − p) (direct form, fine away from p = 1) and increasing in ℓ."""
    got = orpo_log_odds(avg_logprobs=t(a, b))
    for ell, value in zip((a, b), got, strict=True):
        if ell < -1e-6:
            close(value, ell - math.log(-math.expm1(ell)), atol=1e-6 * max(1, abs(float(value))))
    assert (float(got[0]) - float(got[1])) * (a - b) >= 0
