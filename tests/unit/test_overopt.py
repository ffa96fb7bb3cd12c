"""Over-optimisation utilities: best-of-n curve, Gao fits and peaks, RM ensembles."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlhfkit.eval.overopt import (
    bon_curve,
    bon_curve_unbiased,
    bon_unbiased,
    fit_gao_bon,
    fit_gao_rl,
    gao_fit,
    gao_peaks,
    r_squared,
    rm_ensemble,
)

NAN = math.nan

# A hand-made grid: 2 prompts x 6 samples with ties, unscored proxies (NaN) and a NaN gold.
PROXY = [
    [0.1, 0.5, 0.3, 0.3, 0.9, 0.2],
    [0.4, 0.4, NAN, 0.8, 0.6, NAN],
]
GOLD = [
    [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    [7.0, 8.0, 9.0, 10.0, NAN, 12.0],
]


def test_bon_curve_hand_made():
    # Derivation (0-indexed columns; groups are consecutive and disjoint):
    # n=1: every scored sample is its own group. Row 0: 6 groups, proxy sum 2.3, gold sum 21.
    #      Row 1: cols 0,1,3,4 scored (proxy 2.2); gold of col 4 is NaN, so gold over cols
    #      0,1,3 = 25 (col 5 has a gold reward but no proxy: skipped). proxy 4.5/10, gold 46/9.
    # n=2: row 0 groups (0,1)->1 [.5, 2], (2,3) tie->2 [.3, 3], (4,5)->4 [.9, 5];
    #      row 1 (0,1) tie->0 [.4, 7], (2,3)->3 [.8, 10], (4,5)->4 [.6, NaN].
    #      proxy 3.5/6, gold 27/5 over the 5 picks with a gold reward.
    # n=3: row 0 (0,1,2)->1 [.5, 2], (3,4,5)->4 [.9, 5]; row 1 (0,1,2)->0 [.4, 7],
    #      (3,4,5)->3 [.8, 10]. proxy 2.6/4, gold 24/4.
    # n=4: one group of cols 0..3 per row (cols 4, 5 dropped): row 0 ->1 [.5, 2],
    #      row 1 ->3 [.8, 10]. proxy 1.3/2, gold 12/2.
    # n=6: row 0 ->4 [.9, 5], row 1 ->3 [.8, 10]. proxy 1.7/2, gold 15/2.
    expected = {
        1: (4.5 / 10, 46 / 9, 10),
        2: (3.5 / 6, 27 / 5, 6),
        3: (2.6 / 4, 24 / 4, 4),
        4: (1.3 / 2, 12 / 2, 2),
        6: (1.7 / 2, 15 / 2, 2),
    }
    curve = bon_curve(PROXY, GOLD, [1, 2, 3, 4, 6])
    assert [pt["n"] for pt in curve] == [1, 2, 3, 4, 6]
    for pt in curve:
        proxy, gold, groups = expected[pt["n"]]
        assert pt["proxy"] == pytest.approx(proxy, abs=1e-12)
        assert pt["gold"] == pytest.approx(gold, abs=1e-12)
        assert pt["groups"] == groups
        assert pt["d"] == pytest.approx(math.sqrt(pt["kl"]), abs=1e-15)
    # KL_BoN = log n - (n - 1)/n: n = 1 -> 0, 2 -> 0.193147, 4 -> 0.636294.
    assert curve[0]["kl"] == 0.0 and curve[0]["d"] == 0.0
    assert curve[1]["kl"] == pytest.approx(0.193147, abs=1e-6)
    assert curve[3]["kl"] == pytest.approx(0.636294, abs=1e-6)


def test_bon_curve_accepts_tensors_and_keeps_order():
    a = bon_curve(torch.tensor(PROXY), torch.tensor(GOLD), [6, 1])
    b = bon_curve(PROXY, GOLD, [6, 1])
    assert [pt["n"] for pt in a] == [6, 1]
    for x, y in zip(a, b, strict=True):
        assert x["proxy"] == pytest.approx(y["proxy"]) and x["gold"] == pytest.approx(y["gold"])


def test_bon_curve_without_gold_or_proxy_gives_nan():
    curve = bon_curve([[1.0, 2.0]], [[NAN, NAN]], [1, 2])
    assert curve[1]["proxy"] == 2.0 and math.isnan(curve[1]["gold"])
    empty = bon_curve([[NAN, NAN]], [[1.0, 2.0]], [2])[0]
    assert math.isnan(empty["proxy"]) and math.isnan(empty["gold"]) and empty["groups"] == 0


def test_bon_curve_n1_is_plain_mean_property():
    gen = torch.Generator().manual_seed(0)
    proxy = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    gold = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    pt = bon_curve(proxy, gold, [1])[0]
    assert pt["proxy"] == pytest.approx(float(proxy.mean()), abs=1e-12)
    assert pt["gold"] == pytest.approx(float(gold.mean()), abs=1e-12)
    # n = N: the per-prompt argmax, which is at least the mean.
    top = bon_curve(proxy, gold, [5])[0]
    assert top["proxy"] == pytest.approx(float(proxy.max(dim=1).values.mean()), abs=1e-12)


@pytest.mark.parametrize("ns", [[0], [7]])
def test_bon_curve_rejects_bad_n(ns):
    with pytest.raises(ValueError, match=r"1\.\.N"):
        bon_curve(PROXY, GOLD, ns)


def test_bon_curve_rejects_bad_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        bon_curve([[1.0, 2.0]], [[1.0]], [1])
    with pytest.raises(ValueError, match="matrix"):
        bon_curve([1.0, 2.0], [1.0, 2.0], [1])


def test_gao_peaks_methods_values():
    d_bon, d_rl = gao_peaks(1.0, 0.25)
    assert d_bon == pytest.approx(2.0, abs=1e-12)
    assert d_rl == pytest.approx(math.e**3, abs=1e-9)
    assert d_rl == pytest.approx(20.0855, abs=1e-4)


def test_gao_peaks_are_maxima_property():
    for alpha, beta in [(1.0, 0.25), (0.7, 0.4), (2.0, 1.5)]:
        d_bon, d_rl = gao_peaks(alpha, beta)

        def bon(d, a=alpha, b=beta):
            return d * (a - b * d)

        def rl(d, a=alpha, b=beta):
            return d * (a - b * math.log(d))

        for f, peak in [(bon, d_bon), (rl, d_rl)]:
            assert f(peak) > f(peak * 0.99) and f(peak) > f(peak * 1.01)


def test_gao_peaks_without_turning_point():
    assert gao_peaks(1.0, 0.0) == (math.inf, math.inf)
    assert gao_peaks(1.0, -0.5) == (math.inf, math.inf)
    assert gao_peaks(1000.0, 1.0)[1] == math.inf  # exp overflow -> +inf, not an exception


def test_fit_gao_bon_recovers_noise_free_curve():
    d = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0]
    r = [x * (1.0 - 0.25 * x) for x in d]
    alpha, beta = fit_gao_bon(d, r)
    assert alpha == pytest.approx(1.0, abs=1e-9)
    assert beta == pytest.approx(0.25, abs=1e-9)


def test_fit_gao_rl_recovers_noise_free_curve_and_skips_zero():
    d = [0.0, 0.3, 0.7, 1.0, 2.0, 5.0, 10.0]
    r = [0.0] + [x * (1.0 - 0.25 * math.log(x)) for x in d[1:]]
    alpha, beta = fit_gao_rl(d, r)
    assert alpha == pytest.approx(1.0, abs=1e-9)
    assert beta == pytest.approx(0.25, abs=1e-9)
    # A d = 0 point with any reward is ignored (log 0 is undefined): same fit.
    assert fit_gao_rl([0.0, *d[1:]], [5.0, *r[1:]]) == pytest.approx((alpha, beta), abs=1e-12)


def test_fits_solve_the_normal_equations_property():
    # With noisy data the residual is orthogonal to both features (the normal equations).
    gen = torch.Generator().manual_seed(1)
    d = [0.2 * (i + 1) for i in range(12)]
    noise = torch.randn(12, generator=gen, dtype=torch.float64).tolist()
    r = [x * (0.8 - 0.3 * x) + 0.05 * e for x, e in zip(d, noise, strict=True)]
    for fit, feat in [
        (fit_gao_bon, lambda x: -x * x),
        (fit_gao_rl, lambda x: -x * math.log(x)),
    ]:
        a, b = fit(d, r)
        res = [y - (a * x + b * feat(x)) for x, y in zip(d, r, strict=True)]
        assert math.fsum(e * x for e, x in zip(res, d, strict=True)) == pytest.approx(0, abs=1e-9)
        assert math.fsum(e * feat(x) for e, x in zip(res, d, strict=True)) == pytest.approx(
            0, abs=1e-9
        )


def test_fits_need_two_points():
    with pytest.raises(ValueError, match="two points"):
        fit_gao_bon([0.0, 1.0], [0.0, 0.5])
    with pytest.raises(ValueError, match="two points"):
        fit_gao_rl([1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="two points"):
        fit_gao_bon([0.5, 1.0, 2.0], [NAN, 0.5, NAN])  # NaN rewards are dropped
    with pytest.raises(ValueError, match="length"):
        fit_gao_bon([1.0], [1.0, 2.0])


def test_rm_ensemble_hand_values():
    scores = torch.tensor([[1.0, 4.0], [3.0, 0.0]], dtype=torch.float64)
    # mean [2, 2]; min [1, 0]; population std [1, 2].
    torch.testing.assert_close(rm_ensemble(scores, "mean"), torch.tensor([2.0, 2.0]).double())
    torch.testing.assert_close(rm_ensemble(scores, "min"), torch.tensor([1.0, 0.0]).double())
    torch.testing.assert_close(rm_ensemble(scores, "uwo"), torch.tensor([1.0, 0.0]).double())
    torch.testing.assert_close(
        rm_ensemble(scores, "uwo", lam=0.5), torch.tensor([1.5, 1.0]).double()
    )


@pytest.mark.parametrize("mode", ["mean", "min", "uwo"])
def test_rm_ensemble_identical_members_equal_single_rm(mode):
    single = torch.tensor([0.3, -1.2, 2.5], dtype=torch.float64)
    torch.testing.assert_close(rm_ensemble(single.expand(4, 3), mode), single)
    torch.testing.assert_close(rm_ensemble(single[None], mode), single)  # K = 1


def test_rm_ensemble_properties():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(5, 64, generator=gen, dtype=torch.float64)
    mean = rm_ensemble(scores, "mean")
    assert (rm_ensemble(scores, "min") <= mean).all()
    torch.testing.assert_close(rm_ensemble(scores, "uwo", lam=0.0), mean)
    assert (rm_ensemble(scores, "uwo", lam=1.0) <= mean).all()


def test_rm_ensemble_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown ensemble mode"):
        rm_ensemble(torch.zeros(2, 3), "median")
    with pytest.raises(ValueError, match="K >= 1"):
        rm_ensemble(torch.zeros(3), "mean")


def test_synthetic_overoptimisation_gold_peaks_while_proxy_rises():
    # Each sample has a true quality q and a hackable feature h (think: length), both N(0, 1).
    # The gold reward values quality and punishes extreme h: gold = q - 0.5 h^2. The proxy RM
    # is gold plus an error that correlates with h: proxy = gold + h + 0.5 h^2 = q + h.
    # Best-of-n on the proxy selects a large s = q + h; E[q | s] = E[h | s] = s/2 and
    # Var(h | s) = 1/2, so E[gold | s] = s/2 - 0.5 (s^2/4 + 1/2): it peaks at s = 2 (around
    # n = 8) and falls after, while the proxy (the expected max of n draws) keeps rising.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(400, 256, generator=gen, dtype=torch.float64)
    h = torch.randn(400, 256, generator=gen, dtype=torch.float64)
    gold = q - 0.5 * h**2
    proxy = q + h
    ns = [1, 2, 4, 8, 16, 32, 64, 128, 256]
    curve = bon_curve(proxy, gold, ns)
    p = [pt["proxy"] for pt in curve]
    g = [pt["gold"] for pt in curve]
    assert all(b > a for a, b in itertools.pairwise(p)), p  # proxy rises monotonically
    peak = max(range(len(g)), key=g.__getitem__)
    assert 0 < peak < len(g) - 1, g  # gold peaks inside the range ...
    assert g[peak] > g[0] + 0.3 and g[peak] > g[-1] + 0.3, g  # ... and falls well below it
    assert g[-1] < g[-2] < g[-3], g  # still falling at the largest n
    # Gao's best-of-n form fits the gold gain and puts its peak between the ends.
    d = [pt["d"] for pt in curve]
    alpha, beta = fit_gao_bon(d, [x - g[0] for x in g])
    d_bon, _ = gao_peaks(alpha, beta)
    assert beta > 0 and d[1] < d_bon < d[-1]


def test_bon_curve_unbiased_averages_the_per_prompt_estimator():
    proxy = [[0.1, 0.9, 0.5, 0.3], [0.2, 0.4, 0.8, 0.6], [0.7, 0.1, 0.3, 0.5]]
    gold = [[1.0, 0.0, 2.0, 3.0], [4.0, 1.0, 0.0, 2.0], [0.5, 1.5, 2.5, 3.5]]
    points = bon_curve_unbiased(proxy, gold, [1, 2, 4])
    assert [p["n"] for p in points] == [1, 2, 4] and points[0]["d"] == 0.0
    for p in points:
        picks = [bon_unbiased(a, b, p["n"]) for a, b in zip(proxy, gold, strict=True)]
        assert p["gold"] == pytest.approx(sum(g for _, g in picks) / 3)
        assert p["proxy"] == pytest.approx(sum(r for r, _ in picks) / 3)
        assert p["gold_low"] <= p["gold"] <= p["gold_high"]
    # n = N picks every prompt's proxy argmax: gold 0.0, 0.0, 0.5
    assert points[-1]["gold"] == pytest.approx(0.5 / 3)
    assert points[0]["gold"] == pytest.approx((6.0 + 7.0 + 8.0) / 12)  # n = 1: the plain mean


def test_r_squared_is_one_on_the_curve_and_matches_the_definition_off_it():
    d = [0.2, 0.5, 1.0, 1.5, 2.0]
    exact = [x * (0.8 - 0.3 * x) for x in d]
    assert r_squared(d, exact, 0.8, 0.3, rl=False) == pytest.approx(1.0)
    noisy = [y + e for y, e in zip(exact, [0.05, -0.02, 0.03, -0.04, 0.01], strict=True)]
    alpha, beta = fit_gao_bon(d, noisy)
    pred = [x * (alpha - beta * x) for x in d]
    mean = sum(noisy) / len(noisy)
    expected = 1 - sum((y - f) ** 2 for y, f in zip(noisy, pred, strict=True)) / sum(
        (y - mean) ** 2 for y in noisy
    )
    assert r_squared(d, noisy, alpha, beta, rl=False) == pytest.approx(expected)
    rl = [x * (0.5 - 0.4 * math.log(x)) for x in d]
    assert r_squared(d, rl, 0.5, 0.4, rl=True) == pytest.approx(1.0)
    assert math.isnan(r_squared([1.0], [0.3], 0.1, 0.1, rl=False))


def test_gao_fit_recovers_known_parameters_with_r2_and_peak():
    d = [0.0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.8]
    fit = gao_fit(d, [x * (1.2 - 0.5 * x) for x in d], rl=False)
    assert fit["alpha"] == pytest.approx(1.2) and fit["beta"] == pytest.approx(0.5)
    assert fit["r2"] == pytest.approx(1.0) and fit["d_star"] == pytest.approx(1.2)
    fit = gao_fit(d, [x * (0.7 - 0.2 * math.log(x)) if x else 0.0 for x in d], rl=True)
    assert fit["alpha"] == pytest.approx(0.7) and fit["beta"] == pytest.approx(0.2)
    assert fit["d_star"] == pytest.approx(math.exp(0.7 / 0.2 - 1))
    assert gao_fit([0.0, 1.0], [0.0, 0.5], rl=False) is None  # one usable point


def test_pairwise_agreement_counts_gold_ordered_pairs():
    from rlhfkit.eval.overopt import pairwise_agreement

    # prompt 0: gold pairs (0,1) (0,2) (1,2) all differ; the proxy orders (0,1) and (1,2) as
    # gold does and ties (0,2); prompt 1: gold all equal, no pair counts
    proxy = [[0.9, 0.1, 0.9], [0.3, 0.2, 0.1]]
    gold = [[1.0, 0.0, 0.5], [1.0, 1.0, 1.0]]
    assert pairwise_agreement(proxy, gold) == pytest.approx((1 + 0.5 + 1) / 3)
    reversed_proxy = [[-x for x in row] for row in proxy]  # every ordered pair flips, ties stay
    assert pairwise_agreement(reversed_proxy, gold) == pytest.approx(0.5 / 3)
    assert pairwise_agreement(gold, gold) == 1.0
    assert math.isnan(pairwise_agreement([[0.1, 0.2]], [[1.0, 1.0]]))


def test_reward_fingerprints_change_when_a_reward_model_is_retrained(tmp_path):
    import os

    from rlhfkit.eval.run import reward_fingerprints

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"weights")
    specs = [f"rm:{a}", f"rm-ensemble:min:{a},{b}", "verifier:auto"]
    before = reward_fingerprints(specs)
    assert before[2] == "verifier:auto" and reward_fingerprints(specs) == before
    (b / "model.safetensors").write_bytes(b"retrained weights")
    os.utime(b / "model.safetensors", ns=(1, 1))
    after = reward_fingerprints(specs)
    assert after[0] == before[0]  # a is untouched
    assert after[1] != before[1]  # the ensemble names b: its cached scores no longer match
