"""Training core: LR schedule, AdamW groups, clipping, master weights, precision, checkpoints."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rlhfkit.models.precision as precision_module
from rlhfkit.models.precision import resolve_precision
from rlhfkit.models.tiny import tiny_model
from rlhfkit.training.checkpoint import (
    TrainerState,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from rlhfkit.training.optim import build_optimizer, build_scheduler, clip_grad_norm, lr_factor
from rlhfkit.training.precision import MasterWeights

# ---------------------------------------------------------------- learning-rate schedule


@pytest.mark.parametrize(
    ("step", "linear", "cosine"),
    [
        # total 10, warmup 2. Warmup: (step + 1) / (warmup + 1).
        (0, 1 / 3, 1 / 3),
        (1, 2 / 3, 2 / 3),
        # Decay: progress = (step - 2) / 8; linear 1 - p; cosine (1 + cos(pi p)) / 2.
        (2, 1.0, 1.0),
        (4, 0.75, 0.5 + math.sqrt(2) / 4),  # p = 1/4, cos(pi/4) = sqrt(2)/2
        (6, 0.5, 0.5),  # p = 1/2
        (8, 0.25, 0.5 - math.sqrt(2) / 4),  # p = 3/4
        (10, 0.0, 0.0),  # p = 1
        (13, 0.0, 0.0),  # past the end: clamped at p = 1
    ],
)
def test_lr_factor_closed_form(step, linear, cosine):
    kw = {"total_steps": 10, "warmup_steps": 2}
    assert lr_factor(step, schedule="linear", **kw) == pytest.approx(linear, abs=1e-12)
    assert lr_factor(step, schedule="cosine", **kw) == pytest.approx(cosine, abs=1e-12)
    expected_constant = (step + 1) / 3 if step < 2 else 1.0
    assert lr_factor(step, schedule="constant", **kw) == pytest.approx(expected_constant)


def test_lr_factor_without_warmup_and_unknown_schedule():
    assert lr_factor(0, total_steps=4, warmup_steps=0, schedule="linear") == 1.0
    assert lr_factor(3, total_steps=4, warmup_steps=0, schedule="linear") == 0.25
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(5, total_steps=10, warmup_steps=0, schedule="step")  # type: ignore[arg-type]


def test_scheduler_follows_lr_factor():
    param = nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer([param], lr=2.0)
    sched = build_scheduler(opt, total_steps=10, warmup_ratio=0.2, schedule="cosine")  # warmup 2
    seen = []
    for _ in range(11):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    expected = [
        2.0 * lr_factor(s, total_steps=10, warmup_steps=2, schedule="cosine") for s in range(11)
    ]
    assert seen == pytest.approx(expected, abs=1e-12)
    assert seen[0] == pytest.approx(2 / 3) and seen[2] == pytest.approx(2.0) and seen[10] == 0


# ---------------------------------------------------------------- optimiser


def test_weight_decay_skips_one_dimensional_params():
    """With zero gradients AdamW only applies decoupled decay: w <- w (1 - lr * wd)."""
    matrix = nn.Parameter(torch.full((3, 2), 2.0))
    vector = nn.Parameter(torch.full((4,), 2.0))
    opt = build_optimizer([matrix, vector], lr=0.1, weight_decay=0.5)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {id(matrix): 0.5, id(vector): 0.0}
    matrix.grad = torch.zeros_like(matrix)
    vector.grad = torch.zeros_like(vector)
    opt.step()
    torch.testing.assert_close(matrix.detach(), torch.full((3, 2), 2.0 * (1 - 0.1 * 0.5)))
    torch.testing.assert_close(vector.detach(), torch.full((4,), 2.0))


def test_clip_grad_norm():
    """Gradients (3, 4) and (12): global norm sqrt(9 + 16 + 144) = 13."""
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(1))
    unused = nn.Parameter(torch.zeros(3))  # no gradient: ignored
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    assert clip_grad_norm([a, b, unused], None) == pytest.approx(13.0)
    torch.testing.assert_close(b.grad, torch.tensor([12.0]))  # measuring does not clip
    assert clip_grad_norm([a, b, unused], 6.5) == pytest.approx(13.0)  # the pre-clip norm
    torch.testing.assert_close(a.grad, torch.tensor([1.5, 2.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.grad, torch.tensor([6.0]), atol=1e-5, rtol=0)
    assert clip_grad_norm([a, b], 100.0) == pytest.approx(6.5, abs=1e-4)  # below: unchanged
    torch.testing.assert_close(b.grad, torch.tensor([6.0]), atol=1e-5, rtol=0)
    assert clip_grad_norm([unused], 1.0) == 0.0


# ---------------------------------------------------------------- fp32 master weights


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def test_master_weights_bf16_layout_and_fp32_accumulation():
    net = small_net()
    original = {n: p.detach().clone() for n, p in net.named_parameters()}
    mw = MasterWeights(net, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    assert all(p.dtype == torch.float32 for p in mw.params())
    for name, master in mw.state_dict().items():
        assert torch.equal(master, original[name])  # exact fp32 copy, taken before the cast

    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 5, generator=gen).bfloat16() for _ in range(2)]
    # The two micro-batch gradients, computed independently in bf16.
    expected = [torch.zeros_like(m) for m in mw.params()]
    for x in xs:
        grads = torch.autograd.grad(net(x).float().pow(2).sum(), list(net.parameters()))
        for e, g in zip(expected, grads, strict=True):
            assert g.dtype == torch.bfloat16
            e += g.float()
    for x in xs:
        net(x).float().pow(2).sum().backward()
        mw.collect_grads()
        assert all(p.grad is None for p in net.parameters())  # moved into the master grads
    for master, e in zip(mw.params(), expected, strict=True):
        assert master.grad.dtype == torch.float32
        assert torch.equal(master.grad, e)  # summed in fp32, not in bf16

    opt = torch.optim.SGD(mw.params(), lr=0.1)
    opt.step()
    before = [p.detach().clone() for p in net.parameters()]
    mw.sync_to_model()
    for p, master, old in zip(net.parameters(), mw.params(), before, strict=True):
        assert torch.equal(p.detach(), master.detach().bfloat16())
        assert not torch.equal(p.detach(), old)
    mw.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    # The next step's first collect overwrites the (reused) master buffers instead of adding.
    x = xs[0]
    fresh = torch.autograd.grad(net(x).float().pow(2).sum(), list(net.parameters()))
    net(x).float().pow(2).sum().backward()
    mw.collect_grads()
    for master, g in zip(mw.params(), fresh, strict=True):
        assert torch.equal(master.grad, g.float())
    # A parameter that gets no gradient in a step has none in the master either (no stale one).
    mw.zero_grad()
    first = next(net.parameters())
    net(x).float().pow(2).sum().backward()
    first.grad = None
    mw.collect_grads()
    assert mw.params()[0].grad is None and mw.params()[1].grad is not None


def test_master_weights_fp32_is_a_no_op():
    net = small_net()
    mw = MasterWeights(net, torch.float32)
    assert all(m is p for m, p in zip(mw.params(), net.parameters(), strict=True))
    net(torch.randn(2, 5)).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    mw.collect_grads()
    mw.sync_to_model()
    for p, g in zip(net.parameters(), grads, strict=True):
        assert p.dtype == torch.float32 and torch.equal(p.grad, g)  # untouched


def test_master_weights_on_tiny_model_and_state_round_trip():
    model = tiny_model()
    mw = MasterWeights(model, torch.bfloat16)
    names = [n for n, _ in model.named_parameters()]
    assert mw.names == names and len(mw.params()) == len(names)
    state = {n: torch.full_like(t, 0.5) for n, t in mw.state_dict().items()}
    mw.load_state_dict(state)
    assert all((p == 0.5).all() and p.dtype == torch.bfloat16 for p in model.parameters())
    assert all((m == 0.5).all() for m in mw.params())
    del state[names[0]]
    with pytest.raises(KeyError, match="lacks trainable"):
        mw.load_state_dict(state)


# ---------------------------------------------------------------- precision policy


def test_resolve_precision_names(monkeypatch):
    assert resolve_precision("bf16").compute == torch.bfloat16
    assert resolve_precision("fp16").compute == torch.float16
    fp32 = resolve_precision("fp32")
    assert fp32.compute == torch.float32 and fp32.master == torch.float32 and not fp32.mixed
    assert resolve_precision("bf16").mixed and resolve_precision("bf16").master == torch.float32
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("int8")
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ())
    assert resolve_precision("auto", "cpu").compute == torch.float32
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ("amx_bf16",))
    auto = resolve_precision("auto", "cpu")
    assert auto.compute == torch.bfloat16 and "amx_bf16" in auto.reason


# ---------------------------------------------------------------- checkpoints


def make_training(seed=0):
    net = small_net(seed)
    opt = build_optimizer(net.parameters(), lr=0.05, weight_decay=0.1)
    sched = build_scheduler(opt, total_steps=6, warmup_ratio=0.5, schedule="cosine")
    return net, opt, sched


def train_step(net, opt, sched):
    """A step that consumes torch and Python randomness (so RNG restore matters)."""
    x = torch.randn(4, 5) * (1 + random.random())
    opt.zero_grad()
    net(x).pow(2).sum().backward()
    opt.step()
    sched.step()


def save(run_dir, net, opt, sched, step, **kw):
    state = TrainerState(
        step=step,
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        rng=capture_rng(),
        data={"epoch": 0, "batch": step},
        extra={"note": "x"},
    )
    return save_checkpoint(run_dir, dict(net.named_parameters()), state, **kw)


def test_resume_equals_uninterrupted(tmp_path):
    """2 steps + save + (restore in fresh objects) + 2 steps == 4 uninterrupted steps."""
    torch.manual_seed(123)
    random.seed(123)
    net, opt, sched = make_training()
    for _ in range(2):
        train_step(net, opt, sched)
    path = save(tmp_path, net, opt, sched, step=2)
    for _ in range(2):
        train_step(net, opt, sched)
    straight = {n: p.detach().clone() for n, p in net.named_parameters()}

    torch.manual_seed(999)  # different RNG state and weights in the fresh run
    random.seed(999)
    net2, opt2, sched2 = make_training(seed=7)
    assert latest_checkpoint(tmp_path) == path
    weights, state = load_checkpoint(path)
    assert state.step == 2 and state.data == {"epoch": 0, "batch": 2}
    assert state.extra == {"note": "x"}
    net2.load_state_dict(weights)
    opt2.load_state_dict(state.optimizer)
    sched2.load_state_dict(state.scheduler)
    restore_rng(state.rng)
    # Warmup round(0.5 * 6) = 3 steps: after 2 steps the factor is (2 + 1) / (3 + 1).
    assert sched2.get_last_lr() == pytest.approx([0.05 * 3 / 4] * 2)  # both param groups
    for _ in range(2):
        train_step(net2, opt2, sched2)
    for name, p in net2.named_parameters():
        assert torch.equal(p.detach(), straight[name]), name


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    net, opt, sched = make_training()
    first = save(tmp_path, net, opt, sched, step=1)
    root = tmp_path / "checkpoints"
    before = sorted(p.name for p in root.iterdir())

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, net, opt, sched, step=2)
    assert sorted(p.name for p in root.iterdir()) == before == ["latest", "step-00000001"]
    assert (root / "latest").read_text().strip() == "step-00000001"
    assert latest_checkpoint(tmp_path) == first
    weights, state = load_checkpoint(first)
    assert state.step == 1 and set(weights) == {n for n, _ in net.named_parameters()}


def test_keep_last_prunes_oldest(tmp_path):
    net, opt, sched = make_training()
    for step in range(1, 5):
        save(tmp_path, net, opt, sched, step=step, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000003", "step-00000004"]
    assert latest_checkpoint(tmp_path) == root / "step-00000004"
    for step in range(5, 8):
        save(tmp_path, net, opt, sched, step=step, keep_last=None)
    assert len(list(root.glob("step-*"))) == 5


def test_keep_last_never_deletes_the_checkpoint_just_saved(tmp_path):
    net, opt, sched = make_training()
    save(tmp_path, net, opt, sched, step=4, keep_last=None)
    path = save(tmp_path, net, opt, sched, step=3, keep_last=1)
    assert latest_checkpoint(tmp_path) == path


def test_missing_or_incomplete_checkpoints(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    root = tmp_path / "checkpoints"
    (root / "step-00000009").mkdir(parents=True)
    (root / "latest").write_text("step-00000009\n")
    assert latest_checkpoint(tmp_path) is None  # points at an incomplete directory
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(root / "step-00000009")


def test_rng_restore_reproduces_random_numbers():
    state = capture_rng()
    first = (torch.rand(5), random.random())
    second = (torch.rand(5), random.random())
    assert not torch.equal(first[0], second[0])  # control: the generators moved on
    restore_rng(state)
    again = (torch.rand(5), random.random())
    assert torch.equal(again[0], first[0]) and again[1] == first[1]


@settings(max_examples=50, deadline=None)
@given(
    total=st.integers(1, 200),
    warmup_frac=st.floats(0, 0.5),
    schedule=st.sampled_from(["linear", "cosine", "constant"]),
)
def test_property_lr_factor_bounded_and_monotone(total, warmup_frac, schedule):
    """Factors lie in (0, 1] during warmup and [0, 1] after; warmup rises, decay never rises."""
    warmup = int(warmup_frac * total)
    f = [lr_factor(s, total_steps=total, warmup_steps=warmup, schedule=schedule)
         for s in range(total + 2)]  # fmt: skip
    assert all(0 < x <= 1 for x in f[:warmup]) and all(0 <= x <= 1 for x in f)
    assert all(a < b for a, b in itertools.pairwise(f[: warmup + 1]))
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(f[warmup:]))
    if schedule != "constant":
        assert f[total] == pytest.approx(0.0, abs=1e-12)


def test_atomic_directory_replaces_or_keeps(tmp_path):
    from rlhfkit.atomic import atomic_directory

    target = tmp_path / "out"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "1"  # the old complete version survives
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left behind


def test_master_weights_cast_parameters_but_not_buffers():
    from rlhfkit.models.tiny import tiny_model

    model = tiny_model()
    MasterWeights(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE frequencies stay exact
