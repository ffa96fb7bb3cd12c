"""Reward-model losses: closed-form values and properties.

Expected values are derived by hand in each docstring (math.log / math.exp of the formula),
never produced by the code under test. fp64 throughout, atol 1e-6.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.losses.reward import (
    PRM_CLASSES,
    all_pairs_loss,
    bradley_terry_loss,
    orm_score,
    orm_sequence_loss,
    orm_token_loss,
    plackett_luce_loss,
    prm_aggregate,
    prm_class_to_label,
    prm_label_to_class,
    prm_loss,
    prm_step_scores,
)
from rlhfkit.ops.masking import Aggregation

D = torch.float64
ATOL = 1e-6
finite = st.floats(-8, 8, allow_nan=False, allow_infinity=False)


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=D, requires_grad=grad)


def close(actual: torch.Tensor | float, expected: float, atol: float = ATOL) -> None:
    assert float(torch.as_tensor(actual).detach()) == pytest.approx(expected, abs=atol)


def no_grad_metrics(metrics: dict) -> None:
    assert not any(torch.is_tensor(v) and v.requires_grad for v in metrics.values())


# --- Bradley-Terry and margin (3.2, 3.3) ---------------------------------------------------


def test_bt_softplus_form_equals_neg_log_sigmoid():
    gen = torch.Generator().manual_seed(0)
    r_c, r_r = torch.randn(16, generator=gen, dtype=D) * 3, torch.randn(16, generator=gen, dtype=D)
    out = bradley_terry_loss(chosen_rewards=r_c, rejected_rewards=r_r)
    expected = -torch.log(torch.sigmoid(r_c - r_r)).mean()  # the textbook form, log first
    torch.testing.assert_close(out.loss, expected, atol=ATOL, rtol=0)
    assert out.loss.dtype == D
    no_grad_metrics(out.metrics)


def test_bt_equal_rewards_give_log2():
    """r_c = r_r: -log sigmoid(0) = log 2 whatever the common value."""
    out = bradley_terry_loss(chosen_rewards=t(0.0, 3.5, -7.0), rejected_rewards=t(0.0, 3.5, -7.0))
    close(out.loss, math.log(2))
    close(out.metrics["correct"], 1.5)  # three ties count 0.5 each


def test_bt_closed_form_and_gradient():
    """(r_c, r_r) = (2, 0): L = log(1 + e^-2) = 0.126928; dL/dr_c = -sigmoid(-2) = -0.119203."""
    r_c, r_r = t(2.0, grad=True), t(0.0, grad=True)
    out = bradley_terry_loss(chosen_rewards=r_c, rejected_rewards=r_r)
    close(out.loss, math.log(1 + math.exp(-2)))
    close(out.loss, 0.126928)
    out.loss.backward()
    close(r_c.grad[0], -1 / (1 + math.exp(2)))
    close(r_c.grad[0], -0.119203)
    close(r_r.grad[0], 0.119203)


def test_bt_metrics_are_sums():
    """Pairs (3, -1), (0, 0), (1, 2): correct 1 + 0.5 + 0, margins 4 + 0 - 1."""
    out = bradley_terry_loss(chosen_rewards=t(3, 0, 1), rejected_rewards=t(-1, 0, 2))
    m = out.metrics
    assert (float(m["pairs"]), float(m["correct"]), float(m["margin_sum"])) == (3, 1.5, 3)
    assert (float(m["chosen_sum"]), float(m["rejected_sum"])) == (4, 1)
    sp = [math.log(1 + math.exp(-4)), math.log(2), math.log(1 + math.exp(1))]
    close(m["loss_sum"], sum(sp))
    close(out.loss, sum(sp) / 3)


def test_margin_closed_forms():
    """Gap r_c - r_r = 2: m = 3 -> log(1 + e^1) = 1.313262; m = 1 -> log(1 + e^-1) = 0.313262."""
    r_c, r_r = t(2.0), t(0.0)
    close(bradley_terry_loss(chosen_rewards=r_c, rejected_rewards=r_r, margin=3.0).loss, 1.313262)
    close(bradley_terry_loss(chosen_rewards=r_c, rejected_rewards=r_r, margin=1.0).loss, 0.313262)
    close(
        bradley_terry_loss(chosen_rewards=r_c, rejected_rewards=r_r, margin=t(3.0)).loss,
        math.log(1 + math.e),
    )


def test_margin_zero_is_bt_and_loss_is_monotone_in_margin():
    r_c, r_r = t(1.0, -2.0, 0.5), t(0.0, 1.0, 0.5)
    plain = bradley_terry_loss(chosen_rewards=r_c, rejected_rewards=r_r).loss
    zero = bradley_terry_loss(chosen_rewards=r_c, rejected_rewards=r_r, margin=0.0).loss
    torch.testing.assert_close(zero, plain, atol=0, rtol=0)
    losses = [
        float(bradley_terry_loss(chosen_rewards=r_c, rejected_rewards=r_r, margin=m).loss)
        for m in (0.0, 0.5, 1.0, 2.0, 5.0)
    ]
    assert all(a < b for a, b in itertools.pairwise(losses))


def test_bt_weights_and_global_normaliser():
    """sum_i w_i l_i / normaliser; two micro-batches with the global normaliser add up."""
    r_c, r_r, w = t(1.0, 0.0, -1.0, 2.0), t(0.0, 0.0, 1.0, 0.0), t(1.0, 2.0, 0.5, 0.5)
    per_pair = [
        math.log(1 + math.exp(-1)),
        math.log(2),
        math.log(1 + math.exp(2)),
        math.log(1 + math.exp(-2)),
    ]
    weighted = sum(wi * li for wi, li in zip([1, 2, 0.5, 0.5], per_pair, strict=True))
    full = bradley_terry_loss(chosen_rewards=r_c, rejected_rewards=r_r, weights=w)
    close(full.loss, weighted / 4.0)  # default normaliser = sum of weights = 4
    parts = [
        bradley_terry_loss(
            chosen_rewards=r_c[s], rejected_rewards=r_r[s], weights=w[s], normaliser=4.0
        ).loss
        for s in (slice(0, 1), slice(1, 4))
    ]
    close(sum(parts), weighted / 4.0)


def test_low_precision_inputs_give_fp32_losses():
    """bf16 head outputs: the loss arithmetic runs in fp32 (docs/methods/index.md)."""
    r = torch.tensor([[1.0, 0.5, -0.5]], dtype=torch.bfloat16)
    mask = torch.ones(1, 3, dtype=torch.bool)
    losses = [
        bradley_terry_loss(chosen_rewards=r[0], rejected_rewards=r[0].flip(0)).loss,
        all_pairs_loss(rewards=r, scores=r, mask=mask).loss,
        plackett_luce_loss(rewards=r, mask=mask).loss,
        orm_token_loss(logits=r, labels=torch.tensor([1]), mask=mask, normaliser=1).loss,
        orm_sequence_loss(logits=r, labels=torch.tensor([1]), mask=mask).loss,
        prm_loss(logits=r, labels=torch.tensor([1])).loss,
    ]
    assert all(loss.dtype == torch.float32 for loss in losses)


def test_bt_empty_batch_is_zero_not_nan():
    out = bradley_terry_loss(chosen_rewards=t(grad=True), rejected_rewards=t())
    assert float(out.loss.detach()) == 0.0 and out.loss.requires_grad


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=8), finite)
def test_bt_swap_and_shift_properties(pairs, shift):
    """softplus(d) - softplus(-d) = d: swapping the roles raises the mean loss by mean(r_c - r_r);
    margin_sum flips sign; correct becomes pairs - correct; a common shift changes nothing."""
    r_c, r_r = t(*[p[0] for p in pairs]), t(*[p[1] for p in pairs])
    out = bradley_terry_loss(chosen_rewards=r_c, rejected_rewards=r_r)
    swapped = bradley_terry_loss(chosen_rewards=r_r, rejected_rewards=r_c)
    close(swapped.loss - out.loss, float((r_c - r_r).mean()), atol=1e-9)
    close(swapped.metrics["margin_sum"], -float(out.metrics["margin_sum"]), atol=1e-9)
    close(swapped.metrics["correct"], len(pairs) - float(out.metrics["correct"]))
    shifted = bradley_terry_loss(chosen_rewards=r_c + shift, rejected_rewards=r_r + shift)
    close(shifted.loss, out.loss.item(), atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=1, max_size=6), st.floats(0.1, 10))
def test_bt_weight_scale_property(gaps, scale):
    """Scaling all weights leaves the default-normalised loss alone and scales a fixed one."""
    r_c, r_r = t(*gaps), torch.zeros(len(gaps), dtype=D)
    w = torch.linspace(0.5, 2.0, len(gaps), dtype=D)
    base = bradley_terry_loss(chosen_rewards=r_c, rejected_rewards=r_r, weights=w)
    scaled = bradley_terry_loss(chosen_rewards=r_c, rejected_rewards=r_r, weights=w * scale)
    close(scaled.loss, base.loss.item(), atol=1e-9)
    fixed = bradley_terry_loss(
        chosen_rewards=r_c, rejected_rewards=r_r, weights=w * scale, normaliser=float(w.sum())
    )
    close(fixed.loss, scale * base.loss.item(), atol=1e-9)


# --- All pairs (3.4) ------------------------------------------------------------------------


def hand_all_pairs(rewards, scores, use_margin=False):
    """Independent reference: a Python loop over prompts and ordered pairs."""
    total, groups = 0.0, 0
    for r, s in zip(rewards, scores, strict=True):
        pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if s[i] > s[j]]
        if not pairs:
            continue
        groups += 1
        for i, j in pairs:
            m = s[i] - s[j] if use_margin else 0.0
            total += math.log(1 + math.exp(r[j] - r[i] + m)) / len(pairs)
    return total / groups


def padded(rows, fill=0.0):
    k = max(len(r) for r in rows)
    values = torch.tensor([list(r) + [fill] * (k - len(r)) for r in rows], dtype=D)  # (N, K)
    mask = torch.tensor([[j < len(r) for j in range(k)] for r in rows])  # (N, K)
    return values, mask


@pytest.mark.parametrize("use_margin", [False, True])
def test_all_pairs_equals_hand_loop(use_margin):
    rewards = [[0.3, -1.2, 2.0, 0.1], [1.0, 0.5], [0.0, 0.7, -0.4, 1.1, 0.2], [2.0, 2.0]]
    scores = [[4, 1, 3, 2], [2, 1], [5, 3, 3, 1, 2], [1, 1]]  # ties skipped; last: no pair
    r, mask = padded(rewards, fill=float("nan"))
    s, _ = padded(scores, fill=float("nan"))
    r.requires_grad_(True)
    out = all_pairs_loss(rewards=r, scores=s, mask=mask, use_margin=use_margin)
    close(out.loss, hand_all_pairs(rewards, scores, use_margin))
    assert float(out.metrics["groups"]) == 3
    assert float(out.metrics["pairs"]) == 6 + 1 + 9  # 5 scores with one tie: 10 - 1
    (grad,) = torch.autograd.grad(out.loss, r)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    assert (grad[3] == 0).all()  # the all-tied prompt gives no pair


def test_all_pairs_k9_and_k4_prompts_get_equal_weight():
    """Equal rewards: each pair costs w log 2, so with normaliser 1 each prompt totals log 2
    (36 x 1/36 and 6 x 1/6). The best completion is in K-1 pairs with dL/dr = -w/2, so its
    gradient is -(K-1) / (2 C(K,2)) = -1/K: -1/9 and -1/4."""
    scores, mask = padded([list(range(9, 0, -1)), [4, 3, 2, 1]])
    rewards = torch.zeros(2, 9, dtype=D, requires_grad=True)
    out = all_pairs_loss(rewards=rewards, scores=scores, mask=mask, normaliser=1.0)
    close(out.loss, 2 * math.log(2))
    (grad,) = torch.autograd.grad(out.loss, rewards)
    close(grad[0, 0], -1 / 9)
    close(grad[1, 0], -1 / 4)
    for row in range(2):
        one = all_pairs_loss(
            rewards=rewards[row : row + 1],
            scores=scores[row : row + 1],
            mask=mask[row : row + 1],
            normaliser=1.0,
        )
        close(one.loss, math.log(2))
    assert float(out.metrics["pairs"]) == 36 + 6


def test_all_pairs_k2_equals_bt():
    r = torch.tensor([[1.5, -0.5], [0.2, 0.9], [0.0, 3.0]], dtype=D)
    s = torch.tensor([[2.0, 1.0], [0.0, 1.0], [7.0, 4.0]], dtype=D)  # row 1: column 1 wins
    out = all_pairs_loss(rewards=r, scores=s, mask=torch.ones(3, 2, dtype=torch.bool))
    r_c, r_r = t(1.5, 0.9, 0.0), t(-0.5, 0.2, 3.0)
    bt = bradley_terry_loss(chosen_rewards=r_c, rejected_rewards=r_r)
    torch.testing.assert_close(out.loss, bt.loss, atol=ATOL, rtol=0)
    for key in ("pairs", "correct", "margin_sum", "chosen_sum", "rejected_sum"):
        close(out.metrics[key], float(bt.metrics[key]))
    margin = all_pairs_loss(
        rewards=r, scores=s, mask=torch.ones(3, 2, dtype=torch.bool), use_margin=True
    )
    bt_m = bradley_terry_loss(chosen_rewards=r_c, rejected_rewards=r_r, margin=t(1.0, 1.0, 3.0))
    torch.testing.assert_close(margin.loss, bt_m.loss, atol=ATOL, rtol=0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(finite, st.integers(0, 4)), min_size=2, max_size=6), st.randoms())
def test_all_pairs_column_permutation_property(items, rnd):
    """Pairs come from the scores, not the column order: permuting columns changes nothing."""
    order = list(range(len(items)))
    rnd.shuffle(order)
    r, s = t(*[x[0] for x in items])[None], t(*[x[1] for x in items])[None]  # (1, K)
    mask = torch.ones_like(r, dtype=torch.bool)
    a = all_pairs_loss(rewards=r, scores=s, mask=mask, use_margin=True)
    b = all_pairs_loss(rewards=r[:, order], scores=s[:, order], mask=mask, use_margin=True)
    close(b.loss, a.loss.item(), atol=1e-9)
    assert float(a.metrics["pairs"]) == float(b.metrics["pairs"])


# --- Plackett-Luce (3.5) --------------------------------------------------------------------


def test_pl_k2_equals_bt():
    r = torch.tensor([[1.0, -0.5], [0.0, 2.0]], dtype=D)
    pl = plackett_luce_loss(rewards=r, mask=torch.ones(2, 2, dtype=torch.bool))
    bt = bradley_terry_loss(chosen_rewards=r[:, 0], rejected_rewards=r[:, 1])
    torch.testing.assert_close(pl.loss, bt.loss, atol=ATOL, rtol=0)


def test_pl_closed_form_2_1_0():
    """[2, 1, 0] in order: P = e^2/(e^2+e+1) * e/(e+1) = 0.665241 * 0.731059 = 0.486330;
    -log P = log(1 + e^-1 + e^-2) + log(1 + e^-1) = 0.407606 + 0.313262 = 0.720868."""
    out = plackett_luce_loss(rewards=t(2.0, 1.0, 0.0)[None], mask=torch.ones(1, 3).bool())
    close(torch.exp(-out.loss), 0.486330)
    close(out.loss, math.log(1 + math.exp(-1) + math.exp(-2)) + math.log(1 + math.exp(-1)))
    assert float(out.metrics["top1_correct"]) == 1 and float(out.metrics["groups"]) == 1


def test_pl_permutation_probabilities_sum_to_one():
    """sum over all 4! orderings sigma of P(sigma) = 1."""
    r = t(0.3, -1.0, 2.2, 0.7)
    mask = torch.ones(1, 4, dtype=torch.bool)
    total = sum(
        float(torch.exp(-plackett_luce_loss(rewards=r[list(p)][None], mask=mask).loss))
        for p in itertools.permutations(range(4))
    )
    close(total, 1.0)


def test_pl_padding_invariance_and_finite_gradients():
    """Rows of K = 3, 1 and 4 padded to 4 with garbage equal the rows scored alone."""
    rows = [[2.0, 1.0, 0.0], [0.4], [1.0, 3.0, -2.0, 0.5]]
    r, mask = padded(rows, fill=1e6)
    r.requires_grad_(True)
    out = plackett_luce_loss(rewards=r, mask=mask)
    alone = [
        float(plackett_luce_loss(rewards=t(*x)[None], mask=torch.ones(1, len(x)).bool()).loss)
        for x in rows
    ]
    close(alone[1], 0.0)  # a single completion has probability 1
    close(out.loss, sum(alone) / 3)
    (grad,) = torch.autograd.grad(out.loss, r)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    assert float(out.metrics["top1_correct"]) == 2  # row 2's best is column 1
    nan_pad = plackett_luce_loss(rewards=torch.where(mask, r, float("nan")), mask=mask)
    close(nan_pad.loss, out.loss.item())


@settings(max_examples=50, deadline=None)
@given(st.lists(finite, min_size=1, max_size=6), finite)
def test_pl_shift_invariance_property(values, shift):
    r = t(*values)[None]
    mask = torch.ones_like(r, dtype=torch.bool)
    close(
        plackett_luce_loss(rewards=r + shift, mask=mask).loss,
        float(plackett_luce_loss(rewards=r, mask=mask).loss),
        atol=1e-9,
    )


# --- ORM (3.6) ------------------------------------------------------------------------------


def bce(z: float, y: float) -> float:
    p = 1 / (1 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def orm_batch():
    logits = torch.tensor([[0.5, -1.0, 2.0, 9.0], [1.5, 0.2, 9.0, 9.0]], dtype=D)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    return logits, torch.tensor([1, 0]), mask


def test_orm_token_loss_manual_bce():
    """seq_mean_token_mean: mean over rows of each row's mean token BCE; token_mean pools."""
    logits, labels, mask = orm_batch()
    row0 = [bce(0.5, 1), bce(-1.0, 1), bce(2.0, 1)]
    row1 = [bce(1.5, 0), bce(0.2, 0)]
    out = orm_token_loss(logits=logits, labels=labels, mask=mask, normaliser=2)
    close(out.loss, (sum(row0) / 3 + sum(row1) / 2) / 2)
    tok = orm_token_loss(
        logits=logits, labels=labels, mask=mask, normaliser=5, agg=Aggregation("token_mean")
    )
    close(tok.loss, (sum(row0) + sum(row1)) / 5)
    assert float(out.metrics["tokens"]) == 5 and float(out.metrics["sequences"]) == 2
    close(out.metrics["loss_sum"], sum(row0) + sum(row1))
    no_grad_metrics(out.metrics)


def test_orm_token_loss_without_labels_is_zero_with_graph():
    logits = torch.randn(2, 3, dtype=D, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    out = orm_token_loss(logits=logits, labels=torch.tensor([1, 0]), mask=mask, normaliser=0)
    assert float(out.loss.detach()) == 0.0
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert (grad == 0).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=1, max_size=5), st.integers(0, 1))
def test_orm_label_flip_symmetry_property(values, label):
    """BCE(z, y) = BCE(-z, 1 - y), token and sequence level."""
    z, mask = t(*values)[None], torch.ones(1, len(values), dtype=torch.bool)
    y, flipped = torch.tensor([label]), torch.tensor([1 - label])
    a = orm_token_loss(logits=z, labels=y, mask=mask, normaliser=1).loss
    close(orm_token_loss(logits=-z, labels=flipped, mask=mask, normaliser=1).loss, float(a))
    b = orm_sequence_loss(logits=z, labels=y, mask=mask).loss
    close(orm_sequence_loss(logits=-z, labels=flipped, mask=mask).loss, float(b))


def test_orm_sequence_loss_pools_before_sigmoid():
    """Logits [0, 2]: sigmoid(mean) = sigmoid(1) = 0.731059 != mean sigmoid =
    (0.5 + 0.880797) / 2 = 0.690399; with label 1, L = -log sigmoid(1)."""
    logits, mask = t(0.0, 2.0)[None], torch.ones(1, 2, dtype=torch.bool)
    out = orm_sequence_loss(logits=logits, labels=torch.tensor([1]), mask=mask)
    close(torch.exp(-out.loss), 0.731059)
    close(out.loss, math.log(1 + math.exp(-1)))
    assert abs(float(torch.exp(-out.loss)) - 0.690399) > 0.04
    logits, labels, mask = orm_batch()
    both = orm_sequence_loss(logits=logits, labels=labels, mask=mask)
    close(both.loss, (bce(1.5 / 3, 1) + bce(1.7 / 2, 0)) / 2)
    assert float(both.metrics["correct"]) == 1  # row 0 right (0.5 > 0), row 1 wrong


def logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize(
    ("mode", "kwargs", "expected"),
    [
        ("final", {}, 0.8),
        ("mean", {}, (0.9 + 0.2 + 0.6 + 0.8) / 4),
        ("min", {}, 0.2),
        ("product", {}, math.log(0.9 * 0.2 * 0.6 * 0.8)),
        ("last_m", {"last_m": 2}, (0.6 + 0.8) / 2),
        ("last_m", {"last_m": 10}, (0.9 + 0.2 + 0.6 + 0.8) / 4),
        ("flag", {"threshold": 0.5}, 1.0),
        ("flag", {"threshold": 0.1}, 0.0),
    ],
)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_orm_score_modes_on_hand_vector(mode, kwargs, expected, padding):
    """p = [0.9, 0.2, 0.6, 0.8] plus two pads of p = 0.01 on either side."""
    probs = [0.9, 0.2, 0.6, 0.8]
    row = [*probs, 0.01, 0.01] if padding == "right" else [0.01, 0.01, *probs]
    logits = t(*[logit(p) for p in row])[None]
    mask = torch.tensor([[p != 0.01 for p in row]])
    close(orm_score(logits=logits, mask=mask, mode=mode, **kwargs)[0], expected)


def test_orm_score_rejects_unknown_mode():
    with pytest.raises(ValueError, match="median"):
        orm_score(logits=torch.zeros(1, 2), mask=torch.ones(1, 2).bool(), mode="median")


@settings(max_examples=40, deadline=None)
@given(st.lists(finite, min_size=1, max_size=6), st.integers(0, 3))
def test_orm_score_padding_property(values, pads):
    """Every mode gives the same score under left and right padding."""
    z = t(*values)
    fill = torch.full((pads,), 5.0, dtype=D)
    right, left = torch.cat([z, fill])[None], torch.cat([fill, z])[None]  # (1, T + pads)
    m = torch.tensor([True] * len(values) + [False] * pads)
    for mode in ("final", "mean", "min", "product", "last_m", "flag"):
        a = orm_score(logits=right, mask=m[None], mode=mode, last_m=2)
        b = orm_score(logits=left, mask=m.flip(0)[None], mode=mode, last_m=2)
        close(a[0], float(b[0]), atol=1e-12)


# --- PRM (3.7) ------------------------------------------------------------------------------


def test_prm_class_map_round_trips():
    assert PRM_CLASSES == {-1: 0, 0: 1, 1: 2}
    labels = torch.tensor([-1, 0, 1, 1, -1])
    classes = prm_label_to_class(labels=labels)
    assert classes.tolist() == [PRM_CLASSES[x] for x in labels.tolist()]
    assert prm_class_to_label(classes=classes).tolist() == labels.tolist()
    with pytest.raises(ValueError, match="-1, 0, 1"):
        prm_label_to_class(labels=torch.tensor([2]))


def test_prm_3class_cross_entropy_hand_value():
    """Logits [0, 0, log 2] -> softmax [1/4, 1/4, 1/2]. Label +1: -log 1/2 = log 2; label -1:
    -log 1/4 = 2 log 2; -100 is ignored. Mean over 2 steps: 1.5 log 2."""
    logits = torch.tensor([[0.0, 0.0, math.log(2)]] * 3, dtype=D, requires_grad=True)
    out = prm_loss(logits=logits, labels=torch.tensor([1, -1, -100]))
    close(out.loss, 1.5 * math.log(2))
    assert float(out.metrics["steps"]) == 2 and float(out.metrics["correct"]) == 1
    close(out.metrics["loss_sum"], 3 * math.log(2))
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert (grad[2] == 0).all()
    close(prm_step_scores(logits=logits.detach())[0], 0.5)


@pytest.mark.parametrize(
    ("neutral", "expected", "steps"),
    [
        ("drop", (bce(1.0, 1) + bce(1.0, 0)) / 2, 2),
        ("positive", (bce(1.0, 1) + bce(1.0, 0) + bce(-2.0, 1)) / 3, 3),
        ("negative", (bce(1.0, 1) + bce(1.0, 0) + bce(-2.0, 0)) / 3, 3),
    ],
)
def test_prm_binary_neutral_mapping(neutral, expected, steps):
    logits = t(1.0, 1.0, -2.0)[:, None]  # (N, 1) head output
    out = prm_loss(logits=logits, labels=torch.tensor([1, -1, 0]), mode="binary", neutral=neutral)
    close(out.loss, expected)
    assert float(out.metrics["steps"]) == steps
    close(prm_step_scores(logits=logits, mode="binary")[2], 1 / (1 + math.exp(2)))


def test_prm_min_is_first_bad_step_and_aggregates():
    """Steps labelled [+1, +1, -1, -1] with P(+1) = [0.9, 0.8, 0.1, 0.3]: min = 0.1, the first
    bad step. mean 2.1/4, product 0.0216, weighted (0.9 + 1.6 + 0.3 + 1.2) / 10 = 0.4."""
    p = [0.9, 0.8, 0.1, 0.3]
    logits = torch.tensor([[0.0, 0.0, logit(x)] for x in p], dtype=D)  # P(+1) = sigmoid(c - 0)
    logits[:, 0] = -1e9  # class -1 removed, so softmax over {0, +1} is sigmoid
    scores = prm_step_scores(logits=logits)[None]  # (1, S)
    mask = torch.ones_like(scores, dtype=torch.bool)
    first_bad = [1, 1, -1, -1].index(-1)
    close(prm_aggregate(step_scores=scores, mask=mask)[0], p[first_bad])
    close(prm_aggregate(step_scores=scores, mask=mask, mode="mean")[0], 2.1 / 4)
    close(prm_aggregate(step_scores=scores, mask=mask, mode="product")[0], 0.9 * 0.8 * 0.1 * 0.3)
    close(prm_aggregate(step_scores=scores, mask=mask, mode="weighted")[0], 0.4)


def test_prm_aggregate_ignores_padded_steps():
    """[0.9, 0.5, 0.2] + pad 0.0: weighted (0.9 + 1.0 + 0.6) / 6; min 0.2; product 0.09."""
    scores, mask = t(0.9, 0.5, 0.2, 0.0)[None], torch.tensor([[True, True, True, False]])
    close(prm_aggregate(step_scores=scores, mask=mask, mode="weighted")[0], 2.5 / 6)
    close(prm_aggregate(step_scores=scores, mask=mask, mode="min")[0], 0.2)
    close(prm_aggregate(step_scores=scores, mask=mask, mode="product")[0], 0.09)
    close(prm_aggregate(step_scores=scores, mask=mask, mode="mean")[0], 1.6 / 3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=6))
def test_prm_aggregate_bounds_property(values):
    """product <= min <= mean, weighted <= max, for probabilities in [0, 1]."""
    s, m = t(*values)[None], torch.ones(1, len(values), dtype=torch.bool)
    agg = {
        k: float(prm_aggregate(step_scores=s, mask=m, mode=k)[0])
        for k in ("mean", "min", "product", "weighted")
    }
    assert agg["product"] <= agg["min"] + 1e-12 <= agg["mean"] + 2e-12
    assert min(values) - 1e-12 <= agg["weighted"] <= max(values) + 1e-12


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(finite, finite, finite, st.sampled_from([-1, 0, 1])), min_size=1, max_size=5
    ),
    finite,
)
def test_prm_3class_shift_property(rows, shift):
    """Softmax ignores a common logit shift: loss and P(+1) unchanged; labels round-trip."""
    logits = torch.tensor([r[:3] for r in rows], dtype=D)
    labels = torch.tensor([r[3] for r in rows])
    a = prm_loss(logits=logits, labels=labels)
    b = prm_loss(logits=logits + shift, labels=labels)
    close(b.loss, a.loss.item(), atol=1e-9)
    torch.testing.assert_close(
        prm_step_scores(logits=logits + shift), prm_step_scores(logits=logits), atol=1e-9, rtol=0
    )
    assert torch.equal(prm_class_to_label(classes=prm_label_to_class(labels=labels)), labels)
    expected = F.cross_entropy(logits, labels + 1)  # independent check of the class map
    close(a.loss, float(expected))


def test_pairwise_stats_hand_values():
    """Group scores [2, 1, 1] (completion 0 beats 1 and 2; 1 vs 2 is a tie, skipped) with
    rewards [0.5, 1.0, 0.5]: pairs (0,1) wrong, (0,2) tied -> correct 0 + 0.5 = 0.5 over 2
    pairs, margins -0.5 + 0 = -0.5. A padded column never counts."""
    from rlhfkit.losses.reward import pairwise_stats

    rewards = torch.tensor([[0.5, 1.0, 0.5, 9.0]], dtype=torch.float64)
    scores = torch.tensor([[2.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    stats = pairwise_stats(rewards=rewards, scores=scores, mask=mask)
    assert float(stats["pairs"]) == 2 and float(stats["correct"]) == 0.5
    assert float(stats["margin_sum"]) == pytest.approx(-0.5, abs=1e-12)


def test_pairwise_stats_equal_bt_metrics_for_pairs():
    """K = 2: the same pairs, correct and margin_sum as bradley_terry_loss."""
    from rlhfkit.losses.reward import pairwise_stats

    gen = torch.Generator().manual_seed(0)
    r = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    r[3, 1] = r[3, 0]  # a tie counts half in both
    bt = bradley_terry_loss(chosen_rewards=r[:, 0], rejected_rewards=r[:, 1]).metrics
    stats = pairwise_stats(
        rewards=r, scores=torch.tensor([[1.0, 0.0]] * 7), mask=torch.ones(7, 2, dtype=torch.bool)
    )
    for key in ("pairs", "correct", "margin_sum"):
        assert float(stats[key]) == pytest.approx(float(bt[key]), abs=1e-12)
