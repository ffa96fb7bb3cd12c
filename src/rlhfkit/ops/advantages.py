"""Advantage estimators of the policy-gradient family (docs/methods/policy.md).

Pure tensor functions. Group estimators take rewards shaped (P, G): P prompts, G samples each;
their output is broadcast over a sample's completion tokens by the caller. Token estimators
(GAE, returns-to-go) take (B, T) completion-space tensors with a ``mask``.

- ``batch_baseline``: A = r - mean(r) over the batch (includes self: O(1/B) bias).
- ``ema_baseline``: A = r - b, b an exponential moving average of batch means.
- ``leave_one_out`` (RLOO): A_i = r_i - mean_{j != i} r_j = G/(G-1) (r_i - mean).
- ``group_zscore`` (GRPO): (r - mean_G) / (std_G + eps); groups with all-equal rewards get 0.
- ``group_center`` (Dr. GRPO): r - mean_G.
- ``maxrl``: (r - p) / p with p the group's mean binary reward (0 when p = 0).
- ``greedy_baseline`` (ReMax): r(sample) - r(greedy).
- ``masked_whiten``: (A - mu) / (sigma + eps) over the masked entries (REINFORCE++, PPO).
- ``gae``: generalised advantage estimation with ``done`` flags (packing-safe); masked-out
  positions inside a row (tool output between model turns) are skipped, not terminal.
- ``returns_to_go``: discounted suffix sums of per-token rewards.
- ``process_group``: PRM step rewards normalised over every step of the group, then summed over
  the steps that end at or after each token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from rlhfkit.ops.masking import fill_masked


def _group_shape(rewards: torch.Tensor, minimum: int) -> None:
    if rewards.dim() != 2:
        raise ValueError(
            f"group rewards must be (prompts, samples), got shape {tuple(rewards.shape)}"
        )
    if rewards.shape[1] < minimum:
        raise ValueError(
            f"this estimator needs at least {minimum} samples per prompt, got {rewards.shape[1]}"
        )


def batch_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """A = r - mean(r) over the whole batch.

    Shapes:
        rewards: (B,) or (P, G); returns the same shape.
    """
    return rewards - rewards.mean()


def ema_baseline(
    rewards: torch.Tensor, baseline: float | None, decay: float = 0.9
) -> tuple[torch.Tensor, float]:
    """A = r - b with b the running baseline; returns A and the updated baseline.

    b starts at the first batch's mean; after each batch b <- decay * b + (1 - decay) * mean(r).

    Shapes:
        rewards: any; returns the same shape and a float.
    """
    mean = float(rewards.mean())
    b = mean if baseline is None else baseline
    return rewards - b, decay * b + (1.0 - decay) * mean


def leave_one_out(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = r_i - (sum_j r_j - r_i) / (G - 1).

    Shapes:
        rewards: (P, G) with G >= 2; returns (P, G).
    """
    _group_shape(rewards, 2)
    g = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (g - 1)


def _all_equal(rewards: torch.Tensor) -> torch.Tensor:
    """(P, 1) True where every reward of the group is exactly equal."""
    return (rewards == rewards[:, :1]).all(dim=1, keepdim=True)


def group_zscore(
    rewards: torch.Tensor, std: Literal["unbiased", "biased"] = "unbiased", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO: (r - mean_G) / (std_G + eps); exactly 0 for a group whose rewards are all equal.

    Shapes:
        rewards: (P, G) with G >= 2; returns (P, G).
    """
    _group_shape(rewards, 2)
    if std not in ("unbiased", "biased"):
        raise ValueError(f"std must be 'unbiased' or 'biased', got {std!r}")
    centred = rewards - rewards.mean(1, keepdim=True)
    spread = rewards.std(1, keepdim=True, correction=1 if std == "unbiased" else 0)
    out = centred / (spread + eps)
    return torch.where(_all_equal(rewards), torch.zeros_like(out), out)


def group_center(rewards: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO: r - mean_G (G/(G-1) times it is RLOO).

    Shapes:
        rewards: (P, G); returns (P, G).
    """
    _group_shape(rewards, 1)
    return rewards - rewards.mean(1, keepdim=True)


def maxrl(rewards: torch.Tensor) -> torch.Tensor:
    """MaxRL: (r - p) / p with p the group's mean (binary) reward; 0 where p = 0.

    Shapes:
        rewards: (P, G) in {0, 1}; returns (P, G).
    """
    _group_shape(rewards, 1)
    p = rewards.mean(1, keepdim=True)
    out = (rewards - p) / torch.where(p > 0, p, torch.ones_like(p))
    return torch.where(p > 0, out, torch.zeros_like(out))


def greedy_baseline(rewards: torch.Tensor, greedy_rewards: torch.Tensor) -> torch.Tensor:
    """ReMax: A = r(x, y_sample) - r(x, y_greedy), the greedy reward broadcast per prompt.

    Shapes:
        rewards: (P, G); greedy_rewards: (P,); returns (P, G).
    """
    return rewards - greedy_rewards.reshape(-1, 1)


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 1e-8,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """(x - mu) / (sigma + eps) with the unbiased masked mean and std; masked entries become 0.

    Args:
        values: Values to whiten.
        mask: True where a value counts.
        eps: Added to sigma.
        stats: Optional global ``(sum, sum of squares, count)`` (e.g. all-reduced over ranks);
            default: from this tensor.

    Shapes:
        values, mask: (B, T) or (B,); returns the same shape.
    """
    x = fill_masked(values, mask)
    total, squares, count = stats if stats is not None else (x.sum(), x.square().sum(), mask.sum())
    count = count.to(values.dtype)
    mean = total / count
    var = (squares - count * mean.square()) / (count - 1).clamp(min=1)
    out = (x - mean) / (var.clamp(min=0).sqrt() + eps)  # x, not values: finite padding
    return fill_masked(out, mask)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    dones: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, backward over the masked tokens of each row.

    With t' the next masked token after t in the same row (positions outside the mask are
    skipped, so a tool output between two model turns is not a step),
    delta_t = r_t + gamma (1 - done_t) V_{t'} - V_t and
    A_t = delta_t + gamma lam (1 - done_t) A_{t'}; returns R_t = A_t + V_t (detached inputs).
    ``done_t`` defaults to "t is the last masked token of its row", so the terminal reward
    reaches every turn of a multi-turn row (as in :func:`returns_to_go`). A packed row passes
    its own flags so that no value or advantage crosses a document boundary; a flag on a
    masked-out position (a separator) also ends the episode there. Masked-out positions hold
    0, whatever ``rewards`` and ``values`` hold there.

    Shapes:
        rewards, values, mask (and dones): (B, T); returns advantages and returns, (B, T).
    """
    rewards, values = rewards.detach(), values.detach()
    r, v = fill_masked(rewards, mask), fill_masked(values, mask)
    if dones is None:
        later = mask.flip(-1).to(torch.long).cumsum(-1).flip(-1)  # (B, T): masked tokens >= t
        dones = mask & (later == 1)
    keep = 1.0 - dones.to(values.dtype)
    adv = torch.zeros_like(v)
    running = torch.zeros_like(v[:, 0])  # (B,): A of the next masked token
    next_value = torch.zeros_like(v[:, 0])  # (B,): V of the next masked token
    for t in range(v.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * keep[:, t] * next_value - v[:, t]
        step = delta + gamma * lam * keep[:, t] * running
        adv[:, t] = fill_masked(step, mask[:, t])
        # a masked-out position passes A and V of the next masked token on unchanged
        running = torch.where(mask[:, t], step, keep[:, t] * running)
        next_value = torch.where(mask[:, t], v[:, t], keep[:, t] * next_value)
    return adv, fill_masked(adv + v, mask)


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_k gamma^k r_{s_k} over the masked tokens s_0 = t < s_1 < ... of t's row.

    Discounting counts masked tokens only: a hole in the mask (tool output between two model
    turns) is not a step, as in :func:`gae`.

    Shapes:
        rewards, mask: (B, T); returns (B, T), 0 at masked-out positions.
    """
    r = torch.where(mask, rewards, 0.0)
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        running = torch.where(mask[:, t], r[:, t] + gamma * running, running)
        out[:, t] = running
    return torch.where(mask, out, 0.0)


def process_group(
    step_rewards: Sequence[Sequence[float]],
    step_ends: Sequence[Sequence[int]],
    lengths: Sequence[int],
    eps: float = 1e-8,
) -> list[torch.Tensor]:
    """Process-reward GRPO advantages of one group.

    Step rewards are normalised over every step of every response of the group (population
    std): r~ = (r - mean) / (std + eps); then A_{i,t} = sum of r~_i^(j) over the steps j of
    response i that end at or after token t. Tokens after the last step end get 0.

    Args:
        step_rewards: Per response, its step rewards.
        step_ends: Per response, the completion index of each step's last token (increasing).
        lengths: Completion length of each response.
        eps: Added to the std (all-equal rewards give 0 advantages).

    Returns:
        Per response, a (T_i,) float64 advantage vector.
    """
    flat = torch.tensor([r for rs in step_rewards for r in rs], dtype=torch.float64)
    if flat.numel() == 0:
        raise ValueError("process_group needs at least one step reward")
    spread = flat.std(correction=0)
    normed = (flat - flat.mean()) / (spread + eps) if spread > 0 else torch.zeros_like(flat)
    out, offset = [], 0
    for rewards, ends, length in zip(step_rewards, step_ends, lengths, strict=True):
        if len(rewards) != len(ends):
            raise ValueError("each step needs one reward and one end index")
        adv = torch.zeros(length, dtype=torch.float64)
        for j, end in enumerate(ends):
            adv[: end + 1] += normed[offset + j]
        offset += len(rewards)
        out.append(adv)
    return out
