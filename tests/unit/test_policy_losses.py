"""Policy-gradient objectives, TIS, the value loss and the presets."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.losses.policy import (
    LOG_RATIO_CLAMP,
    OBJECTIVES,
    ObjectiveParams,
    policy_loss,
    sampler_mismatch,
    tis_weights,
    value_loss,
)
from rlhfkit.ops.masking import Aggregation, normaliser_count
from rlhfkit.recipes.policy_gradient.presets import PG_PRESETS

P = ObjectiveParams()


def _obj_and_grad(name: str, rho: float, adv: float, params: ObjectiveParams = P):
    """obj = -loss at one token with log pi_old = 0, and d obj / d rho."""
    ratio = torch.tensor([[rho]], dtype=torch.float64, requires_grad=True)
    logprobs = ratio.log()
    loss, _ = OBJECTIVES[name](
        logprobs=logprobs,
        old_logprobs=torch.zeros_like(logprobs),
        advantages=torch.tensor([[adv]], dtype=torch.float64),
        mask=torch.ones(1, 1, dtype=torch.bool),
        params=params,
    )
    (grad,) = torch.autograd.grad(-loss.sum(), ratio)
    return -float(loss.detach()), float(grad)


@pytest.mark.parametrize(
    ("rho", "adv", "obj", "grad"),
    [
        (math.e, 1.0, 1.2, 0.0),
        (1 / math.e, -1.0, -0.8, 0.0),
        (0.5, 1.0, 0.5, 1.0),
        (1.5, -1.0, -1.5, -1.0),
        (1.3, 1.0, 1.2, 0.0),
        (0.7, -1.0, -0.8, 0.0),
    ],
)
def test_ppo_clip_table(rho, adv, obj, grad):
    value, g = _obj_and_grad("ppo_clip", rho, adv)
    assert value == pytest.approx(obj, abs=1e-12)
    assert g == pytest.approx(grad, abs=1e-12)


def test_dual_clip_caps_negative_advantage_loss():
    value, grad = _obj_and_grad("ppo_clip", 10.0, -1.0, ObjectiveParams(dual_clip=3.0))
    assert value == pytest.approx(-3.0) and grad == 0.0
    assert _obj_and_grad("ppo_clip", 10.0, -1.0)[0] == pytest.approx(-10.0)


def test_ppo_clip_first_step_equals_reinforce_gradient():
    """pi_old = sg(pi_theta): ratio 1, clipping inactive, same gradient as REINFORCE."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 7, (3, 5), generator=gen)
    adv = torch.randn(3, 1, generator=gen, dtype=torch.float64).expand(3, 5)
    mask = torch.rand(3, 5, generator=gen) > 0.2
    grads = {}
    for name in ("reinforce", "ppo_clip", "sapo"):
        logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
        agg = Aggregation("seq_mean_token_mean")
        out = policy_loss(
            logprobs=logprobs,
            old_logprobs=logprobs.detach(),
            advantages=adv,
            mask=mask,
            objective=name,
            params=P,
            aggregation=agg,
            normaliser=normaliser_count(mask, agg),
        )
        (grads[name],) = torch.autograd.grad(out.loss, logits)
        assert out.metrics["clipped"] == 0
    torch.testing.assert_close(grads["ppo_clip"], grads["reinforce"])
    torch.testing.assert_close(grads["sapo"], grads["reinforce"])  # f'(1) = 1


def test_reinforce_matches_the_exact_bandit_gradient():
    """2-armed bandit: MC mean of the REINFORCE gradient = pi(a)(r(a) - J), with or without a
    baseline; the baseline lowers the variance."""
    logits = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([1.0, 0.2], dtype=torch.float64)
    probs = torch.softmax(logits, 0)
    exact = (probs * (rewards - (probs * rewards).sum())).detach()
    gen = torch.Generator().manual_seed(3)
    actions = torch.multinomial(probs.detach(), 20000, replacement=True, generator=gen)
    estimates = {}
    for name, baseline in (("none", 0.0), ("batch", float(rewards[actions].mean()))):
        logprobs = torch.log_softmax(logits, 0)[actions]
        adv = (rewards[actions] - baseline)[:, None]
        per, _ = OBJECTIVES["reinforce"](
            logprobs=logprobs[:, None],
            old_logprobs=logprobs[:, None].detach(),
            advantages=adv,
            mask=torch.ones(len(actions), 1, dtype=torch.bool),
            params=P,
        )
        jac = torch.stack(
            [
                torch.autograd.grad(-per[i, 0], logits, retain_graph=True)[0]
                for i in range(0, 20000, 50)
            ]
        )
        estimates[name] = jac
        mean = torch.autograd.grad(-per.mean(), logits)[0]
        assert mean.tolist() == pytest.approx(exact.tolist(), abs=0.01)
    assert estimates["batch"].var(0).sum() < estimates["none"].var(0).sum()


def test_gspo_sequence_ratio_and_reduction_to_ppo():
    logprobs = torch.tensor([[0.1, -0.1, 0.3]], dtype=torch.float64)
    old = torch.zeros_like(logprobs)
    adv = torch.ones_like(logprobs)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, _ = OBJECTIVES["gspo"](
        logprobs=logprobs,
        old_logprobs=old,
        advantages=adv,
        mask=mask,
        params=ObjectiveParams(1.0, 1.0),
    )
    approx = math.exp(0.1)
    assert loss.tolist()[0] == pytest.approx([-approx] * 3, abs=1e-6)
    same = torch.full((2, 4), 0.05, dtype=torch.float64)
    a = torch.tensor([[1.0], [-2.0]], dtype=torch.float64).expand(2, 4)
    m = torch.ones(2, 4, dtype=torch.bool)
    torch.testing.assert_close(
        OBJECTIVES["gspo"](
            logprobs=same, old_logprobs=old.new_zeros(2, 4), advantages=a, mask=m, params=P
        )[0],
        OBJECTIVES["ppo_clip"](
            logprobs=same, old_logprobs=old.new_zeros(2, 4), advantages=a, mask=m, params=P
        )[0],
    )
    padded = torch.cat([logprobs, torch.full((1, 2), 7.0, dtype=torch.float64)], 1)
    pmask = torch.tensor([[True, True, True, False, False]])
    out, _ = OBJECTIVES["gspo"](
        logprobs=padded,
        old_logprobs=torch.zeros_like(padded),
        advantages=torch.ones_like(padded),
        mask=pmask,
        params=ObjectiveParams(1.0, 1.0),
    )
    assert out[0, :3].tolist() == pytest.approx([-approx] * 3, abs=1e-6)  # padding-invariant


def test_cispo_keeps_a_clipped_gradient():
    for rho, expected in ((1.5, 1.4), (1.0, 1.0)):
        logprobs = torch.tensor([[math.log(rho)]], dtype=torch.float64, requires_grad=True)
        loss, _ = OBJECTIVES["cispo"](
            logprobs=logprobs,
            old_logprobs=torch.zeros(1, 1, dtype=torch.float64),
            advantages=torch.ones(1, 1, dtype=torch.float64),
            mask=torch.ones(1, 1, dtype=torch.bool),
            params=ObjectiveParams(0.2, 0.4),
        )
        (g,) = torch.autograd.grad(-loss.sum(), logprobs)
        assert float(g) == pytest.approx(expected)  # d obj / d log pi
    assert _obj_and_grad("ppo_clip", 1.5, 1.0)[1] == 0.0


@pytest.mark.parametrize(
    ("tau", "rho", "deriv"),
    [
        (1.0, 1.0, 1.0),
        (1.05, 1.0, 1.0),
        (1.0, 2.0, 0.786448),
        (1.0, 0.5, 0.940015),
        (1.05, 2.0, 0.768110),
    ],
)
def test_sapo_gate_derivative(tau, rho, deriv):
    adv = 1.0 if tau == 1.0 else -1.0
    _, g = _obj_and_grad("sapo", rho, adv)
    assert g / adv == pytest.approx(deriv, abs=1e-6)


def test_tis_weights():
    lp = torch.tensor([0.0, math.log(3), -math.log(2), 15.0])
    w = tis_weights(learner_logprobs=lp, sampler_logprobs=torch.zeros(4))
    assert w.tolist() == pytest.approx([1.0, 2.0, 0.5, 2.0])
    assert not w.requires_grad
    assert tis_weights(
        learner_logprobs=torch.tensor([math.log(3)]), sampler_logprobs=torch.zeros(1), cap=math.inf
    ).item() == pytest.approx(3.0)


def test_tis_modes_closed_form():
    # rho = [1, 3, 0.5, 1.5] on row 0; row 1: rho = [4, 4] (geometric mean 4 > C = 2)
    learner = torch.log(torch.tensor([[1.0, 3.0, 0.5, 1.5], [4.0, 4.0, 1.0, 1.0]]))
    sampler = torch.zeros(2, 4)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])

    def w(mode):
        return tis_weights(learner_logprobs=learner, sampler_logprobs=sampler, cap=2.0,
                           mode=mode, mask=mask).flatten().tolist()  # fmt: skip

    assert w("token_truncate") == pytest.approx([1.0, 2.0, 0.5, 1.5, 2.0, 2.0, 1.0, 1.0])
    assert w("token_mask") == pytest.approx([1.0, 0.0, 0.5, 1.5, 0.0, 0.0, 1.0, 1.0])
    # row 0: geometric mean (1 * 3 * 0.5 * 1.5)^(1/4) = 2.25^(1/4) = 1.22 in [0.5, 2]: kept;
    # row 1: (4 * 4)^(1/2) = 4 over its two masked tokens: the row is dropped
    assert w("sequence_mask") == pytest.approx([1.0, 3.0, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0])
    # a row far below 1/C is dropped too
    low = torch.log(torch.tensor([[0.1, 0.2]]))
    low = tis_weights(
        learner_logprobs=low, sampler_logprobs=torch.zeros(1, 2), cap=2.0, mode="sequence_mask"
    )
    assert low.tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_mask"])
def test_tis_weight_is_one_when_sampler_and_learner_agree(mode):
    lp = -torch.rand(3, 5) * 4
    w = tis_weights(learner_logprobs=lp, sampler_logprobs=lp.clone(), cap=2.0, mode=mode)
    assert torch.equal(w, torch.ones_like(w))


def test_sampler_mismatch_sums():
    learner = torch.log(torch.tensor([[0.5, 0.25, 1.0]]))
    sampler = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    mask = torch.tensor([[True, True, False]])
    out = sampler_mismatch(learner_logprobs=learner, sampler_logprobs=sampler, mask=mask)
    # r = [2, 1]: |log r| = [ln 2, 0]; k3 = r - 1 - ln r = [1 - ln 2, 0]
    assert out["sampler_gap"] == pytest.approx(math.log(2))
    assert out["sampler_kl"] == pytest.approx(1 - math.log(2))
    same = sampler_mismatch(learner_logprobs=learner, sampler_logprobs=learner, mask=mask)
    assert same == {"sampler_gap": 0.0, "sampler_kl": 0.0}


def test_uncapped_tis_is_unbiased_on_a_categorical():
    sampler = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    learner = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    f = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    w = tis_weights(learner_logprobs=learner.log(), sampler_logprobs=sampler.log(), cap=math.inf)
    assert float((sampler * w * f).sum()) == pytest.approx(float((learner * f).sum()))


def test_value_loss_clipping():
    v = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    agg = Aggregation("token_mean")
    out = value_loss(
        values=v,
        old_values=torch.tensor([[0.5]]).double(),
        returns=torch.tensor([[1.0]]).double(),
        mask=torch.ones(1, 1, dtype=torch.bool),
        aggregation=agg,
        normaliser=1.0,
        clip=0.2,
    )
    assert float(out.loss.detach()) == pytest.approx(0.045)
    (g,) = torch.autograd.grad(out.loss, v)
    assert float(g) == 0.0
    gen = torch.Generator().manual_seed(0)
    vals, old, ret = (torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    m = torch.ones(4, 6, dtype=torch.bool)
    clipped = value_loss(
        values=vals, old_values=old, returns=ret, mask=m, aggregation=agg, normaliser=24.0, clip=0.2
    ).loss
    plain = value_loss(
        values=vals,
        old_values=old,
        returns=ret,
        mask=m,
        aggregation=agg,
        normaliser=24.0,
        clip=None,
    ).loss
    assert clipped >= plain


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "fixed_length"])
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_gradient_independent_of_micro_batch_split(mode, objective):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(8, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (8, 6), generator=gen)
    old = torch.log_softmax(
        logits.detach() + 0.1 * torch.randn(8, 6, 5, generator=gen, dtype=torch.float64), -1
    ).gather(-1, tokens[..., None])[..., 0]
    adv = torch.randn(8, 1, generator=gen, dtype=torch.float64).expand(8, 6)
    mask = torch.rand(8, 6, generator=gen) > 0.25
    mask[:, 0] = True
    agg = Aggregation(mode, max_len=6)
    normaliser = normaliser_count(mask, agg)
    grads = []
    for parts in ([8], [4, 4], [2, 2, 2, 2], [1] * 8):
        logits.grad = None
        start = 0
        for n in parts:
            rows = slice(start, start + n)
            logprobs = torch.log_softmax(logits[rows], -1).gather(-1, tokens[rows, :, None])[..., 0]
            out = policy_loss(
                logprobs=logprobs,
                old_logprobs=old[rows],
                advantages=adv[rows],
                mask=mask[rows],
                objective=objective,
                params=P,
                aggregation=agg,
                normaliser=normaliser,
            )
            out.loss.backward()
            start += n
        grads.append(logits.grad.clone())
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], atol=1e-12, rtol=0)


def test_kl_in_loss_adds_kl_coef_times_k():
    logprobs = torch.zeros(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    kl = torch.tensor([[0.5, 1.5]], dtype=torch.float64)
    agg = Aggregation("token_mean")
    base = policy_loss(
        logprobs=logprobs,
        old_logprobs=logprobs,
        advantages=torch.ones(1, 2),
        mask=mask,
        objective="ppo_clip",
        params=P,
        aggregation=agg,
        normaliser=2.0,
    )
    with_kl = policy_loss(
        logprobs=logprobs,
        old_logprobs=logprobs,
        advantages=torch.ones(1, 2),
        mask=mask,
        objective="ppo_clip",
        params=P,
        aggregation=agg,
        normaliser=2.0,
        kl=kl,
        kl_coef=0.1,
    )
    assert float(with_kl.loss - base.loss) == pytest.approx(0.1)
    assert with_kl.metrics["kl"] == pytest.approx(2.0)


def test_presets_resolve_to_the_table():
    table = {
        "reinforce": ("batch_baseline", "reinforce", "seq_mean_token_mean", "reward", "k1", "seq"),
        "rloo": ("leave_one_out", "reinforce", "fixed_length", "reward", "k1", "seq"),
        "remax": ("greedy_baseline", "reinforce", "fixed_length", "reward", "k1", "seq"),
        "reinforce_pp": ("batch_whiten", "ppo_clip", "token_mean", "reward", "k1", "token"),
        "ppo": ("gae", "ppo_clip", "seq_mean_token_mean", "reward", "k1", "token"),
        "grpo": ("group_zscore", "ppo_clip", "seq_mean_token_mean", "loss", "k3", "token"),
        "dr_grpo": ("group_center", "ppo_clip", "fixed_length", "none", "k1", "token"),
        "dapo": ("group_zscore", "ppo_clip", "token_mean", "none", "k1", "token"),
        "gspo": ("group_zscore", "gspo", "seq_mean_token_mean", "none", "k1", "token"),
        "cispo": ("group_zscore", "cispo", "token_mean", "none", "k1", "token"),
        "sapo": ("group_zscore", "sapo", "seq_mean_token_mean", "none", "k1", "token"),
        "maxrl": ("maxrl", "reinforce", "seq_mean_token_mean", "none", "k1", "token"),
        "grpo_process": ("process_group", "ppo_clip", "seq_mean_token_mean", "loss", "k3", "token"),
        "opd": ("group_center", "ppo_clip", "token_mean", "none", "k1", "token"),
    }
    assert set(PG_PRESETS) == set(table)
    assert [n for n, p in PG_PRESETS.items() if p.teacher] == ["opd"]
    for name, row in table.items():
        p = PG_PRESETS[name]
        assert (
            p.advantage,
            p.objective,
            p.aggregation,
            p.kl_placement,
            p.kl_estimator,
            p.kl_per,
        ) == row
    assert PG_PRESETS["grpo"].kl_coef == 0.04 and PG_PRESETS["ppo"].kl_coef == 0.05
    assert (PG_PRESETS["dapo"].params.eps_low, PG_PRESETS["dapo"].params.eps_high) == (0.2, 0.28)
    assert (PG_PRESETS["gspo"].params.eps_low, PG_PRESETS["gspo"].params.eps_high) == (3e-4, 4e-4)
    assert (PG_PRESETS["cispo"].params.eps_low, PG_PRESETS["cispo"].params.eps_high) == (0.2, 0.4)
    assert PG_PRESETS["ppo"].critic and PG_PRESETS["ppo"].whiten_advantages
    assert PG_PRESETS["dapo"].dynamic_sampling and PG_PRESETS["dapo"].overlong_penalty


# ---------------------------------------------------------------------------------------------
# Extreme log-ratios: the exp of the ratio must not turn a zero gradient into NaN
# ---------------------------------------------------------------------------------------------

HUGE = (100.0, 1e30, math.inf)  # exp overflows: fp32 from ~89, fp64 from ~710
TINY = (-100.0, -1e30, -math.inf)  # exp underflows to (nearly) 0: exact without a clamp
DUAL = ObjectiveParams(dual_clip=3.0)


def _sapo(tau: float, adv: float, rho: float) -> tuple[float, float]:
    """SAPO's obj = (4 / tau) sigma(tau (rho - 1)) A and d obj / d log pi = 4 sigma' rho A."""
    s = 1.0 / (1.0 + math.exp(-tau * (rho - 1.0)))
    return 4.0 / tau * s * adv, 4.0 * s * (1.0 - s) * rho * adv


def _extreme_cases() -> list[tuple[str, float, float, ObjectiveParams, float, float]]:
    """(objective, log rho, A, params, exact obj, exact d obj / d log pi), log pi_old = 0."""
    cases = []
    for d in HUGE:
        cases += [
            ("ppo_clip", d, 1.0, P, 1.2, 0.0),  # clipped above: (1 + eps_high) A, no gradient
            ("ppo_clip", d, 0.0, P, 0.0, 0.0),  # an all-equal group: A = 0 (0 * inf was NaN)
            ("ppo_clip", d, -1.0, DUAL, -3.0, 0.0),  # dual clip: capped at c A, no gradient
            ("gspo", d, 1.0, P, 1.2, 0.0),
            ("gspo", d, 0.0, P, 0.0, 0.0),
            ("sapo", d, 1.0, P, 4.0, 0.0),  # gate saturated at 4 / tau, sigma' = 0
            ("sapo", d, -1.0, P, -4.0 / 1.05, 0.0),
            ("sapo", d, 0.0, P, 0.0, 0.0),
            ("cispo", d, 1.0, P, 1.2 * -0.5, 1.2),  # sg(clip(rho)) A log pi, log pi = -0.5
        ]
    for d in TINY:
        rho = math.exp(d)  # 3.7e-44 (a fp32 subnormal) or 0
        cases += [
            ("ppo_clip", d, -1.0, P, -0.8, 0.0),  # clipped below
            ("ppo_clip", d, 1.0, P, rho, rho),  # not clipped: rho A, gradient rho A (~0)
            ("gspo", d, -1.0, P, -0.8, 0.0),
            ("gspo", d, 1.0, P, rho, rho),
            ("sapo", d, 1.0, P, *_sapo(1.0, 1.0, rho)),
            ("sapo", d, -1.0, P, *_sapo(1.05, -1.0, rho)),
        ]
    cases.append(("cispo", -100.0, -1.0, P, 0.8 * -1.0 * -100.5, -0.8))  # weight 1 - eps_low
    # inside the clamp nothing changes, even where the ratio is large and unclipped
    cases.append(("ppo_clip", 9.9, -1.0, P, -math.exp(9.9), -math.exp(9.9)))
    cases.append(("gspo", 9.9, -1.0, P, -math.exp(9.9), -math.exp(9.9)))
    return cases


def _obj_and_grad_at_log_ratio(
    name: str, log_ratio: float, adv: float, params: ObjectiveParams, dtype: torch.dtype
) -> tuple[float, float]:
    """obj and d obj / d log pi at one token with log pi - log pi_old = log_ratio.

    Both log-probs are <= 0: log pi = min(0, d) - 0.5 and log pi_old = -max(0, d) - 0.5.
    """
    logprobs = torch.tensor([[min(0.0, log_ratio) - 0.5]], dtype=dtype, requires_grad=True)
    loss, _ = OBJECTIVES[name](
        logprobs=logprobs,
        old_logprobs=torch.tensor([[-max(0.0, log_ratio) - 0.5]], dtype=dtype),
        advantages=torch.tensor([[adv]], dtype=dtype),
        mask=torch.ones(1, 1, dtype=torch.bool),
        params=params,
    )
    (grad,) = torch.autograd.grad(-loss.sum(), logprobs)
    return -float(loss.detach()), float(grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    ("name", "log_ratio", "adv", "params", "obj", "grad"),
    [
        pytest.param(
            *case, id=f"{case[0]}-{case[1]:g}-A{case[2]:g}" + ("-dual" * (case[3] is DUAL))
        )
        for case in _extreme_cases()
    ],
)
def test_extreme_log_ratios_give_the_exact_value_and_gradient(
    name, log_ratio, adv, params, obj, grad, dtype
):
    value, g = _obj_and_grad_at_log_ratio(name, log_ratio, adv, params, dtype)
    assert math.isfinite(value) and math.isfinite(g)
    assert value == pytest.approx(obj, rel=1e-6, abs=1e-12)
    assert g == pytest.approx(grad, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("name", ["ppo_clip", "gspo"])
@pytest.mark.parametrize("log_ratio", HUGE)
def test_unclipped_huge_ratio_is_held_at_the_clamp(name, log_ratio):
    """A < 0 without dual clip: rho is held at e^C (loss -A e^C, zero gradient), not inf."""
    value, g = _obj_and_grad_at_log_ratio(name, log_ratio, -1.0, P, torch.float32)
    assert value == pytest.approx(-math.exp(LOG_RATIO_CLAMP), rel=1e-6)
    assert g == 0.0


# ---------------------------------------------------------------------------------------------
# Non-finite padding
# ---------------------------------------------------------------------------------------------

PAD_MASK = torch.tensor(
    [
        [True, True, True, False, False],  # right padding
        [False, False, True, True, True],  # left padding
        [True, True, False, False, True],  # a hole (tool output between two turns)
    ]
)
JUNK = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)


def _junk_at_padding(mask: torch.Tensor) -> torch.Tensor:
    """0 on the mask; nan, inf, -inf in turn on the padding (an offset to add to a tensor)."""
    out = torch.zeros(mask.shape, dtype=torch.float64)
    out[~mask] = JUNK[torch.arange(int((~mask).sum())) % 3]
    return out


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "fixed_length"])
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_non_finite_padding_changes_neither_loss_nor_gradient(objective, mode):
    """inf / NaN at padded positions of every input: same loss and same (finite) gradient."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 4, (3, 5), generator=gen)
    old = torch.log_softmax(logits.detach(), -1).gather(-1, tokens[..., None])[..., 0]
    old = old + 0.3 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    adv = torch.randn(3, 1, generator=gen, dtype=torch.float64).expand(3, 5)
    weights = torch.rand(3, 5, generator=gen, dtype=torch.float64) + 0.5
    ref = old + 0.1 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    agg = Aggregation(mode, max_len=5)
    junk = _junk_at_padding(PAD_MASK)

    def loss_and_grad(dirty: bool) -> tuple[torch.Tensor, torch.Tensor]:
        logits.grad = None
        lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
        kl = ref - lp  # differentiable, as in KL-in-loss
        if dirty:  # an offset, not a where: the junk must reach the loss's own backward
            lp, kl = lp + junk, kl + junk
        out = policy_loss(
            logprobs=lp,
            old_logprobs=old + junk if dirty else old,
            advantages=adv + junk if dirty else adv,
            mask=PAD_MASK,
            objective=objective,
            params=P,
            aggregation=agg,
            normaliser=normaliser_count(PAD_MASK, agg),
            weights=weights + junk if dirty else weights,
            kl=kl,
            kl_coef=0.1,
        )
        out.loss.backward()
        return out.loss.detach(), logits.grad.clone()

    clean_loss, clean_grad = loss_and_grad(False)
    dirty_loss, dirty_grad = loss_and_grad(True)
    assert torch.isfinite(dirty_grad).all()
    torch.testing.assert_close(dirty_loss, clean_loss, rtol=0, atol=0)
    torch.testing.assert_close(dirty_grad, clean_grad, rtol=0, atol=0)


def test_value_loss_ignores_non_finite_padding_in_the_gradient():
    gen = torch.Generator().manual_seed(6)
    vals, old, ret = (torch.randn(3, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    junk = _junk_at_padding(PAD_MASK)
    results = []
    for offset in (torch.zeros_like(junk), junk):
        v = vals.clone().requires_grad_(True)
        out = value_loss(
            values=v + offset,
            old_values=old + offset,
            returns=ret + offset,
            mask=PAD_MASK,
            aggregation=Aggregation("token_mean"),
            normaliser=float(PAD_MASK.sum()),
        )
        (g,) = torch.autograd.grad(out.loss, v)
        results.append((out.loss.detach(), g))
    assert torch.isfinite(results[1][1]).all()
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    assert (results[1][1][~PAD_MASK] == 0).all()
