"""Length-controlled win rate (Dubois et al. 2024)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.eval.winrate import fit_length_logistic, lc_win_rate


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_all_dlen_zero_gives_raw():
    wins = [1, 0, 0.5, 1, 1, 0, 0.5, 1]
    out = lc_win_rate(wins, [0] * len(wins))
    assert out["raw"] == 0.625
    assert out["lc"] == pytest.approx(0.625, abs=1e-12)
    assert out["theta"] == pytest.approx(logit(0.625), abs=1e-12)
    assert out["phi"] == 0.0 and out["sigma_len"] == 0.0 and out["n"] == 8


def test_constant_nonzero_dlen_is_no_feature():
    # Every output 40 tokens longer: std 0, so the feature is 0 and LC = raw.
    out = lc_win_rate([1, 1, 0, 1], [40, 40, 40, 40])
    assert out["lc"] == pytest.approx(0.75, abs=1e-12) and out["phi"] == 0.0


def test_two_point_design_closed_form():
    # With dlen in {-d, +d} the model is saturated: sigma(theta + phi x_+) = p_+ and
    # sigma(theta + phi x_-) = p_-, so theta, phi solve two linear equations in the logits.
    plus = [1] * 7 + [0] * 3 + [0.5] * 2  # p_+ = 8/12
    minus = [1] * 2 + [0] * 5 + [0.5] * 1  # p_- = 2.5/8
    wins = plus + minus
    dlen = [30.0] * len(plus) + [-30.0] * len(minus)
    n = len(dlen)
    mean = 30.0 * (len(plus) - len(minus)) / n
    std = math.sqrt(sum((d - mean) ** 2 for d in dlen) / n)
    x_plus, x_minus = math.tanh(30 / std), math.tanh(-30 / std)
    l_plus, l_minus = logit(8 / 12), logit(2.5 / 8)
    phi = (l_plus - l_minus) / (x_plus - x_minus)
    theta = l_plus - phi * x_plus
    out = lc_win_rate(wins, dlen)
    assert out["converged"]
    assert out["sigma_len"] == pytest.approx(std, abs=1e-12)
    assert out["phi"] == pytest.approx(phi, abs=1e-9)
    assert out["theta"] == pytest.approx(theta, abs=1e-9)
    assert out["lc"] == pytest.approx(sigmoid(theta), abs=1e-9)
    assert out["raw"] == pytest.approx(10.5 / 20)


def test_score_equations_hold_at_the_optimum():
    gen = torch.Generator().manual_seed(3)
    dlen = torch.randn(300, generator=gen, dtype=torch.float64) * 50 + 20
    wins = (torch.rand(300, generator=gen, dtype=torch.float64) < 0.6).double()
    wins[:30] = 0.5
    out = lc_win_rate(wins, dlen)
    x = torch.tanh(dlen / dlen.std(correction=0))
    p = torch.sigmoid(out["theta"] + out["phi"] * x)
    assert out["converged"]
    assert float((p - wins).sum()) == pytest.approx(0.0, abs=1e-8)
    assert float(((p - wins) * x).sum()) == pytest.approx(0.0, abs=1e-8)
    # And it is a minimum: the NLL grows in every direction.
    theta, phi = fit_length_logistic(wins, x)[:2]

    def nll(t: float, f: float) -> float:
        z = t + f * x
        ls = torch.nn.functional.logsigmoid
        return float(-(wins * ls(z) + (1 - wins) * ls(-z)).mean())

    best = nll(theta, phi)
    for dt, df in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3), (1e-3, -1e-3)]:
        assert nll(theta + dt, phi + df) > best


def test_length_driven_wins_give_lc_near_half():
    # The judge ignores quality: P(win) = sigma(2.5 tanh(dlen / sigma_len)), theta = 0, and the
    # model is usually longer than the baseline, so the raw win rate is far above 0.5.
    dlen = [float(d) for d in range(-100, 301, 10)]
    n = len(dlen)
    mean = sum(dlen) / n
    std = math.sqrt(sum((d - mean) ** 2 for d in dlen) / n)
    wins, lengths = [], []
    for d in dlen:
        k = round(400 * sigmoid(2.5 * math.tanh(d / std)))
        wins += [1.0] * k + [0.0] * (400 - k)
        lengths += [d] * 400
    out = lc_win_rate(wins, lengths)
    assert out["raw"] > 0.65
    assert out["lc"] == pytest.approx(0.5, abs=0.005)
    assert out["phi"] == pytest.approx(2.5, abs=0.05)


def test_symmetric_data_gives_theta_zero():
    # Every (dlen, w) has a mirror (-dlen, 1 - w): L(theta, phi) = L(-theta, phi), so theta = 0.
    half = [(5.0, 1.0), (12.0, 1.0), (30.0, 0.0), (3.0, 0.5), (50.0, 1.0), (8.0, 0.0)]
    data = half + [(-d, 1 - w) for d, w in half]
    out = lc_win_rate([w for _, w in data], [d for d, _ in data])
    assert out["raw"] == 0.5
    assert out["theta"] == pytest.approx(0.0, abs=1e-10)
    assert out["lc"] == pytest.approx(0.5, abs=1e-10)
    assert out["phi"] > 0


def test_invariances():
    gen = torch.Generator().manual_seed(0)
    dlen = (torch.randn(200, generator=gen, dtype=torch.float64) * 80).tolist()
    wins = [
        float(u < 0.3 + 0.4 * (d > 0))
        for u, d in zip(torch.rand(200, generator=gen), dlen, strict=True)
    ]
    base = lc_win_rate(wins, dlen)
    # Units do not matter: dlen in characters = 4.2 x dlen in tokens.
    scaled = lc_win_rate(wins, [4.2 * d for d in dlen])
    assert scaled["lc"] == pytest.approx(base["lc"], abs=1e-10)
    assert scaled["phi"] == pytest.approx(base["phi"], abs=1e-9)
    # Swapping model and baseline: w -> 1 - w, dlen -> -dlen gives LC -> 1 - LC, same phi.
    swapped = lc_win_rate([1 - w for w in wins], [-d for d in dlen])
    assert swapped["lc"] == pytest.approx(1 - base["lc"], abs=1e-10)
    assert swapped["theta"] == pytest.approx(-base["theta"], abs=1e-9)
    assert swapped["phi"] == pytest.approx(base["phi"], abs=1e-9)
    # Tensors and lists give the same answer.
    tensors = lc_win_rate(torch.tensor(wins), torch.tensor(dlen, dtype=torch.float64))
    assert tensors["lc"] == pytest.approx(base["lc"], abs=1e-12)


def test_all_wins_or_losses():
    out = lc_win_rate([1, 1, 1], [10, -5, 3])
    assert out["lc"] == 1.0 and out["theta"] == math.inf and out["phi"] == 0.0
    out = lc_win_rate([0, 0], [10, -5])
    assert out["lc"] == 0.0 and out["theta"] == -math.inf


def test_separable_data_does_not_crash():
    # Wins exactly when longer: no finite MLE; the fit stops without raising.
    dlen = [-30.0, -20.0, -10.0, 10.0, 20.0, 30.0, 40.0]
    out = lc_win_rate([float(d > 0) for d in dlen], dlen, max_iter=30)
    assert math.isfinite(out["theta"]) and out["phi"] > 10
    assert 0.0 <= out["lc"] <= 1.0


def test_validation():
    with pytest.raises(ValueError, match="equal length"):
        lc_win_rate([1, 0], [1])
    with pytest.raises(ValueError, match="equal length"):
        lc_win_rate([], [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lc_win_rate([1, 2], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        lc_win_rate([1, 0], [math.nan, 2])
