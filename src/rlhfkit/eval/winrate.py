"""Length-controlled win rate (paper: Dubois et al. 2024, AlpacaEval-LC).

A judge compares the evaluated model's output with a baseline's on N prompts: w_i = 1 (model
wins), 0.5 (tie) or 0 (loses); dlen_i = len(model output) - len(baseline output). Judges favour
longer outputs, so the raw win rate mixes quality with verbosity. The length-controlled win rate
fits a two-parameter logistic model of the win probability,

    P(win_i) = sigma(theta + phi * x_i),   x_i = tanh(dlen_i / sigma_len),

with sigma_len the (population) standard deviation of dlen (x_i = 0 when it is 0), by maximum
likelihood, and reports the win rate predicted at equal length: LC = sigma(theta).

The fit minimises the mean Bernoulli negative log-likelihood with fractional targets (a tie is
half a win and half a loss):

    L(theta, phi) = -(1/N) sum_i [w_i log sigma(z_i) + (1 - w_i) log sigma(-z_i)],
    z_i = theta + phi x_i,
    grad L = (1/N) sum_i (sigma(z_i) - w_i) (1, x_i),
    hess L = (1/N) sum_i sigma(z_i) (1 - sigma(z_i)) (1, x_i)(1, x_i)^T,

with Newton's method in fp64 from (logit(raw), 0) and step halving (deterministic). At the
optimum sum_i sigma(z_i) = sum_i w_i: the fitted probabilities reproduce the raw win rate.
Special cases: all x_i = 0 gives phi = 0 and LC = raw exactly; raw = 0 or 1 gives theta = -inf
or +inf, phi = 0, LC = raw. Perfectly length-separated data (every win longer, every loss
shorter) has no finite maximum; the fit then stops after ``max_iter`` steps with
``converged = False``. AlpacaEval-LC's fit also has an instruction-difficulty term and a
regulariser; this is the two-parameter form of the book.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

Values = torch.Tensor | Sequence[float]
_EPS = torch.finfo(torch.float64).eps


def _vec(values: Values, name: str) -> torch.Tensor:
    """1-D fp64 CPU copy. Shapes: returns (N,)."""
    if isinstance(values, torch.Tensor):
        out = values.detach().to("cpu", torch.float64).flatten()
    else:
        out = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} must be finite numbers")
    return out


def _nll(theta: float, phi: float, x: torch.Tensor, w: torch.Tensor) -> float:
    """Mean Bernoulli NLL with fractional targets (log sigma(-z) = logsigmoid(-z))."""
    z = theta + phi * x  # (N,)
    nll = -(w * torch.nn.functional.logsigmoid(z) + (1 - w) * torch.nn.functional.logsigmoid(-z))
    return float(nll.mean())


def fit_length_logistic(
    wins: Values, x: Values, *, max_iter: int = 100, tol: float = 1e-12
) -> tuple[float, float, bool]:
    """Maximum-likelihood (theta, phi) of P(win_i) = sigma(theta + phi x_i) by Newton's method.

    Args:
        wins: Outcomes in [0, 1] (0, 0.5 or 1 for judge verdicts), not all equal to 0 or 1.
        x: The feature of each comparison (not all zero).
        max_iter: Newton steps at most.
        tol: Stop when the largest parameter change is below this.

    Returns:
        ``(theta, phi, converged)``.

    Shapes:
        wins, x: (N,).
    """
    w, xs = _vec(wins, "wins"), _vec(x, "x")
    raw = float(w.mean())
    theta, phi = math.log(raw / (1 - raw)), 0.0
    loss = _nll(theta, phi, xs, w)
    features = torch.stack([torch.ones_like(xs), xs], dim=1)  # (N, 2)
    for _ in range(max_iter):
        p = torch.sigmoid(theta + phi * xs)  # (N,)
        grad = features.T @ (p - w) / len(w)  # (2,)
        hess = (features * (p * (1 - p))[:, None]).T @ features / len(w)  # (2, 2)
        if torch.linalg.det(hess).abs() < 1e-300:
            return theta, phi, False
        step = torch.linalg.solve(hess, grad)  # (2,)
        scale = 1.0
        while scale > 1e-10:  # step halving keeps every iterate a decrease of L
            new = (theta - scale * float(step[0]), phi - scale * float(step[1]))
            new_loss = _nll(*new, xs, w)
            if new_loss <= loss + 4 * _EPS * abs(loss):  # rounding noise must not stop Newton
                break
            scale /= 2
        else:
            return theta, phi, bool(grad.abs().max() < 1e-9)
        theta, phi, loss = new[0], new[1], new_loss
        if scale * float(step.abs().max()) < tol:
            return theta, phi, True
    return theta, phi, False


def lc_win_rate(wins: Values, dlen: Values, *, max_iter: int = 100) -> dict[str, Any]:
    """Raw and length-controlled win rate: LC = sigma(theta) of the fit in the module docstring.

    Args:
        wins: Judge outcomes of the model against the baseline: 1 win, 0.5 tie, 0 loss (any
            value in [0, 1] counts as a fractional win).
        dlen: Length of the model's output minus the baseline's, per comparison (tokens or
            characters; only its scale relative to its own std matters).
        max_iter: Newton steps at most.

    Returns:
        ``{"raw": mean w, "lc": sigma(theta), "theta", "phi", "sigma_len", "n",
        "converged"}``.

    Raises:
        ValueError: Empty or mismatched inputs, non-finite values or wins outside [0, 1].

    Shapes:
        wins, dlen: (N,).
    """
    w, d = _vec(wins, "wins"), _vec(dlen, "dlen")
    if w.numel() == 0 or w.shape != d.shape:
        raise ValueError(
            f"wins ({w.numel()}) and dlen ({d.numel()}) must be non-empty and of equal length"
        )
    if ((w < 0) | (w > 1)).any():
        raise ValueError("wins must lie in [0, 1] (1 win, 0.5 tie, 0 loss)")
    raw = float(w.mean())
    sigma_len = float(d.std(correction=0))
    x = torch.tanh(d / sigma_len) if sigma_len > 0 else torch.zeros_like(d)  # (N,)
    out = {"raw": raw, "sigma_len": sigma_len, "n": int(w.numel())}
    if raw in (0.0, 1.0):
        theta = math.inf if raw == 1.0 else -math.inf
        return out | {"lc": raw, "theta": theta, "phi": 0.0, "converged": True}
    if not x.any():
        return out | {"lc": raw, "theta": math.log(raw / (1 - raw)), "phi": 0.0, "converged": True}
    theta, phi, converged = fit_length_logistic(w, x, max_iter=max_iter)
    lc = 1.0 / (1.0 + math.exp(-theta))
    return out | {"lc": lc, "theta": theta, "phi": phi, "converged": converged}
