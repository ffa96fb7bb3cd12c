"""Gradient accumulation: the gradient does not depend on the micro-batch or rank split.

Normalisers are global (docs/methods/policy.md). For every aggregation mode the summed
gradient over any split of an 8-sequence batch into micro-batches (and into two simulated DDP
ranks whose gradients are averaged) equals the gradient of the whole-batch formula, evaluated
here directly in plain torch (not through ``aggregate``).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import rlhfkit.training.accumulate as accumulate_module
from rlhfkit.data.collate import pad_batch
from rlhfkit.losses.sft import sft_loss
from rlhfkit.models.forward import label_logprobs
from rlhfkit.models.tiny import tiny_model
from rlhfkit.ops.masking import Aggregation, aggregate, normaliser_count
from rlhfkit.training.accumulate import accumulate
from rlhfkit.types import LossOutput

B, T, D = 8, 6, 3
LENGTHS = [1, 6, 3, 0, 5, 2, 6, 4]  # row 3 has no loss token at all
MODES = [
    Aggregation("token_mean"),
    Aggregation("seq_mean_token_mean"),
    Aggregation("fixed_length", max_len=6),
    Aggregation("fixed_length", max_len=1),
    Aggregation("sum"),
]
SPLITS = {
    "1x8": [8],
    "4x2": [2, 2, 2, 2],
    "8x1": [1] * 8,
    "uneven": [3, 1, 4],
    "5+3": [5, 3],
}


def make_problem(lengths=LENGTHS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = len(lengths)
    features = torch.randn(n, T, D, generator=gen, dtype=torch.float64)
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]  # (n, T) right-padded
    # Garbage (large values) at masked positions: they must not reach the gradient.
    features[~mask] = 1e3
    theta = torch.randn(D, generator=gen, dtype=torch.float64).requires_grad_(True)
    return features, mask, theta


def per_token_loss(theta, features):
    """A non-linear per-token loss, so that every token has its own gradient."""
    z = features @ theta  # (n, T)
    return torch.sin(z) + 0.5 * z**2


def reference_grad(theta, features, mask, agg):
    """Gradient of the whole-batch formula of docs/methods/policy.md."""
    theta = theta.detach().clone().requires_grad_(True)
    loss = per_token_loss(theta, features)
    m = mask.double()
    lengths = m.sum(-1)
    nonempty = lengths > 0
    if agg.mode == "token_mean":
        total = (loss * m).sum() / m.sum()
    elif agg.mode == "seq_mean_token_mean":
        total = ((loss * m).sum(-1)[nonempty] / lengths[nonempty]).sum() / nonempty.sum()
    elif agg.mode == "fixed_length":
        total = ((loss * m).sum(-1)[nonempty] / agg.max_len).sum() / nonempty.sum()
    else:
        total = (loss * m).sum()
    (grad,) = torch.autograd.grad(total, theta)
    return total.detach(), grad


def split_rows(sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes, strict=True)]


def count_for(agg):
    """The micro-batch's share of the normaliser. ``sum`` ignores the normaliser, so any positive
    count works; the token count keeps accumulate's empty-batch check meaningful."""
    if agg.mode == "sum":
        return lambda mb: float(mb[1].sum())
    return lambda mb: float(normaliser_count(mb[1], agg))


def loss_for(theta, agg, calls=None):
    def loss_fn(mb, normaliser):
        features, mask = mb
        if calls is not None:
            calls.append(mask.shape[0])
        return LossOutput(aggregate(per_token_loss(theta, features), mask, agg, normaliser))

    return loss_fn


def accumulated_grad(theta, features, mask, agg, sizes):
    theta.grad = None
    mbs = [(features[s], mask[s]) for s in split_rows(sizes)]
    stats = accumulate(mbs, loss_for(theta, agg), count_fn=count_for(agg))
    assert stats.finite
    return stats, theta.grad.clone()


@pytest.mark.parametrize("split", list(SPLITS), ids=list(SPLITS))
@pytest.mark.parametrize("agg", MODES, ids=lambda a: f"{a.mode}{a.max_len}")
def test_micro_batch_split_invariance(agg, split):
    features, mask, theta = make_problem()
    ref_loss, ref_grad = reference_grad(theta, features, mask, agg)
    stats, grad = accumulated_grad(theta, features, mask, agg, SPLITS[split])
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-12)
    assert stats.loss == pytest.approx(float(ref_loss), abs=1e-12)
    expected_norm = {"token_mean": 27, "sum": 27}.get(agg.mode, 7)  # 27 tokens, 7 sequences
    assert stats.normaliser == expected_norm


def test_per_micro_batch_mean_would_differ():
    """Negative control: averaging per-micro-batch means (the pitfall) gives another gradient, so
    the invariance above is not vacuous."""
    features, mask, theta = make_problem()
    agg = Aggregation("token_mean")
    _, ref_grad = reference_grad(theta, features, mask, agg)
    theta.grad = None
    parts = split_rows([3, 5])  # both parts have loss tokens (own normaliser > 0)
    for s in parts:
        own = normaliser_count(mask[s], agg)
        (aggregate(per_token_loss(theta, features[s]), mask[s], agg, own) / len(parts)).backward()
    assert (theta.grad - ref_grad).abs().max() > 1e-3


class FakeDist(types.SimpleNamespace):
    """torch.distributed stand-in for one of two ranks: all_reduce adds the other rank's count."""

    def __init__(self, other_count: float):
        super().__init__()
        self.other_count = other_count

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_world_size(self, group=None):
        return 2

    def get_backend(self, group=None):
        return "gloo"

    def all_reduce(self, tensor, group=None):
        tensor += self.other_count


@pytest.mark.parametrize("agg", MODES, ids=lambda a: f"{a.mode}{a.max_len}")
def test_two_ranks_two_micro_batches(agg, monkeypatch):
    """Rank 0 holds rows 0-3 as micro-batches [2, 2], rank 1 rows 4-7 as [1, 3]. Each rank's
    gradient is computed with the all-reduced normaliser and its loss times the world size; DDP
    averages the two gradients, which must equal the whole-batch gradient."""
    features, mask, theta = make_problem()
    _, ref_grad = reference_grad(theta, features, mask, agg)
    ranks = [[slice(0, 2), slice(2, 4)], [slice(4, 5), slice(5, 8)]]
    count = count_for(agg)
    local = [sum(count((features[s], mask[s])) for s in r) for r in ranks]
    grads, losses = [], []
    for rank, slices in enumerate(ranks):
        monkeypatch.setattr(accumulate_module, "dist", FakeDist(local[1 - rank]))
        theta.grad = None
        mbs = [(features[s], mask[s]) for s in slices]
        stats = accumulate(mbs, loss_for(theta, agg), count_fn=count)
        assert stats.normaliser == sum(local)
        grads.append(theta.grad.clone())
        losses.append(stats.loss)
    torch.testing.assert_close((grads[0] + grads[1]) / 2, ref_grad, atol=1e-12, rtol=1e-12)
    assert sum(losses) == pytest.approx(float(reference_grad(theta, features, mask, agg)[0]))


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, T), min_size=1, max_size=8).filter(any),
    mode=st.sampled_from(["token_mean", "seq_mean_token_mean", "fixed_length", "sum"]),
    max_len=st.integers(1, 8),
    data=st.data(),
)
def test_property_any_split_gives_the_batch_gradient(lengths, mode, max_len, data):
    agg = Aggregation(mode, max_len=max_len)
    features, mask, theta = make_problem(lengths, seed=len(lengths))
    sizes, left = [], len(lengths)
    while left:
        sizes.append(data.draw(st.integers(1, left)))
        left -= sizes[-1]
    _, ref_grad = reference_grad(theta, features, mask, agg)
    _, grad = accumulated_grad(theta, features, mask, agg, sizes)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-10)


def test_non_finite_loss_stops():
    features, mask, theta = make_problem()
    agg = Aggregation("token_mean")
    calls: list[int] = []
    base = loss_for(theta, agg, calls)

    def loss_fn(mb, normaliser):
        out = base(mb, normaliser)
        if len(calls) == 2:
            return LossOutput(out.loss * float("nan"))
        return out

    after: list[int] = []
    theta.grad = None
    mbs = [(features[s], mask[s]) for s in split_rows([2, 2, 2, 2])]
    stats = accumulate(
        mbs, loss_fn, count_fn=count_for(agg), after_backward=lambda: after.append(1)
    )
    assert stats.finite is False
    assert len(calls) == 2  # the remaining micro-batches were not run
    assert len(after) == 1  # only the first (finite) micro-batch went through backward
    assert torch.isfinite(theta.grad).all()

    inf_fn = lambda mb, n: LossOutput(torch.tensor(float("inf")))  # noqa: E731
    assert accumulate(mbs, inf_fn, count_fn=count_for(agg)).finite is False


def test_zero_normaliser_raises():
    features, mask, theta = make_problem()
    empty = torch.zeros_like(mask)
    calls: list[int] = []
    mbs = [(features[:4], empty[:4]), (features[4:], empty[4:])]
    for agg in MODES[:3]:
        with pytest.raises(ValueError, match="normaliser"):
            accumulate(mbs, loss_for(theta, agg, calls), count_fn=count_for(agg))
    assert calls == []


def test_sum_mode_with_normaliser_count():
    features, mask, theta = make_problem()
    agg = Aggregation("sum")
    mbs = [(features[:4], mask[:4]), (features[4:], mask[4:])]
    accumulate(mbs, loss_for(theta, agg), count_fn=lambda mb: normaliser_count(mb[1], agg))


def test_backward_false_and_metrics():
    features, mask, theta = make_problem()
    agg = Aggregation("token_mean")
    ref_loss, _ = reference_grad(theta, features, mask, agg)

    def loss_fn(mb, normaliser):
        out = loss_for(theta, agg)(mb, normaliser)
        out.metrics = {"tokens": mb[1].sum().float()}
        return out

    theta.grad = None
    mbs = [(features[s], mask[s]) for s in split_rows([3, 5])]
    with torch.no_grad():
        stats = accumulate(mbs, loss_fn, count_fn=count_for(agg), backward=False)
    assert theta.grad is None
    assert stats.loss == pytest.approx(float(ref_loss), abs=1e-12)
    assert stats.metrics == {"tokens": 27.0}


# ------------------------------------------------------- a real model with the SFT loss


def sft_examples(vocab):
    from rlhfkit.types import TokenizedExample

    gen = torch.Generator().manual_seed(11)
    spec = [(9, 4), (5, 1), (12, 3), (6, 5), (8, 2), (4, 1), (11, 7), (7, 3)]
    out = []
    for n, prompt in spec:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        out.append(TokenizedExample(ids, [i >= prompt for i in range(n)]))
    return out


def label_count(batch):
    return float((batch["labels"][:, 1:] != -100).sum())


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["fp64", "fp32"])
def sft_setup(request):
    """fp64 runs the full-logits path; fp32 also exercises the chunked fused head."""
    model = tiny_model(initializer_range=0.2).to(request.param)
    examples = sft_examples(model.config.vocab_size)
    full = pad_batch(examples, pad_id=0)
    logits = model(
        input_ids=full["input_ids"],
        attention_mask=full["attention_mask"],
        position_ids=full["position_ids"],
        use_cache=False,
    ).logits
    # Reference: plain cross-entropy over the whole batch (token_mean).
    labels = full["labels"][:, 1:]
    ref = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).double(), labels.flatten(), ignore_index=-100
    )
    params = [p for p in model.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(ref, params)
    return model, examples, ref.item(), ref_grads


@pytest.mark.parametrize("sizes", [[8], [2, 2, 2, 2], [1] * 8, [3, 5]], ids=str)
def test_sft_on_tiny_model_split_invariance(sft_setup, sizes):
    model, examples, ref_loss, ref_grads = sft_setup

    def loss_fn(batch, normaliser):
        logprobs, _ = label_logprobs(model, batch)
        return sft_loss(
            logprobs=logprobs, mask=torch.ones_like(logprobs, dtype=torch.bool),
            normaliser=normaliser,
        )  # fmt: skip

    # Micro-batches padded to their own lengths (different amounts of padding per split).
    mbs = [pad_batch(examples[s], pad_id=0) for s in split_rows(sizes)]
    model.zero_grad(set_to_none=True)
    stats = accumulate(mbs, loss_fn, count_fn=label_count)
    assert stats.normaliser == 5 + 4 + 9 + 1 + 6 + 3 + 4 + 4
    assert stats.loss == pytest.approx(ref_loss, abs=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    # Log-softmax runs in fp32 even for an fp64 model: differences of about 1e-7 (max |g| 0.7).
    for p, r in zip(params, ref_grads, strict=True):
        torch.testing.assert_close(p.grad, r, atol=1e-6, rtol=1e-5)
