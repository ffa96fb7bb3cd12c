"""DPO on a categorical bandit with exact preferences recovers π* ∝ π_ref·exp(r/β) (Rafailov 2023).

Setting: one prompt, K responses, a softmax policy π = softmax(θ) (θ the parameters), a fixed
π_ref and rewards r. Pairs are shown with a π-independent probability q_ij (ordered pair
(y_i, y_j)); the Bradley-Terry annotator prefers y_i with probability p_ij = σ(r_i − r_j). The
population DPO loss is then

    E[L](θ) = Σ_{i≠j} W_ij · ℓ(i ≻ j),  W_ij = (q_ij + q_ji)·p_ij,  ℓ(i ≻ j) = softplus(−u_ij),
    u_ij = β[(log π_i − log π_ref,i) − (log π_j − log π_ref,j)].

Why the optimum is π*: the unordered pair {i, j} contributes (q_ij + q_ji)·[p·softplus(−u) +
(1 − p)·softplus(u)] with u = u_ij, p = p_ij; its derivative in u is σ(u) − p, zero only at
u = log(p/(1 − p)) = r_i − r_j, and it is strictly convex in u. The policy
log π*_y = log π_ref,y + r_y/β − log Z makes u_ij = r_i − r_j for *every* pair at once (Z cancels
in the difference), so each term sits at its own minimum and the sum, bounded below by the sum
of the minima, is minimised there. Conversely a minimiser must have u_ij = r_i − r_j for all
pairs with q_ij + q_ji > 0 (strict convexity), which fixes log π − log π_ref up to a constant,
and normalisation fixes the constant: π* = π_ref·exp(r/β)/Z is the unique optimum. The pair
distribution must not depend on π (else the weights move with θ), but it is otherwise free:
uniform and skewed q give the same π*.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlhfkit.losses.preference import dpo_loss

D = torch.float64


def expected_dpo_loss(
    theta: torch.Tensor, log_ref: torch.Tensor, rewards: torch.Tensor, q: torch.Tensor, beta: float
) -> torch.Tensor:
    """Σ_{i≠j} (q_ij + q_ji)·σ(r_i − r_j)·DPO(chosen y_i, rejected y_j), one dpo_loss call per
    ordered pair (N = 1, so each call returns that pair's loss)."""
    log_pi = torch.log_softmax(theta, dim=-1)  # (K,)
    total = theta.new_zeros(())
    for i, j in itertools.permutations(range(theta.numel()), 2):
        weight = (q[i, j] + q[j, i]) * torch.sigmoid(rewards[i] - rewards[j])
        out = dpo_loss(
            chosen_logprobs=log_pi[i : i + 1],
            rejected_logprobs=log_pi[j : j + 1],
            ref_chosen_logprobs=log_ref[i : i + 1],
            ref_rejected_logprobs=log_ref[j : j + 1],
            beta=beta,
        )
        total = total + weight * out.loss
    return total


def optimise(log_ref: torch.Tensor, rewards: torch.Tensor, q: torch.Tensor, beta: float):
    """Minimise the expected loss over the logits with L-BFGS from θ = 0 (uniform policy)."""
    theta = torch.zeros_like(log_ref, requires_grad=True)
    opt = torch.optim.LBFGS(
        [theta], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = expected_dpo_loss(theta, log_ref, rewards, q, beta)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(theta.detach(), dim=-1)


LOG_REF = torch.log_softmax(torch.tensor([0.3, -0.2, 0.5, -1.0], dtype=D), dim=-1)
REWARDS = torch.tensor([1.0, 0.2, -0.5, 0.6], dtype=D)
UNIFORM = torch.full((4, 4), 1 / 12, dtype=D).fill_diagonal_(0)
SKEWED = torch.tensor(
    [[0, 0.3, 0.05, 0.02], [0.01, 0, 0.2, 0.1], [0.07, 0.05, 0, 0.04], [0.06, 0.03, 0.07, 0]],
    dtype=D,
)  # any π-independent ordered-pair distribution with every pair reachable (sums to 1)


@pytest.mark.parametrize("q", [UNIFORM, SKEWED], ids=["uniform", "skewed"])
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_dpo_recovers_the_kl_regularised_optimum(q, beta):
    target = torch.softmax(LOG_REF + REWARDS / beta, dim=-1)  # π_ref·exp(r/β)/Z
    assert (target - LOG_REF.exp()).abs().max() > 0.05  # the optimum is not π_ref itself
    pi = optimise(LOG_REF, REWARDS, q, beta)
    torch.testing.assert_close(pi, target, atol=1e-6, rtol=0)


def test_expected_loss_is_stationary_at_the_optimum():
    """The derivation, checked without an optimiser: the gradient at θ = log π* vanishes, and it
    does not at θ = log π_ref."""
    beta = 0.5
    for theta0, stationary in ((LOG_REF + REWARDS / beta, True), (LOG_REF.clone(), False)):
        theta = theta0.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(
            expected_dpo_loss(theta, LOG_REF, REWARDS, UNIFORM, beta), theta
        )
        assert (grad.abs().max() < 1e-12) == stationary


def test_two_response_bandit_ratio():
    """K = 2: π(y1)/π(y2) = [π_ref(y1)/π_ref(y2)]·e^{(r1 − r2)/β}; with π_ref = (0.7, 0.3),
    r = (1, 0), β 0.5: ratio = (7/3)·e² = 17.241131."""
    log_ref = torch.log(torch.tensor([0.7, 0.3], dtype=D))
    q = torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=D)
    pi = optimise(log_ref, torch.tensor([1.0, 0.0], dtype=D), q, 0.5)
    assert float(pi[0] / pi[1]) == pytest.approx(7 / 3 * math.exp(2), abs=1e-5)
