"""Selection from a reward matrix: rejection sampling, best-of-N, difficulty bands (RLHF ch. 9).

``R`` is the (M, N) matrix of rewards of N completions for each of M prompts. Indices are
0-based; a flat index k names completion ``k mod N`` of prompt ``k // N``. Ties always go to the
lower index, so every selection is a deterministic function of ``R`` (and of the seed for the
random controls).

- ``top_per_prompt``: argmax_j R_ij for every prompt.
- ``top_k_overall``: the K largest entries of ``R.flatten()``, descending.
- ``random_per_prompt`` / ``random_k_overall``: the matched random controls (same counts).
- ``bon_kl``: the analytic KL of best-of-n to the base policy, log n - (n - 1)/n.
- ``bon_kl_exact``: the exact KL when the base policy spreads over M equiprobable outcomes with
  distinct rewards.
- ``pass_rate_band``: which prompts have a pass rate inside a band (offline difficulty filter).

Skipped completions (NaN rewards) are never selected by the reward-based rules.
"""

from __future__ import annotations

import math

import torch

SELECTIONS = ("top_per_prompt", "top_k_overall", "random_per_prompt", "random_k_overall")
"""Names accepted by :func:`select`."""


def _check(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty (M, N) matrix, got {tuple(rewards.shape)}")


def top_per_prompt(rewards: torch.Tensor) -> list[tuple[int, int]]:
    """The best completion of every prompt: (i, argmax_j R_ij), ties to the lowest j.

    Prompts whose completions were all skipped (NaN) are left out.

    Shapes:
        rewards: (M, N).
    """
    _check(rewards)
    filled = torch.nan_to_num(rewards.double(), nan=-math.inf)  # (M, N)
    out = []
    for i, row in enumerate(filled):
        if (row > -math.inf).any():
            out.append((i, int(torch.argmax(row))))  # argmax returns the first maximum
    return out


def top_k_overall(rewards: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` largest rewards of the whole matrix, descending; ties to the lower flat index.

    Shapes:
        rewards: (M, N).

    Returns:
        (prompt, completion) pairs; fewer than ``k`` when fewer rewards are scored.
    """
    _check(rewards)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    flat = rewards.double().flatten()  # (M*N,)
    scored = torch.nonzero(~torch.isnan(flat)).flatten()  # (S,) ascending
    order = torch.sort(flat[scored], descending=True, stable=True).indices  # (S,)
    n = rewards.shape[1]
    return [(int(f) // n, int(f) % n) for f in scored[order[:k]]]


def random_per_prompt(rewards: torch.Tensor, seed: int) -> list[tuple[int, int]]:
    """A uniformly random scored completion of every prompt (the control of top_per_prompt)."""
    _check(rewards)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, row in enumerate(rewards):
        scored = torch.nonzero(~torch.isnan(row)).flatten()  # (S_i,)
        if len(scored):
            out.append((i, int(scored[torch.randint(len(scored), (1,), generator=gen)])))
    return out


def random_k_overall(rewards: torch.Tensor, k: int, seed: int) -> list[tuple[int, int]]:
    """``k`` scored completions drawn uniformly without replacement (control of top_k_overall)."""
    _check(rewards)
    gen = torch.Generator().manual_seed(seed)
    flat = rewards.double().flatten()  # (M*N,)
    scored = torch.nonzero(~torch.isnan(flat)).flatten()  # (S,)
    chosen = scored[torch.randperm(len(scored), generator=gen)[:k]].sort().values
    n = rewards.shape[1]
    return [(int(f) // n, int(f) % n) for f in chosen]


def select(
    rewards: torch.Tensor, mode: str, *, k: int | None = None, seed: int = 0
) -> list[tuple[int, int]]:
    """Dispatch to one of :data:`SELECTIONS`; ``k`` is needed by the ``*_k_overall`` modes."""
    if mode not in SELECTIONS:
        raise ValueError(f"unknown selection {mode!r}; choose from {', '.join(SELECTIONS)}")
    if mode.endswith("k_overall") and k is None:
        raise ValueError(f"selection {mode!r} needs k")
    return {
        "top_per_prompt": lambda: top_per_prompt(rewards),
        "top_k_overall": lambda: top_k_overall(rewards, k),
        "random_per_prompt": lambda: random_per_prompt(rewards, seed),
        "random_k_overall": lambda: random_k_overall(rewards, k, seed),
    }[mode]()


def bon_kl(n: int) -> float:
    """Analytic KL(pi_BoN || pi) of best-of-n: log n - (n - 1)/n (Stiennon 2020; Beirami 2024).

    Exact for continuous rewards without ties; an upper bound otherwise.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def bon_kl_exact(outcomes: int, n: int) -> float:
    """KL(pi_BoN || pi) when pi is uniform over ``outcomes`` outcomes with distinct rewards.

    With outcomes ranked m = 1..M by reward, pi_BoN(y_(m)) = (m/M)^n - ((m-1)/M)^n, so
    KL = sum_m pi_BoN(m) log(M pi_BoN(m)). It approaches :func:`bon_kl` from below as M grows.
    """
    if outcomes < 1 or n < 1:
        raise ValueError(f"need outcomes >= 1 and n >= 1, got {outcomes}, {n}")
    m = torch.arange(1, outcomes + 1, dtype=torch.float64)  # (M,)
    p = (m / outcomes) ** n - ((m - 1) / outcomes) ** n  # (M,)
    p = p[p > 0]
    return float((p * torch.log(outcomes * p)).sum())


def pass_rate_band(correct: torch.Tensor, low: float = 0.2, high: float = 0.8) -> torch.Tensor:
    """Which prompts to keep: pass rate c/N inside [low, high], both ends included.

    Args:
        correct: (M, N) booleans (or 0/1), one row of N samples per prompt.
        low: Smallest kept pass rate (default 0.2).
        high: Largest kept pass rate (default 0.8).

    Returns:
        (M,) booleans. With N = 16 and the defaults this keeps exactly c in {4, ..., 12}.
    """
    if correct.dim() != 2:
        raise ValueError(f"correct must be (M, N), got {tuple(correct.shape)}")
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got [{low}, {high}]")
    counts = correct.to(torch.int64).sum(dim=1)  # (M,)
    n = correct.shape[1]
    # integer comparison: c >= low*N and c <= high*N, with a tolerance for the float product
    return (counts >= math.ceil(low * n - 1e-9)) & (counts <= math.floor(high * n + 1e-9))
