"""The direct-alignment recipe on the tiny model.

Golden values: at the first step the policy equals the reference, so every reference-based
DPO-family loss takes its initial value (DPO: log 2 for every pair). Reference log-probs are
checked against ``completion_logprobs`` (the one shift function) one sequence at a time, and the
cache against a fresh computation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhfkit.config import from_dict
from rlhfkit.models.forward import completion_logprobs
from rlhfkit.recipes import dpo
from rlhfkit.training.accumulate import accumulate
from rlhfkit.training.reference import cached_reference, compute_reference
from rlhfkit.training.run import build_run


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    rows = []
    for i in range(24):
        rows.append(
            {
                "prompt": f"What is {i} + {i}?",
                "chosen": f"It is {2 * i}.",
                "rejected": f"I think it might be {2 * i + 1}, or not.",
            }
        )
    path = tmp_path_factory.mktemp("dpo") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir: Path, data: Path, run_dir: Path, loss: str = "dpo", **loop) -> dpo.DPOConfig:
    return from_dict(
        dpo.DPOConfig,
        {
            "model": {"name": str(model_dir), "precision": "fp32"},
            "data": {"train": str(data), "eval": str(data)},
            "algo": {"loss": loss},
            "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
            "loop": {"batch_size": 8, "max_steps": 3, **loop},
            "log": {"run_dir": str(run_dir), "progress": False, "tensorboard": False},
            "eval": {"win_rate": False},
        },
    )


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_reference_sums_equal_completion_logprobs(tiny_model_dir, pairs_file, tmp_path, cache):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "run")
    ctx = build_run(cfg.model, cfg.log, 0, {})
    pairs, _ = dpo.load_pairs(ctx.tokenizer, str(pairs_file), "train", cfg, 0)
    for share_prefix in (True, False):
        sums, tokens = compute_reference(
            ctx.model, pairs, max_tokens=256, packing=True, pad_id=ctx.pad_id,
            share_prefix=share_prefix,
        )  # fmt: skip
        for g, group in enumerate(pairs[:5]):
            for k, seq in enumerate(group.sequences):
                p = seq.loss_mask.index(True)
                with torch.no_grad():
                    lp = completion_logprobs(
                        ctx.model, torch.tensor([seq.input_ids[:p]]),
                        torch.ones(1, p, dtype=torch.long), torch.tensor([seq.input_ids[p:]]),
                        torch.ones(1, len(seq.input_ids) - p, dtype=torch.long),
                    )  # fmt: skip
                labelled = torch.tensor(seq.loss_mask[p:])  # reply + end of turn, not the "\n"
                assert float(sums[g, k]) == pytest.approx(float(lp[0][labelled].sum()), abs=1e-4)
                assert int(tokens[g, k]) == seq.num_loss_tokens


def test_reference_cache_hit_and_invalidation(tiny_model_dir, pairs_file, tmp_path, cache):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "run")
    ctx = build_run(cfg.model, cfg.log, 0, {})
    pairs, _ = dpo.load_pairs(ctx.tokenizer, str(pairs_file), "train", cfg, 0)
    kw = {"max_tokens": 256, "packing": True, "pad_id": ctx.pad_id, "share_prefix": True}
    first, _, hit1 = cached_reference(ctx.model, pairs, **kw)
    again, _, hit2 = cached_reference(ctx.model, pairs, **kw)
    assert (hit1, hit2) == (False, True) and torch.equal(first, again)
    cfg.data.max_len = 12  # another tokenisation: other ids, so another key
    short, _ = dpo.load_pairs(ctx.tokenizer, str(pairs_file), "train", cfg, 0)
    assert cached_reference(ctx.model, short, **kw)[2] is False
    with torch.no_grad():
        next(ctx.model.parameters()).add_(0.01)  # another model
    assert cached_reference(ctx.model, pairs, **kw)[2] is False


@pytest.mark.parametrize(
    ("loss", "expected"),
    [("dpo", math.log(2)), ("cdpo", math.log(2)), ("ipo", 25.0), ("apo_zero", 1.0),
     ("kto", 0.5)],
)  # fmt: skip
def test_first_step_loss_at_policy_equal_reference(
    tiny_model_dir, pairs_file, tmp_path, cache, loss, expected
):
    """h = 0 at the start: DPO and cDPO log 2, IPO (1/(2 beta))^2 = 25, APO-zero 1 - 1/2 + 1/2
    = 1, KTO lambda (1 - sigma(0)) = 0.5 (z0 = max(0, mean rejected log-ratio) = 0)."""
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "run", loss)
    ctx = build_run(cfg.model, cfg.log, 0, {})
    ctx.packing = True
    train, _, _ = dpo.prepare(ctx, cfg)
    step_loss = dpo.make_step_loss(ctx.model, cfg.algo)
    batches = train.micro_batches(list(range(8)), 128)
    stats = accumulate(batches, step_loss, count_fn=dpo.example_count(cfg.algo), backward=False)
    assert len(batches) > 1 and stats.loss == pytest.approx(expected, abs=1e-5)


def test_gradient_independent_of_micro_batch_split(tiny_model_dir, pairs_file, tmp_path, cache):
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "run")
    ctx = build_run(cfg.model, cfg.log, 0, {})
    ctx.packing = True
    train, _, _ = dpo.prepare(ctx, cfg)
    with torch.no_grad():  # move away from the reference so the gradient is not trivial
        for p in ctx.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    grads = []
    for budget in (4096, 64):
        ctx.model.zero_grad()
        accumulate(
            train.micro_batches(list(range(12)), budget),
            dpo.make_step_loss(ctx.model, cfg.algo), count_fn=dpo.example_count(cfg.algo),
        )  # fmt: skip
        grads.append([p.grad.clone() for p in ctx.model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("loss", ["dpo", "simpo", "orpo", "kto", "rpo", "odpo", "apo_down"])
def test_every_loss_trains_and_saves(tiny_model_dir, pairs_file, tmp_path, cache, loss):
    run = dpo.main(_cfg(tiny_model_dir, pairs_file, tmp_path / loss, loss))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in lines if "train/loss" in m]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert (run / "final" / "config.json").exists() and (run / "eval.json").exists()
    reference_free = dpo.PREFERENCE_LOSSES[loss].reference_free
    assert (cache / "reference").exists() != reference_free  # no reference pass if not needed


def test_dpo_raises_heldout_accuracy(tiny_model_dir, pairs_file, tmp_path, cache):
    run = dpo.main(_cfg(tiny_model_dir, pairs_file, tmp_path / "learn", max_steps=6))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "eval/rewards/margin" in m]
    assert evals[0]["eval/rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert evals[-1]["eval/rewards/margin"] > 0.05 and evals[-1]["eval/loss"] < math.log(2)


def test_lora_reference_is_the_base_model(tiny_model_dir, pairs_file, tmp_path, cache):
    """With LoRA the reference pass disables the adapter: equal to the plain model's sums even
    after the adapter has changed."""
    cfg = _cfg(tiny_model_dir, pairs_file, tmp_path / "run")
    cfg.model.lora, cfg.model.lora_r = True, 4
    ctx = build_run(cfg.model, cfg.log, 0, {})
    pairs, _ = dpo.load_pairs(ctx.tokenizer, str(pairs_file), "train", cfg, 0)
    kw = {"max_tokens": 256, "packing": True, "pad_id": ctx.pad_id, "share_prefix": True}
    base, _ = compute_reference(ctx.model, pairs, **kw)
    with torch.no_grad():
        for name, p in ctx.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    again, _ = compute_reference(ctx.model, pairs, **kw)
    torch.testing.assert_close(again, base, atol=1e-5, rtol=0)


def test_rpo_nll_only_on_pairs_with_the_margin(tiny_model_dir, tmp_path, cache):
    """At policy = reference RPO is log 2 + alpha * mean(w * NLL): with no pair's margin at the
    threshold only log 2 is left, with every pair's it is plain RPO, and half the pairs give a
    value in between; a threshold on another loss is a config problem."""
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": f"It is {2 * i}.",
             "rejected": f"Maybe {2 * i + 1}.", "margin": 1.0 if i % 2 else 0.25}
            for i in range(8)]  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for gate in (None, 0.1, 0.5, 2.0):
        cfg = _cfg(tiny_model_dir, data, tmp_path / "run", "rpo")
        cfg.algo.rpo_nll_min_margin = gate
        ctx = build_run(cfg.model, cfg.log, 0, {})
        ctx.packing = True
        train, _, _ = dpo.prepare(ctx, cfg)
        batches = train.micro_batches(list(range(8)), 4096)
        step_loss = dpo.make_step_loss(ctx.model, cfg.algo)
        losses[gate] = accumulate(batches, step_loss, count_fn=dpo.example_count(cfg.algo),
                                  backward=False).loss  # fmt: skip
    assert losses[2.0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[0.1] == pytest.approx(losses[None], abs=1e-6)
    assert losses[2.0] < losses[0.5] < losses[None]
    assert dpo.DPOAlgoConfig(loss="dpo", rpo_nll_min_margin=0.5).problems() == [
        ("rpo_nll_min_margin", "applies to loss rpo only, not dpo")
    ]
