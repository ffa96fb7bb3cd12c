"""Reward-model losses and scores (docs/methods/reward_models.md).

Pairwise (Bradley-Terry, margin, all pairs), listwise (Plackett-Luce), outcome (ORM) and
process (PRM) reward models. Every loss returns this micro-batch's *share* of the batch loss:
a sum divided by a global ``normaliser`` (summed over micro-batches and ranks by the caller);
the defaults are the local counts. Metrics are detached *sums*, so that they add up across
micro-batches.

The file is about 500 lines, over the ~400 guideline: it holds the whole reward-model family
(one loss family per file). The PRM part (class map, loss, step scores, aggregators)
is the natural piece to move out if it grows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from rlhfkit.losses._common import Number, detached_sums, safe_div
from rlhfkit.ops.masking import (
    Aggregation,
    aggregate,
    last_token_index,
    masked_mean,
    masked_sum,
)
from rlhfkit.types import LossOutput

PRM_CLASSES: dict[int, int] = {-1: 0, 0: 1, 1: 2}
"""PRM step label -> class index of the 3-class head (class = label + 1)."""
IGNORE_INDEX = -100


def _fp(x: torch.Tensor) -> torch.Tensor:
    """Cast to the loss dtype: fp64 stays fp64, everything else becomes fp32."""
    return x.double() if x.dtype == torch.float64 else x.float()


def bradley_terry_loss(
    *,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: Number | None = None,
    weights: torch.Tensor | None = None,
    normaliser: Number | None = None,
) -> LossOutput:
    """Bradley-Terry pairwise loss, optionally with the Llama 2 margin (Touvron 2023).

    l_i = -log sigmoid(r_c - r_r - m) = softplus(r_r - r_c + m)
    L = sum_i w_i l_i / normaliser

    Args:
        chosen_rewards: Scalar reward of each chosen completion.
        rejected_rewards: Scalar reward of each rejected completion.
        margin: m >= 0 per pair or shared (0 gives plain BT).
        weights: Per-pair weights w_i (default 1).
        normaliser: Global normaliser; default the local sum of weights.

    Returns:
        LossOutput with metric sums ``pairs``, ``correct`` (1[r_c > r_r], ties 0.5),
        ``margin_sum`` (r_c - r_r), ``chosen_sum``, ``rejected_sum`` and ``loss_sum``
        (sum_i w_i l_i).

    Shapes:
        chosen_rewards, rejected_rewards, weights, margin: (N,); loss scalar.
    """
    r_c, r_r = _fp(chosen_rewards), _fp(rejected_rewards)
    diff = r_c - r_r  # (N,)
    m = 0.0 if margin is None else torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    per_pair = F.softplus(m - diff)  # (N,)
    w = torch.ones_like(diff) if weights is None else weights.to(diff.dtype)
    total = (w * per_pair).sum()
    loss = safe_div(total, w.sum() if normaliser is None else normaliser)
    metrics = {
        "pairs": torch.tensor(float(diff.numel()), device=diff.device),
        "correct": (diff > 0).sum() + 0.5 * (diff == 0).sum(),
        "margin_sum": diff.sum(),
        "chosen_sum": r_c.sum(),
        "rejected_sum": r_r.sum(),
        "loss_sum": total,
    }
    return LossOutput(loss=loss, metrics=detached_sums(metrics))


def pairwise_stats(
    *, rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Pairwise accuracy sums over every ordered pair of a group with different scores.

    For each group n and completions i, j with scores[n, i] > scores[n, j]: ``pairs`` counts
    them, ``correct`` adds 1[r_i > r_j] + 0.5 * 1[r_i == r_j], ``margin_sum`` adds r_i - r_j.
    With K = 2 these are the Bradley-Terry metrics; they give every pairwise or K-wise loss
    the same training accuracy.

    Shapes:
        rewards, scores, mask: (N, K); returns detached fp64 scalars.
    """
    r = _fp(rewards).detach()
    diff = r[:, :, None] - r[:, None, :]  # (N, K, K): r_i - r_j
    both = mask[:, :, None] & mask[:, None, :]  # (N, K, K)
    valid = both & (scores[:, :, None] > scores[:, None, :])  # (N, K, K): i preferred to j
    wins = (diff > 0).to(r.dtype) + 0.5 * (diff == 0).to(r.dtype)
    metrics = {
        "pairs": valid.sum(),
        "correct": torch.where(valid, wins, 0.0).sum(),
        "margin_sum": torch.where(valid, diff, 0.0).sum(),
    }
    return detached_sums(metrics)


def all_pairs_loss(
    *,
    rewards: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    use_margin: bool = False,
    normaliser: Number | None = None,
) -> LossOutput:
    """InstructGPT all-pairs BT loss: every prompt totals weight 1 (Ouyang 2022).

    For prompt n with P_n = |{(i, j): s_i > s_j}| ordered pairs (ties skipped):
    L = sum_n (1/P_n) sum_{s_i > s_j} softplus(r_j - r_i + m_ij) / normaliser,
    m_ij = s_i - s_j with ``use_margin`` else 0. For a full strict ranking P_n = C(K, 2).

    Args:
        rewards: Model rewards of each completion.
        scores: Ranking scores (higher is better); only their order matters without margin.
        mask: True where completion k of prompt n exists.
        use_margin: Use the score gap as the BT margin.
        normaliser: Global normaliser; default the number of prompts with >= 1 pair.

    Returns:
        LossOutput with the :func:`bradley_terry_loss` metrics (unweighted sums over the
        pairs) plus ``groups`` (prompts with >= 1 pair).

    Shapes:
        rewards, scores, mask: (N, K); loss scalar.
    """
    r = torch.where(mask, _fp(rewards), 0.0)  # (N, K); padding never reaches the math
    s = torch.where(mask, scores.to(r.dtype), 0.0)  # (N, K)
    valid = mask[:, :, None] & mask[:, None, :]  # (N, K, K)
    better = valid & (s[:, :, None] > s[:, None, :])  # (N, K, K): i ranked above j
    n_pairs = better.sum((1, 2))  # (N,)
    weight = 1.0 / n_pairs.clamp(min=1).to(r.dtype)  # (N,)
    shape = better.shape
    chosen = r[:, :, None].expand(shape)[better]  # (P,)
    rejected = r[:, None, :].expand(shape)[better]  # (P,)
    gap = (s[:, :, None] - s[:, None, :])[better] if use_margin else None  # (P,)
    groups = (n_pairs > 0).sum()
    out = bradley_terry_loss(
        chosen_rewards=chosen,
        rejected_rewards=rejected,
        margin=gap,
        weights=weight[:, None, None].expand(shape)[better],  # (P,)
        normaliser=groups if normaliser is None else normaliser,
    )
    out.metrics["groups"] = groups.detach().to(torch.float64)
    return out


def plackett_luce_loss(
    *, rewards: torch.Tensor, mask: torch.Tensor, normaliser: Number | None = None
) -> LossOutput:
    """Plackett-Luce listwise loss of a ranking (Plackett 1975; Starling, Zhu 2023).

    P(sigma) = prod_k exp(r_k) / sum_{j >= k} exp(r_j), with the columns in ranked order;
    -log P = sum_k [logsumexp_{j >= k} r_j - r_k], computed with ``logcumsumexp`` over the
    reversed columns. Padding is -inf inside the log-sum-exp and masked out of the sum.
    L = sum_n -log P_n / normaliser.

    Args:
        rewards: Rewards in ranked order (column 0 = best).
        mask: True on the valid columns, a prefix of each row (variable K).
        normaliser: Global normaliser; default the number of rows with >= 1 valid column.

    Returns:
        LossOutput with metric sums ``groups``, ``loss_sum`` and ``top1_correct``
        (1[argmax_k r_k == 0], first index on ties).

    Shapes:
        rewards, mask: (N, K); loss scalar.
    """
    r = _fp(rewards)
    padded = torch.where(mask, r, float("-inf"))  # (N, K)
    tail_lse = torch.logcumsumexp(padded.flip(-1), dim=-1).flip(-1)  # (N, K)
    terms = torch.where(mask, tail_lse - torch.where(mask, r, 0.0), 0.0)  # (N, K)
    per_row = terms.sum(-1)  # (N,)
    has_any = mask.any(-1)  # (N,)
    groups = has_any.sum()
    total = per_row.sum()
    loss = safe_div(total, groups if normaliser is None else normaliser)
    metrics = {
        "groups": groups,
        "loss_sum": total,
        "top1_correct": ((padded.argmax(-1) == 0) & has_any).sum(),
    }
    return LossOutput(loss=loss, metrics=detached_sums(metrics))


def orm_token_loss(
    *,
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    normaliser: Number,
    agg: Aggregation | None = None,
) -> LossOutput:
    """Token-level outcome-RM binary cross-entropy (Cobbe 2021).

    p_t = sigmoid(z_t); the sequence label y in {0, 1} is copied to every completion token;
    l_t = -[y log p_t + (1 - y) log(1 - p_t)], reduced by ``aggregate`` (default
    ``seq_mean_token_mean``: L = (1/B) sum_i (1/|y_i|) sum_t l_it).

    Args:
        logits: Per-token head outputs z_t.
        labels: Outcome label of each sequence (1 = correct).
        mask: True on the completion tokens that carry the label.
        normaliser: Global normaliser of ``agg`` (see ``ops.masking.normaliser_count``).
        agg: Aggregation mode.

    Returns:
        LossOutput with metric sums ``tokens``, ``sequences`` and ``loss_sum``. A batch with
        no labelled token gives ``logits.sum() * 0`` (graph kept, no NaN).

    Shapes:
        logits, mask: (B, T); labels: (B,); loss scalar.
    """
    agg = agg or Aggregation("seq_mean_token_mean")
    z = _fp(logits)
    target = labels.to(z.dtype)[:, None].expand_as(z)  # (B, T)
    per_token = F.binary_cross_entropy_with_logits(z, target, reduction="none")  # (B, T)
    empty = not bool(mask.any())
    loss = logits.sum() * 0 if empty else aggregate(per_token, mask, agg, normaliser)
    metrics = {
        "tokens": mask.sum(),
        "sequences": mask.any(-1).sum(),
        "loss_sum": masked_sum(per_token, mask),
    }
    return LossOutput(loss=loss, metrics=detached_sums(metrics))


def orm_sequence_loss(
    *,
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    normaliser: Number | None = None,
) -> LossOutput:
    """Sequence-level outcome-RM BCE with the sigmoid after pooling (Lyu 2025).

    pbar_i = sigmoid((1/|y_i|) sum_t z_it); l_i = -[y_i log pbar_i + (1 - y_i) log(1 - pbar_i)];
    L = sum_i l_i / normaliser over the sequences with >= 1 token.

    Args:
        logits: Per-token head outputs z_t.
        labels: Outcome label of each sequence (1 = correct).
        mask: True on the tokens to pool.
        normaliser: Global normaliser; default the number of sequences with >= 1 token.

    Returns:
        LossOutput with metric sums ``sequences``, ``loss_sum`` and ``correct``
        (1[pbar > 0.5] == y).

    Shapes:
        logits, mask: (B, T); labels: (B,); loss scalar.
    """
    z = _fp(logits)
    pooled = masked_mean(z, mask, dim=-1)  # (B,)
    target = labels.to(z.dtype)  # (B,)
    per_seq = F.binary_cross_entropy_with_logits(pooled, target, reduction="none")  # (B,)
    has_any = mask.any(-1)  # (B,)
    total = torch.where(has_any, per_seq, 0.0).sum()
    sequences = has_any.sum()
    if not bool(has_any.any()):
        loss = logits.sum() * 0
    else:
        loss = safe_div(total, sequences if normaliser is None else normaliser)
    correct = ((pooled > 0) == (target > 0.5)) & has_any
    metrics = {"sequences": sequences, "loss_sum": total, "correct": correct.sum()}
    return LossOutput(loss=loss, metrics=detached_sums(metrics))


def _score_final(z: torch.Tensor, mask: torch.Tensor, last_m: int, tau: float) -> torch.Tensor:
    return torch.sigmoid(z).gather(-1, last_token_index(mask)[:, None]).squeeze(-1)  # (B,)


def _score_mean(z: torch.Tensor, mask: torch.Tensor, last_m: int, tau: float) -> torch.Tensor:
    return masked_mean(torch.sigmoid(z), mask, dim=-1)


def _score_min(z: torch.Tensor, mask: torch.Tensor, last_m: int, tau: float) -> torch.Tensor:
    return torch.where(mask, torch.sigmoid(z), float("inf")).amin(-1)


def _score_product(z: torch.Tensor, mask: torch.Tensor, last_m: int, tau: float) -> torch.Tensor:
    return masked_sum(F.logsigmoid(z), mask, dim=-1)  # log prod p_t, stable for tiny p_t


def _score_last_m(z: torch.Tensor, mask: torch.Tensor, last_m: int, tau: float) -> torch.Tensor:
    from_end = mask.flip(-1).cumsum(-1).flip(-1)  # (B, T): masked tokens at positions >= t
    return masked_mean(torch.sigmoid(z), mask & (from_end <= last_m), dim=-1)


def _score_flag(z: torch.Tensor, mask: torch.Tensor, last_m: int, tau: float) -> torch.Tensor:
    return (mask & (torch.sigmoid(z) < tau)).any(-1).to(z.dtype)


ORM_SCORERS: dict[str, Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]] = {
    "final": _score_final,
    "mean": _score_mean,
    "min": _score_min,
    "product": _score_product,
    "last_m": _score_last_m,
    "flag": _score_flag,
}


def orm_score(
    *,
    logits: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "final",
    last_m: int = 1,
    threshold: float = 0.5,
) -> torch.Tensor:
    """Inference score of an outcome RM from per-token p_t = sigmoid(z_t).

    Modes: ``final`` p at the last masked token (left or right padding); ``mean`` (1/T) sum p_t;
    ``min`` min_t p_t; ``product`` sum_t log p_t (the log of prod_t p_t); ``last_m`` the mean of
    the last ``last_m`` masked p_t; ``flag`` 1.0 if any p_t < ``threshold`` else 0.0.

    Args:
        logits: Per-token head outputs z_t.
        mask: True on the completion tokens (each row needs >= 1).
        mode: One of ``ORM_SCORERS``.
        last_m: m of ``last_m``.
        threshold: tau of ``flag``.

    Returns:
        One score per sequence (fp32, or fp64 for fp64 logits).

    Shapes:
        logits, mask: (B, T); returns (B,).
    """
    if mode not in ORM_SCORERS:
        raise ValueError(f"unknown orm_score mode {mode!r}; choose one of {sorted(ORM_SCORERS)}")
    return ORM_SCORERS[mode](_fp(logits), mask, last_m, threshold)


def prm_label_to_class(*, labels: torch.Tensor) -> torch.Tensor:
    """Map PRM step labels {-1, 0, +1} to class indices {0, 1, 2} (``PRM_CLASSES``).

    Shapes:
        labels: any shape; returns the same shape (int64).
    """
    bad = (labels < -1) | (labels > 1)
    if bool(bad.any()):
        raise ValueError(f"PRM labels must be in {{-1, 0, 1}}, got {labels[bad].unique().tolist()}")
    return labels.long() + 1  # PRM_CLASSES is label + 1


def prm_class_to_label(*, classes: torch.Tensor) -> torch.Tensor:
    """Map class indices {0, 1, 2} back to PRM step labels {-1, 0, +1}.

    Shapes:
        classes: any shape; returns the same shape (int64).
    """
    return classes.long() - 1


PrmTerms = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_NEUTRAL_TARGET: dict[str, float | None] = {"drop": None, "positive": 1.0, "negative": 0.0}


def _prm_3class(logits: torch.Tensor, labels: torch.Tensor, neutral: str) -> PrmTerms:
    valid = labels != IGNORE_INDEX  # (N,)
    classes = prm_label_to_class(labels=torch.where(valid, labels, 0))  # (N,)
    per_step = F.cross_entropy(_fp(logits), classes, reduction="none")  # (N,)
    return per_step, valid, logits.argmax(-1) == classes


def _prm_binary(logits: torch.Tensor, labels: torch.Tensor, neutral: str) -> PrmTerms:
    z = _fp(logits.reshape(labels.shape))  # (N,); (N, 1) heads are flattened
    neutral_target = _NEUTRAL_TARGET[neutral]
    valid = (labels != IGNORE_INDEX) & ((labels != 0) | (neutral_target is not None))  # (N,)
    target = torch.where(labels == 0, neutral_target or 0.0, (labels > 0).to(z.dtype))  # (N,)
    target = target.to(z.dtype)
    per_step = F.binary_cross_entropy_with_logits(z, target, reduction="none")  # (N,)
    return per_step, valid, (z > 0) == (target > 0.5)


PRM_LOSS_MODES: dict[str, Callable[[torch.Tensor, torch.Tensor, str], PrmTerms]] = {
    "3class": _prm_3class,
    "binary": _prm_binary,
}


def prm_loss(
    *,
    logits: torch.Tensor,
    labels: torch.Tensor,
    normaliser: Number | None = None,
    mode: Literal["3class", "binary"] = "3class",
    neutral: Literal["drop", "positive", "negative"] = "drop",
) -> LossOutput:
    """Process-RM step loss at the step-end tokens (Lightman 2023).

    ``3class``: l = -log softmax(z)[c], c = label + 1 ({-1, 0, +1} -> {0, 1, 2}).
    ``binary``: l = BCE(z, y) with y = 1 for +1, 0 for -1, and the neutral label 0 mapped by
    ``neutral`` (``drop`` excludes it). L = sum_steps l / normaliser. Labels equal to -100 are
    ignored, so a flattened token-level label row may be passed directly.

    Args:
        logits: Head outputs at the step-end tokens.
        labels: Step labels in {-1, 0, +1} (or -100).
        normaliser: Global normaliser; default the number of counted steps.
        mode: ``3class`` or ``binary``.
        neutral: Binary-mode mapping of the neutral label.

    Returns:
        LossOutput with metric sums ``steps``, ``correct`` (argmax == class, or sign agreement
        for binary) and ``loss_sum``.

    Shapes:
        logits: (N, 3) for 3class, (N,) or (N, 1) for binary; labels: (N,); loss scalar.
    """
    if mode not in PRM_LOSS_MODES or neutral not in _NEUTRAL_TARGET:
        raise ValueError(f"unknown prm_loss mode {mode!r} or neutral mapping {neutral!r}")
    prm_label_to_class(labels=labels[labels != IGNORE_INDEX])  # raises on labels outside {-1, 0, 1}
    per_step, valid, correct = PRM_LOSS_MODES[mode](logits, labels, neutral)
    total = torch.where(valid, per_step, 0.0).sum()
    steps = valid.sum()
    if not bool(valid.any()):
        loss = logits.sum() * 0
    else:
        loss = safe_div(total, steps if normaliser is None else normaliser)
    metrics = {"steps": steps, "correct": (correct & valid).sum(), "loss_sum": total}
    return LossOutput(loss=loss, metrics=detached_sums(metrics))


def prm_step_scores(*, logits: torch.Tensor, mode: str = "3class") -> torch.Tensor:
    """Step score P(+1): softmax class 2 (``3class``) or sigmoid(z) (``binary``).

    Shapes:
        logits: (..., 3) for 3class; (...) or (..., 1) for binary (a trailing size-1
        dimension is removed); returns (...).
    """
    z = _fp(logits)
    if mode == "3class":
        return torch.softmax(z, dim=-1)[..., PRM_CLASSES[1]]
    if mode == "binary":
        return torch.sigmoid(z.squeeze(-1) if z.dim() > 1 and z.shape[-1] == 1 else z)
    raise ValueError(f"unknown PRM mode {mode!r}; choose 3class or binary")


def _agg_weighted(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    step_index = mask.cumsum(-1).to(scores.dtype)  # (B, S): 1..n over the valid steps
    weights = torch.where(mask, step_index, 0.0)  # (B, S)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1)  # (B, S), rows sum to 1
    return (weights * torch.where(mask, scores, 0.0)).sum(-1)


PRM_AGGREGATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean": lambda s, m: masked_mean(s, m, dim=-1),
    "min": lambda s, m: torch.where(m, s, float("inf")).amin(-1),
    "product": lambda s, m: torch.where(m, s, 1.0).prod(-1),
    "weighted": _agg_weighted,
}


def prm_aggregate(
    *, step_scores: torch.Tensor, mask: torch.Tensor, mode: str = "min"
) -> torch.Tensor:
    """Solution score from step scores p_s (Lightman 2023).

    ``mean`` (1/S) sum_s p_s; ``min`` min_s p_s (fail fast); ``product`` prod_s p_s;
    ``weighted`` sum_s w_s p_s with w_s = s / sum_{s'} s' over the valid steps s = 1..S
    (favours later steps).

    Args:
        step_scores: P(+1) of each step.
        mask: True on the valid steps (each row needs >= 1).
        mode: One of ``PRM_AGGREGATORS``.

    Shapes:
        step_scores, mask: (B, S); returns (B,).
    """
    if mode not in PRM_AGGREGATORS:
        raise ValueError(f"unknown prm_aggregate mode {mode!r}; choose {sorted(PRM_AGGREGATORS)}")
    return PRM_AGGREGATORS[mode](step_scores, mask)
