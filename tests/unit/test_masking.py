"""Masked reductions and loss aggregation: closed forms and properties.

Two sequences, per-token losses [1, 1, 1, 1, 10] (|y_1| = 5) and [1 x 9, 10] (|y_2| = 10):

- sums 14 and 19, per-sequence means 2.8 and 1.9;
- seq_mean_token_mean = (2.8 + 1.9) / 2 = 2.35;
- token_mean = (14 + 19) / (5 + 10) = 33 / 15 = 2.2;
- fixed_length(10): 14 / 10 = 1.4 and 19 / 10 = 1.9 per sequence, batch (1.4 + 1.9) / 2 = 1.65;
- sum = 33.

Padded positions hold 1000 so that any leak of a masked value is obvious.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.ops.masking import (
    Aggregation,
    aggregate,
    fill_masked,
    masked_mean,
    masked_sum,
    normaliser_count,
)

MODES = [
    Aggregation("token_mean"),
    Aggregation("seq_mean_token_mean"),
    Aggregation("fixed_length", max_len=10),
    Aggregation("sum"),
]


def book_batch() -> tuple[torch.Tensor, torch.Tensor]:
    loss = torch.full((2, 10), 1000.0, dtype=torch.float64)
    loss[0, :5] = torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0])
    loss[1] = torch.tensor([1.0] * 9 + [10.0])
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :5] = True
    mask[1] = True
    return loss, mask


def full_aggregate(loss, mask, agg):
    """Aggregate one micro-batch that is the whole batch (normaliser from this batch)."""
    return aggregate(loss, mask, agg, normaliser_count(mask, agg))


@pytest.mark.parametrize(
    ("agg", "expected"),
    [
        (Aggregation("seq_mean_token_mean"), 2.35),
        (Aggregation("token_mean"), 2.2),
        (Aggregation("fixed_length", max_len=10), 1.65),
        (Aggregation("sum"), 33.0),
    ],
    ids=["seq_mean_token_mean", "token_mean", "fixed_length", "sum"],
)
def test_closed_form_values(agg, expected):
    loss, mask = book_batch()
    assert full_aggregate(loss, mask, agg).item() == pytest.approx(expected, abs=1e-12)


def test_fixed_length_per_sequence_values():
    loss, mask = book_batch()
    agg = Aggregation("fixed_length", max_len=10)
    per_seq = [aggregate(loss[i : i + 1], mask[i : i + 1], agg, 1.0).item() for i in range(2)]
    assert per_seq == pytest.approx([1.4, 1.9], abs=1e-12)


def test_fixed_length_one_is_per_sequence_sum():
    loss, mask = book_batch()
    out = full_aggregate(loss, mask, Aggregation("fixed_length", max_len=1))
    assert out.item() == pytest.approx((14 + 19) / 2, abs=1e-12)


def test_normaliser_count():
    _, mask = book_batch()
    mask = torch.cat([mask, torch.zeros(1, 10, dtype=torch.bool)])  # an empty third row
    assert normaliser_count(mask, Aggregation("token_mean")).item() == 15
    assert normaliser_count(mask, Aggregation("seq_mean_token_mean")).item() == 2
    assert normaliser_count(mask, Aggregation("fixed_length", max_len=7)).item() == 2
    assert normaliser_count(mask, Aggregation("sum")).item() == 15  # tokens; ignored by aggregate
    assert normaliser_count(mask, Aggregation("token_mean")).dtype == torch.float64


@pytest.mark.parametrize("agg", MODES, ids=lambda a: a.mode)
def test_empty_row_changes_nothing(agg):
    """A row with no loss tokens adds nothing and does not count as a sequence."""
    loss, mask = book_batch()
    loss3 = torch.cat([loss, torch.full((1, 10), 7.0, dtype=torch.float64)])
    mask3 = torch.cat([mask, torch.zeros(1, 10, dtype=torch.bool)])
    torch.testing.assert_close(full_aggregate(loss3, mask3, agg), full_aggregate(loss, mask, agg))


def test_book_gradient_check():
    """ratio = 1 (requires grad), A = 2, masks of 4 and 7 tokens, L_max = 7, B = 2.

    The per-token objective is rho * A, so d/d rho_it = A * m_it * (aggregation weight):
    seq_mean_token_mean: A / |y_i| / B = 2/4/2 = 0.25 (short) and 2/7/2 = 0.142857 (long);
    fixed_length(7): A / L_max / B = 2/7/2 = 0.142857 everywhere;
    token_mean: A / sum_i |y_i| = 2/11 = 0.181818 (the book's A-free variant gives 1/11);
    sum: A = 2. Masked positions get exactly 0.
    """
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, :7] = True
    advantages = torch.full((2, 7), 2.0, dtype=torch.float64)
    expected = {
        "seq_mean_token_mean": ([0.25] * 4 + [0.0] * 3, [1 / 7] * 7),
        "fixed_length": ([1 / 7] * 4 + [0.0] * 3, [1 / 7] * 7),
        "token_mean": ([2 / 11] * 4 + [0.0] * 3, [2 / 11] * 7),
        "sum": ([2.0] * 4 + [0.0] * 3, [2.0] * 7),
    }
    for mode, rows in expected.items():
        agg = Aggregation(mode, max_len=7)
        ratio = torch.ones(2, 7, dtype=torch.float64, requires_grad=True)
        loss = aggregate(ratio * advantages, mask, agg, normaliser_count(mask, agg))
        (grad,) = torch.autograd.grad(loss, ratio)
        torch.testing.assert_close(
            grad, torch.tensor(rows, dtype=torch.float64), atol=1e-12, rtol=0, msg=mode
        )
    assert 2 / 4 / 2 == 0.25 and round(2 / 7 / 2, 4) == 0.1429  # the hand-derived numbers


def test_invalid_mode_and_max_len_raise():
    with pytest.raises(ValueError, match="unknown aggregation mode"):
        Aggregation("seq_mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_len"):
        Aggregation("fixed_length", max_len=0)


def test_masked_sum_and_mean_closed_form():
    loss, mask = book_batch()
    assert masked_sum(loss, mask).item() == 33
    torch.testing.assert_close(masked_sum(loss, mask, dim=-1), torch.tensor([14.0, 19.0]).double())
    assert masked_mean(loss, mask).item() == pytest.approx(2.2, abs=1e-12)
    torch.testing.assert_close(masked_mean(loss, mask, dim=-1), torch.tensor([2.8, 1.9]).double())
    # A row without any True entry has mean 0, not NaN.
    empty = torch.zeros(2, 10, dtype=torch.bool)
    assert masked_mean(loss, empty, dim=-1).tolist() == [0.0, 0.0]
    assert masked_mean(loss, empty).item() == 0.0


masks = st.integers(1, 6).flatmap(
    lambda b: st.integers(1, 8).flatmap(
        lambda t: st.lists(st.lists(st.booleans(), min_size=t, max_size=t), min_size=b, max_size=b)
    )
)


@settings(max_examples=60, deadline=None)
@given(mask_rows=masks, seed=st.integers(0, 2**16))
def test_property_masked_mean_ignores_masked_values(mask_rows, seed):
    mask = torch.tensor(mask_rows)
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(mask.shape, generator=gen, dtype=torch.float64)
    garbage = values.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), generator=gen, dtype=torch.float64) * 1e6
    torch.testing.assert_close(masked_mean(values, mask), masked_mean(garbage, mask))
    torch.testing.assert_close(masked_mean(values, mask, -1), masked_mean(garbage, mask, -1))
    # Against a plain-Python reference.
    for row, mrow, got in zip(values, mask, masked_mean(garbage, mask, -1), strict=True):
        kept = [v.item() for v, m in zip(row, mrow, strict=True) if m]
        assert got.item() == pytest.approx(sum(kept) / len(kept) if kept else 0.0, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    mask_rows=masks,
    mode=st.sampled_from(["token_mean", "seq_mean_token_mean", "fixed_length", "sum"]),
    max_len=st.integers(1, 9),
    cuts=st.lists(st.integers(0, 6), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_property_aggregate_split_invariance(mask_rows, mode, max_len, cuts, seed):
    """Summing per-micro-batch shares with the global normaliser gives the whole-batch value,
    for any split of the rows; and it equals a plain-Python evaluation of the formula."""
    mask = torch.tensor(mask_rows)
    if not mask.any():
        return
    agg = Aggregation(mode, max_len=max_len)
    loss = torch.randn(mask.shape, generator=torch.Generator().manual_seed(seed)).double()
    b = mask.shape[0]
    bounds = sorted({0, b, *(c for c in cuts if c < b)})
    parts = [(loss[i:j], mask[i:j]) for i, j in itertools.pairwise(bounds)]
    normaliser = sum(normaliser_count(m, agg) for _, m in parts)
    split = sum(aggregate(lo, m, agg, normaliser) for lo, m in parts)

    rows = [[v for v, k in zip(lr, mr, strict=True) if k] for lr, mr in zip(
        loss.tolist(), mask_rows, strict=True)]  # fmt: skip
    nonempty = [r for r in rows if r]
    if mode == "token_mean":
        expected = sum(map(sum, rows)) / sum(map(len, rows))
    elif mode == "seq_mean_token_mean":
        expected = sum(sum(r) / len(r) for r in nonempty) / len(nonempty)
    elif mode == "fixed_length":
        expected = sum(sum(r) / max_len for r in nonempty) / len(nonempty)
    else:
        expected = sum(map(sum, rows))
    assert float(split) == pytest.approx(expected, abs=1e-9)


def test_masked_out_non_finite_values_do_not_leak():
    values = torch.tensor([[1.0, float("inf"), float("nan")]])
    mask = torch.tensor([[True, False, False]])
    assert masked_sum(values, mask).item() == 1.0
    assert masked_mean(values, mask).item() == 1.0
    assert aggregate(values, mask, Aggregation("token_mean"), 1.0).item() == 1.0


@pytest.mark.parametrize("agg", MODES, ids=lambda a: a.mode)
def test_fill_masked_keeps_non_finite_padding_out_of_the_gradient(agg):
    """aggregate's where protects the loss value; fill_masked on the inputs, the gradient.

    l_t = exp(theta x_t) + theta x_t^2 with inf / NaN in x at padding: with x filled first, the
    loss and d L / d theta equal those of the same batch with finite padding. Without it, the
    value is still right but the zero gradient of a padded l_t meets exp(inf) and inf^2 in the
    backward pass (0 * inf = NaN).
    """
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[0.5, -1.0, inf, nan], [2.0, nan, -inf, 0.25]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [True, False, False, True]])
    finite = torch.where(mask, x, 3.0)  # the same batch with harmless padding

    def loss_and_grad(values: torch.Tensor, fill: bool) -> tuple[torch.Tensor, torch.Tensor]:
        theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        inputs = fill_masked(values, mask) if fill else values
        per_token = torch.exp(theta * inputs) + theta * inputs.square()  # (B, T)
        loss = aggregate(per_token, mask, agg, normaliser_count(mask, agg))
        (grad,) = torch.autograd.grad(loss, theta)
        return loss.detach(), grad

    loss, grad = loss_and_grad(x, fill=True)
    expected_loss, expected_grad = loss_and_grad(finite, fill=False)
    assert torch.isfinite(grad)
    torch.testing.assert_close((loss, grad), (expected_loss, expected_grad), rtol=0, atol=0)
    naive_loss, naive_grad = loss_and_grad(x, fill=False)
    assert naive_loss == expected_loss and torch.isnan(naive_grad)  # why fill_masked exists


def test_fill_masked_gradient_is_zero_at_padding():
    values = torch.tensor([[1.0, float("inf"), float("nan")]], requires_grad=True)
    mask = torch.tensor([[True, False, False]])
    out = fill_masked(values, mask, fill=-1.0)
    assert out.tolist() == [[1.0, -1.0, -1.0]]
    (grad,) = torch.autograd.grad((out * 2.0).sum(), values)
    assert grad.tolist() == [[2.0, 0.0, 0.0]]
