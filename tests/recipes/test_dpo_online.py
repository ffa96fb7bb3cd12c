"""Iterative (online) DPO, the reward-function plumbing it labels with, and the sampled KL.

Exact properties: with ``reference=round`` the policy equals the reference at the first step of
every round, so the DPO loss there is log 2 (fp32); with ``reference=initial`` only the first
round starts at log 2. An interrupted run resumed at its last round ends with the same weights as
an uninterrupted one. The sampled KL of a model against itself is exactly 0. Rounds, the gold
comparison and the KL samples all sample with the rollout Generator (as RL and eval do).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import GenerationMixin

from rlhfkit.config import from_dict
from rlhfkit.data.prompts import conversation_rows
from rlhfkit.data.templates import render_messages, render_prompt
from rlhfkit.eval.kl import sampled_kl, sequence_kl
from rlhfkit.eval.run import sample_grid
from rlhfkit.models.heads import score_examples
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.recipes import dpo_eval, dpo_online
from rlhfkit.rewards import load_reward_fn, score_completions
from rlhfkit.rewards.model import RewardModelScorer
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.sampler import HFGenerator, chat_generator

REWARD_FILE = '''
def vowels(completion, prompt):
    """Reward: share of vowels in the completion (deterministic, varied across samples)."""
    text = completion.lower()
    return sum(ch in "aeiou" for ch in text) / max(len(text), 1)


def with_kwargs(completion, **fields):
    return float(len(fields))
'''


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reward") / "my_reward.py"
    path.write_text(REWARD_FILE)
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    rows = [
        {"prompt": f"Say something about {i}.", "chosen": f"{i} is nice.", "rejected": "No."}
        for i in range(12)
    ]
    path = tmp_path_factory.mktemp("online") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir, data, run_dir, reward, **online) -> dpo_online.OnlineDPOConfig:
    return from_dict(
        dpo_online.OnlineDPOConfig,
        {
            "model": {"name": str(model_dir), "precision": "fp32"},
            "data": {"train": str(data), "eval": None},
            "optim": {"lr": 1e-3, "warmup_ratio": 0.0, "schedule": "constant"},
            "loop": {"batch_size": 4},
            "log": {"run_dir": str(run_dir), "progress": False, "tensorboard": False},
            "eval": {"win_rate": False, "kl_prompts": 0},
            "online": {
                "reward": reward, "rounds": 2, "prompts_per_round": 6, "num_samples": 3,
                "max_new_tokens": 12, "steps_per_round": 1, "temperature": 1.0, **online,
            },
        },
    )  # fmt: skip


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Rewards


def test_module_function_and_file_rewards(reward_file):
    fn = load_reward_fn(f"{reward_file}:vowels")
    fields = [{"prompt": "p", "reference": "unused"}] * 2
    assert score_completions(fn, ["aa", "bb"], fields) == [1.0, 0.0]
    kw = load_reward_fn(f"{reward_file}:with_kwargs")
    assert score_completions(kw, ["x"], [{"prompt": "p", "a": 1}]) == [2.0]
    gold = load_reward_fn("rlhfkit.data.tasks.preferences:gold_score")
    out = score_completions(
        gold, ["Add.\nAnswer: 4"], [{"reference": "x\nAnswer: 4", "prompt": []}]
    )
    assert out == [pytest.approx(1.3)]


def test_bad_reward_specs_and_values_are_named(reward_file, tmp_path):
    with pytest.raises(ValueError, match="module:function"):
        load_reward_fn("no_colon")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        load_reward_fn(f"{reward_file}:missing".replace(str(reward_file), "json"))
    with pytest.raises(FileNotFoundError, match=r"nope\.py"):
        load_reward_fn(f"{tmp_path}/nope.py:f")
    with pytest.raises(ValueError, match="completion 1"):
        score_completions(lambda c: None if c == "a" else float("nan"), ["a", "b"], [{}, {}])


def test_reward_model_scorer_scores_in_order(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir), task="score")
    model.save_pretrained(tmp_path / "rm")
    load_tokenizer(str(tiny_model_dir)).save_pretrained(tmp_path / "rm")
    scorer = load_reward_fn(f"rm:{tmp_path / 'rm'}", precision="fp32")
    assert isinstance(scorer, RewardModelScorer)
    prompt = [{"role": "user", "content": "Hi there"}]
    completions = ["a much longer reply than the other", "short", ""]
    got = score_completions(scorer, completions, [{"prompt": prompt}] * 3)
    assert got[2] is None  # nothing scorable
    for text, value in zip(completions[:2], got, strict=False):
        seq = render_messages(
            scorer.tokenizer, [*prompt, {"role": "assistant", "content": text}],
            truncation="left_prompt",
        )  # fmt: skip
        expected = score_examples(scorer.model, [seq], packing=scorer.packing, pad_id=0)[0, 0]
        assert value == pytest.approx(float(expected), abs=1e-5)
    assert scorer("short", prompt=prompt) == pytest.approx(got[1], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Round construction


def test_best_vs_worst_pairs_ties_and_skips():
    fields = {"prompt": [{"role": "user", "content": "q"}], "location": "f:1"}
    group = dpo_online.best_vs_worst(fields, ["a", "b", "c", "d"], [0.5, 2.0, None, -1.0], 0.0)
    assert [c[0]["content"] for c in group.completions] == ["b", "d"]
    assert group.scores == [2.0, -1.0] and group.margin == 3.0
    assert dpo_online.best_vs_worst(fields, ["a", "b"], [1.0, 1.0], 0.0) is None
    assert dpo_online.best_vs_worst(fields, ["a", "b"], [1.0, 1.5], 0.5) is None
    assert dpo_online.best_vs_worst(fields, ["a", "b", "c"], [1.0, None, None], 0.0) is None
    assert dpo_online.best_vs_worst(fields, ["a", " "], [1.0, 0.0], 0.0) is None  # empty reply


def test_round_prompts_cycle_through_every_prompt():
    prompts = [{"prompt": i} for i in range(5)]
    first_pass = [p["prompt"] for k in range(5) for p in dpo_online.pick_prompts(prompts, k, 1, 3)]
    assert sorted(first_pass) == list(range(5))
    again = [p["prompt"] for p in dpo_online.pick_prompts(prompts, 0, 7, 3)]
    assert again == [p["prompt"] for p in dpo_online.pick_prompts(prompts, 0, 7, 3)]
    assert sorted(again[:5]) == list(range(5))


# ---------------------------------------------------------------------------------------------
# The recipe


def _first_losses(run_dir: Path) -> list[float]:
    return [m["train/loss"] for m in _metrics(run_dir) if "train/loss" in m]


@pytest.mark.parametrize("reference", ["round", "initial"])
def test_rounds_anchor_to_the_chosen_reference(
    tiny_model_dir, prompts_file, reward_file, tmp_path, reference
):
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, prompts_file, run, f"{reward_file}:vowels", reference=reference)
    dpo_online.main(cfg)
    losses = _first_losses(run)
    assert len(losses) == 2
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    if reference == "round":
        assert losses[1] == pytest.approx(math.log(2), abs=1e-5)
    else:
        assert abs(losses[1] - math.log(2)) > 1e-3
    rounds = [m for m in _metrics(run) if "online/round" in m]
    assert [m["online/round"] for m in rounds] == [1.0, 2.0]
    assert all(m["online/pairs"] + m["online/ties"] == 6 for m in rounds)
    assert rounds[0]["online/reward_chosen"] > rounds[0]["online/reward_rejected"]
    records = (run / "rounds" / "round-001.jsonl").read_text().splitlines()
    assert len(records) == 6 and len(json.loads(records[0])["completions"]) == 3
    assert (run / "final" / "model.safetensors").exists()


def test_resume_at_last_round_matches_uninterrupted(
    tiny_model_dir, prompts_file, reward_file, tmp_path, monkeypatch
):
    reward = f"{reward_file}:vowels"
    dpo_online.main(_cfg(tiny_model_dir, prompts_file, tmp_path / "a", reward))
    real = dpo_online.sample_round

    def crash_in_round_two(ctx, cfg, fn, prompts, k, generator=None):
        if k == 1:
            raise KeyboardInterrupt
        return real(ctx, cfg, fn, prompts, k, generator)

    monkeypatch.setattr(dpo_online, "sample_round", crash_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        dpo_online.main(_cfg(tiny_model_dir, prompts_file, tmp_path / "b", reward))
    monkeypatch.setattr(dpo_online, "sample_round", real)
    cfg = _cfg(tiny_model_dir, prompts_file, tmp_path / "b", reward)
    cfg.loop.resume = True
    dpo_online.main(cfg)
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_online_settings_are_rejected(tiny_model_dir, prompts_file, reward_file, tmp_path):
    cfg = _cfg(tiny_model_dir, prompts_file, tmp_path / "r", f"{reward_file}:vowels", num_samples=1)
    with pytest.raises(ValueError, match="num_samples >= 2"):
        dpo_online.main(cfg)


# ---------------------------------------------------------------------------------------------
# Sampled KL


def test_sampled_kl_of_a_model_against_itself_is_zero(tiny_model_dir):
    model = load_model(str(tiny_model_dir), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = [[{"role": "user", "content": f"Tell me {i}"}] for i in range(3)]
    same = sampled_kl(model, contextlib.nullcontext(model), tokenizer, prompts, max_new_tokens=8)
    assert same["samples"] == 3 and same["k1"] == 0.0 and same["k3"] == 0.0
    other = load_model(str(tiny_model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kl = sampled_kl(model, contextlib.nullcontext(other), tokenizer, prompts, max_new_tokens=8)
    assert kl["k3"] > 0


def test_sequence_kl_sums_per_sequence():
    logprobs = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -2.0, -1.0])
    out = sequence_kl(logprobs, ref, torch.tensor([0, 0, 1]), 2)
    assert out["k1"].tolist() == pytest.approx([0.5, 0.5])
    k3 = math.expm1(-0.5) + 0.5
    assert out["k3"].tolist() == pytest.approx([k3, k3])


def test_sampled_kl_agrees_with_exact_kl_for_one_token(tiny_model_dir):
    """One sampled token per prompt: the sample mean of k1 and k3 estimates the exact KL over the
    vocabulary at the prompt's last position (within 4 standard errors; seeded)."""
    from rlhfkit.eval.kl import sample_sequences, sequence_kl, token_logprobs
    from rlhfkit.ops.kl import full_kl

    tokenizer = load_tokenizer(str(tiny_model_dir))
    policy = load_model(str(tiny_model_dir), dtype=torch.float64).eval()
    reference = load_model(str(tiny_model_dir), dtype=torch.float64).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.3 * torch.randn_like(p))
    prompt = [{"role": "user", "content": "Hello"}]
    samples = sample_sequences(policy, tokenizer, [prompt] * 600, max_new_tokens=1, seed=5)
    assert all(sum(s.loss_mask) == 1 for s in samples)
    logprobs, owners = token_logprobs(policy, samples, pad_id=0)
    ref, _ = token_logprobs(reference, samples, pad_id=0)
    kl = sequence_kl(logprobs, ref, owners, len(samples))
    ids = torch.tensor([samples[0].input_ids[:-1]])
    with torch.no_grad():
        exact = float(full_kl(policy(ids).logits[0, -1], reference(ids).logits[0, -1]))
    for name in ("k1", "k3"):
        values = kl[name]
        stderr = float(values.std()) / math.sqrt(len(values))
        assert abs(float(values.mean()) - exact) < 4 * stderr + 1e-9, (name, exact)


# ---------------------------------------------------------------------------------------------
# Sampling: every sample comes from the rollout Generator, never from transformers' generate


@pytest.fixture()
def no_hf_generate(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("sampled with transformers' generate instead of the Generator")

    monkeypatch.setattr(GenerationMixin, "generate", refuse)


def test_round_samples_are_the_generators(
    tiny_model_dir, prompts_file, reward_file, tmp_path, no_hf_generate
):
    """Round 1 samples the starting policy: its completions are exactly sample_grid's with
    chat_generator on the starting model, at the round's seed."""
    cfg = _cfg(tiny_model_dir, prompts_file, tmp_path / "run", f"{reward_file}:vowels", rounds=1)
    dpo_online.main(cfg)
    lines = (tmp_path / "run" / "rounds" / "round-001.jsonl").read_text().splitlines()
    model = load_model(str(tiny_model_dir), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    chosen = dpo_online.pick_prompts(dpo_online.round_prompts(cfg), 0, 6, cfg.loop.seed)
    rows = conversation_rows(tokenizer, [p["prompt"] for p in chosen])
    sampling = SamplingConfig(
        max_new_tokens=12, temperature=1.0, num_samples=3, seed=cfg.loop.seed * 1_000_003
    )
    expected = sample_grid(chat_generator(model, tokenizer), tokenizer, rows, sampling).texts
    assert [json.loads(line)["completions"] for line in lines] == expected


def test_gold_replies_are_greedy_generator_decodes(tiny_model_dir, monkeypatch):
    """The gold comparison's greedy replies are what transformers' greedy generate gives (the
    sampler it replaced), token for token, though sampled with the Generator."""
    model = load_model(str(tiny_model_dir), dtype=torch.float32).train()
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the tiny model's own greedy replies are blank lines
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=noise))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    ctx = SimpleNamespace(model=model, tokenizer=tokenizer, dist=SimpleNamespace(is_main=True))
    cfg = SimpleNamespace(
        eval=SimpleNamespace(win_rate=True, prompts=3, max_new_tokens=10),
        data=SimpleNamespace(eval=dpo_eval.GOLD_SOURCE),
    )
    prompts, _ = dpo_eval.gold_prompts(3)
    expected = []
    for ids in (render_prompt(tokenizer, p) for p in prompts):
        out = model.generate(
            input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=10,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )[0, len(ids) :]  # fmt: skip
        expected.append(tokenizer.decode(out, skip_special_tokens=True).strip())
    monkeypatch.setattr(GenerationMixin, "generate", lambda *a, **k: pytest.fail("HF generate"))
    before = dpo_eval.gold_comparison(ctx, cfg, None)
    assert before == {"replies": expected} and all(expected)
    assert model.training  # put back in training mode
    after = dpo_eval.gold_comparison(ctx, cfg, before)
    assert after["summary"]["win_rate"] == pytest.approx(0.5)  # the same replies tie


def test_kl_samples_are_the_generators_per_chunk(tiny_model_dir, no_hf_generate):
    """sample_sequences: each chunk of prompts is one Generator call (T = 1, untruncated) seeded
    with seed + its first index; equal prompts in two chunks get their own samples."""
    from rlhfkit.eval.kl import sample_sequences

    model = load_model(str(tiny_model_dir), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = [[{"role": "user", "content": "Hello"}]] * 3
    got = sample_sequences(model, tokenizer, prompts, max_new_tokens=6, seed=4, batch_size=2)
    ids = render_prompt(tokenizer, prompts[0])
    generator = chat_generator(model, tokenizer)
    expected = []
    for start, n in ((0, 2), (2, 1)):
        sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=4 + start)
        expected += generator.generate([ids] * n, sampling).completion_ids
    assert [e.input_ids for e in got] == [ids + c for c in expected]
    assert [e.loss_mask for e in got] == [[False] * len(ids) + [True] * len(c) for c in expected]
    assert got[0].input_ids != got[2].input_ids  # same prompt, first row of each chunk


def test_top_k_zero_means_no_truncation():
    """transformers falls back to generation_config.top_k (50) when top_k is None; the Generator
    takes top_k 0 as "no limit" and samples from the whole vocabulary."""
    logits = torch.zeros(6000, 300)  # flat: each draw is uniform over 300 tokens
    tokens, _, _ = HFGenerator._sample(
        logits, SamplingConfig(temperature=1.0), torch.Generator().manual_seed(0)
    )
    assert len(set(tokens.tolist())) == 300
    ranked = -torch.arange(300.0).repeat(6000, 1) / 100  # token i has logit -i / 100
    capped, _, _ = HFGenerator._sample(
        ranked, SamplingConfig(temperature=1.0, top_k=50), torch.Generator().manual_seed(0)
    )
    assert int(capped.max()) < 50
