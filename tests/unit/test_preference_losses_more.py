"""DPO-family losses, part 2: KTO, APO, ODPO, RPO and the loss table.

Expected values are derived by hand in each docstring (math.log / math.exp of the formula),
never produced by the code under test. fp64 throughout, atol 1e-6. σ' = σ(x)σ(−x).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.losses.preference import (
    PREFERENCE_LOSSES,
    apo_down_loss,
    apo_zero_loss,
    dpo_loss,
    dpo_nll_loss,
    kto_loss,
    kto_unpaired_from_pairs,
    kto_z0,
    kto_z0_batch_rejected,
    odpo_loss,
    rpo_loss,
)

D = torch.float64
ATOL = 1e-6
PAIRED = sorted(name for name, spec in PREFERENCE_LOSSES.items() if spec.paired)
H_ONLY = ["dpo", "cdpo", "ipo", "rpo", "odpo"]  # losses that see the reference only through h
GRID = torch.linspace(-30, 30, 13, dtype=D)


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=D, requires_grad=grad)


def close(actual: torch.Tensor | float, expected: float, atol: float = ATOL) -> None:
    value = float(actual.detach()) if torch.is_tensor(actual) else float(actual)
    assert value == pytest.approx(expected, abs=atol)


def worked(**kw: object) -> dict:
    """(logp_c, ref_c, logp_r, ref_r) = (−10, −12, −15, −14): h = 3, DPO L = 0.554355."""
    return {
        "chosen_logprobs": t(-10.0), "ref_chosen_logprobs": t(-12.0), "rejected_logprobs": t(-15.0),
        "ref_rejected_logprobs": t(-14.0), **kw,
    }  # fmt: skip


def call(name: str, c, r, rc, rr, nc, nr, **kw: object):
    """Call a table row the way a recipe does: common inputs, spec beta, ODPO scores (2, 1)."""
    spec = PREFERENCE_LOSSES[name]
    extra = {}
    if "score_chosen" in spec.extra_inputs:
        extra = {"score_chosen": torch.full_like(c, 2.0), "score_rejected": torch.ones_like(c)}
    refs = (None, None) if spec.reference_free else (rc, rr)
    return spec.fn(
        chosen_logprobs=c, rejected_logprobs=r, ref_chosen_logprobs=refs[0],
        ref_rejected_logprobs=refs[1], chosen_tokens=nc, rejected_tokens=nr, beta=spec.beta,
        **extra, **kw,
    )  # fmt: skip


def grads(fn, d_c: float, d_r: float) -> tuple[float, float]:
    """(∂L/∂Δ_c, ∂L/∂Δ_r) via the policy log-probs with zero reference."""
    c, r = t(d_c, grad=True), t(d_r, grad=True)
    out = fn(
        chosen_logprobs=c,
        rejected_logprobs=r,
        ref_chosen_logprobs=t(0.0),
        ref_rejected_logprobs=t(0.0),
    )
    g_c, g_r = torch.autograd.grad(out.loss, (c, r))
    return float(g_c), float(g_r)


# --- KTO (7.7) ---------------------------------------------------------------------------


def test_kto_at_reference_point_is_half_lambda():
    """r = z0: 1 − σ(0) = 0.5, so l = 0.5 λ: λ_D 2 -> 1, λ_U 3 -> 1.5; L = 2.5 / 2 = 1.25."""
    out = kto_loss(
        logprobs=t(-3.0, -3.0), ref_logprobs=t(-5.0, -5.0), desirable=torch.tensor([True, False]),
        z0=2.0, lambda_d=2.0, lambda_u=3.0,
    )  # fmt: skip
    close(out.loss, 1.25)
    close(out.metrics["desirable"], 1)
    close(out.metrics["undesirable"], 1)
    close(out.metrics["desirable_rewards_sum"], 0.2)  # βr = 0.1 * 2


def test_kto_closed_form():
    """β 0.1, r = 2, z0 = 0: desirable 1 − σ(0.2) = 1/(1 + e^{0.2}) = 0.450166; undesirable
    1 − σ(−0.2) = 0.549834."""
    for desirable, expected in ((True, 0.450166), (False, 0.549834)):
        out = kto_loss(
            logprobs=t(-1.0), ref_logprobs=t(-3.0), desirable=torch.tensor([desirable]), z0=0
        )
        close(out.loss, expected)


@settings(max_examples=50, deadline=None)
@given(st.floats(-100, 100), st.floats(0, 20), st.floats(0.1, 5), st.booleans())
def test_kto_loss_between_zero_and_lambda(r, z0, lam, desirable):
    """λ·σ(·) lies strictly inside (0, λ) for finite arguments (|β(r − z0)| ≤ 12 here)."""
    out = kto_loss(
        logprobs=t(r), ref_logprobs=t(0.0), desirable=torch.tensor([desirable]), z0=z0,
        lambda_d=lam, lambda_u=lam,
    )  # fmt: skip
    assert 0 < float(out.loss) < lam


@settings(max_examples=50, deadline=None)
@given(st.floats(-50, 50))
def test_kto_mirror_symmetry(r):
    """z0 = 0, λ_D = λ_U: L_D(r) = σ(−βr) = 1 − σ(β(0 − (−r))) = L_U(−r)."""
    d = kto_loss(logprobs=t(r), ref_logprobs=t(0.0), desirable=torch.tensor([True]), z0=0.0)
    u = kto_loss(logprobs=t(-r), ref_logprobs=t(0.0), desirable=torch.tensor([False]), z0=0.0)
    close(d.loss, float(u.loss))


def test_kto_z0_values_and_no_gradient():
    """mean [−3, 1] = −1 -> max(0, ·) = 0; mean [1, 4] = 2.5; none -> 0. z0 passed with
    requires_grad gets no gradient from the loss, the policy log-probs do."""
    close(kto_z0(log_ratios=t(-3.0, 1.0)), 0.0)
    z = kto_z0(log_ratios=t(1.0, 4.0, grad=True))
    close(z, 2.5)
    assert not z.requires_grad
    close(kto_z0(log_ratios=torch.zeros(0, dtype=D)), 0.0)
    z0, lp = torch.tensor(0.5, dtype=D, requires_grad=True), t(-1.0, -2.0, grad=True)
    out = kto_loss(
        logprobs=lp, ref_logprobs=t(-1.5, -1.0), desirable=torch.tensor([True, False]), z0=z0
    )
    out.loss.backward()
    assert z0.grad is None and lp.grad is not None


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=8))
def test_kto_z0_nonnegative_and_at_least_the_mean(values):
    z = float(kto_z0(log_ratios=torch.tensor(values, dtype=D)))
    assert z >= 0
    assert z >= sum(values) / len(values) - 1e-9


def test_kto_z0_batch_rejected():
    """Undesirable rows 1 and 2: log-ratios −2 − (−4) = 2 and −3 − (−4) = 1 -> z0 = 1.5."""
    z = kto_z0_batch_rejected(
        logprobs=t(-1.0, -2.0, -3.0, -4.0), ref_logprobs=t(-2.0, -4.0, -4.0, -1.0),
        desirable=torch.tensor([True, False, False, True]),
    )  # fmt: skip
    close(z, 1.5)


def test_kto_split_pairs_equals_explicit_unpaired_input():
    """Pairs (Δ_c, Δ_r) = (2, −1), (−0.5, 0.5), z0 = 0.3, β 0.1 split into 4 examples equal the
    same examples listed by hand in another order, and the hand sum
    Σ_pairs [σ(−β(Δ_c − z0)) + σ(β(Δ_r − z0))] / 4."""
    c, r, rc, rr = t(-10.0, -4.0), t(-15.0, -3.0), t(-12.0, -3.5), t(-14.0, -3.5)
    split = kto_unpaired_from_pairs(
        chosen_logprobs=c, rejected_logprobs=r, ref_chosen_logprobs=rc, ref_rejected_logprobs=rr
    )
    explicit = {
        "logprobs": t(-3.0, -10.0, -15.0, -4.0), "ref_logprobs": t(-3.5, -12.0, -14.0, -3.5),
        "desirable": torch.tensor([False, True, False, True]),
    }  # fmt: skip
    hand = sum(
        1 / (1 + math.exp(0.1 * (dc - 0.3))) + 1 / (1 + math.exp(-0.1 * (dr - 0.3)))
        for dc, dr in ((2.0, -1.0), (-0.5, 0.5))
    )
    a, b = kto_loss(**split, z0=0.3), kto_loss(**explicit, z0=0.3)
    close(a.loss, hand / 4)
    close(b.loss, hand / 4)
    for key, value in a.metrics.items():
        close(b.metrics[key], float(value))


# --- APO (7.8) ---------------------------------------------------------------------------


def test_apo_value_and_gradients_at_init():
    """Δ = 0, β 0.1: APO-zero 1 − 0.5 + 0.5 = 1, APO-down 0.5 + 1 − 0.5 = 1. APO-zero
    gradients ∓βσ'(0) = ∓0.1 * 0.25 = (−0.025, +0.025); APO-down ∂/∂Δ_c = βσ'(0) − βσ'(0) = 0."""
    zero = {k: t(0.0) for k in ("chosen_logprobs", "rejected_logprobs")}
    refs = {"ref_chosen_logprobs": t(0.0), "ref_rejected_logprobs": t(0.0)}
    close(apo_zero_loss(**zero, **refs).loss, 1.0)
    close(apo_down_loss(**zero, **refs).loss, 1.0)
    g_c, g_r = grads(apo_zero_loss, 0.0, 0.0)
    close(g_c, -0.025)
    close(g_r, 0.025)
    close(grads(apo_down_loss, 0.0, 0.0)[0], 0.0)


def test_apo_down_chosen_gradient_off_init():
    """(Δ_c, Δ_r) = (0, −5): ∂/∂Δ_c = βσ'(0) − βσ'(0.5) = 0.025 − 0.1 * σ(0.5)σ(−0.5)
    = 0.025 − 0.1 * 0.622459 * 0.377541 = 0.0014996 > 0 (chosen pushed down)."""
    close(grads(apo_down_loss, 0.0, -5.0)[0], 0.0014996)


def test_apo_gradient_signs_on_a_grid():
    """APO-zero: ∂/∂Δ_c = −βσ'(βΔ_c) < 0 and ∂/∂Δ_r = βσ'(βΔ_r) > 0; APO-down:
    ∂/∂Δ_r = βσ'(β(Δ_c − Δ_r)) > 0, everywhere on [−30, 30]²."""
    for d_c in GRID.tolist():
        for d_r in GRID.tolist():
            g_c, g_r = grads(apo_zero_loss, d_c, d_r)
            assert g_c < 0 < g_r
            assert grads(apo_down_loss, d_c, d_r)[1] > 0


# --- ODPO, RPO (7.9, 5) ------------------------------------------------------------------


def test_odpo_closed_form_and_offsets_input():
    """s_c − s_r = e, α 1 -> δ = log e = 1; h = 3, β 0.1: L = softplus(1 − 0.3) =
    log(1 + e^{0.7}) = 1.103186. The same δ given as ``offsets`` gives the same loss."""
    scores = {"score_chosen": t(math.e + 1.0), "score_rejected": t(1.0)}
    close(odpo_loss(**worked(**scores)).loss, 1.103186)
    close(odpo_loss(**worked(offsets=t(1.0))).loss, 1.103186)


def test_odpo_rejects_bad_scores():
    with pytest.raises(ValueError, match="score_chosen > score_rejected"):
        odpo_loss(**worked(score_chosen=t(1.0), score_rejected=t(1.0)))
    with pytest.raises(ValueError, match="not both"):
        odpo_loss(**worked(score_chosen=t(2.0), score_rejected=t(1.0), offsets=t(0.0)))
    with pytest.raises(ValueError, match="needs score_chosen"):
        odpo_loss(**worked())


def test_rpo_closed_form():
    """Worked pair with |y_c| = 5: DPO 0.554355 + α·NLL, NLL = 10/5 = 2 -> 2.554355 (α 1)."""
    out = rpo_loss(**worked(chosen_tokens=t(5.0)))
    close(out.loss, 2.554355)
    close(out.metrics["nll_sum"], 2.0)
    assert dpo_nll_loss is rpo_loss


def test_rpo_nll_weights_pick_the_pairs_whose_chosen_reply_is_imitated():
    """Two copies of the worked pair (|y_c| = 5), weights (1, 0): the first pays DPO + NLL
    (2.554355), the second DPO alone (0.554355); the mean is 1.554355 and nll_sum 2. Weights of
    ones equal no weights; the second pair's chosen log-prob then gets only DPO's gradient."""
    pair = {k: v.repeat(2) for k, v in worked(chosen_tokens=t(5.0)).items()}
    out = rpo_loss(**pair, nll_weights=t(1.0, 0.0))
    close(out.loss, 1.554355)
    close(out.metrics["nll_sum"], 2.0)
    close(rpo_loss(**pair, nll_weights=t(1.0, 1.0)).loss, float(rpo_loss(**pair).loss))
    c = pair["chosen_logprobs"].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(rpo_loss(**{**pair, "chosen_logprobs": c},
                                        nll_weights=t(1.0, 0.0)).loss, c)  # fmt: skip
    dpo_grad = -0.1 * torch.sigmoid(t(-0.3)) / 2  # d/dlogp_c of softplus(-βh), mean of 2
    close(g[1], float(dpo_grad))
    close(g[0], float(dpo_grad) - 1 / 5 / 2)


@settings(max_examples=40, deadline=None)
@given(*[st.floats(-50, 0)] * 4, st.floats(0.01, 5), st.floats(0.5, 9), st.integers(1, 30))
def test_alpha_zero_gives_dpo(c, r, rc, rr, beta, gap, n):
    """ODPO δ = 0·log(gap) = 0 and RPO 0·NLL = 0 leave −log σ(βh)."""
    kw = {
        "chosen_logprobs": t(c), "rejected_logprobs": t(r), "ref_chosen_logprobs": t(rc),
        "ref_rejected_logprobs": t(rr), "beta": beta,
    }  # fmt: skip
    dpo = float(dpo_loss(**kw).loss)
    close(odpo_loss(**kw, alpha=0.0, score_chosen=t(gap + 1), score_rejected=t(1.0)).loss, dpo)
    close(rpo_loss(**kw, alpha=0.0, chosen_tokens=t(n)).loss, dpo)


# --- the table ---------------------------------------------------------------------------


def test_table_rows_match_their_functions():
    """Every row: the beta default equals the function's, hyperparameters and extra inputs are
    keyword-only parameters of it; rpo and dpo_nll share a row."""
    expected = {"dpo", "cdpo", "ipo", "dpo_norm", "simpo", "orpo", "kto", "apo_zero"}
    assert expected | {"apo_down", "rpo", "dpo_nll", "odpo"} == set(PREFERENCE_LOSSES)
    assert PREFERENCE_LOSSES["rpo"] is PREFERENCE_LOSSES["dpo_nll"]
    for spec in PREFERENCE_LOSSES.values():
        params = inspect.signature(spec.fn).parameters
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
        assert params["beta"].default == spec.beta
        assert set(spec.hyperparameters) | set(spec.extra_inputs) <= set(params)
    assert PREFERENCE_LOSSES["simpo"].reference_free and PREFERENCE_LOSSES["orpo"].reference_free
    assert not PREFERENCE_LOSSES["kto"].paired


@pytest.mark.parametrize("name", PAIRED)
def test_reference_based_rows_require_reference(name):
    spec = PREFERENCE_LOSSES[name]
    kw = {"chosen_logprobs": t(-1.0), "rejected_logprobs": t(-2.0), "chosen_tokens": t(1.0)}
    kw |= {"rejected_tokens": t(1.0), "ref_chosen_logprobs": None, "ref_rejected_logprobs": None}
    if "score_chosen" in spec.extra_inputs:
        kw |= {"score_chosen": t(2.0), "score_rejected": t(1.0)}
    if spec.reference_free:
        assert torch.isfinite(spec.fn(**kw).loss)
    else:
        with pytest.raises(ValueError, match="ref_chosen_logprobs"):
            spec.fn(**kw)


pair_values = st.tuples(*[st.floats(-200, 0)] * 4, st.integers(1, 64), st.integers(1, 64))


@pytest.mark.parametrize("name", PAIRED)
@settings(max_examples=25, deadline=None)
@given(values=pair_values)
def test_swapping_chosen_and_rejected_flips_margin(name, values):
    c, r, rc, rr, nc, nr = (t(v) for v in values)
    out = call(name, c, r, rc, rr, nc, nr)
    swapped = call(name, r, c, rr, rc, nr, nc)
    close(swapped.metrics["margin_sum"], -float(out.metrics["margin_sum"]), atol=1e-9)
    assert float(out.metrics["correct"]) + float(swapped.metrics["correct"]) == 1.0
    assert not any(v.requires_grad for v in out.metrics.values())


@pytest.mark.parametrize("name", H_ONLY)
@settings(max_examples=25, deadline=None)
@given(values=pair_values, shift=st.floats(-100, 100))
def test_reference_shift_invariance(name, values, shift):
    """These losses read the reference only through h, which one constant added to both
    reference log-probs leaves unchanged (APO and KTO read Δ itself, so they are excluded)."""
    c, r, rc, rr, nc, nr = (t(v) for v in values)
    base = float(call(name, c, r, rc, rr, nc, nr).loss)
    close(call(name, c, r, rc + shift, rr + shift, nc, nr).loss, base, atol=1e-6 * max(1, base))


@settings(max_examples=25, deadline=None)
@given(values=pair_values, per_token=st.floats(-5, 5))
def test_dpo_norm_per_token_reference_shift_invariance(values, per_token):
    """DPO-norm: shifting every reference token by a constant (sums by const * length) moves both
    averaged Δ by the same amount, so h_avg and the loss are unchanged."""
    c, r, rc, rr, nc, nr = (t(v) for v in values)
    base = float(call("dpo_norm", c, r, rc, rr, nc, nr).loss)
    moved = call("dpo_norm", c, r, rc + per_token * nc, rr + per_token * nr, nc, nr).loss
    close(moved, base, atol=1e-6 * max(1, base))


extreme = st.floats(-1e4, 0)


@pytest.mark.parametrize("name", PAIRED)
@settings(max_examples=25, deadline=None)
@given(values=st.tuples(extreme, extreme, extreme, extreme, st.integers(1, 4096)))
def test_finite_for_extreme_inputs(name, values):
    *logprobs, n = values
    c, r = t(logprobs[0], grad=True), t(logprobs[1], grad=True)
    out = call(name, c, r, t(logprobs[2]), t(logprobs[3]), t(n), t(n))
    out.loss.backward()
    assert (
        torch.isfinite(out.loss) and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    )


@settings(max_examples=25, deadline=None)
@given(st.tuples(extreme, extreme, st.floats(0, 1e4), st.booleans()))
def test_kto_finite_for_extreme_inputs(values):
    lp, ref, z0, desirable = values
    x = t(lp, grad=True)
    out = kto_loss(logprobs=x, ref_logprobs=t(ref), desirable=torch.tensor([desirable]), z0=z0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", PAIRED)
def test_fp32_inputs_give_fp32_loss(name):
    x = torch.tensor([-3.0, -5.0], dtype=torch.float32)
    assert call(name, x, x - 1, x, x, x.abs(), x.abs()).loss.dtype == torch.float32
